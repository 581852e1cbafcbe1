"""Distillation losses: pure tensor math, no training loop.

Logit distillation (Hinton et al. 2015) from full teacher logits or from stored top-k soft labels, hidden-state
matching (MSE or cosine, with a learned projection when widths differ) and attention-map matching (MiniLM style).
Every loss is a mean over the unmasked positions; ``mask`` is 1 for real tokens and 0 for padding.

>>> s, t = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
>>> float(compute_distillation_loss(t, t, temperature=2.0))
0.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.errors import LmshrinkError


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise when it is not a finite number > 0."""
    t = float(temperature)
    if not (t > 0 and t < float("inf")):
        raise LmshrinkError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise when it is outside [0, 1]."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise LmshrinkError(f"alpha (weight of the distillation loss) must be in [0, 1], got {alpha}")
    return a


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (any shape) over the positions where ``mask`` (same shape, 0/1 or bool) is set."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    if m.shape != values.shape:
        raise LmshrinkError(
            f"mask shape {tuple(m.shape)} does not match the per-token shape {tuple(values.shape)}"
        )
    return (values * m).sum() / m.sum().clamp_min(1.0)


def kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) for every position, shape ``logits.shape[:-1]``, not scaled."""
    if student_logits.shape != teacher_logits.shape:
        raise LmshrinkError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ "
            "in shape; teacher and student must share the vocabulary (see check_vocab)"
        )
    t = check_temperature(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def compute_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """Knowledge-distillation loss: KL(softmax(teacher/T) || softmax(student/T)) x T², mean over unmasked tokens.

    Logits are ``(..., vocab)``: ``(batch, seq, vocab)`` for language models, ``(batch, classes)`` for
    classification. The T² factor keeps gradient magnitudes comparable across temperatures.

    >>> s = torch.tensor([[1.0, 0.0]]); t = torch.tensor([[0.0, 1.0]])
    >>> round(float(compute_distillation_loss(s, t, 1.0)), 4)
    0.4621
    """
    t = check_temperature(temperature)
    return masked_mean(kl_per_token(student_logits, teacher_logits, t), mask) * (t * t)


def student_topk_log_probs(
    student_logits: Tensor, indices: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student log-probabilities at the teacher's top-k ``indices`` and of the remaining tokens, at temperature T.

    Returns ``(log_q_topk (..., k), log_q_rest (...))``; the rest is computed stably with a masked logsumexp.
    """
    z = student_logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q_top = z.gather(-1, indices.long()) - lse
    # a large finite fill (not -inf): when k == vocab the rest is empty and must stay finite for autograd
    rest = z.scatter(-1, indices.long(), -1e30)
    log_q_rest = torch.logsumexp(rest, dim=-1) - lse.squeeze(-1)
    return log_q_top, log_q_rest


def retemper_topk(probs: Tensor, rest: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Soften top-k probabilities stored at T=1 to temperature T: p_i^(1/T), renormalised.

    The top-k part is exact (p_i ∝ exp(z_i)); the unknown tail is taken as uniform over the other tokens, so the
    tail mass is approximate. At ``temperature == 1`` the inputs come back unchanged.
    """
    t = check_temperature(temperature)
    if t == 1.0:
        return probs.float(), rest.float()
    k = probs.shape[-1]
    n_tail = max(vocab_size - k, 1)
    p = probs.float().clamp_min(1e-30).pow(1.0 / t)
    tail_each = (rest.float().clamp_min(0) / n_tail).clamp_min(1e-30).pow(1.0 / t)
    tail = tail_each * n_tail * (rest.float() > 0)
    total = p.sum(-1) + tail
    return p / total.unsqueeze(-1), tail / total


def topk_distillation_loss(
    student_logits: Tensor,
    topk_probs: Tensor,
    topk_indices: Tensor,
    rest_mass: Tensor,
    temperature: float,
    mask: Tensor | None = None,
    stored_temperature: float = 1.0,
) -> Tensor:
    """Distillation loss from stored soft labels: the teacher's top-k probabilities plus the remaining mass.

    KL over k+1 buckets (the k teacher tokens and "everything else") x T², mean over unmasked tokens. It equals the
    full KL when the teacher puts all its mass on its top-k, and is a lower bound of it otherwise. Soft labels stored
    at ``stored_temperature`` are re-tempered to ``temperature`` (exact for top-k, uniform-tail approximation).

    >>> logits = torch.randn(1, 3, 50)
    >>> p, i = logits.softmax(-1).topk(50)
    >>> full = compute_distillation_loss(torch.zeros(1, 3, 50), logits, 1.0)
    >>> topk = topk_distillation_loss(torch.zeros(1, 3, 50), p, i, torch.zeros(1, 3), 1.0)
    >>> bool(torch.allclose(full, topk, atol=1e-5))
    True
    """
    t = check_temperature(temperature)
    if topk_probs.shape != topk_indices.shape or topk_probs.shape[:-1] != rest_mass.shape:
        raise LmshrinkError(
            f"soft labels disagree in shape: probs {tuple(topk_probs.shape)}, indices {tuple(topk_indices.shape)}, "
            f"rest {tuple(rest_mass.shape)}"
        )
    if student_logits.shape[:-1] != rest_mass.shape:
        raise LmshrinkError(
            f"student logits {tuple(student_logits.shape)} do not match soft labels {tuple(topk_probs.shape)}"
        )
    vocab = student_logits.shape[-1]
    if stored_temperature != t:
        # Re-temper from the stored distribution: q ∝ p^(T0/T).
        p, r = retemper_topk(topk_probs, rest_mass, vocab, t / stored_temperature)
    else:
        p, r = topk_probs.float(), rest_mass.float()
    log_q_top, log_q_rest = student_topk_log_probs(student_logits, topk_indices, t)
    kl = (torch.xlogy(p, p) - p * log_q_top).sum(-1)
    # with k == vocab there is no "rest" bucket: its stored mass is rounding noise
    if topk_indices.shape[-1] < vocab:
        kl = kl + torch.xlogy(r, r) - r * log_q_rest
    return masked_mean(kl, mask) * (t * t)


def causal_lm_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy: position i predicts ``labels[i + 1]``; ``-100`` labels and masked ones are ignored."""
    targets = labels[:, 1:].clone()
    if mask is not None:
        targets[mask[:, 1:] == 0] = -100
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def combine_losses(kd: Tensor, ce: Tensor, alpha: float) -> Tensor:
    """``alpha x kd + (1 - alpha) x ce`` with ``alpha`` validated to lie in [0, 1]."""
    a = check_alpha(alpha)
    if a == 1.0:
        return kd
    if a == 0.0:
        return ce
    return a * kd + (1.0 - a) * ce


class HiddenStateLoss(nn.Module):
    """Match student hidden states to the teacher's: MSE or (1 - cosine), with a learned linear projection of the
    student states when the widths differ (TinyBERT). The projection is trainable: add its parameters to the
    optimizer.

    >>> loss = HiddenStateLoss(32, 64, kind="cosine")
    >>> float(loss(torch.randn(2, 5, 32), torch.randn(2, 5, 64))) > 0
    True
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise LmshrinkError(f"hidden-state loss kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind = kind
        self.proj: nn.Module = (
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)
        )

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        """Loss between ``student (B, T, ds)`` and ``teacher (B, T, dt)`` states, mean over unmasked positions."""
        s = self.proj(student.float())  # (B, T, dt)
        t = teacher.float().detach()
        if s.shape != t.shape:
            raise LmshrinkError(
                f"hidden states differ in shape after projection: {tuple(s.shape)} vs {tuple(t.shape)}"
            )
        per_tok = (s - t).pow(2).mean(-1) if self.kind == "mse" else 1.0 - F.cosine_similarity(s, t, dim=-1)
        return masked_mean(per_tok, mask)


def attention_map_loss(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) between attention distributions ``(B, heads, T, T)``, mean over heads and unmasked
    query positions (MiniLM). When head counts differ, the maps are averaged over heads first.

    >>> a = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    >>> float(attention_map_loss(a, a))
    0.0
    """
    if student_attn.shape[-2:] != teacher_attn.shape[-2:]:
        raise LmshrinkError(
            f"attention maps differ in length: {tuple(student_attn.shape)} vs {tuple(teacher_attn.shape)}"
        )
    s, t = student_attn.float(), teacher_attn.float().detach()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    kl = (torch.xlogy(t, t) - t * s.clamp_min(1e-12).log()).sum(-1).mean(1)  # (B, T)
    return masked_mean(kl, mask)


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i matched to the last teacher layer of its span, ``(i + 1) x n_teacher / n_student - 1``
    (TinyBERT's uniform mapping: the student's last layer always faces the teacher's last layer).

    >>> default_layer_map(3, 6), default_layer_map(2, 4)
    ([(0, 1), (1, 3), (2, 5)], [(0, 1), (1, 3)])
    """
    if not 1 <= n_student <= n_teacher:
        raise LmshrinkError(
            f"a layer map needs 1 <= student layers ({n_student}) <= teacher layers ({n_teacher})"
        )
    return [(i, (i + 1) * n_teacher // n_student - 1) for i in range(n_student)]


class IntermediateLoss(nn.Module):
    """Hidden-state and attention-map terms between mapped student and teacher layers, added to the logit loss as
    ``hidden_weight x mean_pairs(HiddenStateLoss) + attention_weight x mean_pairs(attention_map_loss)``.

    ``layer_map`` pairs ``(student_layer, teacher_layer)`` (0-based blocks; default :func:`default_layer_map`).
    A pair compares the *outputs* of the two blocks (``hidden_states[i + 1]`` of a ``transformers`` output) and
    their attention maps (``attentions[i]``). With widths that differ each pair gets a learned projection: pass
    :meth:`parameters` to the optimizer (``distill_model`` and ``train_lm`` do). Inputs are ``transformers``
    outputs run with ``output_hidden_states`` / ``output_attentions`` (see :meth:`forward_kwargs`).

    >>> loss = IntermediateLoss(32, 64, 2, 4, hidden_weight=1.0)
    >>> loss.layer_map
    [(0, 1), (1, 3)]
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_student_layers: int,
        n_teacher_layers: int,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        attention_weight: float = 0.0,
        layer_map: list[tuple[int, int]] | list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        for name, w in (("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
            if not (float(w) >= 0 and math.isfinite(float(w))):
                raise LmshrinkError(f"{name} must be a finite number >= 0, got {w}")
        self.hidden_weight, self.attention_weight = float(hidden_weight), float(attention_weight)
        pairs = (
            default_layer_map(n_student_layers, n_teacher_layers)
            if layer_map is None
            else [tuple(p) for p in layer_map]
        )
        for p in pairs:
            if len(p) != 2 or not 0 <= int(p[0]) < n_student_layers or not 0 <= int(p[1]) < n_teacher_layers:
                raise LmshrinkError(
                    f"layer_map pairs are (student layer 0..{n_student_layers - 1}, teacher layer "
                    f"0..{n_teacher_layers - 1}), got {list(p)}"
                )
        if not pairs:
            raise LmshrinkError("layer_map is empty; give at least one (student layer, teacher layer) pair")
        self.layer_map: list[tuple[int, int]] = [(int(s), int(t)) for s, t in pairs]
        self.hidden = nn.ModuleList(
            HiddenStateLoss(student_dim, teacher_dim, hidden_loss) for _ in self.layer_map
        )

    @property
    def active(self) -> bool:
        """Whether any intermediate term has a non-zero weight."""
        return self.hidden_weight > 0 or self.attention_weight > 0

    def forward_kwargs(self) -> dict[str, bool]:
        """Extra keyword arguments for the model calls: which intermediate outputs to return."""
        return {
            "output_hidden_states": self.hidden_weight > 0,
            "output_attentions": self.attention_weight > 0,
        }

    def forward(
        self, student_out: Any, teacher_out: Any, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The weighted sum of the intermediate terms and the unweighted terms as floats."""
        dev = (student_out.logits if hasattr(student_out, "logits") else student_out[0]).device
        total = torch.zeros((), device=dev)
        parts: dict[str, float] = {}
        if self.hidden_weight > 0:
            hs, ht = _needed(student_out, "hidden_states"), _needed(teacher_out, "hidden_states")
            terms = [
                loss(hs[s + 1], ht[t + 1], mask)
                for loss, (s, t) in zip(self.hidden, self.layer_map, strict=True)
            ]
            hidden = torch.stack(terms).mean()
            total = total + self.hidden_weight * hidden
            parts["loss_hidden"] = float(hidden.detach())
        if self.attention_weight > 0:
            a_s, a_t = _needed(student_out, "attentions"), _needed(teacher_out, "attentions")
            attn = torch.stack([attention_map_loss(a_s[s], a_t[t], mask) for s, t in self.layer_map]).mean()
            total = total + self.attention_weight * attn
            parts["loss_attention"] = float(attn.detach())
        return total, parts


def _needed(out: Any, field: str) -> Any:
    value = getattr(out, field, None)
    if value is None or any(v is None for v in value):
        hint = (
            "; attention maps need the eager attention implementation (use_eager_attention(model))"
            if field == "attentions"
            else ""
        )
        raise LmshrinkError(f"the model output has no {field}{hint}")
    return value


def use_eager_attention(model: nn.Module) -> None:
    """Switch a ``transformers`` model to eager attention, the implementation that returns attention maps."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise LmshrinkError(f"{type(model).__name__} has no config; cannot return attention maps")
        cfg._attn_implementation = "eager"


def build_intermediate_loss(
    teacher: nn.Module,
    student: nn.Module,
    hidden_weight: float = 0.0,
    hidden_loss: str = "mse",
    attention_weight: float = 0.0,
    layer_map: list[tuple[int, int]] | list[list[int]] | None = None,
) -> IntermediateLoss | None:
    """An :class:`IntermediateLoss` for two ``transformers`` models (widths and depths from their configs), or None
    when both weights are 0. Switches both models to eager attention when attention maps are matched."""
    if not (hidden_weight or attention_weight):
        if layer_map is not None:
            raise LmshrinkError("layer_map is given but hidden_weight and attention_weight are both 0")
        return None
    ct, cs = getattr(teacher, "config", None), getattr(student, "config", None)
    if ct is None or cs is None:
        raise LmshrinkError("hidden-state and attention losses need transformers models (with a config)")
    loss = IntermediateLoss(
        int(cs.hidden_size),
        int(ct.hidden_size),
        int(cs.num_hidden_layers),
        int(ct.num_hidden_layers),
        hidden_weight,
        hidden_loss,
        attention_weight,
        layer_map,
    )
    if attention_weight > 0:
        use_eager_attention(teacher)
        use_eager_attention(student)
    return loss.to(next(student.parameters()).device)
