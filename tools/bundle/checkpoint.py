"""Load a Hugging Face masked-LM checkpoint (hub id or local folder), or build the
same architecture with seeded random weights (``--random-init``).

Everything goes through the real ``from_pretrained`` path
(``AutoConfig`` / ``AutoModelForMaskedLM`` / ``AutoTokenizer``) so that a real
checkpoint pulled from the hub takes exactly the code path exercised here on a
local folder that only holds a config and a tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.manifest import SPECIAL_TOKENS
from tools import ToolError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "google-bert/bert-base-chinese"
# Written by ``tools trim`` into the checkpoint folder it produces, so that a later
# step (export, verify) still knows the original source and whether weights are random.
PROVENANCE_FILE = "edge_provenance.json"
TRAINING_FILE = "training.json"  # what pretrain / distill record about a run
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class Preset:
    """A hub checkpoint a user may pick, with its published shape."""

    hub_id: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    note: str


# Chinese masked-LM checkpoints on the Hugging Face hub that carry an MLM head
# (``*ForMaskedLM`` weights with ``cls.predictions``). All use the bert-base-chinese
# character vocabulary (21,128) and load as BertForMaskedLM; the shapes are those of
# their published config.json files.
PRESETS: dict[str, Preset] = {
    "bert-base-chinese": Preset("google-bert/bert-base-chinese", 12, 768, 12, 3072, 21128,
                                "Google's original Chinese BERT (character masking)"),
    "chinese-bert-wwm-ext": Preset("hfl/chinese-bert-wwm-ext", 12, 768, 12, 3072, 21128,
                                   "HFL BERT-wwm-ext: whole-word masking, 5.4 B tokens of extra data"),
    "chinese-roberta-wwm-ext": Preset("hfl/chinese-roberta-wwm-ext", 12, 768, 12, 3072, 21128,
                                      "HFL RoBERTa-wwm-ext (BERT architecture, RoBERTa recipe)"),
    "chinese-macbert-base": Preset("hfl/chinese-macbert-base", 12, 768, 12, 3072, 21128,
                                   "HFL MacBERT: masks with similar words instead of [MASK] (weaker [MASK] filler)"),
    "rbt6": Preset("hfl/rbt6", 6, 768, 12, 3072, 21128, "HFL RoBERTa-wwm-ext, 6 layers"),
    "rbt4": Preset("hfl/rbt4", 4, 768, 12, 3072, 21128, "HFL RoBERTa-wwm-ext, 4 layers"),
    "rbt3": Preset("hfl/rbt3", 3, 768, 12, 3072, 21128, "HFL RoBERTa-wwm-ext, 3 layers: the team's edge choice"),
    "rbtl3": Preset("hfl/rbtl3", 3, 1024, 16, 4096, 21128, "HFL RoBERTa-wwm-ext-large, 3 layers"),
    "chinese-roberta-wwm-ext-large": Preset("hfl/chinese-roberta-wwm-ext-large", 24, 1024, 16, 4096, 21128,
                                            "HFL RoBERTa-wwm-ext-large: most accurate, far too slow for a Pi"),
}


def resolve_source(source: str) -> str:
    """A preset name → its hub id; anything else (hub id, folder) unchanged.

    A local folder of the same name wins over the preset."""
    if source in PRESETS and not Path(source).expanduser().exists():
        return PRESETS[source].hub_id
    return source


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Architectures with a masked-LM head that AutoModelForMaskedLM loads in full.
_MLM_SUFFIXES = ("ForMaskedLM", "ForPreTraining")


@dataclass
class Checkpoint:
    """A loaded masked-LM with its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel (*ForMaskedLM), eval mode, float32
    tokenizer: Any  # transformers fast tokenizer
    source: str  # hub id or folder as given (or the original one, for a trimmed folder)
    revision: str | None = None
    random_init: bool = False
    seed: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab(self) -> dict[str, int]:
        """Token → id of the tokenizer."""
        return self.tokenizer.get_vocab()

    def special_ids(self) -> dict[str, int]:
        """Ids of the five BERT special tokens."""
        return special_ids_of(self.vocab)


def special_ids_of(vocab: dict[str, int]) -> dict[str, int]:
    """Return the ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]``; ToolError if one is missing."""
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ToolError(f"tokenizer lacks special token(s) {', '.join(missing)}; a BERT vocabulary is required")
    return {t: vocab[t] for t in SPECIAL_TOKENS}


def is_local(source: str) -> bool:
    """True when ``source`` names a local path rather than a hub id."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or not _HUB_ID_RE.match(source)


def _check_folder(folder: Path, random_init: bool) -> None:
    if not folder.exists():
        raise ToolError(f"{folder}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise ToolError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder with config.json)")
    config = folder / "config.json"
    if not config.is_file():
        raise ToolError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolError(f"{config}: not valid JSON ({exc})") from exc
    if not random_init and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ToolError(
            f"{folder}: no weights (none of {', '.join(WEIGHT_FILES)}); pass --random-init to build "
            "the same architecture with seeded random weights (benchmarks only, answers are meaningless)"
        )


def _check_mlm_architecture(config, source: str) -> None:
    """Refuse, by name, a checkpoint whose architecture has no masked-LM head."""
    names = list(getattr(config, "architectures", None) or [])
    bad = [n for n in names if not n.endswith(_MLM_SUFFIXES)]
    if names and len(bad) == len(names):
        raise ToolError(
            f"{source}: checkpoint is a {', '.join(bad)} (config.json 'architectures'), which has no "
            "masked-LM head; use a *ForMaskedLM or *ForPreTraining checkpoint (e.g. google-bert/bert-base-chinese)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolError(f"{path}: not valid JSON ({exc})") from exc


def _read_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE_FILE
    return _read_json(path) if path.is_file() else {}


def read_training_record(folder) -> dict[str, Any] | None:
    """The ``training.json`` that ``tools pretrain`` / ``tools distill`` write beside a
    checkpoint they trained (None when the folder has none, e.g. a hub checkpoint)."""
    path = Path(str(folder)) / TRAINING_FILE
    return _read_json(path) if path.is_file() else None


def load_checkpoint(source: str = DEFAULT_SOURCE, random_init: bool = False, seed: int = 0,
                    revision: str | None = None) -> Checkpoint:
    """Load a masked-LM and its tokenizer from a hub id or a local folder.

    With ``random_init`` only the config and tokenizer are read, and the model is
    built with ``torch.manual_seed(seed)`` random weights (same architecture).
    Raises ToolError with a message naming the source and the problem.
    """
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    source = resolve_source(source)
    local = is_local(source)
    provenance: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if local:
        folder = Path(source).expanduser()
        _check_folder(folder, random_init)
        provenance = _read_provenance(folder)
        load_from = str(folder)
    else:
        load_from = source
        if revision:
            kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError) as exc:
        where = ("local folder" if local else
                 "hub id (no such local folder; is the hub reachable? a local folder works offline)")
        raise ToolError(f"{source}: cannot read the config as a {where}: {_first_line(exc)}") from exc
    _check_mlm_architecture(config, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ToolError(f"{source}: cannot load the tokenizer: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ToolError(f"{source}: needs a fast (tokenizers) tokenizer; add tokenizer.json or vocab.txt")
    special_ids_of(tokenizer.get_vocab())

    if random_init:
        torch.manual_seed(seed)
        model = AutoModelForMaskedLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        log.info("built %s with random weights (seed %d): benchmarks only", type(model).__name__, seed)
    else:
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(
                load_from, config=config, attn_implementation="eager", dtype=torch.float32,
                output_loading_info=True, **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise ToolError(f"{source}: cannot load the weights: {_first_line(exc)}") from exc
        _check_head_loaded(model, info, source)
        log.info("loaded %s from %s", type(model).__name__, source)
    model.eval()
    if len(tokenizer.get_vocab()) > model.config.vocab_size:
        raise ToolError(
            f"{source}: tokenizer has {len(tokenizer.get_vocab())} tokens but the model only "
            f"{model.config.vocab_size} embedding rows"
        )
    rev = revision if not local else None
    rev = getattr(config, "_commit_hash", None) or rev
    if local and Path(load_from).resolve().parent.name == "snapshots":
        rev = Path(load_from).resolve().name  # a folder inside the HF cache: .../snapshots/<commit>
    result = Checkpoint(model=model, tokenizer=tokenizer, source=source, revision=rev,
                        random_init=random_init, seed=seed if random_init else None, provenance=provenance)
    if provenance:
        # A folder written by ``tools trim`` (or the tiny test checkpoint): report the
        # original model it came from, and whether its saved weights are random.
        result.source = provenance.get("source", source)
        result.revision = provenance.get("revision", result.revision)
        if not random_init and provenance.get("random_init"):
            result.random_init, result.seed = True, provenance.get("seed")
    return result


def _check_head_loaded(model, info: dict, source: str) -> None:
    """Refuse weights that left the MLM head randomly initialised."""
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(model.base_model_prefix + ".")]
    if missing:
        raise ToolError(
            f"{source}: the weights have no masked-LM head (missing {', '.join(sorted(missing)[:3])}); "
            "use a *ForMaskedLM or *ForPreTraining checkpoint"
        )
    if info.get("missing_keys"):
        raise ToolError(f"{source}: weights are incomplete (missing {', '.join(sorted(info['missing_keys'])[:3])} ...)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def architecture_of(config) -> dict[str, Any]:
    """The ``Architecture`` fields of the manifest, from a transformers config."""
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
    }


def add_source_arguments(parser) -> None:
    """Add the ``--source / --revision / --random-init / --seed`` options."""
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="hub id, preset name (python -m tools presets) or local checkpoint folder")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--random-init", action="store_true",
                        help="build the architecture with seeded random weights (config + tokenizer only)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
