"""Per-token divergences between the student and a target distribution over the vocabulary.

Pure tensor math (ALGORITHM.md §3): logits in, one loss per token out, no reduction. Averaging
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

At real vocabulary sizes ``[N, V]`` logits for all response tokens do not fit in memory; see
:func:`chunked_head_loss`, which applies the LM head and the loss one chunk of tokens at a time.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TOPK_VARIANTS = ("unbiased", "renormalized", "tail")

# An LM head: either its weight [V, H] (logits = hidden @ weight.T) or any callable hidden -> logits.
Head = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# --------------------------------------------------------------------------- small helpers


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision floats; float32/float64 are kept as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dimension, in float32 (or float64)."""
    return _log_probs(logits, temperature)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    _check_temperature(temperature)
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = Σ_v P(v) (log P(v) − log Q(v)) over the last dimension, from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# --------------------------------------------------------------------------- token helpers


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids], computed as logit − logsumexp (stable).

    ``logits`` [..., V], ``ids`` [...] (int64) -> [...].
    """
    _check_temperature(temperature)
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature): [..., V] -> [...]."""
    return entropy_from_logprobs(_log_probs(logits, temperature))


def entropy_from_logprobs(log_p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) from log-probabilities [..., V] -> [...]."""
    return -(log_p.exp() * log_p).sum(dim=-1)


def token_cross_entropy(
    student_logits: torch.Tensor, target_ids: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """SFT loss per token: −log P_S(target). Positions whose id is ``ignore_index`` give 0."""
    ignored = target_ids == ignore_index
    nll = -token_logprobs(student_logits, target_ids.masked_fill(ignored, 0))
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
        _log_probs(student_logits, temperature), _log_probs(teacher_logits.detach(), temperature), beta
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
        _log_probs(student_logits, temperature), _log_probs(target_logits.detach(), temperature), k, variant
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
    ``methods.compute_loss``). The ``"tail"`` variant needs the full rows: use
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
    student = _upcast(student_token_logprobs)
    advantage = _upcast(teacher_token_logprobs).detach() - student.detach()
    return -advantage * student


# --------------------------------------------------------------------------- memory helpers


def chunked(
    fn: Callable[..., torch.Tensor], *per_token_tensors: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """``fn`` applied to consecutive chunks of rows of ``per_token_tensors``, concatenated.

    Every tensor is sliced along dim 0 (all must share that length); ``fn`` returns one row
    per token of its chunk ([chunk] or [chunk, C], e.g. a loss stacked with logging columns).
    Extra non-per-token arguments go in through a closure or ``functools.partial``. This bounds
    forward memory only; to also bound what the backward keeps alive, use :func:`chunked_head_loss`.
    """
    if not per_token_tensors:
        raise ValueError("chunked needs at least one per-token tensor")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_rows = per_token_tensors[0].shape[0]
    for tensor in per_token_tensors:
        if tensor.shape[0] != num_rows:
            raise ValueError(
                f"per-token tensors disagree on the number of rows: {[t.shape[0] for t in per_token_tensors]}"
            )
    if num_rows == 0:  # one call on the empty tensors keeps the output's dtype/shape conventions
        return fn(*per_token_tensors)
    pieces = [
        fn(*(tensor[start : start + chunk_size] for tensor in per_token_tensors))
        for start in range(0, num_rows, chunk_size)
    ]
    return torch.cat(pieces)


def _apply_head(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(head, torch.Tensor):
        return F.linear(hidden, head)
    return head(hidden)


_RECOMPUTING = threading.local()


def is_recomputing() -> bool:
    """True while :func:`chunked_head_loss` re-runs a checkpointed chunk during backward.

    A per-chunk function can skip work whose result the backward does not need (detached
    diagnostics) when this is True; its output must keep the same shape.
    """
    return getattr(_RECOMPUTING, "active", False)


@contextlib.contextmanager
def _recomputing():
    previous = is_recomputing()
    _RECOMPUTING.active = True
    try:
        yield
    finally:
        _RECOMPUTING.active = previous


def chunked_head_loss(
    hidden: torch.Tensor,
    head: Head,
    per_chunk_loss_fn: Callable[..., torch.Tensor],
    *per_token_tensors: torch.Tensor,
    chunk_size: int = 1024,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """Per-token losses computed from hidden states, never materialising all-token logits.

    For each chunk of rows, the student logits ``head(hidden[chunk])`` ([chunk, V]; with a weight
    tensor ``head`` of shape [V, H] that is ``hidden @ head.T``) are passed to
    ``per_chunk_loss_fn(student_logits, *chunks_of_per_token_tensors)``, which returns one row
    per token ([chunk] losses, or [chunk, C] to carry extra per-token columns).
    The per-chunk function typically computes the target logits itself from the chunk of target
    hidden states and a target head captured in a closure, under ``torch.no_grad()``.

    Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): autograd keeps only the
    chunk's inputs, and the backward recomputes one chunk's logits at a time. Peak memory is then
    O(chunk_size·V) in both directions instead of O(N·V), at the price of a second head matmul
    (and of a second run of ``per_chunk_loss_fn``, so it must be deterministic: no sampling;
    during that second run :func:`is_recomputing` is True). Without grad mode, or with
    ``checkpoint_chunks=False``, chunks run plainly.

    Gradients reach ``hidden`` and the head's parameters (weight tensor or the callable's),
    identical to the unchunked computation. When the caller reduces the per-token losses with
    weights it knows in advance and the head is a plain weight tensor, :func:`fused_head_loss`
    does the same work without the recomputation.
    """

    def chunk_loss(hidden_chunk: torch.Tensor, head_: Head, *other_chunks: torch.Tensor) -> torch.Tensor:
        return per_chunk_loss_fn(_apply_head(head_, hidden_chunk), *other_chunks)

    if checkpoint_chunks and torch.is_grad_enabled():

        def contexts():
            return contextlib.nullcontext(), _recomputing()

        def run(hidden_chunk: torch.Tensor, *other_chunks: torch.Tensor) -> torch.Tensor:
            return checkpoint(
                chunk_loss, hidden_chunk, head, *other_chunks, use_reentrant=False, context_fn=contexts
            )

    else:

        def run(hidden_chunk: torch.Tensor, *other_chunks: torch.Tensor) -> torch.Tensor:
            return chunk_loss(hidden_chunk, head, *other_chunks)

    return chunked(run, hidden, *per_token_tensors, chunk_size=chunk_size)


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients w.r.t. hidden/weight/bias.

    The gradients are kept (sizes of the inputs, not of the logits); backward only scales them
    by the upstream gradient of the scalar loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weights, fn, vocab_size, chunk_size, give_log_probs, *others):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        w = weight[:vocab_size]
        b = bias[:vocab_size] if bias is not None else None
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        wants_grad = needs_hidden or needs_weight or needs_bias
        total = torch.zeros((), dtype=_upcast(hidden).dtype, device=hidden.device)
        columns = []
        n = hidden.shape[0]
        for start in range(0, max(n, 1), chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            x = F.linear(h, w, b)  # grad mode is off in forward: no graph back to the inputs
            if give_log_probs:  # in place: the logits' memory becomes the log-probs'
                x = _upcast(x)
                x -= x.logsumexp(dim=-1, keepdim=True)
            with torch.enable_grad():
                x.requires_grad_(wants_grad)
                out = fn(x, *(t[start:stop] for t in others))
                loss = out if out.ndim == 1 else out[:, 0]
                weighted = (loss * token_weights[start:stop].to(loss.dtype)).sum()
                grad_x = None
                if wants_grad and weighted.requires_grad and stop > start:
                    (grad_x,) = torch.autograd.grad(weighted, x)
            total += weighted.detach().to(total.dtype)
            columns.append(out.detach())
            del out, loss, weighted
            if grad_x is None:
                continue
            if give_log_probs:  # d/dz of log_softmax: g - softmax(z) * sum(g), in place
                x = x.detach().exp_().mul_(grad_x.sum(dim=-1, keepdim=True))
                grad_x -= x
            del x
            grad_x = grad_x.to(h.dtype)
            if needs_hidden:
                torch.mm(grad_x, w, out=grad_hidden[start:stop])
            if needs_weight:
                grad_weight[:vocab_size].addmm_(grad_x.T, h)
            if needs_bias:
                grad_bias[:vocab_size] += grad_x.sum(dim=0)
            del grad_x
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        columns = torch.cat(columns)
        ctx.mark_non_differentiable(columns)
        return total, columns

    @staticmethod
    def backward(ctx, grad_total, _grad_columns):
        unit = bool(grad_total == 1)  # the usual case (loss.backward()): no [V, H]-sized copy

        def scale(grad):
            if grad is None or unit:
                return grad
            return grad * grad_total.to(grad.dtype)

        grads = tuple(scale(g) for g in ctx.saved_tensors)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    per_chunk_loss_fn: Callable[..., torch.Tensor],
    *per_token_tensors: torch.Tensor,
    token_weights: torch.Tensor,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    give_log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n token_weights[n] · loss_n`` from hidden states, with the gradient computed in forward.

    Same contract for ``per_chunk_loss_fn`` as :func:`chunked_head_loss` (student logits of a
    chunk, then the chunks of ``per_token_tensors``; returns [chunk] losses or [chunk, C] with the
    loss in column 0), but the head is a linear layer given by its ``weight`` [V', H] (and
    optional ``bias``), of which the first ``vocab_size`` rows are used (all by default).

    With ``give_log_probs=True`` the function receives ``log_softmax(logits)`` (float32 or
    float64) instead of the logits; for objectives written on log-probs this saves a
    [chunk, V] tensor and a pass over it (the log-probs are made in place of the logits, and the
    gradient is mapped back to the logits in place).

    Returns ``(loss, columns)``: the scalar weighted loss, differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias``, and the detached per-token output [N] / [N, C].

    Because the reduction weights are known up front, each chunk's gradient w.r.t. its logits is
    taken right away (one local autograd call) and folded into gradients w.r.t. the hidden states
    and the head ([N, H] and [V', H], the sizes of the inputs), which backward just scales. No
    [chunk, V] tensor outlives its chunk, and unlike checkpointing nothing is recomputed: the
    per-chunk function runs once and the head costs one forward and two gradient matmuls.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = hidden.shape[0]
    for tensor in (token_weights, *per_token_tensors):
        if tensor.shape[0] != n:
            raise ValueError(f"per-token tensors must have {n} rows, got {tensor.shape[0]}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    token_weights = token_weights.detach()
    if not torch.is_grad_enabled():

        def plain(h, _token_weights, *others):
            x = F.linear(h, weight[:vocab_size], None if bias is None else bias[:vocab_size])
            return per_chunk_loss_fn(_log_probs(x, 1.0) if give_log_probs else x, *others)

        columns = chunked(plain, hidden, token_weights, *per_token_tensors, chunk_size=chunk_size)
        loss = columns if columns.ndim == 1 else columns[:, 0]
        return (loss * token_weights).sum(), columns
    return _FusedHeadLoss.apply(
        hidden, weight, bias, token_weights, per_chunk_loss_fn, vocab_size, chunk_size, give_log_probs,
        *per_token_tensors,
    )
