"""The graph every bundle exports: a ``*ForMaskedLM`` with its MLM head applied only at
the masked positions (used by the export and by the PyTorch side of verification).

For BERT-shaped encoders the last layer too runs only where it is needed: its keys
and values over the whole sequence, but its queries, attention output and
feed-forward block only at the masked rows, since nothing else reads them. That is
the same arithmetic for those rows (``tests/test_masked_lm.py`` checks it against the
plain model) and ~10/12 of one layer less work for the others: on bert-base at 24
tokens, 7% of the encoder's multiply-adds.
"""

from __future__ import annotations

import torch


def _last_layer_parts(encoder: torch.nn.Module):
    """The pieces of the encoder's last layer when it is a BERT layer whose forward
    ``_last_layer`` reproduces, else None (the encoder then runs whole, as exported by
    transformers)."""
    from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if config is None or not layers:
        return None
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None  # relative position scores live inside the attention
    last = layers[-1]
    # the very forwards reproduced, not a subclass's own
    if type(last).forward is not BertLayer.forward or \
            type(last.attention.self).forward is not BertSelfAttention.forward:
        return None
    return {"self": last.attention.self, "attention_out": last.attention.output,
            "intermediate": last.intermediate, "output": last.output}


class MaskedPositionsLM(torch.nn.Module):
    """Wrap a ``*ForMaskedLM``: encoder over the whole sequence (its last layer only at
    the masked rows, for BERT-shaped encoders), MLM head only at ``mask_positions``
    (gathered before the head, so the ``hidden × vocab`` projection runs for
    ``n_masks`` rows instead of ``seq``)."""

    def __init__(self, mlm: torch.nn.Module, last_layer_at_masks: bool = True):
        super().__init__()
        self.encoder = getattr(mlm, mlm.base_model_prefix)
        heads = [m for name, m in mlm.named_children() if name != mlm.base_model_prefix]
        if len(heads) != 1:
            raise ValueError(f"cannot find the MLM head of {type(mlm).__name__}")
        self.head = heads[0]
        self.last = _last_layer_parts(self.encoder) if last_layer_at_masks else None

    @property
    def last_layer_at_masks(self) -> bool:
        """Whether the last encoder layer runs only at the masked rows."""
        return self.last is not None

    def forward(self, input_ids, attention_mask, mask_positions):
        """Return logits ``[batch, n_masks, vocab]`` at ``mask_positions``."""
        token_type_ids = torch.zeros_like(input_ids)
        if self.last is None:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )[0]
            return self.head(_gather_rows(hidden, mask_positions))
        # hidden_states[-2] is the last layer's input; the last layer's own whole-sequence
        # output is then unused, and the exporter drops it as dead code.
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            output_hidden_states=True,
        ).hidden_states
        return self.head(self._last_layer(states[-2], attention_mask, mask_positions))

    def _last_layer(self, hidden, attention_mask, mask_positions):
        """BertLayer's forward (eval mode) for the rows at ``mask_positions`` only."""
        att = self.last["self"]
        heads, size = att.num_attention_heads, att.attention_head_size
        batch = hidden.shape[0]
        picked = _gather_rows(hidden, mask_positions)  # [batch, n_masks, hidden]
        query = att.query(picked).view(batch, -1, heads, size).transpose(1, 2)
        key = att.key(hidden).view(batch, -1, heads, size).transpose(1, 2)
        value = att.value(hidden).view(batch, -1, heads, size).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(2, 3)) * att.scaling
        # the additive mask transformers uses: the dtype's minimum at padding
        blocked = (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        probs = torch.softmax(scores + blocked, dim=-1)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, -1, heads * size)
        out = self.last["attention_out"]
        attended = out.LayerNorm(out.dense(context) + picked)
        inner = self.last["intermediate"](attended)
        final = self.last["output"]
        return final.LayerNorm(final.dense(inner) + attended)


def _gather_rows(hidden, positions):
    """``hidden[b, positions[b, i], :]`` as ``[batch, n, hidden]``."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)
