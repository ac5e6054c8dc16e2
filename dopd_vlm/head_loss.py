"""The token-level loss machinery: one chunk of response tokens as the objectives see it, and the
two ways of running an objective over all chunks of a micro-batch.

Calls go one way: ``methods.compute_loss`` -> :func:`evaluate` -> (per chunk) the method's
per-token objective on a :class:`Chunk` -> ``losses`` (pure divergences).

Full-vocabulary logits exist for one chunk of ``train.loss_chunk_size`` tokens at a time, in
forward and backward, on one of two paths (same values and gradients, tests/test_fused_loss.py):

- **fused** (a linear student head): :func:`fused_head_loss` takes each chunk's gradient in the
  forward, so nothing is recomputed. Under ZeRO-3 the loss runs as the partitioned head's own
  forward (``Head.with_weight``): DeepSpeed gathers the weight for it and for its backward and
  reduce-scatters the full-size weight gradient. Frozen partitioned target heads are gathered once
  for the call, so top-K targets come from their weight rows;
- **chunked** (any head): :func:`chunked_head_loss`, each chunk under activation checkpointing.

Top-K objectives read the targets' log-probs at the student's K support tokens from K head rows
and the scoring pass's logsumexp, so a target's full-vocabulary logits are computed only where a
full-vocabulary objective needs them (DOPD's HT rows, GKD, OPSD, full OPD).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from dopd_vlm import divergences
from dopd_vlm.errors import InputError
from dopd_vlm.divergences import log_probs, upcast
from dopd_vlm.lora import LowRank
from dopd_vlm.scoring import Head, ResponseTokens, WeightHead, at_least_float32, linear_float32, matmul_float32

if TYPE_CHECKING:
    from dopd_vlm.config import MethodConfig

LossPath = Literal["auto", "fused", "chunked"]

# Elements of the [rows, K, H] weight gather per step of the top-K target logits (16 MiB in fp32).
GATHER_ELEMENTS = 1 << 22


@dataclass
class LossInputs:
    """One micro-batch's valid response tokens as the three passes saw them (N rows).

    ``privileged_lse`` / ``teacher_lse`` are optional: the logsumexp of each row's target logits,
    which the scoring pass computes anyway for the router (``scoring.token_logprobs_and_lse``).
    With them, and a target head whose weight can be read (``Head.linear``), the top-K objectives
    read the target's log-probs at the student's K support tokens from K weight rows instead of
    recomputing the target's full-vocabulary logits.
    """

    tokens: ResponseTokens
    student_hidden: torch.Tensor  # [N, H], carries the gradient
    student_head: Head
    privileged_hidden: torch.Tensor | None = None  # [N, H], detached
    teacher_hidden: torch.Tensor | None = None  # [N, H], detached
    teacher_head: Head | None = None
    regimes: torch.Tensor | None = None  # [N] router codes (dopd)
    privileged_lse: torch.Tensor | None = None  # [N] logsumexp of the privileged logits (optional)
    teacher_lse: torch.Tensor | None = None  # [N] logsumexp of the teacher logits (optional)
    privileged_head: Head | None = None  # a frozen privileged student's head; None: the student's own
    kept: torch.Tensor | None = None  # [N] bool: tokens the loss keeps (method.token_drop); None: all


# -- one chunk ----------------------------------------------------------------------------------


class Target:
    """A detached target pass (teacher or privileged student) on one chunk of tokens.

    Full-vocabulary log-probs are computed on demand (and cached for the chunk); log-probs at the
    student's top-K tokens come from K weight rows and the scoring pass's logsumexp when the head's
    weight is readable and the loss temperature is 1 (the logsumexp is of the untempered logits),
    else from the full rows.
    """

    def __init__(self, hidden: torch.Tensor, head: Head, lse: torch.Tensor | None, temperature: float):
        self.hidden, self.head, self.temperature, self.lse = hidden, head, temperature, lse
        self.sparse = head.linear if lse is not None and temperature == 1.0 else None
        self._full: torch.Tensor | None = None
        self._support: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def has_full(self) -> bool:
        return self._full is not None

    @torch.no_grad()
    def log_probs(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary log-probs of all rows, or of the given row indices."""
        if self._full is None and rows is None:
            self._full = log_probs(self.head(self.hidden), self.temperature)
        if self._full is not None:
            return self._full if rows is None else self._full[rows]
        return log_probs(self.head(self.hidden[rows]), self.temperature)

    @torch.no_grad()
    def support_log_probs(self, support: torch.Tensor) -> torch.Tensor:
        """Log-probs at ``support`` [n, K] (token ids per row of the chunk): [n, K] float32."""
        if self._support is not None and self._support[0] is support:
            return self._support[1]
        if self.sparse is None or self.has_full:
            result = self.log_probs().gather(-1, support)
        else:
            result = gathered_logits(self.hidden, *self.sparse, support) - self.lse[:, None].float()
        self._support = (support, result)
        return result


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


class Chunk:
    """The student's scores of one chunk plus its targets: what a per-token objective reads.

    ``student_scores`` are the student's logits, or (fused path) already their log-softmax; both
    give the same log-probs (log_softmax is shift invariant). Pieces shared by several terms
    (student log-probs, the top-K support, target rows) are computed once per chunk.
    """

    def __init__(self, cfg: "MethodConfig", student_scores: torch.Tensor, token_ids: torch.Tensor,
                 regimes: torch.Tensor, *, privileged: Target | None, teacher: Target | None,
                 scores_are_log_probs: bool = False):
        self.cfg = cfg
        self.student_logits, self.token_ids, self.regimes = student_scores, token_ids, regimes
        self.privileged, self.teacher = privileged, teacher
        self._log_p_s = student_scores if scores_are_log_probs and cfg.temperature == 1.0 else None
        self._support: torch.Tensor | None = None

    @property
    def log_p_s(self) -> torch.Tensor:
        """Student log-probs at the loss temperature (with gradient), computed once per chunk."""
        if self._log_p_s is None:
            self._log_p_s = log_probs(self.student_logits, self.cfg.temperature)
        return self._log_p_s

    @property
    def support(self) -> torch.Tensor:
        """The student's top-K token ids per row (no gradient)."""
        if self._support is None:
            k = min(self.cfg.top_k, self.log_p_s.shape[-1])
            self._support = self.log_p_s.detach().topk(k, dim=-1).indices
        return self._support

    def topk_rkl(self, use_teacher: torch.Tensor | bool) -> torch.Tensor:
        """Top-K reverse KL per row to the teacher where ``use_teacher`` else the privileged student."""
        if isinstance(use_teacher, bool):
            use_teacher = torch.full(self.token_ids.shape, use_teacher, dtype=torch.bool, device=self.token_ids.device)
        if use_teacher.numel() == 0:
            return self.log_p_s.sum(dim=-1)  # no rows: an empty [0] result that keeps the graph
        targets = [(self.teacher, use_teacher), (self.privileged, ~use_teacher)]
        variant = self.cfg.topk_variant
        if variant == "tail":  # needs every target token outside the support: full rows
            rows = _routed_rows(targets, lambda source: source.log_probs())
            return divergences.topk_reverse_kl_from_logprobs(self.log_p_s, rows, self.cfg.top_k, variant)
        support_t = _routed_rows(targets, lambda source: source.support_log_probs(self.support))
        return divergences.topk_reverse_kl_on_support(self.log_p_s.gather(-1, self.support), support_t, variant)

    def jsd(self, target: Target, beta: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary generalised JSD to ``target`` on all rows or the given row indices."""
        log_p_s = self.log_p_s if rows is None else self.log_p_s[rows]
        return divergences.generalized_jsd_from_logprobs(log_p_s, target.log_probs(rows), beta)

    def full_divergence(self, use_teacher: torch.Tensor, beta: float) -> torch.Tensor:
        """Full-vocabulary generalised JSD per row (beta 0.5: JS, 1: reverse KL) to the teacher
        where ``use_teacher``, else to the privileged student; each target's rows only."""
        loss = self.log_p_s.sum(dim=-1) * 0.0  # [n], keeps the graph even without rows
        for source, rows in ((self.teacher, use_teacher), (self.privileged, ~use_teacher)):
            index = rows.nonzero(as_tuple=True)[0]
            if index.numel():
                loss = loss.index_put((index,), self.jsd(source, beta, index))
        return loss

    def token_logprobs(self, target: Target | None = None) -> torch.Tensor:
        """log P(y_n) of the sampled tokens under the student (with grad) or a target."""
        ids = self.token_ids[:, None]
        if target is None:
            return self.log_p_s.gather(-1, ids).squeeze(-1)
        return target.support_log_probs(ids).squeeze(-1)

    # -- detached diagnostics (temperature 1, as logged) --
    @torch.no_grad()
    def entropy(self) -> torch.Tensor:
        log_p = self.log_p_s if self.cfg.temperature == 1.0 else log_probs(self.student_logits)
        return -torch.linalg.vecdot(log_p.exp(), log_p)  # one [n, V] temporary

    @torch.no_grad()
    def kl_to_teacher(self) -> torch.Tensor:
        """KL(P_S ‖ P_T): full where the teacher's rows exist, else over the top-K plus one bucket."""
        teacher = self.teacher
        if self.cfg.temperature != 1.0:
            return divergences.generalized_jsd(self.student_logits, teacher.head(teacher.hidden), beta=1.0)
        if teacher.has_full or teacher.sparse is None:
            return divergences.generalized_jsd_from_logprobs(self.log_p_s, teacher.log_probs(), beta=1.0)
        return divergences.support_bucket_kl(self.log_p_s.gather(-1, self.support), teacher.support_log_probs(self.support))


def _routed_rows(targets, rows_of: Callable[[Target], torch.Tensor]) -> torch.Tensor:
    """Per row, the rows of the target that row is routed to (each target computed only if used)."""
    result = None
    for source, routed in targets:
        if bool(routed.any()):
            values = rows_of(source)
            result = values if result is None else torch.where(routed[:, None], values, result)
    return result


PerToken = Callable[[Chunk], torch.Tensor]  # a method's per-token objective: Chunk -> [n] losses


# -- the per-chunk function the drivers call ----------------------------------------------------


@dataclass
class ChunkObjective:
    """``objective`` on one chunk, returning its [n, 3] columns: loss, student entropy, KL to teacher.

    Called by the drivers with the student's scores of the chunk and the chunks of the per-token
    tensors of :func:`per_token_tensors`. A target whose hidden states are absent is None.
    """

    objective: PerToken
    cfg: "MethodConfig"
    privileged_head: Head | None
    teacher_head: Head | None
    has_privileged_lse: bool
    has_teacher_lse: bool
    scores_are_log_probs: bool = False

    def __call__(self, student_scores, token_ids, regimes, kept, privileged_hidden, teacher_hidden, privileged_lse,
                 teacher_lse):
        temperature = self.cfg.temperature
        privileged = teacher = None
        if self.privileged_head is not None:
            privileged = Target(privileged_hidden, self.privileged_head,
                                privileged_lse if self.has_privileged_lse else None, temperature)
        if self.teacher_head is not None:
            teacher = Target(teacher_hidden, self.teacher_head, teacher_lse if self.has_teacher_lse else None, temperature)
        chunk = Chunk(self.cfg, student_scores, token_ids, regimes, privileged=privileged, teacher=teacher,
                      scores_are_log_probs=self.scores_are_log_probs)
        loss = self.objective(chunk)
        loss = loss * kept.to(loss.dtype)  # method.token_drop: dropped tokens get no loss
        if is_recomputing():  # backward recompute: only the loss's graph is needed
            zeros = torch.zeros_like(loss)
            return torch.stack([loss, zeros, zeros], dim=-1)
        entropy = chunk.entropy()
        kl = chunk.kl_to_teacher() if teacher is not None else torch.zeros_like(entropy)
        return torch.stack([loss, entropy.to(loss.dtype), kl.to(loss.dtype)], dim=-1)


def per_token_tensors(inputs: LossInputs) -> tuple[torch.Tensor, ...]:
    """The [N]-row tensors sliced with the student's hidden states: token ids, regimes, the kept-token
    mask, the targets' hidden states and logsumexps (absent ones as [N, 0] / zeros / all kept, so
    every chunk has the same arguments)."""
    n = inputs.tokens.token_ids.shape[0]
    empty = inputs.student_hidden.new_zeros(n, 0)
    no_lse = inputs.student_hidden.new_zeros(n, dtype=torch.float32)
    regimes = inputs.regimes if inputs.regimes is not None else torch.full_like(inputs.tokens.token_ids, -1)

    def present(tensor, absent):
        return tensor if tensor is not None else absent

    kept = present(inputs.kept, torch.ones_like(inputs.tokens.token_ids, dtype=torch.bool))
    return (inputs.tokens.token_ids, regimes, kept, present(inputs.privileged_hidden, empty),
            present(inputs.teacher_hidden, empty), present(inputs.privileged_lse, no_lse),
            present(inputs.teacher_lse, no_lse))


# -- running an objective over every chunk -------------------------------------------------------


def use_fused(loss_path: LossPath, student_head: Head) -> bool:
    """Whether ``loss_path`` runs the fused loss on this head (``auto``: whenever it is linear)."""
    if loss_path == "chunked":
        return False
    if loss_path == "fused" and not student_head.is_linear:
        raise InputError(f"train.loss_path=fused needs a linear output layer; this student's is "
                         f"{type(getattr(student_head, 'module', student_head)).__name__} (use auto or chunked)")
    return student_head.is_linear


def check_partitioned_heads(inputs: LossInputs, fused: bool, world_size: int) -> None:
    """`check_heads` for the heads of `inputs`."""
    check_heads(inputs.student_head, inputs.teacher_head, inputs.privileged_head, fused, world_size)


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


def evaluate(objective: PerToken, cfg: "MethodConfig", inputs: LossInputs, chunk_size: int,
             fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the micro-batch loss, [N, 3] detached columns) of ``objective`` over every chunk.

    The loss is the paper's reduction (``ResponseTokens.sequence_mean``); the columns are each
    token's loss, student entropy and KL to the teacher (zeros without a teacher pass).
    """
    teacher_head = inputs.teacher_head if inputs.teacher_hidden is not None else None
    frozen_privileged = inputs.privileged_head if inputs.privileged_hidden is not None else None
    if not fused:  # every head is called per chunk, again in the backward's recompute: nothing gathered
        own_head = inputs.student_head if inputs.privileged_hidden is not None else None
        per_chunk = ChunkObjective(objective, cfg, frozen_privileged or own_head, teacher_head,
                                   inputs.privileged_lse is not None, inputs.teacher_lse is not None)
        columns = chunked_head_loss(inputs.student_hidden, inputs.student_head, per_chunk,
                                    *per_token_tensors(inputs), chunk_size=chunk_size)
        return inputs.tokens.sequence_mean(columns[:, 0]), columns
    with contextlib.ExitStack() as stack:  # frozen ZeRO-3 target heads: gathered once, not needed in backward
        call = FusedLossCall(objective, cfg, inputs, _gathered(stack, teacher_head), _gathered(stack, frozen_privileged),
                             chunk_size)
        loss = inputs.student_head.with_weight(call, inputs.student_hidden, *per_token_tensors(inputs))
    return loss, call.columns


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

    def __init__(self, objective: PerToken, cfg: "MethodConfig", inputs: LossInputs, teacher_head: Head | None,
                 frozen_privileged_head: Head | None, chunk_size: int):
        self.objective, self.cfg, self.inputs, self.chunk_size = objective, cfg, inputs, chunk_size
        self.teacher_head, self.frozen_privileged_head = teacher_head, frozen_privileged_head
        self.columns: torch.Tensor | None = None

    def __call__(self, full: WeightHead, hidden: torch.Tensor, *per_token: torch.Tensor):
        inputs = self.inputs
        privileged_head = self.frozen_privileged_head
        if privileged_head is None and inputs.privileged_hidden is not None:
            privileged_head = full
        per_chunk = ChunkObjective(self.objective, self.cfg, privileged_head, self.teacher_head,
                                   inputs.privileged_lse is not None, inputs.teacher_lse is not None,
                                   scores_are_log_probs=True)
        loss, self.columns = fused_head_loss(
            hidden, full.weight, per_chunk, *per_token, token_weights=inputs.tokens.weights().to(hidden.device),
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
