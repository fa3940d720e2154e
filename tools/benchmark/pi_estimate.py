"""Paper estimate of per-query latency on a Raspberry Pi 4 and Pi 5.

Method: count the arithmetic of one query from the model shape (FLOP for FP32,
integer ops for INT8; a multiply-add counts as 2), divide by the latency measured on
this machine to get the *achieved* rate, divide that by this CPU's peak rate for the
threads used to get the *efficiency*, and assume the same efficiency on the Pi's
cores at their peak rate. The estimate is then floored by the time needed to stream
the weights once from DRAM (batch 1 reads every weight once per query).

Everything here is arithmetic on stated assumptions (see ``ASSUMPTIONS``); nothing is
measured on a Pi.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shape:
    """The transformer shape that the arithmetic depends on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int


# google-bert/bert-base-chinese (config.json of ../shared/models/bert-base-chinese).
BERT_BASE_CHINESE = Shape(layers=12, hidden=768, intermediate=3072, vocab=21128)


def encoder_flops(shape: Shape, seq: int) -> float:
    """Multiply-add work of the encoder for one sequence of ``seq`` tokens.

    Per layer: Q, K, V and output projections (4 · 2·seq·h²), the two feed-forward
    matrices (2 · 2·seq·h·i), and attention scores QKᵀ and the weighted sum of V
    (2 · 2·seq²·h). Softmax, GELU, layer norms and embeddings are left out (<1%).
    """
    h, i = shape.hidden, shape.intermediate
    per_layer = 8 * seq * h * h + 4 * seq * h * i + 4 * seq * seq * h
    return float(shape.layers * per_layer)


def head_flops(shape: Shape, positions: int, vocab: int | None = None) -> float:
    """The MLM head at ``positions`` rows: dense h×h transform + h×vocab decoder."""
    v = shape.vocab if vocab is None else vocab
    return float(2 * positions * (shape.hidden * shape.hidden + shape.hidden * v))


def query_flops(shape: Shape, seq: int, head_positions: int, vocab: int | None = None) -> float:
    """Encoder at ``seq`` tokens plus the head at ``head_positions`` rows."""
    return encoder_flops(shape, seq) + head_flops(shape, head_positions, vocab)


@dataclass(frozen=True)
class Cpu:
    """Peak arithmetic rates of one CPU (per core, per cycle) and its memory bandwidth."""

    name: str
    cores: int
    ghz: float
    fp32_flop_per_cycle: float  # per core
    int8_op_per_cycle: float  # per core (a multiply-add = 2 ops)
    dram_gb_s: float | None = None  # sustained, what a weight stream gets
    note: str = ""

    def peak_gflops(self, threads: int, int8: bool) -> float:
        """Peak GFLOP/s (FP32) or GOP/s (INT8) using ``threads`` cores."""
        per_cycle = self.int8_op_per_cycle if int8 else self.fp32_flop_per_cycle
        return min(threads, self.cores) * self.ghz * per_cycle


# Pi cores. A72: one 128-bit FP32 FMA per cycle effective (8 FLOP); INT8 without the
# dot-product instructions goes through widening multiplies + pairwise adds
# (UMULL/UADALP in ONNX Runtime's MLAS kernels), about 2x the FP32 rate.
# A76: two 128-bit FMA pipes (16 FLOP); SDOT, 2 per cycle x 16 multiply-adds.
PI4 = Cpu("Raspberry Pi 4 (4x Cortex-A72 @ 1.5 GHz)", 4, 1.5, 8.0, 16.0, dram_gb_s=4.0,
          note="1.8 GHz on boards from 2020 on: divide the compute part by 1.2")
PI5 = Cpu("Raspberry Pi 5 (4x Cortex-A76 @ 2.4 GHz)", 4, 2.4, 16.0, 64.0, dram_gb_s=10.0,
          note="INT8 via SDOT (ONNX Runtime MLAS uses it when the CPU reports asimddot)")

ASSUMPTIONS = [
    "FLOP count from the model shape: Q/K/V/O and FFN matrices + attention scores; "
    "softmax/GELU/layer norm/embeddings left out (<1%). A multiply-add counts as 2 operations.",
    "This runtime: encoder at the padded bucket length (32 or 128), MLM head only at the masked "
    "position(s) over the trimmed vocabulary. Pipeline / plain ORT: encoder at the exact length, "
    "head at every position over the full vocabulary.",
    "Efficiency (achieved rate / peak rate of the cores used) measured end to end here, Python, "
    "tokenizer and beam-search overheads included, is assumed to carry over to the Pi unchanged. "
    "Small models are overhead-dominated, so their 'efficiency' is low and the estimate pessimistic "
    "for the matrix part but optimistic for the Python part (a Pi core runs Python ~3-5x slower).",
    "Pi 4: Cortex-A72 8 FP32 FLOP/cycle/core (one 128-bit FMA), ~16 INT8 ops/cycle/core without "
    "dot-product instructions; Pi 5: Cortex-A76 16 FP32 FLOP/cycle/core, 64 INT8 ops/cycle/core "
    "with SDOT. All 4 cores used with linear scaling (optimistic: the measured efficiency is at 2 threads).",
    "Memory floor: batch 1 streams every weight once per query; sustained DRAM bandwidth ~4 GB/s "
    "(Pi 4, LPDDR4) and ~10 GB/s (Pi 5, LPDDR4X). The estimate is max(compute, memory floor).",
    "Thermal throttling (a Pi 4 without a heatsink drops to 1.0-1.2 GHz under sustained load) is not "
    "modelled.",
    "The host clock is the nominal one /proc/cpuinfo reports; if the host boosts higher (an EPYC Zen 4 "
    "may run at up to ~3.7 GHz) the measured efficiency is overstated and the Pi estimates are optimistic "
    "by the same factor (up to ~1.4x).",
]


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo as a dict (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def host_cpu(ghz: float | None = None, fp32_per_cycle: float | None = None,
             int8_per_cycle: float | None = None) -> tuple[Cpu, list[str]]:
    """Describe this machine's CPU with peak rates inferred from /proc/cpuinfo.

    Returns the Cpu and the assumptions made (each value can be overridden). The
    clock is the ``cpu MHz`` reported (under a hypervisor the nominal/TSC clock;
    turbo may be higher, which would make the efficiency look better than it is).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    model = info.get("model name", "unknown CPU")
    notes = []
    if ghz is None:
        mhz = float(info.get("cpu MHz", "0") or 0)
        if not mhz and info.get("bogomips"):
            mhz = float(info["bogomips"]) / 2
        ghz = round(mhz / 1000, 3) if mhz else 2.0
        notes.append(f"clock {ghz} GHz from /proc/cpuinfo (nominal; boost clocks not counted)")
    if fp32_per_cycle is None:
        if "avx512f" in flags and vendor == "AuthenticAMD":
            fp32_per_cycle = 32.0  # Zen 4: AVX-512 executed on two 256-bit FMA pipes
            notes.append("FP32 peak 32 FLOP/cycle/core: AMD Zen 4 runs AVX-512 on 2x256-bit FMA pipes")
        elif "avx512f" in flags:
            fp32_per_cycle = 64.0
            notes.append("FP32 peak 64 FLOP/cycle/core: Intel AVX-512 with 2 FMA units assumed")
        elif "avx2" in flags and "fma" in flags:
            fp32_per_cycle = 32.0
            notes.append("FP32 peak 32 FLOP/cycle/core: AVX2, 2 FMA units")
        else:
            fp32_per_cycle = 8.0
            notes.append("FP32 peak 8 FLOP/cycle/core assumed (no AVX2/FMA, or not x86)")
    if int8_per_cycle is None:
        if flags & {"avx512_vnni", "avx_vnni"}:
            int8_per_cycle = 4 * fp32_per_cycle
            notes.append("INT8 peak 4x FP32 (VNNI: 4 u8*s8 multiply-adds per 32-bit lane per instruction)")
        elif "avx2" in flags:
            int8_per_cycle = 2 * fp32_per_cycle
            notes.append("INT8 peak 2x FP32 (AVX2 vpmaddubsw/vpmaddwd, no VNNI)")
        else:
            int8_per_cycle = 2 * fp32_per_cycle
            notes.append("INT8 peak 2x FP32 assumed")
    arch = f"{vendor} family {family}" if vendor else ""
    cpu = Cpu(name=f"{model} ({arch})".strip(), cores=os.cpu_count() or 1, ghz=ghz,
              fp32_flop_per_cycle=fp32_per_cycle, int8_op_per_cycle=int8_per_cycle)
    return cpu, notes


def estimate(flops: float, measured_ms: float, host: Cpu, host_threads: int, int8: bool,
             weight_bytes: int | None, targets: tuple[Cpu, ...] = (PI4, PI5)) -> dict[str, Any]:
    """Efficiency here and the latency it implies on each target board.

    ``flops``: operations per query; ``measured_ms``: median latency here with
    ``host_threads`` threads; ``weight_bytes``: bytes of weights streamed per query
    (the model file size), for the memory floor.
    """
    achieved = flops / (measured_ms / 1000) / 1e9
    peak = host.peak_gflops(host_threads, int8)
    efficiency = achieved / peak
    result: dict[str, Any] = {
        "gflop_per_query": flops / 1e9,
        "measured_ms": measured_ms,
        "achieved_gops": achieved,
        "host_peak_gops": peak,
        "efficiency": efficiency,
        "int8": int8,
        "targets": {},
    }
    for cpu in targets:
        target_peak = cpu.peak_gflops(cpu.cores, int8)
        compute_ms = flops / (target_peak * 1e9 * efficiency) * 1000
        memory_ms = weight_bytes / (cpu.dram_gb_s * 1e9) * 1000 if weight_bytes and cpu.dram_gb_s else 0.0
        result["targets"][cpu.name] = {
            "peak_gops": target_peak,
            "compute_ms": compute_ms,
            "memory_floor_ms": memory_ms,
            "estimate_ms": max(compute_ms, memory_ms),
        }
    return result


def cpu_table() -> list[dict[str, Any]]:
    """The target boards' assumed figures, for the report."""
    return [asdict(cpu) for cpu in (PI4, PI5)]


def parse_arch(arch: dict[str, Any], vocab: int) -> Shape:
    """A Shape from a manifest/``architecture_of`` dict and a vocabulary size."""
    return Shape(layers=int(arch["num_layers"]), hidden=int(arch["hidden_size"]),
                 intermediate=int(arch["intermediate_size"]), vocab=int(vocab))


def shape_of_hf_config(config: dict[str, Any]) -> Shape:
    """A Shape from a Hugging Face ``config.json`` dict."""
    return Shape(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                 intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]))

