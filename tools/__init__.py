"""Workstation toolchain: checkpoint → verified INT8 bundle, training, evaluation,
benchmarks. May import torch and transformers; the board never runs this."""


class ToolError(Exception):
    """An error a user can act on (bad path, bad checkpoint, bad option).

    ``python -m tools`` prints it as one line naming the file and the problem and
    exits with status 2.
    """
