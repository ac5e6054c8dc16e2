"""DOPD's loss on one batch from the full logits of the three passes: the code to read first.

The trainer computes the same value and gradient with less memory: chunks of tokens, the fused
LM-head gradient, top-K targets read from K weight rows, thresholds gathered over micro-batches and
ranks (`step.py`, `router.py`, `methods.py`, `head_loss.py`); tests/test_reference.py checks both
loss paths against this module in float64. The maths and where it comes from: docs/algorithm.md.
"""

from __future__ import annotations

import math

import torch

from dopd_vlm.config import MethodConfig
from dopd_vlm.divergences import generalized_jsd, log_probs_at, topk_reverse_kl
from dopd_vlm.router import HS, HT, LH, LL


def dopd_loss(student_logits: torch.Tensor, privileged_logits: torch.Tensor, teacher_logits: torch.Tensor,
              token_ids: torch.Tensor, seq_index: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """J = mean over sequences of (mean over the sequence's tokens of each token's routed loss).

    Rows are a batch's valid response tokens: logits [N, V] of the student (the only ones with
    gradient), the privileged student and the teacher at the same tokens `token_ids` [N] of the
    sequences `seq_index` [N] (0..S-1, each with a token).
    """
    regimes = route(log_probs_at(teacher_logits, token_ids), log_probs_at(privileged_logits, token_ids),
                    cfg.trim, cfg.normalize)
    losses = token_losses(student_logits, privileged_logits, teacher_logits, regimes, cfg)
    per_sequence = losses.new_zeros(int(seq_index.max()) + 1).index_add(0, seq_index, losses)
    return (per_sequence / torch.bincount(seq_index)).mean()


def route(teacher_logprobs: torch.Tensor, privileged_logprobs: torch.Tensor, trim: float,
          normalize: str = "none") -> torch.Tensor:
    """Each token's regime from lT, lP (its sampled token's log-probs; untempered, detached)."""
    gap = (teacher_logprobs - privileged_logprobs).abs()
    q_t, q_p = teacher_logprobs.exp(), privileged_logprobs.exp()
    gap, q_t, q_p = (normalized(x.detach(), normalize) for x in (gap, q_t, q_p))
    gap_bar, q_t_bar, q_p_bar = (trimmed_mean(x, trim) for x in (gap, q_t, q_p))
    low_gap = torch.where(q_p + q_t >= q_p_bar + q_t_bar, LH, LL)
    high_gap = torch.where(q_t >= q_p, HT, HS)
    return torch.where(gap < gap_bar, low_gap, high_gap)


def trimmed_mean(values: torch.Tensor, trim: float) -> torch.Tensor:
    """The mean of the batch's values without the largest floor(trim * n) (the paper: 5 %)."""
    kept = values.numel() - math.floor(trim * values.numel() + 1e-9)
    return values.sort().values[:kept].mean()


def normalized(values: torch.Tensor, how: str) -> torch.Tensor:
    """method.normalize: none, minmax (to [0, 1]) or zscore, with the batch's statistics."""
    if how == "minmax":
        return (values - values.min()) / ((values.max() - values.min()).item() or 1.0)
    if how == "zscore":
        return (values - values.mean()) / (values.std(correction=0).item() or 1.0)
    return values


def token_losses(student_logits: torch.Tensor, privileged_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 regimes: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """Each token's weighted divergence to its regime's target: top-K reverse KL, full JS in HT."""

    def divergence(target: torch.Tensor, name: str) -> torch.Tensor:
        if name in ("js", "reverse_kl"):  # full vocabulary: beta 0.5 is JS, 1 the reverse KL
            return generalized_jsd(student_logits, target, 0.5 if name == "js" else 1.0, cfg.temperature)
        return topk_reverse_kl(student_logits, target, cfg.top_k, cfg.topk_variant, cfg.temperature)

    if cfg.ablation == "no_routing":  # both sources on every token, half weight each
        return 0.5 * divergence(teacher_logits, "topk") + 0.5 * divergence(privileged_logits, "topk")
    to_teacher = teacher_rows(regimes, cfg.ablation)
    losses = divergence(torch.where(to_teacher[:, None], teacher_logits, privileged_logits), cfg.divergence)
    if cfg.divergence == "routed":  # HT rows that distil from the teacher: full-vocabulary JS
        losses = torch.where((regimes == HT) & to_teacher, divergence(teacher_logits, "js"), losses)
    return regime_weights(regimes, cfg).to(losses.dtype) * losses


def teacher_rows(regimes: torch.Tensor, ablation: str) -> torch.Tensor:
    """Which tokens distil from the teacher (the others from the privileged student)."""
    from_teacher = {"none": (LH, HT), "no_teacher": (), "no_student": (LH, LL, HT, HS)}[ablation]
    return torch.isin(regimes, torch.tensor(from_teacher, dtype=regimes.dtype))


def regime_weights(regimes: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """Each token's weight, by its regime: the paper's (beta_l, beta_w, 1, beta_l), equal or HT only."""
    weights = {"paper": {LH: cfg.beta_l, LL: cfg.beta_w, HT: cfg.ht_weight, HS: cfg.beta_l},
               "equal": {LH: 1.0, LL: 1.0, HT: 1.0, HS: 1.0},
               "ht_only": {LH: 0.0, LL: 0.0, HT: 1.0, HS: 0.0}}[cfg.regime_weights]
    return torch.tensor([weights[int(r)] for r in regimes], dtype=torch.float64)
