"""The graph every bundle exports: a ``*ForMaskedLM`` with its MLM head applied only at
the masked positions (used by the export and by the PyTorch side of verification)."""

from __future__ import annotations

import torch


class MaskedPositionsLM(torch.nn.Module):
    """Wrap a ``*ForMaskedLM``: encoder over the whole sequence, MLM head only at
    ``mask_positions`` (gathered before the head, so the ``hidden × vocab`` projection
    runs for ``n_masks`` rows instead of ``seq``)."""

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.encoder = getattr(mlm, mlm.base_model_prefix)
        heads = [m for name, m in mlm.named_children() if name != mlm.base_model_prefix]
        if len(heads) != 1:
            raise ValueError(f"cannot find the MLM head of {type(mlm).__name__}")
        self.head = heads[0]

    def forward(self, input_ids, attention_mask, mask_positions):
        """Return logits ``[batch, n_masks, vocab]`` at ``mask_positions``."""
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )[0]
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden, 1, index)
        return self.head(picked)
