"""``tools ship``: a bundle becomes the embedded default with its measured figures."""

from __future__ import annotations

import json
import shutil

import pytest

from edge.bundle import load_bundle
from edge.manifest import Manifest


def _trained_copy(tiny_bundle_dir, tmp_path):
    """The tiny bundle, relabelled as trained (its files and hashes unchanged)."""
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    manifest = Manifest.load(folder)
    manifest.random_init = False
    manifest.notes = ""
    manifest.save(folder)
    return folder


def _evaluation(tmp_path, bundle, fp32=True):
    rows = [{"bundle": str(bundle), "quantization": "int8", "cloze_top1": 0.31, "cloze_top5": 0.52, "chid_acc": 0.4,
             "n_cloze": 2000, "n_chid": 202, "chid_chance": 1 / 7, "latency_ms_median": 3.2}]
    if fp32:
        rows.append({"bundle": str(bundle) + "-fp32", "quantization": "fp32", "cloze_top1": 0.32,
                     "cloze_top5": 0.53, "chid_acc": 0.41, "n_cloze": 2000, "n_chid": 202})
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"sources": {}, "results": rows}), encoding="utf-8")
    return path


def test_ship_installs_the_bundle_with_its_accuracy(tiny_bundle_dir, tmp_path):
    from tools.__main__ import main

    bundle = _trained_copy(tiny_bundle_dir, tmp_path)
    dest = tmp_path / "pkg" / "default_bundle"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old default")
    assert main(["ship", "--bundle", str(bundle), "--evaluation", str(_evaluation(tmp_path, bundle)),
                 "--dest", str(dest), "--hardware", "2-core test box", "--notes", "trained here"]) == 0
    shipped = load_bundle(dest)  # sizes and hashes verified
    accuracy = shipped.manifest.evaluation["accuracy"]
    assert accuracy["int8"]["cloze_top1"] == 0.31 and accuracy["fp32"]["chid_acc"] == 0.41
    assert accuracy["chid_chance"] == pytest.approx(1 / 7)
    assert shipped.manifest.training["hardware"] == "2-core test box"
    assert shipped.manifest.notes == "trained here"
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]


def test_ship_refuses_random_weights_and_bad_evaluations_leaving_the_default_alone(tiny_bundle_dir, tmp_path,
                                                                                    capsys):
    from tools.__main__ import main

    dest = tmp_path / "default_bundle"
    shutil.copytree(tiny_bundle_dir, dest)
    before = sorted((p.name, p.stat().st_size) for p in dest.iterdir())
    evaluation = _evaluation(tmp_path, tiny_bundle_dir)
    assert main(["ship", "--bundle", str(tiny_bundle_dir), "--evaluation", str(evaluation), "--dest", str(dest)]) == 2
    assert "random weights" in capsys.readouterr().err
    bundle = _trained_copy(tiny_bundle_dir, tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["ship", "--bundle", str(bundle), "--evaluation", str(tmp_path / "bad.json"), "--dest", str(dest)]) == 2
    assert "bad.json" in capsys.readouterr().err
    (tmp_path / "fp32only.json").write_text(json.dumps({"results": [{"quantization": "fp32", "cloze_top1": 0.3}]}))
    assert main(["ship", "--bundle", str(bundle), "--evaluation", str(tmp_path / "fp32only.json"),
                 "--dest", str(dest)]) == 2
    assert "no INT8 row" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in dest.iterdir()) == before
