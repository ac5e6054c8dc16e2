"""The memory machinery of the loss: a method's per-chunk loss run over every chunk of a
micro-batch's response tokens through the student's output layer, with its gradient.

``methods.compute_loss`` calls :func:`loss_over_chunks` once per micro-batch with the method's
per-chunk loss (``methods.ChunkLoss``: what an objective sees, and the objective itself, live in
``methods``); the function returns the loss and its per-token columns, which are what
``reference.dopd_loss`` computes from full logits (tests/test_reference.py).

Full-vocabulary logits exist for one chunk of ``train.loss_chunk_size`` tokens at a time, in
forward and backward, on one of two paths (same values and gradients, tests/test_fused_loss.py):

- **fused** (a linear student head): :func:`fused_head_loss` takes each chunk's gradient in the
  forward, so nothing is recomputed. Under ZeRO-3 the loss runs as the partitioned head's own
  forward (``Head.with_weight``): DeepSpeed gathers the weight for it and for its backward and
  reduce-scatters the full-size weight gradient. Frozen partitioned target heads are gathered once
  for the call, so top-K targets come from their weight rows (:func:`gathered_logits`);
- **chunked** (any head): :func:`chunked_head_loss`, each chunk under activation checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from dopd_vlm.choices import LossPath
from dopd_vlm.divergences import log_probs, upcast
from dopd_vlm.errors import InputError
from dopd_vlm.lora import LowRank
from dopd_vlm.scoring import Head, ResponseTokens, WeightHead, at_least_float32, linear_float32, matmul_float32

# Elements of the [rows, K, H] weight gather per step of the top-K target logits (16 MiB in fp32).
GATHER_ELEMENTS = 1 << 22

# `chunk_loss(student_scores, *chunks of the per-token tensors, privileged_head=, teacher_head=,
# scores_are_log_probs=)` -> [n] losses or [n, C] columns (the loss first): a method's loss on one chunk
ChunkLossFn = Callable[..., torch.Tensor]


def gathered_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, support: torch.Tensor
) -> torch.Tensor:
    """logits[n, k] = hidden[n] · weight[support[n, k]] (+ bias), in float32 (float64 for float64
    inputs), without [n, V]."""
    n, k = support.shape
    dtype = at_least_float32(hidden.dtype)
    out = torch.empty((n, k), dtype=dtype, device=hidden.device)
    step = max(1, GATHER_ELEMENTS // max(1, k * hidden.shape[-1]))
    for start in range(0, n, step):
        rows = weight[support[start : start + step]]  # [r, K, H]
        out[start : start + step] = torch.bmm(rows.to(dtype), hidden[start : start + step, :, None].to(dtype)).squeeze(-1)
    if bias is not None:
        out += bias[support].to(dtype)
    return out


# -- which path, on which heads ------------------------------------------------------------------


def use_fused(loss_path: LossPath, student_head: Head) -> bool:
    """Whether ``loss_path`` runs the fused loss on this head (``auto``: whenever it is linear)."""
    if loss_path == "chunked":
        return False
    if loss_path == "fused" and not student_head.is_linear:
        raise InputError(f"train.loss_path=fused needs a linear output layer; this student's is "
                         f"{type(getattr(student_head, 'module', student_head)).__name__} (use auto or chunked)")
    return student_head.is_linear


def check_heads(student_head: Head, teacher_head: Head | None, privileged_head: Head | None, fused: bool,
                world_size: int) -> None:
    """Across ranks, calls of a ZeRO-3 partitioned head are collectives. The fused path makes a
    fixed number per micro-batch (student: its forward and backward; frozen heads: one gather); the
    chunked path calls heads per chunk and per routed row subset, a count that differs between ranks.
    Raises InputError (a config problem: the loss path or the ZeRO stage) otherwise."""
    if world_size == 1:
        return
    heads = (("student", student_head, fused),
             ("teacher", teacher_head, fused and teacher_head is not None and teacher_head.is_linear),
             ("frozen privileged student", privileged_head,
              fused and privileged_head is not None and privileged_head.is_linear))
    for name, head, safe in heads:
        if head is None or not head.partitioned or safe:
            continue
        if head.is_linear:
            raise InputError(
                f"train.loss_path=chunked: the {name}'s output layer is ZeRO-3 partitioned across {world_size} "
                "ranks, where only the fused loss keeps the ranks' collectives equal; use train.loss_path=auto or fused"
            )
        raise InputError(
            f"the {name}'s output layer ({type(head.module).__name__}) is ZeRO-3 partitioned across "
            f"{world_size} ranks but is not a plain nn.Linear; use ZeRO-2 (ds_configs/zero2.json) for this model"
        )


# -- a method's per-chunk loss over every chunk ---------------------------------------------------


def loss_over_chunks(chunk_loss: ChunkLossFn, tokens: ResponseTokens, student_hidden: torch.Tensor,
                     student_head: Head, per_token: Sequence[torch.Tensor], *, teacher_head: Head | None,
                     frozen_privileged_head: Head | None, privileged_pass: bool, chunk_size: int,
                     fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the micro-batch loss, the [N, C] detached per-token columns) of ``chunk_loss`` over every
    chunk of the N tokens (``per_token``: [N]-row tensors, sliced with ``student_hidden``).

    The loss is the paper's reduction of column 0 (``tokens.sequence_mean``). ``chunk_loss`` gets
    the targets' heads as this path calls them: ``teacher_head`` (None: no teacher pass), the
    privileged student's (``frozen_privileged_head``, or with ``privileged_pass`` and no frozen
    head the student's own, its weight as the fused path reads it) and whether the scores it gets
    are already log-probs.
    """
    if not fused:  # every head is called per chunk, again in the backward's recompute: nothing gathered
        per_chunk = functools.partial(chunk_loss, teacher_head=teacher_head, scores_are_log_probs=False,
                                      privileged_head=privileged_target(frozen_privileged_head, privileged_pass,
                                                                        student_head))
        columns = chunked_head_loss(student_hidden, student_head, per_chunk, *per_token, chunk_size=chunk_size)
        return tokens.sequence_mean(columns[:, 0]), columns
    with contextlib.ExitStack() as stack:  # frozen ZeRO-3 target heads: gathered once, not needed in backward
        call = FusedLossCall(chunk_loss, tokens, _gathered(stack, teacher_head),
                             _gathered(stack, frozen_privileged_head), privileged_pass, chunk_size)
        loss = student_head.with_weight(call, student_hidden, *per_token)
    return loss, call.columns


def privileged_target(frozen_head: Head | None, privileged_pass: bool, student_head: Head) -> Head | None:
    """The privileged student's head: a frozen one, else (live) the student's own; None: no such pass."""
    if frozen_head is not None:
        return frozen_head
    return student_head if privileged_pass else None


def _gathered(stack: contextlib.ExitStack, head: Head | None) -> Head | None:
    return None if head is None else stack.enter_context(head.gathered())


class FusedLossCall:
    """The fused loss as a function of the student head's full weights, for ``Head.with_weight``.

    Under ZeRO-3 it runs as the partitioned head's forward, where the weights are gathered: the
    privileged-student target of a live privileged pass (the student's own head, its LoRA adapter
    included) is read from those same weights. The call returns the scalar loss, the one output
    that carries the gradient; the per-token columns are kept in :attr:`columns` (a second module
    output would get ZeRO-3's backward hooks).
    """

    def __init__(self, chunk_loss: ChunkLossFn, tokens: ResponseTokens, teacher_head: Head | None,
                 frozen_privileged_head: Head | None, privileged_pass: bool, chunk_size: int):
        self.chunk_loss, self.tokens, self.chunk_size = chunk_loss, tokens, chunk_size
        self.teacher_head, self.frozen_privileged_head, self.privileged_pass = (teacher_head, frozen_privileged_head,
                                                                                privileged_pass)
        self.columns: torch.Tensor | None = None

    def __call__(self, full: WeightHead, hidden: torch.Tensor, *per_token: torch.Tensor):
        per_chunk = functools.partial(self.chunk_loss, teacher_head=self.teacher_head, scores_are_log_probs=True,
                                      privileged_head=privileged_target(self.frozen_privileged_head,
                                                                        self.privileged_pass, full))
        loss, self.columns = fused_head_loss(
            hidden, full.weight, per_chunk, *per_token, token_weights=self.tokens.weights().to(hidden.device),
            chunk_size=self.chunk_size, bias=full.bias, vocab_size=full.vocab_size, give_log_probs=True,
            low_rank=full.low_rank,
        )
        return loss


# -- the two drivers -------------------------------------------------------------------------------


def chunked(
    fn: Callable[..., torch.Tensor], *per_token_tensors: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """``fn`` applied to consecutive chunks of rows of ``per_token_tensors``, concatenated.

    Every tensor is sliced along dim 0 (all must share that length); ``fn`` returns one row
    per token of its chunk ([chunk] or [chunk, C], e.g. a loss stacked with logging columns).
    Extra non-per-token arguments go in with ``fn`` (a callable object or ``functools.partial``). This bounds
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

    For each chunk of rows, the student logits ``head(hidden[chunk])`` ([chunk, V]) are passed to
    ``per_chunk_loss_fn(student_logits, *chunks_of_per_token_tensors)``, which returns one row
    per token ([chunk] losses, or [chunk, C] to carry extra per-token columns).
    The per-chunk function typically computes the target logits itself from the chunk of target
    hidden states and the target heads it holds, under ``torch.no_grad()``.

    Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): autograd keeps only the
    chunk's inputs, and the backward recomputes one chunk's logits at a time. Peak memory is then
    O(chunk_size·V) in both directions instead of O(N·V), at the price of a second head matmul
    (and of a second run of ``per_chunk_loss_fn``, so it must be deterministic: no sampling;
    during that second run :func:`is_recomputing` is True). Without grad mode, or with
    ``checkpoint_chunks=False``, chunks run plainly.

    Gradients reach ``hidden`` and the head's parameters, identical to the unchunked computation.
    When the caller reduces the per-token losses with weights it knows in advance and the head is
    a linear layer, :func:`fused_head_loss` does the same work without the recomputation.
    """

    def chunk_loss(hidden_chunk: torch.Tensor, head_: Head, *other_chunks: torch.Tensor) -> torch.Tensor:
        return per_chunk_loss_fn(head_(hidden_chunk), *other_chunks)

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
    """Forward computes the loss and, chunk by chunk, its gradients w.r.t. hidden/weight/bias (and a
    LoRA update's projected input and up-projection).

    The gradients are kept (sizes of the inputs, not of the logits); backward only scales them
    by the upstream gradient of the scalar loss. Logits are float32 (`linear_float32`), and the
    head's gradients sum their chunks in float32 even for a bf16 head (cast once at the end).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, projected, up, token_weights, fn, vocab_size, chunk_size, give_log_probs,
                *others):
        needs_hidden, needs_weight, needs_bias, needs_projected, needs_up = ctx.needs_input_grad[:5]
        w = weight[:vocab_size]
        b = bias[:vocab_size] if bias is not None else None
        u = up[:vocab_size] if up is not None else None
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=upcast(weight).dtype) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=upcast(bias).dtype) if needs_bias else None
        grad_projected = torch.zeros_like(projected) if needs_projected else None
        grad_up = torch.zeros_like(up, dtype=upcast(up).dtype) if needs_up else None
        wants_grad = any(ctx.needs_input_grad[:5])
        total = torch.zeros((), dtype=upcast(hidden).dtype, device=hidden.device)
        columns = []
        n = hidden.shape[0]
        for start in range(0, max(n, 1), chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            x = linear_float32(h, w, b)  # grad mode is off in forward: no graph back to the inputs
            if u is not None:  # the LoRA update: (scale * h @ down.T) @ up.T
                x += matmul_float32(projected[start:stop], u.T).to(x.dtype)
            if give_log_probs:  # in place: the logits' memory becomes the log-probs'
                x = upcast(x)
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
            if needs_bias:
                grad_bias[:vocab_size] += grad_x.sum(dim=0).to(grad_bias.dtype)
            if needs_projected:
                grad_projected[start:stop] = matmul_float32(grad_x, u).to(grad_projected.dtype)
            if needs_up:
                grad_up[:vocab_size] += matmul_float32(grad_x.T, projected[start:stop]).to(grad_up.dtype)
            grad_x = grad_x.to(h.dtype)
            if needs_hidden:
                torch.mm(grad_x, w, out=grad_hidden[start:stop])
            if needs_weight and grad_weight.dtype == h.dtype:
                grad_weight[:vocab_size].addmm_(grad_x.T, h)
            elif needs_weight:
                grad_weight[:vocab_size] += matmul_float32(grad_x.T, h)
            del grad_x
        grad_weight = grad_weight.to(weight.dtype) if needs_weight else None
        grad_bias = grad_bias.to(bias.dtype) if needs_bias else None
        grad_up = grad_up.to(up.dtype) if needs_up else None
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_projected, grad_up)
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
    low_rank: LowRank | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n token_weights[n] · loss_n`` from hidden states, with the gradient computed in forward.

    Same contract for ``per_chunk_loss_fn`` as :func:`chunked_head_loss` (student logits of a
    chunk, then the chunks of ``per_token_tensors``; returns [chunk] losses or [chunk, C] with the
    loss in column 0), but the head is a linear layer given by its ``weight`` [V', H] (and
    optional ``bias``, and optional LoRA update ``low_rank``: logits += scale · (h @ down.T) @ up.T),
    of which the first ``vocab_size`` rows are used (all by default).

    With ``give_log_probs=True`` the function receives ``log_softmax(logits)`` (float32 or
    float64) instead of the logits; for objectives written on log-probs this saves a
    [chunk, V] tensor and a pass over it (the log-probs are made in place of the logits, and the
    gradient is mapped back to the logits in place).

    Returns ``(loss, columns)``: the scalar weighted loss, differentiable w.r.t. ``hidden``,
    ``weight``, ``bias`` and the update's ``down`` and ``up``, and the detached per-token output
    [N] / [N, C].

    Because the reduction weights are known up front, each chunk's gradient w.r.t. its logits is
    taken right away (one local autograd call) and folded into gradients w.r.t. the hidden states
    and the head ([N, H] and [V', H], the sizes of the inputs; [N, r] and [V', r] for a LoRA
    update, whose frozen base weight gets none), which backward just scales. No [chunk, V] tensor
    outlives its chunk, and unlike checkpointing nothing is recomputed: the per-chunk function runs
    once and the head costs one forward and two gradient matmuls.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = hidden.shape[0]
    for tensor in (token_weights, *per_token_tensors):
        if tensor.shape[0] != n:
            raise ValueError(f"per-token tensors must have {n} rows, got {tensor.shape[0]}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    token_weights = token_weights.detach()
    head = WeightHead(weight, bias, vocab_size, low_rank)
    if not torch.is_grad_enabled():

        def plain(h, _token_weights, *others):
            x = head(h)
            return per_chunk_loss_fn(log_probs(x) if give_log_probs else x, *others)

        columns = chunked(plain, hidden, token_weights, *per_token_tensors, chunk_size=chunk_size)
        loss = columns if columns.ndim == 1 else columns[:, 0]
        return (loss * token_weights).sum(), columns
    # the update's small projection [N, r] goes through autograd (to `down` and `hidden`); the
    # function takes the gradient w.r.t. it and `up` with the rest
    projected = low_rank.project(hidden) if low_rank is not None else None
    up = low_rank.up if low_rank is not None else None
    return _FusedHeadLoss.apply(
        hidden, weight, bias, projected, up, token_weights, per_chunk_loss_fn, vocab_size, chunk_size, give_log_probs,
        *per_token_tensors,
    )
