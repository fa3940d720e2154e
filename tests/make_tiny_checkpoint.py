"""Make the tiny Chinese masked-LM checkpoint (and bundle) the tests run on.

A ``BertForMaskedLM`` with 2 layers, hidden 32 and a ~300-token vocabulary laid out
like bert-base-chinese's (``[PAD]``, ``[unusedN]``, ``[UNK]`` ``[CLS]`` ``[SEP]``
``[MASK]``, punctuation, digits, Latin pieces, common CJK characters, a few ``##``
pieces), seeded random weights, saved with ``save_pretrained`` plus the tokenizer
files, so the toolchain reads it through the same ``from_pretrained`` path as a
real checkpoint. An ``edge_provenance.json`` marks the weights as random, and the
committed bundle is built from exactly these weights.

    python tests/make_tiny_checkpoint.py                 # checkpoint + bundle into tests/fixtures/
    python tests/make_tiny_checkpoint.py --out DIR       # checkpoint only, into DIR
    python tests/make_tiny_checkpoint.py --quantized     # only the static INT8 / int4 twins

The committed fixtures (``tests/fixtures/tiny_checkpoint``, ``tests/fixtures/tiny_bundle``,
its FP32 twin ``tests/fixtures/tiny_bundle-fp32`` and the ``tiny_bundle-static`` /
``tiny_bundle-int4`` twins of the other quantizations) are made by running this script
with no arguments. They are committed (not built by the tests) so that ``make
arm-check``, which has no torch, runs the same checks on them on arm64.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
CHECKPOINT_DIR = FIXTURES / "tiny_checkpoint"
BUNDLE_DIR = FIXTURES / "tiny_bundle"

N_UNUSED = 9
PUNCTUATION = "，。！？、；：“”‘’（）《》…—.,!?"
DIGITS_LATIN = ["0", "1", "2", "3", "5", "8", "10", "2020", "a", "e", "i", "s", "t", "the", "ai", "ok"]
# The test sentences need these: a famous poem line and two idioms.
POEM = "床前明月光疑是地上霜举头望低思故乡"
IDIOMS = "画蛇添足一石二鸟守株待兔马到成功"
# Common everyday characters (roughly by frequency), deduplicated below.
COMMON = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之"
    "过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前"
    "所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声"
    "全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使"
    "教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑"
    "性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果"
)
HASH_PIECES = ["##的", "##一", "##是", "##国", "##人", "##s", "##ing", "##ed", "##0"]


def tiny_vocab() -> list[str]:
    """Return the tiny vocabulary in id order (bert-base-chinese's layout)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, N_UNUSED + 1)]
    vocab += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(PUNCTUATION) + DIGITS_LATIN
    seen = set(vocab)
    for char in POEM + IDIOMS + COMMON:
        if char not in seen:
            seen.add(char)
            vocab.append(char)
    vocab += HASH_PIECES
    return vocab


def make_checkpoint(out: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a seeded tiny ``BertForMaskedLM`` + tokenizer files into ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from tools.bundle.checkpoint import PROVENANCE_FILE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False,
                              tokenize_chinese_chars=True, model_max_length=64)
    tokenizer.save_pretrained(str(out))

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    # Random init gives a near-zero decoder bias; a non-trivial one checks that
    # trimming re-indexes the bias together with the weight rows.
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.randn(len(vocab)) * 0.5)
    model.save_pretrained(str(out))
    # The weights are random: say so, so that bundles built from this folder carry
    # random_init: true in their manifest (tools.bundle.checkpoint reads this file).
    (out / PROVENANCE_FILE).write_text(json.dumps(
        {"random_init": True, "seed": seed, "made_by": "tests/make_tiny_checkpoint.py"}, indent=2) + "\n",
        encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Make the checkpoint (and, by default, the committed tiny bundle)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write only the checkpoint, into this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantized", action="store_true",
                        help="only (re)build the static INT8 and int4 twins from the committed checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.out:
        make_checkpoint(args.out, seed=args.seed)
        return 0
    from tools.bundle.build import build_bundle

    os.chdir(ROOT)  # so the manifest records the repository-relative source path
    if not args.quantized:
        make_checkpoint(CHECKPOINT_DIR, seed=args.seed)
        build_main_bundles(build_bundle)
    for method in ("static", "int4"):
        # Same weights, the other quantizations: static INT8 calibrated on seeded
        # random inputs (no corpus), int4 weight-only.
        build_bundle(source=str(CHECKPOINT_DIR.relative_to(ROOT)), out=FIXTURES / f"tiny_bundle-{method}",
                     vocab_size=None, corpus=None, quantization=method, name="tiny-test-bert",
                     notes="Tiny random-weight test model made by tests/make_tiny_checkpoint.py; "
                           "answers are meaningless.")
    return 0


def build_main_bundles(build_bundle) -> None:
    """The tiny dynamic INT8 bundle and its FP32 twin."""
    build_bundle(
        source=str(CHECKPOINT_DIR.relative_to(ROOT)),
        out=BUNDLE_DIR,
        vocab_size=None,  # keep the tiny vocabulary whole (minus ## CJK and [unused])
        corpus=None,
        # FP32 twin at tests/fixtures/tiny_bundle-fp32: batch-independent logits, for
        # tests that need exact equality (dynamic INT8 quantizes activations per
        # tensor, so a row's logits move slightly with its batch mates and padding).
        keep_fp32=True,
        name="tiny-test-bert",
        notes="Tiny random-weight test model made by tests/make_tiny_checkpoint.py; answers are meaningless.",
    )


if __name__ == "__main__":
    sys.exit(main())
