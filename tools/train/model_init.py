"""The model a pretraining phase starts from: a fresh ``BertForMaskedLM`` of a shape, or an
earlier checkpoint grown to more layers (progressive stacking with silent copies) and
mapped onto this run's vocabulary by token; and the record of the phases before it
(their seeds, so that a phase does not replay an earlier one's batches)."""

from __future__ import annotations

import logging
from pathlib import Path

from tools import ToolError
from tools.bundle.checkpoint import read_training_record
from tools.train import wwm

log = logging.getLogger(__name__)

SHAPE_HELP = "LAYERSxHIDDENxHEADSxINTERMEDIATE, e.g. 4x256x4x1024"
DEFAULT_SHAPE = "4x256x4x1024"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """Parse ``LxHxAxI`` (layers, hidden, heads, intermediate)."""
    try:
        layers, hidden, heads, inter = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ToolError(f"--shape {text!r}: expected {SHAPE_HELP}") from None
    if min(layers, hidden, heads, inter) <= 0 or hidden % heads:
        raise ToolError(f"--shape {text!r}: sizes must be positive and hidden divisible by heads")
    return layers, hidden, heads, inter


def make_config(shape: str, vocab_size: int, max_position: int, dropout: float, pad_id: int):
    """A ``BertConfig`` of the given shape."""
    from transformers import BertConfig

    layers, hidden, heads, inter = parse_shape(shape)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter,
                      max_position_embeddings=max_position, type_vocab_size=2,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      pad_token_id=pad_id, architectures=["BertForMaskedLM"])


def shape_of(config) -> str:
    """The ``LxHxAxI`` shape string of a ``BertConfig``."""
    return (f"{config.num_hidden_layers}x{config.hidden_size}x{config.num_attention_heads}"
            f"x{config.intermediate_size}")


def grow_layers(model, layers: int):
    """A deeper copy of ``model`` with ``layers`` encoder layers, stacked on top of its
    own (progressive stacking: Gong et al. 2019, "Efficient training of BERT by
    progressively stacking"). Added layer i starts as a copy of layer i mod n, except
    that its two residual branches' output projections are zero and its LayerNorms
    plain (weight 1, bias 0): it then only re-normalises what it is given, so the grown
    model starts with about the shallow one's loss (growing the phase-5 4×128 to 6
    layers: 3.86 before and after; plain copies, to 8 layers: 6.9), and its query/key/value
    and feed-forward input weights already hold learned features. Embeddings and the
    masked-LM head are copied."""
    import copy

    import torch
    from transformers import BertForMaskedLM

    n = model.config.num_hidden_layers
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    grown = BertForMaskedLM(config)
    # Embeddings, layers 0..n-1 and the head by name; only the added layers are missing.
    missing = grown.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(key.startswith("bert.encoder.layer.") for key in missing), missing
    with torch.no_grad():
        for index in range(n, layers):
            layer = grown.bert.encoder.layer[index]
            layer.load_state_dict(model.bert.encoder.layer[index % n].state_dict())
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
    return grown


def map_vocabulary(model, folder: Path, have: list[str], tokens: list[str]) -> None:
    """Re-index ``model`` (in place) from its checkpoint's vocabulary ``have`` to
    ``tokens``: each token's embedding row and output bias are taken from the row of
    the same token (:func:`tools.bundle.trim_vocab.trim_model`), so that training can go on
    over data prepared with a different kept vocabulary (e.g. a model recovered from a
    bundle, whose vocabulary was chosen from another preparation of the corpus). Every
    token must be in the checkpoint, in the same relative order (both are taken from
    bert-base-chinese's vocabulary in its order)."""
    from tools.bundle.trim_vocab import trim_model

    if len(have) != model.config.vocab_size:
        raise ToolError(f"--init-from {folder}: vocab.txt has {len(have)} tokens, the model "
                        f"{model.config.vocab_size} embedding rows")
    index = {t: i for i, t in enumerate(have)}
    missing = [t for t in tokens if t not in index]
    if missing:
        raise ToolError(f"--init-from {folder}: {len(missing)} tokens of the prepared data are not in its "
                        f"vocabulary (e.g. {missing[:5]})")
    try:
        trim_model(model, [index[t] for t in tokens])
    except ValueError as exc:
        raise ToolError(f"--init-from {folder}: its vocabulary orders the tokens differently ({exc})") from exc
    log.info("vocabulary mapped by token: %d → %d rows (%d dropped)", len(have), len(tokens),
             len(have) - len(tokens))


def init_from_checkpoint(folder: Path, tokens: list[str], max_position: int, shape: str | None = None):
    """Weights of an earlier run to continue from, re-indexed by token when its
    vocabulary is not ``tokens`` (the prepared data's), with the position table cut
    to ``max_position`` when that is shorter, and grown to ``shape`` by stacking its
    layers when that asks for more layers of the same width."""
    import torch
    from transformers import BertForMaskedLM

    if not (Path(folder) / "config.json").is_file():
        raise ToolError(f"--init-from {folder}: no config.json (not a checkpoint folder)")
    model = BertForMaskedLM.from_pretrained(folder)
    have = wwm.read_vocab(Path(folder) / "vocab.txt")
    if have != list(tokens):
        map_vocabulary(model, folder, have, list(tokens))
    old = model.config.max_position_embeddings
    if max_position > old:
        raise ToolError(f"--init-from {folder}: has {old} positions, --max-position {max_position} asks for more")
    if max_position < old:
        emb = model.bert.embeddings
        table = torch.nn.Embedding(max_position, model.config.hidden_size)
        with torch.no_grad():
            table.weight.copy_(emb.position_embeddings.weight[:max_position])
        emb.position_embeddings = table
        model.config.max_position_embeddings = max_position
    log.info("starting from %s (%d positions → %d)", folder, old, max_position)
    have = shape_of(model.config)
    if shape and parse_shape(shape) != parse_shape(have):
        layers, *width = parse_shape(shape)
        n, *have_width = parse_shape(have)
        if width != have_width or layers < n:
            raise ToolError(f"--init-from {folder}: its shape is {have}; --shape {shape} can only add layers to it "
                            "(same hidden, heads and intermediate sizes)")
        log.info("growing %s → %s: added layer i starts as layer i mod %d with zero output projections",
                 have, shape, n)
        model = grow_layers(model, layers)
    return model


# What each phase of a chain of runs (--init-from) records about itself.
PHASE_FIELDS = ("objective", "shape", "init_from", "seq_len", "seq_schedule", "batch_size", "lr", "seed", "steps",
                "tokens_seen", "train_minutes", "device")


def earlier_phases(folder: Path | None) -> list[dict]:
    """The training phases behind the checkpoint a run continues from (oldest first),
    read from its training.json; [] for a fresh run or a checkpoint with no record
    (e.g. one from the hub), whose training is then not counted in the totals."""
    info = read_training_record(folder) if folder is not None else None
    if info is None:
        return []
    if info.get("phases"):
        # Phases recorded before the shape was a phase field all had the record's shape
        # (a chain could not change shape then).
        return [{**phase, "shape": phase.get("shape") or info.get("shape")} for phase in info["phases"]]
    return [{k: info.get(k) for k in PHASE_FIELDS}]  # a record written before phases were kept


def replayed_phase(earlier: list[dict], seed: int, seq_len: int, batch_size: int,
                   seq_schedule: str | None) -> int | None:
    """Index (1-based) of an earlier phase whose batches a run would replay, or None.

    The seed fixes both the chunk order and every mask (``Batches``), so a phase with
    the same seed, length and batch size (neither with a length schedule) sees the same
    batches with the same blanks, step for step: the model learns those blanks and its
    logged loss falls without it getting better (phase 9 of the default model)."""
    if seq_schedule:
        return None
    for i, phase in enumerate(earlier, 1):
        if (phase.get("seed") == seed and phase.get("seq_len") == seq_len
                and phase.get("batch_size") == batch_size and not phase.get("seq_schedule")):
            return i
    return None


def with_phases(info: dict, earlier: list[dict]) -> dict:
    """``info`` plus ``phases`` (earlier ones + this run) and the totals over them, so a
    model trained in several runs says how long it was trained in all."""
    phases = earlier + [{k: info.get(k) for k in PHASE_FIELDS}]
    return {**info, "phases": phases,
            "total_train_minutes": round(sum(p.get("train_minutes") or 0 for p in phases), 2),
            "total_tokens_seen": sum(p.get("tokens_seen") or 0 for p in phases),
            "total_steps": sum(p.get("steps") or 0 for p in phases)}
