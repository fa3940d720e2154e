"""edge.affinity: the runtime reads the affinity mask it is given."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge import affinity

ROOT = Path(__file__).resolve().parents[1]
HAS_AFFINITY = hasattr(os, "sched_getaffinity")


def _run_pinned(cpu_list: str, code: str) -> str:
    """Run ``python -c code`` under ``taskset -c cpu_list`` and return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        ["taskset", "-c", cpu_list, sys.executable, "-c", code],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )
    return result.stdout.strip()


def test_usable_cores_matches_mask():
    cores = affinity.usable_cores()
    assert cores == sorted(cores) and cores
    if HAS_AFFINITY:
        assert set(cores) == os.sched_getaffinity(0)


@pytest.mark.skipif(shutil.which("taskset") is None or not HAS_AFFINITY, reason="needs taskset (util-linux) and sched_getaffinity")
def test_subprocess_reads_taskset_mask():
    code = "from edge.affinity import usable_cores, thread_count; print(usable_cores(), thread_count(None))"
    assert _run_pinned("0", code) == "[0] 1"
    available = sorted(os.sched_getaffinity(0))
    if len(available) >= 2:
        pair = available[:2]
        out = _run_pinned(",".join(map(str, pair)), code)
        assert out == f"{pair} 2"


@pytest.mark.skipif(not HAS_AFFINITY, reason="needs sched_getaffinity")
def test_in_process_mask_change(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1, 2})
    assert affinity.usable_cores() == [1, 2, 3]
    assert affinity.thread_count(None) == 3
    assert affinity.thread_count(0) == 3
    assert affinity.ort_thread_affinities(3) == "3;4"


def test_fallback_without_affinity_call(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert affinity.usable_cores() == [0, 1, 2, 3]
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert affinity.usable_cores() == [0]


def test_thread_count_override():
    assert affinity.thread_count(2) == 2
    assert affinity.thread_count(64) == 64  # allowed when asked for, never chosen
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError):
            affinity.thread_count(bad)


def test_ort_thread_affinities():
    # ORT pins threads - 1 pool threads with 1-based processor numbers.
    assert affinity.ort_thread_affinities(1, [0, 1, 2, 3]) is None
    assert affinity.ort_thread_affinities(4, [0, 1, 2, 3]) == "2;3;4"
    assert affinity.ort_thread_affinities(2, [3, 1]) == "4"
    assert affinity.ort_thread_affinities(5, [0, 1, 2, 3]) is None  # oversubscribed


def test_ort_accepts_affinity_string():
    ort = pytest.importorskip("onnxruntime")
    cores = affinity.usable_cores()
    threads = len(cores)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    spec = affinity.ort_thread_affinities(threads, cores)
    if spec is None:
        pytest.skip("single usable core: nothing to pin")
    options.add_session_config_entry("session.intra_op_thread_affinities", spec)
    # A tiny graph: building a session validates the affinity string.
    onnx = pytest.importorskip("onnx")  # a workstation dependency, only to build the graph
    TensorProto, helper = onnx.TensorProto, onnx.helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    import numpy as np

    assert session.run(None, {"x": np.ones(1, np.float32)})[0].tolist() == [1.0]


def test_cpu_list_round_trip():
    assert affinity.parse_cpu_list("1-3") == [1, 2, 3]
    assert affinity.parse_cpu_list("0,2 4-5") == [0, 2, 4, 5]
    assert affinity.format_cpu_list([5, 1, 2, 3]) == "1-3,5"
    assert affinity.format_cpu_list([0]) == "0"
    with pytest.raises(ValueError, match="x"):
        affinity.parse_cpu_list("1,x")
    with pytest.raises(ValueError):
        affinity.parse_cpu_list("3-1")
