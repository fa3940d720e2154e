"""The report of ``python -m tools bench``: ``results.md`` (tables) and ``bench.png``
(chart), both rendered from the report dict that is also written as ``results.json``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from tools.benchmark.inputs import SETS
from tools.benchmark.worker import ALL_SYSTEMS

SET_LABELS = {"short": "<=32 tokens, 1 blank", "long": "~128 tokens, 1 blank", "short_4": "<=32 tokens, 4-char blank"}


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _mb(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def _header_lines(report: dict[str, Any]) -> list[str]:
    """Date, command, machine, versions, contention and what each system does."""
    m = report["machine"]
    return [
        "# Benchmark: PyTorch pipeline vs plain ONNX Runtime FP32 vs this runtime (INT8)",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m.get('cpu_model')} ({m.get('cpu_mhz')} MHz reported), {m.get('usable_cpus')} usable cores"
        f"{' (virtual machine)' if m.get('hypervisor') else ''}, {m.get('memory_gb')} GB RAM; SIMD: "
        f"{', '.join(m.get('simd', []))}",
        f"- Threads per system: {m['threads']} (each system in its own process, pinned to {m['threads']} core(s))",
        f"- Versions: onnxruntime {m.get('onnxruntime_version')}, torch {m.get('torch_version')}, "
        f"transformers {m.get('transformers_version')}, Python {m.get('python')}",
        f"- Load at start: {_fmt(report['contention_start']['loadavg'][0], 2)} (1-min average); other heavy "
        f"processes: {', '.join(report['contention_start']['other_heavy_processes']) or 'none'}",
        f"- Inputs: {report['inputs']['source']}; {report['settings']['iterations']} timed queries per system "
        f"and input set (distinct sentences), after {report['settings']['warmup']} warm-up queries.",
        "- `ours` runs with the response cache off and a batch window of "
        f"{report['settings']['ours_window_ms']} ms (a lone query has nothing to wait for; the served default "
        "is 2 ms, measured in the load test). Plain ORT uses ONNX Runtime's default session options "
        "(thread spinning on); ours spins only while a query runs (`--spin query`: nothing between queries).",
        "- 4-character blank: the pipeline and plain ORT make one pass and return disjoint per-position "
        "top-5 lists (what their users get); ours ranks whole 4-character candidates by joint probability "
        "(left-to-right beam search, beam 5: 4 session runs, 16 rows), so it does more work by design.",
        "",
    ]


def _timing_lines(model: dict[str, Any]) -> list[str]:
    """A model's latency table: each system on each input set, with the ratios."""
    lines: list[str] = []
    lines += [f"## {model['label']}", ""]
    if model.get("random_init"):
        lines += ["**Random weights**: speed, memory and size depend on the architecture only; the "
                  "answers (and the agreement figures) of this model are meaningless.", ""]
    if model.get("note"):
        lines += [f"Note: {model['note']}", ""]
    lines += ["| system | input | median ms | p99 ms | vs pipeline | vs ORT FP32 |",
              "|---|---|---:|---:|---:|---:|"]
    systems = model["systems"]
    for name in SETS:
        for system in ALL_SYSTEMS:
            data = systems.get(system, {}).get("sets", {}).get(name)
            if not data:
                continue
            pipe = systems.get("pipeline", {}).get("sets", {}).get(name, {}).get("median_ms")
            ort_ = systems.get("ort-fp32", {}).get("sets", {}).get(name, {}).get("median_ms")
            med = data["median_ms"]
            lines.append(
                f"| {system} | {SET_LABELS[name]} (avg {data['mean_tokens']:.0f} tok) | {med:.1f} | "
                f"{data['p99_ms']:.1f} | {_fmt(pipe / med if pipe else None, 1, 'x')} | "
                f"{_fmt(ort_ / med if ort_ else None, 1, 'x')} |")
    return lines


def _memory_lines(model: dict[str, Any]) -> list[str]:
    """A model's memory, file size and cold start per system."""
    systems = model["systems"]
    lines: list[str] = []
    lines += ["", "| system | RSS after load | RSS after run | peak RSS | model file | cold start (median of fresh launches) |",
              "|---|---:|---:|---:|---:|---:|"]
    for system in ALL_SYSTEMS:
        data = systems.get(system)
        if not data:
            continue
        if "error" in data:
            lines.append(f"| {system} | failed: {data['error'][:200]} | | | | |")
            continue
        cold = data.get("cold_start", {}).get("median", data.get("cold_start_s"))
        lines.append(f"| {system} | {_fmt(data.get('rss_loaded_mb'), 0, ' MB')} | "
                     f"{_fmt(data.get('rss_after_run_mb'), 0, ' MB')} | {_fmt(data.get('peak_rss_mb'), 0, ' MB')} | "
                     f"{_mb(data.get('model_file_bytes'))} | {_fmt(cold, 2, ' s')} |")
    return lines


def _agreement_lines(model: dict[str, Any]) -> list[str]:
    """How the quantized bundles' answers agree with the FP32 model's."""
    lines: list[str] = []
    agree = model.get("agreement")
    if agree and "top1_agreement" in agree:
        lines += ["", f"INT8 bundle (engine answers, model alone: no word LM or memory) vs plain FP32 model on {agree['masked_positions']} "
                      "held-apart single-character blanks (a row per other quantization after the first):", "",
                  "| top-1 agreement | top-5 overlap | top-1 agr. within kept vocab | top-5 overlap within kept vocab "
                  "| FP32 top-1 accuracy | INT8 top-1 accuracy | vocab FP32 → bundle |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {100 * agree['top1_agreement']:.1f}% | {100 * agree['top5_overlap']:.1f}% | "
                  f"{100 * agree['top1_agreement_kept_vocab']:.1f}% | {100 * agree['top5_overlap_kept_vocab']:.1f}% | "
                  f"{100 * agree['fp32_top1_accuracy']:.1f}% | {100 * agree['ours_top1_accuracy']:.1f}% | "
                  f"{agree['fp32_vocab']} → {agree['bundle_vocab']} |"]
        for system, other in (model.get("agreement_variants") or {}).items():
            if "top1_agreement" in other:
                lines.append(f"| {100 * other['top1_agreement']:.1f}% | {100 * other['top5_overlap']:.1f}% | "
                             f"{100 * other['top1_agreement_kept_vocab']:.1f}% | "
                             f"{100 * other['top5_overlap_kept_vocab']:.1f}% | "
                             f"{100 * other['fp32_top1_accuracy']:.1f}% | {100 * other['ours_top1_accuracy']:.1f}% "
                             f"({system}) | {other['fp32_vocab']} → {other['bundle_vocab']} |")
        if model.get("random_init"):
            lines.append("\n(Random weights: near-uniform logits, so agreement here mostly measures noise, "
                         "not quantization quality.)")
        common = agree.get("fp32_top1_most_common") or []
        if common:
            share = common[0][1] / agree["masked_positions"]
            lines.append(f"\nFP32 top-1 answers: {agree['fp32_top1_distinct']} distinct; most common "
                         + ", ".join(f"'{t}' x{c}" for t, c in common) + ".")
            if share > 0.3:
                lines.append(f"**Caution**: the FP32 model answers '{common[0][0]}' for {100 * share:.0f}% of "
                             "the blanks; agreement between two copies of a model this undecided is inflated "
                             "and says little about INT8 quality on a well-trained model.")
    elif agree:
        lines += ["", f"Agreement: failed: {agree.get('error')}"]
    return lines


def _load_lines(report: dict[str, Any]) -> list[str]:
    """The HTTP load test tables, one per served model."""
    m = report["machine"]
    lines: list[str] = []
    for load in (report.get("load") or {}).values():
        lines += [f"## HTTP load test ({load['model']})", "",
                  f"`python -m edge serve` on loopback, cache off, distinct sentences (<=32 tokens, one blank), "
                  f"open-loop arrivals at fixed rates for {load['seconds']} s each; latency from the scheduled send "
                  f"time. The load generator runs on the same {m.get('usable_cpus')} cores as the server, "
                  f"which runs at nice +5 so that the generator, standing for clients on other machines, "
                  f"sends on time; `late p99` is how late it still sent (client side).", "",
                  "p50/p99 are of the answered requests; `shed` are the 503 `overloaded` refusals of the "
                  "admission gate, with how fast they came back. `HTTP − engine` is the median over the "
                  "answered requests of each one's round trip (a fresh connection each) minus the engine time "
                  "its answer reports (`elapsed_ms`); past capacity it includes the wait in the admission line.", "",
                  "| config | offered req/s | achieved req/s | p50 ms | p99 ms | shed (p99 ms) | errors "
                  "| HTTP − engine p50 ms | late p99 ms | server RSS before → after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, entry in load["results"].items():
            if "error" in entry:
                lines.append(f"| {name} | failed: {entry['error'][:200]} | | | | | | | | |")
                continue
            for r in entry["rates"]:
                shed = f"{r.get('shed', 0)} ({r['shed_p99_ms']:.0f})" if r.get("shed") else "0"
                lines.append(f"| {name} | {r['offered_rps']:g} | {r['achieved_rps']:.1f} | {r['p50_ms']:.1f} | "
                             f"{r['p99_ms']:.1f} | {shed} | {r['errors']} | "
                             f"{_fmt(r.get('http_overhead_p50_ms'), 2)} | {_fmt(r.get('send_lag_p99_ms'), 1)} | "
                             f"{_fmt(r['server_rss_before_mb'], 0)} → "
                             f"{_fmt(r['server_rss_after_mb'], 0)} MB |")
        for name, entry in load["results"].items():
            if "rss_before_mb" in entry:
                growth = (entry.get("rss_after_mb") or 0) - (entry.get("rss_before_mb") or 0)
                lines.append(f"\n- {name}: `python {shlex.join(entry['command'][1:])}`; server RSS after warm-up "
                             f"{_fmt(entry['rss_before_mb'], 0)} MB, after all rates {_fmt(entry.get('rss_after_mb'), 0)} MB "
                             f"(growth {growth:+.0f} MB)")
        lines.append("")
    return lines


def _estimate_lines(report: dict[str, Any]) -> list[str]:
    """The paper estimate for Raspberry Pi 4 / Pi 5."""
    lines: list[str] = []
    flops = report.get("estimates")
    if flops:
        host = flops["host"]
        lines += ["## Paper estimate for Raspberry Pi 4 / Pi 5", "",
                  f"Host peak assumed: {host['ghz']} GHz x {host['fp32_flop_per_cycle']:g} FP32 FLOP/cycle/core, "
                  f"{host['int8_op_per_cycle']:g} INT8 op/cycle/core ({'; '.join(flops['host_notes'])}).", "",
                  "| model | system | input | GFLOP (GOP) per query | measured ms | achieved GFLOP/s | efficiency "
                  "| Pi 4 est. ms | Pi 5 est. ms |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, entry in flops["models"].items():
            for name, per in entry.items():
                for system in ALL_SYSTEMS:
                    est = per.get(system)
                    if not est:
                        continue
                    pis = list(est["targets"].values())
                    lines.append(f"| {key} | {system} | {name} | {est['gflop_per_query']:.2f} | "
                                 f"{est['measured_ms']:.1f} | {est['achieved_gops']:.1f} | "
                                 f"{100 * est['efficiency']:.1f}% | {pis[0]['estimate_ms']:.0f} | "
                                 f"{pis[1]['estimate_ms']:.0f} |")
        lines += ["", "Assumptions:", ""] + [f"- {a}" for a in flops["assumptions"]]
        lines.append("")
    return lines


def _goal_lines(report: dict[str, Any]) -> list[str]:
    """The goals table and any warnings."""
    lines: list[str] = []
    lines += ["## Goals (this machine, bert-base-chinese architecture unless stated)", "",
              "| goal | model | measured | met |", "|---|---|---|---|"]
    for row in report["goals"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['goal']} | {row.get('model', '')} | {row['measured']} | {met} |")
    lines.append("")
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report (tables)."""
    lines = _header_lines(report)
    for model in report["models"].values():
        lines += _timing_lines(model) + _memory_lines(model) + _agreement_lines(model) + [""]
    lines += _load_lines(report) + _estimate_lines(report) + _goal_lines(report)
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Bar chart of median latency per system/input (log scale) and load-test curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"].items())
    loads = list((report.get("load") or {}).values())
    panels = max(len(models) + len(loads), 1)
    ncols = min(panels, 2)
    nrows = (panels + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.8 * nrows), squeeze=False)
    flat = list(grid.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    axes = [flat]  # panels in reading order: latency per model, then load tests
    colors = {"pipeline": "#d62728", "ort-fp32": "#1f77b4", "ours": "#2ca02c", "ours-static": "#98df8a",
              "ours-int4": "#9467bd"}
    for ax, (key, model) in zip(axes[0], models):
        shown = [system for system in ALL_SYSTEMS if system in model["systems"]]
        width = 0.8 / max(len(shown), 1)
        for k, system in enumerate(shown):
            meds, p99s, xs = [], [], []
            for j, name in enumerate(SETS):
                data = model["systems"].get(system, {}).get("sets", {}).get(name)
                if data:
                    xs.append(j + (k - (len(shown) - 1) / 2) * width)
                    meds.append(data["median_ms"])
                    p99s.append(data["p99_ms"] - data["median_ms"])
            if xs:
                ax.bar(xs, meds, width, yerr=[[0] * len(p99s), p99s], capsize=2, label=system, color=colors[system])
        ax.set_xticks(range(len(SETS)))
        long_label = f"{report['settings'].get('long_tokens', 128)} tok"
        ax.set_xticklabels(["≤32 tok" if s == "short" else long_label if s == "long" else "≤32, 4-char" for s in SETS])
        ax.set_yscale("log")
        ax.set_ylabel("latency per query, ms (bar: median, whisker: p99)")
        title = model["label"].replace("architecture, ", "arch.,\n")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
    for ax, load in zip(axes[0][len(models):], loads):
        for name, entry in load["results"].items():
            rates = entry.get("rates", [])
            if rates:
                ax.plot([r["offered_rps"] for r in rates], [r["p99_ms"] for r in rates], "o-", label=f"{name} p99")
                ax.plot([r["offered_rps"] for r in rates], [r["p50_ms"] for r in rates], "x--", label=f"{name} p50")
        ax.axhline(100, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("offered load, requests/s")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"HTTP load test ({load['model']})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{report['machine'].get('cpu_model')}, {report['machine']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

