"""TinyBERT's losses (Jiao et al., 2019) for ``tools distill``: attention-score MSE,
hidden-state and embedding MSE through learned projections, and soft cross-entropy
at the masked positions; ``Distiller`` holds the teacher, the student and the
projections and gives each stage's loss."""

from __future__ import annotations

import math

import numpy as np

from tools import ToolError


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Uniform mapping g(m) = m·N/M for m = 1..M (1-based teacher layer numbers)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ToolError("layer counts must be positive")
    if student_layers > teacher_layers:
        raise ToolError(f"the student has more layers ({student_layers}) than the teacher ({teacher_layers})")
    return [m * teacher_layers // student_layers for m in range(1, student_layers + 1)]


def attention_scores(bert, hidden_states, layer_numbers: list[int]):
    """Unnormalised attention scores QKᵀ/√d of the given (1-based) layers, recomputed
    from each layer's input: [batch, heads, seq, seq] per layer."""
    scores = []
    for number in layer_numbers:
        attn = bert.encoder.layer[number - 1].attention.self
        x = hidden_states[number - 1]
        b, s, _ = x.shape
        q = attn.query(x).view(b, s, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
        k = attn.key(x).view(b, s, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
        scores.append(q @ k.transpose(-1, -2) / math.sqrt(attn.attention_head_size))
    return scores


def attention_loss(student_scores, teacher_scores, attention_mask):
    """MSE of the scores over real (query, key) pairs, averaged over heads and layers.
    With fewer student heads, teacher heads are averaged in groups to match."""
    import torch.nn.functional as F

    pair = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).float()
    total = 0.0
    for s, t in zip(student_scores, teacher_scores):
        if t.shape[1] != s.shape[1]:
            if t.shape[1] % s.shape[1]:
                raise ToolError(f"teacher heads ({t.shape[1]}) are not a multiple of student heads ({s.shape[1]})")
            t = t.view(t.shape[0], s.shape[1], t.shape[1] // s.shape[1], *t.shape[2:]).mean(2)
        err = F.mse_loss(s, t, reduction="none") * pair
        total = total + err.sum() / (pair.sum() * s.shape[1])
    return total / max(len(student_scores), 1)


def hidden_loss(student_hidden, teacher_hidden, projection, attention_mask):
    """MSE between the projected student states and the teacher's, over real tokens."""
    keep = attention_mask.bool()
    return ((projection(student_hidden)[keep] - teacher_hidden[keep]) ** 2).mean()


def soft_cross_entropy(student_logits, teacher_logits, temperature: float):
    """−Σ softmax(z_T/t) · log_softmax(z_S/t), averaged over positions."""
    import torch.nn.functional as F

    target = F.softmax(teacher_logits / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


class Distiller:
    """Teacher + student + projections; computes the loss of one stage on one batch."""

    def __init__(self, teacher, student, to_teacher: np.ndarray, temperature: float):
        import torch

        self.teacher, self.student = teacher, student
        self.to_teacher = torch.as_tensor(to_teacher)
        self.temperature = temperature
        self.layers = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        self.proj_embedding = torch.nn.Linear(d_s, d_t, bias=False)
        self.proj_hidden = torch.nn.Linear(d_s, d_t, bias=False)

    def to(self, device):
        """Move every part to ``device``."""
        for part in (self.teacher, self.student, self.proj_embedding, self.proj_hidden):
            part.to(device)
        self.to_teacher = self.to_teacher.to(device)
        return self

    def trainable(self, stage: str) -> list:
        """(name, parameter) pairs trained in ``stage`` (projections only in the intermediate one)."""
        params = list(self.student.named_parameters())
        if stage == "intermediate":
            params += [(f"proj_embedding.{n}", p) for n, p in self.proj_embedding.named_parameters()]
            params += [(f"proj_hidden.{n}", p) for n, p in self.proj_hidden.named_parameters()]
        return params

    def loss(self, stage: str, inputs, attention_mask, labels) -> tuple:
        """Loss of ``stage`` on one batch, with a dict of its parts (floats)."""
        import torch

        teacher_inputs = self.to_teacher[inputs]
        hidden = stage == "intermediate"  # the prediction stage needs the last layer only
        with torch.no_grad():
            t_out = self.teacher.base_model(input_ids=teacher_inputs, attention_mask=attention_mask,
                                            output_hidden_states=hidden)
        s_out = self.student.base_model(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        if stage == "intermediate":
            t_h, s_h = t_out.hidden_states, s_out.hidden_states
            emb = hidden_loss(s_h[0], t_h[0], self.proj_embedding, attention_mask)
            hid = sum(hidden_loss(s_h[m + 1], t_h[g], self.proj_hidden, attention_mask)
                      for m, g in enumerate(self.layers)) / len(self.layers)
            with torch.no_grad():
                t_scores = attention_scores(self.teacher.base_model, t_h, self.layers)
            s_scores = attention_scores(self.student.base_model, s_h, list(range(1, len(self.layers) + 1)))
            att = attention_loss(s_scores, t_scores, attention_mask)
            total = emb + hid + att
            return total, {"emb": emb.item(), "hidden": hid.item(), "attn": att.item()}
        selected = labels != -100
        with torch.no_grad():
            t_logits = self.teacher.cls(t_out.last_hidden_state[selected]).float()[:, self.to_teacher]
        s_logits = self.student.cls(s_out.last_hidden_state[selected]).float()
        soft = soft_cross_entropy(s_logits, t_logits, self.temperature)
        target = labels[selected]
        acc = (s_logits.argmax(-1) == target).float().mean().item() if target.numel() else 0.0
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item() if target.numel() else 0.0
        return soft, {"soft_ce": soft.item(), "mlm_acc": acc, "teacher_agree": agree}
