"""Markdown + PNG report of ``python -m tools evaluate`` figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

METRICS = (("cloze_top1", "cloze top-1"), ("cloze_top5", "cloze top-5"), ("chid_acc", "ChID accuracy"),
           ("chid_acc_pmi", "ChID (PMI)"))


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _label(result: dict) -> str:
    name = result.get("name") or Path(str(result.get("bundle", "?"))).name
    return f"{name} ({result.get('quantization', '?')})"


def markdown(results: Sequence[dict], sources: dict | None = None) -> str:
    """A Markdown table of the figures, one row per bundle."""
    lines = ["# Evaluation", ""]
    if sources:
        for key, value in sources.items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    lines += ["| bundle | shape | training | quantization | size (MB) | latency (ms) | cloze top-1 | cloze top-5 "
              "| n cloze | ChID acc | ChID acc (PMI) | n ChID | top-1 agreement with first |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        size = r.get("bundle_bytes")
        latency = r.get("latency_ms_median")
        trained = (f"{r['trained_by']}, {r['train_minutes']:.0f} min" if r.get("trained_by") and
                   r.get("train_minutes") is not None else "–")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("name") or r.get("bundle"), r.get("shape") or "–", trained, r.get("quantization"),
            f"{size / 1e6:.1f}" if size else "–", f"{latency:.1f}" if latency is not None else "–",
            _pct(r.get("cloze_top1")), _pct(r.get("cloze_top5")),
            r.get("n_cloze", "–"), _pct(r.get("chid_acc")), _pct(r.get("chid_acc_pmi")), r.get("n_chid", "–"),
            _pct(r.get("cloze_top1_agreement_with_first")) if "cloze_top1_agreement_with_first" in r else "–"))
    chance = next((r.get("chid_chance") for r in results if r.get("chid_chance")), None)
    if chance:
        lines += ["", f"ChID chance level: {_pct(chance)} (one of {round(1 / chance)} candidates). "
                      "ChID acc picks the highest joint log-probability; ChID acc (PMI) subtracts each "
                      "candidate's score without context (frequent characters no longer win by default)."]
    if any(r.get("latency_ms_median") is not None for r in results):
        threads = next((r.get("latency_threads") for r in results if r.get("latency_threads")), "?")
        lines += ["", f"Latency: median per query (≤32 tokens, one blank) through the edge engine, cache and "
                      f"batching off, {threads} thread(s), on the machine that ran the evaluation."]
    lines += ["", "![accuracy](evaluation.png)", ""]
    return "\n".join(lines)


def bar_chart(results: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per bundle; ChID chance as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    metrics = [(k, t) for k, t in METRICS if any(r.get(k) is not None for r in results)]
    timed = [r for r in results if r.get("latency_ms_median") is not None and r.get("cloze_top1") is not None]
    if timed:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
        for r in timed:
            ax2.scatter(r["latency_ms_median"], 100 * r["cloze_top1"], s=40)
            ax2.annotate(_label(r), (r["latency_ms_median"], 100 * r["cloze_top1"]), fontsize=7,
                         xytext=(4, 4), textcoords="offset points")
        ax2.set_xlabel("latency per query (ms, median)")
        ax2.set_ylabel("cloze top-1 (%)")
        ax2.set_xlim(left=0)
        ax2.set_ylim(bottom=0)
        ax2.set_title("accuracy per millisecond", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        values = [100 * (r.get(k) or 0.0) for k, _ in metrics]
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, values, width, label=_label(r))
        for x, v in zip(xs, values):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    chance = next((r.get("chid_chance") for r in results if r.get("chid_chance")), None)
    keys = [k for k, _ in metrics]
    for n, key in enumerate(k for k in ("chid_acc", "chid_acc_pmi") if chance and k in keys):
        m = keys.index(key)
        ax.hlines(100 * chance, m - width / 2, m + 0.8 - width / 2, colors="grey", linestyles="dashed",
                  label="ChID chance" if n == 0 else None)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], [t for _, t in metrics])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: Sequence[dict], out_dir: str | Path, sources: dict | None = None) -> list[Path]:
    """Write ``evaluation.md``, ``evaluation.png`` and ``evaluation.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = bar_chart(results, out / "evaluation.png")
    md = out / "evaluation.md"
    md.write_text(markdown(results, sources), encoding="utf-8")
    js = out / "evaluation.json"
    js.write_text(json.dumps({"sources": sources or {}, "results": list(results)}, ensure_ascii=False, indent=2),
                  encoding="utf-8")
    return [md, png, js]
