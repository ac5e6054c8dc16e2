"""Distillation methods: which passes they need and the loss they put on each response token.

    dopd         routed teacher / privileged-student supervision (ALGORITHM.md section 2)
    vanilla_opd  teacher on every token: sampled-token, top-K or full reverse KL
    opsd         privileged student only (on-policy self-distillation), generalised JSD
    gkd          teacher on every token, generalised JSD (full vocabulary)
    sft          cross-entropy to reference tokens (warm-up / baseline)

DOPD ablations (method.ablation): `no_routing` gives every token both sources at half weight
with the top-K reverse KL; `no_teacher` / `no_student` send the regimes that would use that
source to the other one; `single_objective` keeps the routing but uses the top-K reverse KL in
every regime (HT included).

Loss reduction (paper): mean over each sequence's valid tokens, then mean over sequences. All
full-vocabulary work happens per chunk of tokens, so memory stays O(chunk x V) in forward and
backward: with a plain linear student head in `losses.fused_head_loss` (each chunk's gradient is
taken in the forward, nothing is recomputed), otherwise in `losses.chunked_head_loss` (per-chunk
checkpointing). Top-K objectives read the targets' log-probs at the student's K support tokens
from K head rows and the scoring pass's logsumexp, so the teacher's full-vocabulary logits are
recomputed only where a full-vocabulary objective needs them (DOPD's HT rows, GKD, OPSD, full OPD).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dopd_vlm import losses
from dopd_vlm.config import MethodConfig
from dopd_vlm.distributed import world_size
from dopd_vlm.router import HS, HT, LH, LL, REGIME_NAMES
from dopd_vlm.scoring import Head, ResponseTokens, WeightHead


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs from the scoring passes."""

    needs_teacher: bool
    needs_privileged_student: bool
    routes: bool
    on_policy: bool = True


SPECS = {
    "dopd": MethodSpec(needs_teacher=True, needs_privileged_student=True, routes=True),
    "vanilla_opd": MethodSpec(needs_teacher=True, needs_privileged_student=False, routes=False),
    "opsd": MethodSpec(needs_teacher=False, needs_privileged_student=True, routes=False),
    "gkd": MethodSpec(needs_teacher=True, needs_privileged_student=False, routes=False),
    "sft": MethodSpec(needs_teacher=False, needs_privileged_student=False, routes=False, on_policy=False),
}


@dataclass
class LossInputs:
    """One micro-batch's valid response tokens as the three passes saw them (N rows).

    ``privileged_lse`` / ``teacher_lse`` are optional: the logsumexp of each row's target logits,
    which the scoring pass computes anyway for the router (``scoring.token_logprobs_and_lse``).
    With them, and a target head that is a plain linear layer (``scoring.LMHead``), the top-K
    objectives read the target's log-probs at the student's K support tokens from K weight rows
    instead of recomputing the target's full-vocabulary logits; only DOPD's HT rows (full JS)
    and the full-vocabulary methods still need those.
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


@dataclass
class TokenStats:
    """Detached per-token diagnostics of one micro-batch, concatenated over a step for logging.

    ``kl_to_teacher`` is the full-vocabulary KL(P_S || P_T) wherever the teacher's full logits
    are computed for the loss anyway; where they are not (top-K objectives on the fast path), it
    is the KL over the student's top-K tokens plus one bucket for the remaining mass, a lower
    bound that equals the full KL when the top-K tokens hold (nearly) all of both distributions.
    """

    loss: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N] student entropy
    kl_to_teacher: torch.Tensor | None  # [N] KL(P_S || P_T), when a teacher pass exists (see above)
    regimes: torch.Tensor | None


def compute_loss(cfg: MethodConfig, inputs: LossInputs, chunk_size: int) -> tuple[torch.Tensor, TokenStats]:
    """The micro-batch loss (per-sequence token mean, then mean over sequences) and its stats.

    Two execution paths, same values and gradients (tests/test_fused_loss.py):

    - the student head is a plain linear layer (``scoring.LMHead`` of an ``nn.Linear``, or a
      weight tensor): ``losses.fused_head_loss`` takes each chunk's gradient in the forward, so
      nothing is recomputed in backward. A ZeRO-3 partitioned ``nn.Linear`` head takes this path
      too: the fused loss runs as the head module's forward (``LMHead.run_as_forward``), so
      DeepSpeed gathers the weight for it and again for its backward, and reduce-scatters the
      full-size weight gradient; a frozen partitioned teacher head is gathered once for the call
      (``LMHead.gathered``) so top-K targets come from its weight rows;
    - any other callable head: ``losses.chunked_head_loss`` with per-chunk checkpointing; the
      detached diagnostics are skipped in the recompute. Not with ZeRO-3 partitioned heads on
      several ranks (a clear error): its head calls are collectives in data-dependent numbers.
    """
    spec = SPECS[cfg.name]
    _check_inputs(cfg, spec, inputs)
    mode = _fused_mode(inputs.student_head)
    _check_partitioned_heads(inputs, fused=mode is not None)
    objective = _PER_TOKEN[cfg.name](cfg)
    has_teacher = inputs.teacher_hidden is not None
    has_privileged = inputs.privileged_hidden is not None
    has_teacher_lse, has_privileged_lse = inputs.teacher_lse is not None, inputs.privileged_lse is not None
    student_head = inputs.student_head
    # the heads per_chunk reads the targets from; the fused path swaps in gathered views
    own_privileged_head = inputs.privileged_head is None
    target_heads = {"privileged": student_head if own_privileged_head else inputs.privileged_head,
                    "teacher": inputs.teacher_head}
    fused = mode is not None  # the fused path hands per_chunk log-probs instead of logits

    def per_chunk(student_scores, token_ids, regimes, privileged_hidden, teacher_hidden, privileged_lse, teacher_lse):
        privileged_head, teacher_head = target_heads["privileged"], target_heads["teacher"]
        chunk = _Chunk(
            cfg,
            student_scores,
            token_ids,
            regimes,
            privileged=_Target(privileged_hidden, privileged_head, privileged_lse if has_privileged_lse else None, cfg)
            if has_privileged
            else None,
            teacher=_Target(teacher_hidden, teacher_head, teacher_lse if has_teacher_lse else None, cfg)
            if has_teacher
            else None,
            scores_are_log_probs=fused,
        )
        loss = objective(chunk)
        if losses.is_recomputing():  # backward recompute: only the loss's graph is needed
            zeros = torch.zeros_like(loss)
            return torch.stack([loss, zeros, zeros], dim=-1)
        with torch.no_grad():
            entropy = chunk.entropy()
            kl = chunk.kl_to_teacher() if has_teacher else torch.zeros_like(entropy)
        return torch.stack([loss, entropy.to(loss.dtype), kl.to(loss.dtype)], dim=-1)

    tokens = inputs.tokens
    n = tokens.token_ids.shape[0]
    empty = inputs.student_hidden.new_zeros(n, 0)
    no_lse = inputs.student_hidden.new_zeros(n, dtype=torch.float32)
    regimes = inputs.regimes if inputs.regimes is not None else torch.full_like(tokens.token_ids, -1)
    per_token = (
        tokens.token_ids,
        regimes,
        inputs.privileged_hidden if has_privileged else empty,
        inputs.teacher_hidden if has_teacher else empty,
        inputs.privileged_lse if has_privileged_lse else no_lse,
        inputs.teacher_lse if has_teacher_lse else no_lse,
    )
    if fused:
        weights = token_weights(tokens).to(inputs.student_hidden.device)
        out: dict[str, torch.Tensor] = {}

        def fused_loss(weight, bias, hidden, *per_token_tensors):
            if mode == "module" and own_privileged_head:  # inside the head's forward: its weight is gathered
                target_heads["privileged"] = WeightHead(weight, bias, student_head.vocab_size)
            loss, out["columns"] = losses.fused_head_loss(
                hidden,
                weight,
                per_chunk,
                *per_token_tensors,
                token_weights=weights,
                chunk_size=chunk_size,
                bias=bias,
                vocab_size=_head_vocab_size(student_head, weight),
                give_log_probs=True,
            )
            return loss  # the columns go out through `out`: a module output would get ZeRO-3 hooks

        with contextlib.ExitStack() as stack:  # frozen ZeRO-3 target heads: gathered once, not needed in backward
            for name in ("teacher",) if own_privileged_head else ("teacher", "privileged"):
                head = target_heads[name]
                if hasattr(head, "gathered"):
                    target_heads[name] = stack.enter_context(head.gathered())
            if mode == "direct":
                loss = fused_loss(*_linear(student_head), inputs.student_hidden, *per_token)
            else:  # ZeRO-3 partitioned head: run as its forward, so DeepSpeed gathers it for forward and backward
                loss = student_head.run_as_forward(fused_loss, inputs.student_hidden, *per_token)
        columns = out["columns"]
    else:
        columns = losses.chunked_head_loss(inputs.student_hidden, student_head, per_chunk, *per_token, chunk_size=chunk_size)
        loss = sequence_mean(columns[:, 0], tokens)
    stats = TokenStats(
        loss=columns[:, 0].detach(),
        entropy=columns[:, 1].detach(),
        kl_to_teacher=columns[:, 2].detach() if has_teacher else None,
        regimes=inputs.regimes,
    )
    return loss, stats


def sequence_mean(token_loss: torch.Tensor, tokens: ResponseTokens) -> torch.Tensor:
    """Mean over each sequence's tokens, then mean over all sequences of the micro-batch."""
    b = tokens.num_sequences
    sums = token_loss.new_zeros(b).index_add(0, tokens.seq_index, token_loss)
    counts = torch.bincount(tokens.seq_index, minlength=b).clamp(min=1).to(token_loss.dtype)
    return (sums / counts).sum() / b


def token_weights(tokens: ResponseTokens) -> torch.Tensor:
    """[N] float64 weights w with ``sequence_mean(x, tokens) == (w * x).sum()``."""
    b = tokens.num_sequences
    counts = torch.bincount(tokens.seq_index, minlength=b).clamp(min=1).to(torch.float64)
    return 1.0 / (counts[tokens.seq_index] * b)


def _fused_mode(head: Head) -> str | None:
    """How the fused path reaches the student head's weight: "direct" (a plain weight tensor or
    linear layer), "module" (a ZeRO-3 partitioned linear layer, see ``scoring.LMHead.run_as_forward``),
    or None (any other head: the checkpointed fallback)."""
    if _linear(head) is not None:
        return "direct"
    if getattr(head, "partitioned_linear", False):
        return "module"
    return None


def _linear(head: Head | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a head that is a plain linear map, else None (see scoring.LMHead)."""
    if isinstance(head, torch.Tensor):
        return head, None
    return getattr(head, "linear", None)


def _head_vocab_size(head: Head, weight: torch.Tensor) -> int:
    return getattr(head, "vocab_size", weight.shape[0])


def _check_partitioned_heads(inputs: LossInputs, fused: bool) -> None:
    """Across ranks, calls of a ZeRO-3 partitioned head are collectives. The fused path makes a
    fixed number per micro-batch (student: its forward and backward; teacher: one gather); the
    fallback calls heads per chunk and per routed row subset, a count that differs between ranks."""
    if world_size() == 1:
        return

    def frozen_ok(head):
        return fused and getattr(head, "partitioned_linear", False)

    for name, head, ok in (("student", inputs.student_head, fused),
                           ("teacher", inputs.teacher_head, frozen_ok(inputs.teacher_head)),
                           ("frozen privileged student", inputs.privileged_head, frozen_ok(inputs.privileged_head))):
        if getattr(head, "partitioned", False) and not ok:
            raise ValueError(
                f"the {name}'s output layer ({type(head.module).__name__}) is ZeRO-3 partitioned across "
                f"{world_size()} ranks but is not a plain nn.Linear; use ZeRO-2 (ds_configs/zero2.json) for this model"
            )


def _check_inputs(cfg: MethodConfig, spec: MethodSpec, inputs: LossInputs) -> None:
    if spec.needs_teacher and (inputs.teacher_hidden is None or inputs.teacher_head is None):
        raise ValueError(f"method {cfg.name} needs the teacher pass")
    if spec.needs_privileged_student and inputs.privileged_hidden is None:
        raise ValueError(f"method {cfg.name} needs the privileged-student pass")
    if spec.routes and inputs.regimes is None:
        raise ValueError(f"method {cfg.name} needs router regimes")


# -- one chunk of tokens as the objectives see it ------------------------------------------------

# Elements of the [rows, K, H] weight gather per step of the top-K target logits (16 MiB in fp32).
_GATHER_ELEMENTS = 1 << 22


class _Target:
    """A detached target pass (teacher or privileged student) on one chunk of tokens.

    Full-vocabulary log-probs are computed on demand (and cached for the chunk); log-probs at
    the student's top-K tokens come from K gathered head rows and the scoring pass's logsumexp
    when the head is a plain linear layer and the loss temperature is 1 (the logsumexp is of
    the untempered logits), else from the full rows.
    """

    def __init__(self, hidden: torch.Tensor, head: Head, lse: torch.Tensor | None, cfg: MethodConfig):
        self.hidden, self.head, self.temperature = hidden, head, cfg.temperature
        linear = _linear(head)
        self.sparse = linear if linear is not None and lse is not None and cfg.temperature == 1.0 else None
        self.vocab_size = _head_vocab_size(head, linear[0]) if linear is not None else None
        self.lse = lse
        self._full: torch.Tensor | None = None
        self._support: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def has_full(self) -> bool:
        return self._full is not None

    @torch.no_grad()
    def log_probs(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary log-probs of all rows, or of the given row indices."""
        if self._full is None and rows is None:
            self._full = losses.log_probs(_apply(self.head, self.hidden), self.temperature)
        if self._full is not None:
            return self._full if rows is None else self._full[rows]
        return losses.log_probs(_apply(self.head, self.hidden[rows]), self.temperature)

    @torch.no_grad()
    def support_log_probs(self, support: torch.Tensor) -> torch.Tensor:
        """Log-probs at ``support`` [n, K] (token ids per row of the chunk): [n, K] float32."""
        if self._support is not None and self._support[0] is support:
            return self._support[1]
        if self.sparse is None or self.has_full:
            result = self.log_probs().gather(-1, support)
        else:
            result = _gathered_logits(self.hidden, *self.sparse, support) - self.lse[:, None].float()
        self._support = (support, result)
        return result


def _apply(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, head) if isinstance(head, torch.Tensor) else head(hidden)


def _gathered_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, support: torch.Tensor
) -> torch.Tensor:
    """logits[n, k] = hidden[n] · weight[support[n, k]] (+ bias), in float32, without [n, V]."""
    n, k = support.shape
    out = torch.empty((n, k), dtype=torch.float32, device=hidden.device)
    step = max(1, _GATHER_ELEMENTS // max(1, k * hidden.shape[-1]))
    for start in range(0, n, step):
        rows = weight[support[start : start + step]]  # [r, K, H]
        out[start : start + step] = torch.bmm(rows, hidden[start : start + step, :, None]).squeeze(-1).float()
    if bias is not None:
        out += bias[support].float()
    return out


class _Chunk:
    """The student's logits of one chunk plus its targets; shared, lazily computed pieces."""

    def __init__(
        self, cfg, student_scores, token_ids, regimes, *, privileged: _Target | None, teacher: _Target | None,
        scores_are_log_probs: bool = False,
    ):
        # `student_scores` are the student's logits, or (fused path) already their log-softmax;
        # both give the same log-probs below (log_softmax is shift invariant).
        self.cfg = cfg
        self.student_logits, self.token_ids, self.regimes = student_scores, token_ids, regimes
        self.privileged, self.teacher = privileged, teacher
        self._log_p_s: torch.Tensor | None = None
        self._support: torch.Tensor | None = None
        if scores_are_log_probs and cfg.temperature == 1.0:
            self._log_p_s = student_scores

    @property
    def log_p_s(self) -> torch.Tensor:
        """Student log-probs at the loss temperature (with gradient), computed once per chunk."""
        if self._log_p_s is None:
            self._log_p_s = losses.log_probs(self.student_logits, self.cfg.temperature)
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
        variant = self.cfg.topk_variant
        if isinstance(use_teacher, bool):
            use_teacher = torch.full(self.token_ids.shape, use_teacher, dtype=torch.bool, device=self.token_ids.device)
        targets = [(self.teacher, use_teacher), (self.privileged, ~use_teacher)]
        if use_teacher.numel() == 0:
            return self.log_p_s.sum(dim=-1)  # no rows: an empty [0] result that keeps the graph
        if variant == "tail":  # needs every target token outside the support: full rows
            target = None
            for source, rows in targets:
                if bool(rows.any()):
                    lp = source.log_probs()
                    target = lp if target is None else torch.where(rows[:, None], lp, target)
            return losses.topk_reverse_kl_from_logprobs(self.log_p_s, target, self.cfg.top_k, variant)
        support_t = None
        for source, rows in targets:
            if bool(rows.any()):
                lp = source.support_log_probs(self.support)
                support_t = lp if support_t is None else torch.where(rows[:, None], lp, support_t)
        return losses.topk_reverse_kl_on_support(self.log_p_s.gather(-1, self.support), support_t, variant)

    def jsd(self, target: _Target, beta: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary generalised JSD to ``target`` on all rows or the given row indices."""
        log_p_s = self.log_p_s if rows is None else self.log_p_s[rows]
        return losses.generalized_jsd_from_logprobs(log_p_s, target.log_probs(rows), beta)

    def token_logprobs(self, target: _Target | None = None) -> torch.Tensor:
        """log P(y_n) of the sampled tokens under the student (with grad) or a target."""
        ids = self.token_ids[:, None]
        if target is None:
            return self.log_p_s.gather(-1, ids).squeeze(-1)
        return target.support_log_probs(ids).squeeze(-1)

    # -- detached diagnostics (temperature 1, as logged) --
    def _log_p_s_t1(self) -> torch.Tensor:
        if self.cfg.temperature == 1.0:
            return self.log_p_s.detach()
        return losses.log_probs(self.student_logits.detach())

    def entropy(self) -> torch.Tensor:
        log_p = self._log_p_s_t1()
        return -torch.linalg.vecdot(log_p.exp(), log_p)  # one [n, V] temporary

    def kl_to_teacher(self) -> torch.Tensor:
        teacher = self.teacher
        if self.cfg.temperature != 1.0:
            return losses.generalized_jsd(self.student_logits.detach(), _apply(teacher.head, teacher.hidden), beta=1.0)
        log_p_s = self.log_p_s.detach()
        if teacher.has_full or teacher.sparse is None:
            return losses.generalized_jsd_from_logprobs(log_p_s, teacher.log_probs(), beta=1.0)
        return _bucket_kl(log_p_s.gather(-1, self.support), teacher.support_log_probs(self.support))


def _bucket_kl(support_s: torch.Tensor, support_t: torch.Tensor) -> torch.Tensor:
    """KL over the K support tokens plus one bucket for the rest of each distribution's mass."""
    def tail(log_p):
        return torch.log1p(-log_p.exp().sum(dim=-1).clamp(max=1.0 - 1e-6))

    tail_s, tail_t = tail(support_s), tail(support_t)
    inside = (support_s.exp() * (support_s - support_t)).sum(dim=-1)
    return inside + tail_s.exp() * (tail_s - tail_t)


# -- per-token objectives: _Chunk -> [n] -----------------------------------------------------------


def _dopd(cfg: MethodConfig):
    weights = {LH: cfg.beta_l, LL: cfg.beta_w, HT: cfg.ht_weight, HS: cfg.beta_l}
    uses_teacher = {LH: True, LL: False, HT: True, HS: False}
    if cfg.ablation == "no_teacher":
        uses_teacher = dict.fromkeys(uses_teacher, False)
    elif cfg.ablation == "no_student":
        uses_teacher = dict.fromkeys(uses_teacher, True)
    full_js_in_ht = cfg.ablation not in ("single_objective", "no_teacher")

    def per_token(c: _Chunk) -> torch.Tensor:
        if cfg.ablation == "no_routing":
            return 0.5 * c.topk_rkl(True) + 0.5 * c.topk_rkl(False)
        regimes = c.regimes
        teacher_rows = torch.zeros_like(regimes, dtype=torch.bool)
        weight = torch.zeros(regimes.shape, dtype=torch.float32, device=regimes.device)
        for regime, use_teacher in uses_teacher.items():
            in_regime = regimes == regime
            teacher_rows |= in_regime & use_teacher
            weight[in_regime] = weights[regime]
        loss = c.topk_rkl(teacher_rows)
        if full_js_in_ht:
            ht = (regimes == HT).nonzero(as_tuple=True)[0]
            if ht.numel():  # the full vocabulary is materialised for HT rows only
                loss = loss.index_put((ht,), c.jsd(c.teacher, 0.5, ht))
        return weight * loss

    return per_token


def _vanilla_opd(cfg: MethodConfig):
    def per_token(c: _Chunk) -> torch.Tensor:
        if cfg.opd_divergence == "sampled":
            return losses.sampled_token_reverse_kl(c.token_logprobs(), c.token_logprobs(c.teacher))
        if cfg.opd_divergence == "topk":
            return c.topk_rkl(True)
        return c.jsd(c.teacher, 1.0)

    return per_token


def _opsd(cfg: MethodConfig):
    def per_token(c: _Chunk) -> torch.Tensor:
        return c.jsd(c.privileged, cfg.jsd_beta)

    return per_token


def _gkd(cfg: MethodConfig):
    def per_token(c: _Chunk) -> torch.Tensor:
        return c.jsd(c.teacher, cfg.jsd_beta)

    return per_token


def _sft(cfg: MethodConfig):
    def per_token(c: _Chunk) -> torch.Tensor:
        return losses.token_cross_entropy(c.student_logits, c.token_ids)

    return per_token


_PER_TOKEN = {"dopd": _dopd, "vanilla_opd": _vanilla_opd, "opsd": _opsd, "gkd": _gkd, "sft": _sft}


def summarize(stats: list[TokenStats]) -> dict[str, float]:
    """Token-level means over a whole step: loss, entropy, KL to teacher, per-regime shares/losses."""
    loss = torch.cat([s.loss for s in stats])
    out = {"token_loss": loss.mean().item(), "entropy": torch.cat([s.entropy for s in stats]).mean().item()}
    if stats[0].kl_to_teacher is not None:
        out["kl_to_teacher"] = torch.cat([s.kl_to_teacher for s in stats]).mean().item()
    if stats[0].regimes is not None:
        regimes = torch.cat([s.regimes for s in stats])
        for code, name in enumerate(REGIME_NAMES):
            in_regime = regimes == code
            out[f"share/{name}"] = in_regime.float().mean().item() if regimes.numel() else 0.0
            out[f"loss/{name}"] = loss[in_regime].mean().item() if in_regime.any() else 0.0
    return out
