"""Workstation toolchain (``python -m tools COMMAND``), by job:

- :mod:`tools.bundle`: checkpoint → verified INT8 bundle, and back;
- :mod:`tools.knowledge`: the word LM, the phrase memory and the fusion weights of a bundle;
- :mod:`tools.train`: corpus, pretraining and distillation of the compact model;
- :mod:`tools.evaluation`: accuracy through the edge engine, development sets;
- :mod:`tools.benchmark`: speed and memory, load test, presets, Pi estimates;
- ``tools/board/``: the offline installer archive and the arm64 check (shell).

May import torch and transformers, and :mod:`edge`; the board never runs this, and
``edge`` never imports it."""


class ToolError(Exception):
    """An error a user can act on (bad path, bad checkpoint, bad option).

    ``python -m tools`` prints it as one line naming the file and the problem and
    exits with status 2.
    """
