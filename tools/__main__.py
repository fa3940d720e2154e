"""``python -m tools <command>``: the workstation toolchain.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``--help`` stays fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edge import __version__
from edge.logs import setup_logging
from tools import ToolError

COMMANDS = {
    "build": ("tools.bundle.build", "checkpoint → verified INT8 bundle (the whole pipeline)"),
    "export": ("tools.bundle.export_onnx", "checkpoint → FP32 ONNX with logits at masked positions only"),
    "trim": ("tools.bundle.trim_vocab", "trim the vocabulary of a checkpoint by corpus frequency"),
    "quantize": ("tools.bundle.quantize", "FP32 ONNX → dynamic INT8 (or int4) ONNX"),
    "verify": ("tools.bundle.verify", "check a bundle against its source checkpoint"),
    "pretrain": ("tools.train.pretrain", "train the compact Chinese masked-LM (whole-word masking)"),
    "distill": ("tools.train.distill", "TinyBERT-style distillation of a compact student from a teacher"),
    "presets": ("tools.benchmark.presets", "hub checkpoints to start from: shapes, FLOPs, measured/estimated latency"),
    "evaluate": ("tools.evaluation.evaluate", "cloze and ChID accuracy of a bundle"),
    "mlm-loss": ("tools.train.mlm_loss", "masked-LM loss of checkpoints on identical masks (held-apart vs training text)"),
    "unbundle": ("tools.bundle.unbundle", "bundle → Hugging Face checkpoint folder (to train on from a shipped model)"),
    "lm": ("tools.knowledge.lm", "ARPA word n-gram LM → the bundle's lm.bin (convert); score a text with it"),
    "memory": ("tools.knowledge.memory", "training corpus → the bundle's exact phrase memory (build); look a blank up"),
    "idioms": ("tools.knowledge.idioms", "training corpus → the characters around each idiom of the word LM (the bundle's idioms.bin)"),
    "fusion": ("tools.knowledge.fusion", "fit the weights that fuse model, word LM and memory (on development data)"),
    "ship": ("tools.bundle.ship", "install a bundle as the embedded default, with its measured accuracy"),
    "bench": ("tools.benchmark.bench", "side-by-side latency / memory benchmark"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one toolchain command."""
    parser = argparse.ArgumentParser(prog="python -m tools", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv if argv is not None else sys.argv[1:]
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        # Only import the module whose command is being run (or all, for --help).
        if name in wanted or not any(w in COMMANDS for w in wanted):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("tools."):
                    continue  # command not built yet
                raise
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if not hasattr(args, "_module"):
        parser.error(f"command {args.command!r} is not available")
    try:
        return int(args._module.run(args) or 0)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
