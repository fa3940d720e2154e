"""``tools mlm-loss``: the same masks for every checkpoint, clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools import ToolError
from tools.__main__ import main

TINY_CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_checkpoint"
PASSAGES = "床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。\n今天天气很好，我们去公园散步吧。\n"


def _run(capsys, *extra: str) -> list[dict]:
    assert main(["mlm-loss", "--checkpoint", str(TINY_CHECKPOINT), "--checkpoint", str(TINY_CHECKPOINT),
                 "--json", *extra]) == 0
    out = capsys.readouterr().out  # the log lines come first (logs go to stdout)
    return json.loads(out[out.index("[\n"):])


def test_identical_checkpoints_get_identical_losses_on_held_apart_and_training_text(tmp_path, capsys):
    text = tmp_path / "passages.txt"
    text.write_text(PASSAGES, encoding="utf-8")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(3).integers(5, 100, 500).astype(np.uint16))
    rows = _run(capsys, "--text", str(text), "--train-ids", str(ids), "--train-chunks", "20", "--max-length", "16")
    assert len(rows) == 2
    first, second = rows
    # Same model, same masks: the same loss to the last digit; a real loss, not zero.
    assert first["held_apart_loss"] == second["held_apart_loss"] > 0
    assert first["train_sample_loss"] == second["train_sample_loss"] > 0
    assert first["held_apart_masked"] > 0 and first["train_sample_masked"] > 0
    # Another mask seed draws other blanks.
    other = _run(capsys, "--text", str(text), "--seed", "9")
    assert other[0]["held_apart_masked"] != first["held_apart_masked"] or \
        other[0]["held_apart_loss"] != first["held_apart_loss"]


def test_bad_inputs_are_refused_naming_the_file(tmp_path):
    from tools.train import mlm_loss

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    args = ["mlm-loss", "--checkpoint", str(TINY_CHECKPOINT)]
    with pytest.raises(ToolError, match="empty.txt: no passages"):
        mlm_loss.run(_parse(args + ["--text", str(empty)]))
    with pytest.raises(ToolError, match="not a checkpoint folder"):
        mlm_loss.run(_parse(["mlm-loss", "--checkpoint", str(tmp_path), "--text", str(empty)]))
    bad = tmp_path / "ids.npy"
    bad.write_bytes(b"not numpy")
    good = tmp_path / "p.txt"
    good.write_text(PASSAGES, encoding="utf-8")
    with pytest.raises(ToolError, match="ids.npy: not a .npy token array"):
        mlm_loss.run(_parse(args + ["--text", str(good), "--train-ids", str(bad)]))


def _parse(argv: list[str]):
    import argparse

    from tools.train import mlm_loss

    parser = argparse.ArgumentParser()
    mlm_loss.add_arguments(parser)
    return parser.parse_args(argv[1:])
