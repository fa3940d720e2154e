"""Loading and verifying a bundle folder (model.onnx + tokenizer.json + manifest.json).

The runtime refuses a bundle whose files do not match the manifest: a missing
file, a size or sha256 mismatch is reported with the file name, the expected and
the actual value, so a half-copied bundle never serves wrong answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    ManifestError,
    sha256_of,
)

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"
# Other bundles shipped inside the package, chosen by name: ``--bundle distilled-2x128``.
PACKAGED_BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
BUILD_HINT = (
    "build one with `make model OUT=edge/default_bundle` (or "
    "`python -m tools build --out DIR`) and pass it with --bundle DIR"
)


class BundleError(Exception):
    """A bundle folder is missing, partial, or does not match its manifest."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, manifest and the paths of its files."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        """Path of the ONNX model."""
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        """Path of tokenizer.json."""
        return self.path / TOKENIZER_FILE


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (the project's own trained model)."""
    return DEFAULT_BUNDLE_DIR


def load_bundle(path: str | Path | None = None, verify: bool = True) -> Bundle:
    """Load the bundle at ``path`` (default: the embedded one) and verify its files.

    Raises BundleError naming the file and the expected and actual values.
    """
    folder = Path(path) if path is not None else default_bundle_path()
    if path is not None and not folder.exists() and (PACKAGED_BUNDLES_DIR / str(path)).is_dir():
        folder = PACKAGED_BUNDLES_DIR / str(path)  # a packaged bundle, by name
    if not folder.is_dir():
        if path is None:
            raise BundleError(f"no embedded default bundle at {folder}: {BUILD_HINT}")
        raise BundleError(f"{folder}: bundle folder does not exist")
    if not (folder / MANIFEST_FILE).is_file():
        raise BundleError(f"{folder / MANIFEST_FILE}: missing; {folder} is not a complete bundle")
    try:
        manifest = Manifest.load(folder)
    except ManifestError as exc:
        raise BundleError(str(exc)) from exc
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in manifest.files:
            raise BundleError(f"{folder / MANIFEST_FILE}: lists no entry for {required}")
    if verify:
        verify_files(folder, manifest)
    return Bundle(path=folder, manifest=manifest)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check each file listed in the manifest exists with the recorded size and sha256."""
    for name, entry in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (the manifest lists it; the bundle is partial)")
        size = file.stat().st_size
        if size != entry.size:
            raise BundleError(f"{file}: size mismatch: manifest says {entry.size} bytes, file has {size}")
        digest = sha256_of(file)
        if digest != entry.sha256:
            raise BundleError(f"{file}: sha256 mismatch: manifest says {entry.sha256}, file has {digest}")
