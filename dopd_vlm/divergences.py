"""Per-token divergences between the student and a target distribution over the vocabulary.

Pure tensor math (docs/algorithm.md §3): logits in, one loss per token out, no reduction. Averaging
over tokens and sequences, and choosing which divergence a token gets, belong to the caller
(the router and the methods).

Conventions shared by every function here:

- Logits have shape ``[..., V]`` (usually ``[N, V]``, one row per response token); the result
  has the leading shape ``[...]``.
- Math runs in float32 even when the inputs are bf16/fp16 (float64 inputs stay float64, which
  the tests use for tight gradient checks). Logits must be finite.
- Only the student receives gradient. Target logits and log-probs are detached here, so a
  caller that forgets ``torch.no_grad()`` on a target pass cannot leak gradient into it.
- ``temperature`` divides the logits of both distributions before the softmax; no T^2 rescaling.

At real vocabulary sizes ``[N, V]`` logits for all response tokens do not fit in memory:
``dopd_vlm.head_loss`` applies the LM head and these functions one chunk of tokens at a time.
"""

from __future__ import annotations

import math

import torch

from dopd_vlm.choices import TOPK_VARIANTS


# --------------------------------------------------------------------------- small helpers


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision floats; float32/float64 are kept as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dimension, in float32 (or float64)."""
    _check_temperature(temperature)
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = Σ_v P(v) (log P(v) − log Q(v)) over the last dimension, from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# --------------------------------------------------------------------------- token helpers


def log_probs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids], computed as logit − logsumexp (stable).

    ``logits`` [..., V], ``ids`` [...] (int64) -> [...].
    """
    _check_temperature(temperature)
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature): [..., V] -> [...]."""
    return entropy_from_logprobs(log_probs(logits, temperature))


def entropy_from_logprobs(log_p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) from log-probabilities [..., V] -> [...]."""
    return -(log_p.exp() * log_p).sum(dim=-1)


def token_cross_entropy(
    student_logits: torch.Tensor, target_ids: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """SFT loss per token: −log P_S(target). Positions whose id is ``ignore_index`` give 0."""
    ignored = target_ids == ignore_index
    nll = -log_probs_at(student_logits, target_ids.masked_fill(ignored, 0))
    return nll.masked_fill(ignored, 0.0)


# --------------------------------------------------------------------------- divergences


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per token, full vocabulary (GKD convention).

    With the mixture ``M = β·P_T + (1−β)·P_S``::

        loss = β·KL(P_T ‖ M) + (1−β)·KL(P_S ‖ M)

    β = 0.5 is the symmetric JS divergence of DOPD's HT regime. The log-mixture is one
    ``logaddexp`` of the two log-distributions shifted by log β and log(1−β), so nothing is
    exponentiated outside a softmax.

    As β→0 the expression itself vanishes like β·KL(P_T‖P_S) (and as β→1 like
    (1−β)·KL(P_S‖P_T)); following GKD the endpoints are special-cased to the *unscaled* limits:
    β = 0 returns exactly the forward KL(P_T ‖ P_S), β = 1 exactly the reverse KL(P_S ‖ P_T).
    The function is therefore discontinuous at the two endpoints by design.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return generalized_jsd_from_logprobs(
        log_probs(student_logits, temperature), log_probs(teacher_logits.detach(), temperature), beta
    )


def generalized_jsd_from_logprobs(log_p_s: torch.Tensor, log_p_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """:func:`generalized_jsd` on log-probabilities (already tempered); the target is detached."""
    log_p_t = log_p_t.detach()
    if beta == 0.0:
        return _kl(log_p_t, log_p_s)
    if beta == 1.0:
        return _kl(log_p_s, log_p_t)
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)


def topk_reverse_kl(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    k: int = 128,
    variant: str = "unbiased",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reverse KL(P_S ‖ P_target) on the support of the student's top-``k`` tokens.

    The support S is the ``k`` most likely student tokens, chosen without gradient
    (``k`` larger than the vocabulary is clamped to it). Variants:

    ``"unbiased"`` (default)::

        Σ_{v∈S} P_S(v) · (sg[log P_S(v)] − log P_T(v))

      Why the stop-gradient: differentiating Σ_{v∈S} P_S(v)(log P_S(v) − log P_T(v)) gives
      Σ_S ∇P_S·(log P_S − log P_T) + Σ_S P_S ∇log P_S, and the second term equals ∇ Σ_S P_S.
      Over the full vocabulary that is ∇1 = 0, but over a subset it is the gradient of the
      support's mass, a bias that pushes mass into or out of S regardless of the target. With
      the stop-gradient only the first term remains, which is the exact reverse-KL gradient
      with the sum restricted to S. Per logit j, with c_v = log P_S(v) − log P_T(v)::

        ∂loss/∂z_j = P_S(j) · (1[j∈S]·c_j − Σ_{v∈S} P_S(v)·c_v)

      (for S = whole vocabulary: P_S ⊙ (log P_S − log P_T − KL), the full reverse-KL gradient).
      The *value* is a partial sum of KL terms and can be negative; it is a surrogate whose
      gradient is what matters.

    ``"renormalized"``: both distributions renormalised over S, then the exact KL there.

    ``"tail"``: the K support buckets plus one tail bucket holding each distribution's
      remaining mass, then the exact KL over these K+1 buckets. The tail mass is a
      logsumexp over the non-support log-probs, exact even when it is tiny.

    The target (teacher or detached privileged student) is detached.
    """
    if variant not in TOPK_VARIANTS:
        raise ValueError(f"variant must be one of {TOPK_VARIANTS}, got {variant!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return topk_reverse_kl_from_logprobs(
        log_probs(student_logits, temperature), log_probs(target_logits.detach(), temperature), k, variant
    )


def topk_reverse_kl_from_logprobs(
    log_p_s: torch.Tensor, log_p_t: torch.Tensor, k: int = 128, variant: str = "unbiased"
) -> torch.Tensor:
    """:func:`topk_reverse_kl` on log-probabilities (already tempered); the target is detached."""
    if variant not in TOPK_VARIANTS:
        raise ValueError(f"variant must be one of {TOPK_VARIANTS}, got {variant!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    log_p_t = log_p_t.detach()
    vocab_size = log_p_s.shape[-1]
    k = min(k, vocab_size)
    support = log_p_s.detach().topk(k, dim=-1).indices
    support_s = log_p_s.gather(-1, support)
    support_t = log_p_t.gather(-1, support)

    if variant in ("unbiased", "renormalized"):
        return topk_reverse_kl_on_support(support_s, support_t, variant)

    # "tail": with k == V the tail is empty and this is the full reverse KL.
    if k < vocab_size:
        tail_s = log_p_s.scatter(-1, support, -math.inf).logsumexp(dim=-1, keepdim=True)
        tail_t = log_p_t.scatter(-1, support, -math.inf).logsumexp(dim=-1, keepdim=True)
        support_s = torch.cat([support_s, tail_s], dim=-1)
        support_t = torch.cat([support_t, tail_t], dim=-1)
    return _kl(support_s, support_t)


def topk_reverse_kl_on_support(
    support_log_p_s: torch.Tensor, support_log_p_t: torch.Tensor, variant: str = "unbiased"
) -> torch.Tensor:
    """The ``"unbiased"`` / ``"renormalized"`` top-K reverse KL from log-probs on the support.

    ``support_log_p_s`` [..., K] are the student's (tempered) log-probs at its top-K tokens, with
    gradient; ``support_log_p_t`` the target's at the same tokens (detached here). These two
    variants need nothing outside the support, which lets a caller compute the target's
    support log-probs without materialising its full-vocabulary logits (see
    ``methods.Target.support_log_probs``). The ``"tail"`` variant needs the full rows: use
    :func:`topk_reverse_kl`.
    """
    support_log_p_t = support_log_p_t.detach()
    if variant == "unbiased":
        return (support_log_p_s.exp() * (support_log_p_s.detach() - support_log_p_t)).sum(dim=-1)
    if variant == "renormalized":
        return _kl(
            support_log_p_s - support_log_p_s.logsumexp(dim=-1, keepdim=True),
            support_log_p_t - support_log_p_t.logsumexp(dim=-1, keepdim=True),
        )
    raise ValueError(f"variant must be 'unbiased' or 'renormalized' on a support, got {variant!r}")


def sampled_token_reverse_kl(
    student_token_logprobs: torch.Tensor, teacher_token_logprobs: torch.Tensor
) -> torch.Tensor:
    """Vanilla-OPD single-sample estimator per sampled token.

    ``A_t = sg[log P_T(y_t) − log P_S(y_t)]`` and ``loss_t = −A_t · log P_S(y_t)``. For tokens
    sampled from the student, the expected gradient equals the reverse-KL gradient; the value
    itself is a surrogate (its gradient is −A_t·∇log P_S(y_t)). Inputs are per-token log-probs.
    """
    student = upcast(student_token_logprobs)
    advantage = upcast(teacher_token_logprobs).detach() - student.detach()
    return -advantage * student


def support_bucket_kl(support_log_p_s: torch.Tensor, support_log_p_t: torch.Tensor) -> torch.Tensor:
    """KL(P_S ‖ P_T) over the K support tokens plus one bucket for the rest of each distribution.

    From log-probs at the support only ([..., K] each, e.g. the student's top-K): the bucket's mass
    is 1 − Σ_K P. It equals the exact KL when the support holds (nearly) all of both distributions
    and is a lower bound otherwise (the tail's inner structure is merged). No gradient is intended:
    a diagnostic where the target's full rows are not computed.
    """

    def tail(log_p: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-log_p.exp().sum(dim=-1).clamp(max=1.0 - 1e-6))

    tail_s, tail_t = tail(support_log_p_s), tail(support_log_p_t)
    inside = (support_log_p_s.exp() * (support_log_p_s - support_log_p_t)).sum(dim=-1)
    return inside + tail_s.exp() * (tail_s - tail_t)
