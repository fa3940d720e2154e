"""Command-line options shared by ``tools lm convert`` and ``tools memory build``:
where the file goes (into a bundle, or alone) and the license and provenance it ships with."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_output_arguments(parser: argparse.ArgumentParser, file_name: str, what: str, license_default: str,
                         license_example: str) -> None:
    """``--bundle DIR`` | ``--out FILE``, and ``--license``, ``--license-id``, ``--provenance``."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, help=f"bundle folder: writes {file_name} with its license and "
                                                   "provenance note and lists them in its manifest")
    where.add_argument("--out", type=Path, help=f"write only this {file_name} file")
    parser.add_argument("--license", type=Path, default=None, help=f"license text (default: {license_default})")
    parser.add_argument("--license-id", default="", help=f"SPDX id recorded in the manifest, e.g. {license_example}")
    parser.add_argument("--provenance", default="", help=f"one line on where the {what} comes from")


def check_bundle_folder(folder: Path) -> None:
    """Refuse a ``--bundle`` that is not a bundle folder."""
    from tools import ToolError

    if not (folder / "manifest.json").is_file():
        raise ToolError(f"{folder}: not a bundle folder (no manifest.json)")


def open_bundle_file(folder: Path | None, name: str, reader):
    """``reader(path)`` on a bundle's knowledge file (default: the embedded bundle's);
    its error (a ValueError naming the file) becomes a ToolError."""
    from edge.bundle import default_bundle_path
    from tools import ToolError

    try:
        return reader((folder or default_bundle_path()) / name)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc
