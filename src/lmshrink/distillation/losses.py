"""Distillation losses: pure tensor math, no training loop.

Logit distillation (Hinton et al. 2015) from full teacher logits or from stored top-k soft labels, hidden-state
matching (MSE or cosine, with a learned projection when widths differ) and attention-map matching (MiniLM style).
Every loss is a mean over the unmasked positions; ``mask`` is 1 for real tokens and 0 for padding.

>>> s, t = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
>>> float(compute_distillation_loss(t, t, temperature=2.0))
0.0
"""

from __future__ import annotations

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
