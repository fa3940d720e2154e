"""The machine a benchmark ran on, for the ``tools bench`` report.

``machine_info``: CPU model, SIMD flags, cores, memory and library versions, which
the numbers depend on. ``contention``: the load average and any other process busy on
the CPU, read at the start and end of a run, which may have disturbed them.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, load, versions: what the numbers depend on."""
    info: dict[str, Any] = {"threads": threads, "python": platform.python_version(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu_model"] = names[0] if names else platform.processor()
        mhz = re.findall(r"^cpu MHz\s*:\s*(.+)$", text, re.M)
        info["cpu_mhz"] = float(mhz[0]) if mhz else None
        flags = (re.findall(r"^flags\s*:\s*(.+)$", text, re.M) or [""])[0].split()
        info["simd"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f)
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        info["cpu_model"] = platform.processor()
    info["logical_cpus"] = os.cpu_count()
    info["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for module in ("onnxruntime", "torch", "transformers", "tokenizers", "numpy"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except ImportError:
            info[f"{module}_version"] = None
    return info


def contention(sample_s: float = 1.0) -> dict[str, Any]:
    """Load average and the other processes using CPU right now (a training run, say):
    any process outside this benchmark above 20% of a core over ``sample_s``."""
    busy = []
    try:
        import psutil

        mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["pid"] not in mine]
        for proc in procs:
            try:
                proc.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(sample_s)
        for proc in procs:
            try:
                cpu = proc.cpu_percent(None)
            except psutil.Error:
                continue
            if cpu > 20:
                cmd = " ".join(proc.info.get("cmdline") or []) or str(proc.info["pid"])
                busy.append(f"{cmd[:100]} ({cpu:.0f}% CPU)")
    except ImportError:
        pass
    return {"loadavg": list(os.getloadavg()), "other_heavy_processes": busy}
