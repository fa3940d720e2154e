"""The bundle manifest: one dataclass that both the toolchain (writer) and the
runtime (reader) use, so the two cannot drift apart.

A bundle is a folder with fixed file names:

- ``model.onnx``: inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``)
  and ``mask_positions`` (int64 ``[batch, n_masks]``); output ``logits``
  (float32 ``[batch, n_masks, vocab]``), the vocabulary projection computed only at
  the masked positions.
- ``tokenizer.json``: a ``tokenizers.Tokenizer`` matching the (trimmed) vocabulary.
- ``manifest.json``: this dataclass, serialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"

# ONNX graph input/output names (the contract between export and engine).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
MASK_POSITIONS = "mask_positions"
LOGITS = "logits"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ManifestError(ValueError):
    """A manifest file is missing, unreadable or does not follow the schema."""


@dataclass
class FileEntry:
    """Byte size and sha256 of one bundle file."""

    size: int
    sha256: str


@dataclass
class Architecture:
    """The transformer shape; what speed, memory and size depend on."""

    model_type: str = "bert"
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle, and its provenance."""

    name: str
    source: str
    architecture: Architecture
    vocab_size: int
    special_ids: dict[str, int]
    max_length: int
    random_init: bool = False
    source_revision: str | None = None
    tool_version: str = ""
    schema_version: int = SCHEMA_VERSION
    quantization: dict[str, Any] | None = None
    vocab: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    created: str = ""
    notes: str = ""
    # Knowledge at answer time (optional; a bundle without them answers from the model alone):
    # the word n-gram LM (``lm.bin``), the exact phrase memory (``memory.bin``), their
    # provenance and license, and the fitted weights that fuse them with the model.
    lm: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    idioms: dict[str, Any] | None = None  # the characters around each idiom (``idioms.bin``)
    fusion: dict[str, Any] | None = None

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "manifest") -> "Manifest":
        """Build a manifest from a parsed dict; raise ManifestError naming ``origin``."""
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{origin}: schema_version {version!r} is not supported "
                f"(this runtime reads {SCHEMA_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            and f.name not in data
        ]
        if missing:
            raise ManifestError(f"{origin}: missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["architecture"] = Architecture(**data["architecture"])
            kwargs["files"] = {
                name: FileEntry(**entry) for name, entry in data.get("files", {}).items()
            }
            manifest = cls(**kwargs)
        except TypeError as exc:
            raise ManifestError(f"{origin}: {exc}") from exc
        for token in SPECIAL_TOKENS:
            if token not in manifest.special_ids:
                raise ManifestError(f"{origin}: special_ids lacks {token}")
        return manifest

    def save(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` into ``folder`` and return its path."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(
            json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Read ``manifest.json`` from a bundle folder."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (is this a bundle folder?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, origin=str(path))

    def record_files(self, folder: str | Path, names: tuple[str, ...] = (MODEL_FILE, TOKENIZER_FILE)) -> None:
        """Fill ``files`` with the size and sha256 of each named file in ``folder``."""
        self.files = {name: file_entry(Path(folder) / name) for name in names}

    def attach_files(self, folder: str | Path, section: dict[str, Any], names: list[str]) -> dict[str, Any]:
        """Record the files of an optional part (word LM, memory, idiom contexts): their
        names in its manifest ``section``, their size and sha256 in ``files``. Returns
        ``section``, for the caller to store under the part's key."""
        section["files"] = list(names)
        for name in names:
            self.files[name] = file_entry(Path(folder) / name)
        return section


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: str | Path) -> FileEntry:
    """Return the FileEntry (size, sha256) of one file."""
    path = Path(path)
    return FileEntry(size=path.stat().st_size, sha256=sha256_of(path))
