"""Which CPU cores this process may run on, and how many threads to use.

systemd's ``CPUAffinity=`` (or ``taskset``) sets the process's affinity mask before
Python starts. The runtime reads that mask instead of ``os.cpu_count()`` so that a
unit pinned to cores 1-3 of a 4-core Pi runs 3 inference threads on exactly those
cores and leaves core 0 to the system, the kiosk browser and the serial reader.
"""

from __future__ import annotations

import os

__all__ = [
    "usable_cores",
    "thread_count",
    "ort_thread_affinities",
    "parse_cpu_list",
    "format_cpu_list",
]


def usable_cores() -> list[int]:
    """Return the sorted ids of the CPU cores this process may run on.

    Reads the affinity mask (``os.sched_getaffinity(0)``) that systemd's
    ``CPUAffinity=`` or ``taskset`` set; where the platform has no affinity call
    (macOS, Windows) it falls back to all ``os.cpu_count()`` cores.
    """
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            cores = sorted(getaffinity(0))
        except OSError:
            cores = []
        if cores:
            return cores
    return list(range(os.cpu_count() or 1))


def thread_count(override: int | None = None) -> int:
    """Return how many inference threads to run.

    ``override`` (from ``--threads`` or ``FILLMASK_THREADS``) wins when it is a
    positive number; ``None`` or ``0`` means "one per usable core". More threads
    than usable cores only makes them fight over the same cores, so that is
    allowed (a person asked for it) but never chosen automatically.
    """
    if override is None or override == 0:
        return len(usable_cores())
    if isinstance(override, bool) or not isinstance(override, int) or override < 0:
        raise ValueError(f"thread count must be a positive integer or 0 for auto, got {override!r}")
    return override


def ort_thread_affinities(threads: int, cores: list[int] | None = None) -> str | None:
    """Return an ONNX Runtime ``session.intra_op_thread_affinities`` string, or None.

    ONNX Runtime's intra-op pool has ``threads`` threads of which the first is the
    caller's own thread (it keeps the process mask); the other ``threads - 1`` are
    pinned one per core here, in the order of ``cores`` (default: the usable
    cores), skipping the first core, which the caller's thread mostly runs on.
    The string uses ONNX Runtime's 1-based processor numbers: cores [1, 2, 3]
    with 3 threads give ``"3;4"`` (cores 2 and 3).

    Returns None (leave placement to the kernel) for a single thread or when there
    are more threads than cores, where pinning would stack threads on one core.
    """
    cores = usable_cores() if cores is None else sorted(cores)
    if threads <= 1 or threads > len(cores):
        return None
    pinned = cores[1:threads]
    return ";".join(str(core + 1) for core in pinned)


def parse_cpu_list(text: str) -> list[int]:
    """Parse a CPU list such as ``"1-3"``, ``"0,2"`` or ``"1-3 5"`` into sorted ids.

    Accepts the forms used by systemd's ``CPUAffinity=``, ``taskset -c`` and
    ``/sys/devices/system/cpu/online`` (commas or spaces between items, ``a-b``
    ranges). Raises ValueError naming the bad item.
    """
    cores: set[int] = set()
    for item in text.replace(",", " ").split():
        low, sep, high = item.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise ValueError(f"bad CPU list item {item!r} in {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {item!r} in {text!r}")
        cores.update(range(first, last + 1))
    return sorted(cores)


def format_cpu_list(cores: list[int]) -> str:
    """Format core ids compactly, e.g. [1, 2, 3, 5] -> ``"1-3,5"``."""
    parts: list[str] = []
    ordered = sorted(set(cores))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
