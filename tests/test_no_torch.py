"""The board runtime never imports torch or transformers.

A fresh interpreter (torch *is* installed in the dev venv, so an accidental import
would succeed silently) imports the whole ``edge`` package, builds the app on the
tiny bundle with the real engine, serves one prediction through the test client,
and then checks ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"

SCRIPT = r"""
import json, sys
import edge, edge.app, edge.cli, edge.server, edge.metrics
from edge.app import create_app
app = create_app(config={"BUNDLE": sys.argv[1], "ENGINE_OPTIONS": {"threads": 1}})
client = app.test_client()
response = client.post("/api/predict", json={"text": "今天天气很[MASK]。", "top_k": 3})
assert response.status_code == 200, response.get_data(as_text=True)
assert len(response.get_json()["blanks"][0]["candidates"]) == 3
assert client.get("/metrics").status_code == 200
app.extensions["fillmask_engine"].close()
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"heavy": heavy, "onnxruntime": "onnxruntime" in sys.modules}))
"""


@pytest.mark.skipif(importlib.util.find_spec("edge.engine") is None, reason="edge/engine.py is not there yet")
@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason=f"fixture bundle {TINY_BUNDLE} missing")
def test_app_on_tiny_bundle_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TINY_BUNDLE)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result["onnxruntime"] is True  # the real engine ran
    assert result["heavy"] == [], f"edge imported {result['heavy']}"
