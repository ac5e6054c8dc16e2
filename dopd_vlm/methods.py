"""Distillation methods, as verl's `core_algos`: the per-token objectives, the method table, and
the loss of one micro-batch. Read `reference.py` first: DOPD's loss from the full logits of the
three passes on one screen, the value this module computes chunk by chunk.

A method is one row of `METHODS`: which scoring passes it needs, whether it routes, and its
per-token objective, a function of the method's config returning `Chunk -> [n] losses`. A `Chunk`
(the end of this module) is one chunk of response tokens as an objective sees it: the student's
log-probs, the targets (`Target`: the teacher, the privileged student) and the divergences between
them (`divergences.py`, pure tensors). From the step:

    step.student_loss -> compute_loss -> head_loss.loss_over_chunks (the memory machinery: chunks,
    the fused LM-head gradient, ZeRO-3) -> per chunk, ChunkLoss -> the method's objective on a
    Chunk -> Chunk.topk_rkl / jsd / ... -> divergences

    dopd         routed teacher / privileged-student supervision (docs/algorithm.md section 2)
    vanilla_opd  teacher on every token: sampled-token, top-K or full reverse KL
    opsd         privileged student only (on-policy self-distillation), generalised JSD
    gkd          teacher on every token, generalised JSD (full vocabulary)
    sft          cross-entropy to reference tokens (warm-up / baseline)

The paper's diagnostics are options of these methods: DOPD's sources (`method.ablation`:
`no_routing` gives every token both sources at half weight with the top-K reverse KL,
`no_teacher` / `no_student` send the regimes that would use that source to the other one), its
weights (`method.regime_weights`: paper / equal / ht_only) and its divergence per regime
(`method.divergence`); for any method with a teacher, dropping the top / random / bottom share of
the step's tokens by privileged advantage gap (`method.token_drop`, the paper's Fig. 4; the step
computes which tokens, `ChunkLoss` gives them zero loss).

Loss reduction (paper): mean over each sequence's valid tokens, then mean over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dopd_vlm import divergences, head_loss
from dopd_vlm.choices import LossPath
from dopd_vlm.config import ConfigError, MethodConfig, RunConfig
from dopd_vlm.distributed import world_size
from dopd_vlm.divergences import log_probs
from dopd_vlm.head_loss import gathered_logits, is_recomputing
from dopd_vlm.router import HS, HT, LH, LL, REGIME_NAMES
from dopd_vlm.scoring import Head, ResponseTokens

PerToken = Callable[["Chunk"], torch.Tensor]  # a method's per-token objective: Chunk -> [n] losses


# -- per-token objectives: MethodConfig -> (Chunk -> [n]) -------------------------------------------


def regime_weights(cfg: MethodConfig) -> dict[int, float]:
    """Each regime's weight: the paper's (beta_l, beta_w, ht_weight, beta_l), all 1 (`equal`, the
    paper's "equal weighting" baseline) or HT alone (`ht_only`, its Table 6)."""
    if cfg.regime_weights == "equal":
        return {LH: 1.0, LL: 1.0, HT: 1.0, HS: 1.0}
    if cfg.regime_weights == "ht_only":
        return {LH: 0.0, LL: 0.0, HT: 1.0, HS: 0.0}
    return {LH: cfg.beta_l, LL: cfg.beta_w, HT: cfg.ht_weight, HS: cfg.beta_l}


def regime_targets(cfg: MethodConfig) -> dict[int, bool]:
    """Whether each regime distils from the teacher (else the privileged student); the
    `no_teacher` / `no_student` ablations send every regime to the other source."""
    if cfg.ablation == "no_teacher":
        return dict.fromkeys((LH, LL, HT, HS), False)
    if cfg.ablation == "no_student":
        return dict.fromkeys((LH, LL, HT, HS), True)
    return {LH: True, LL: False, HT: True, HS: False}


def dopd(cfg: MethodConfig) -> PerToken:
    """The routed objective. `method.divergence=routed` (the paper): top-K reverse KL to the
    regime's target, full-vocabulary JS in HT where HT distils from the teacher; `topk_rkl`, `js`,
    `reverse_kl`: that divergence in every regime (the paper's Table 7 compares them)."""
    weights, uses_teacher = regime_weights(cfg), regime_targets(cfg)
    full_js_in_ht = cfg.divergence == "routed" and uses_teacher[HT]

    def per_token(c: Chunk) -> torch.Tensor:
        if cfg.ablation == "no_routing":
            return 0.5 * c.topk_rkl(True) + 0.5 * c.topk_rkl(False)
        regimes = c.regimes
        teacher_rows = torch.zeros_like(regimes, dtype=torch.bool)
        weight = torch.zeros(regimes.shape, dtype=torch.float32, device=regimes.device)
        for regime, use_teacher in uses_teacher.items():
            in_regime = regimes == regime
            teacher_rows |= in_regime & use_teacher
            weight[in_regime] = weights[regime]
        if cfg.divergence in ("js", "reverse_kl"):
            return weight * c.full_divergence(teacher_rows, beta=0.5 if cfg.divergence == "js" else 1.0)
        loss = c.topk_rkl(teacher_rows)
        if full_js_in_ht:
            ht = (regimes == HT).nonzero(as_tuple=True)[0]
            if ht.numel():  # the full vocabulary is materialised for HT rows only
                loss = loss.index_put((ht,), c.jsd(c.teacher, 0.5, ht))
        return weight * loss

    return per_token


def vanilla_opd(cfg: MethodConfig) -> PerToken:
    """The teacher on every token, with the divergence `method.opd_divergence`."""
    def per_token(c: Chunk) -> torch.Tensor:
        if cfg.opd_divergence == "sampled":
            return divergences.sampled_token_reverse_kl(c.token_logprobs(), c.token_logprobs(c.teacher))
        if cfg.opd_divergence == "topk":
            return c.topk_rkl(True)
        return c.jsd(c.teacher, 1.0)

    return per_token


def opsd(cfg: MethodConfig) -> PerToken:
    """On-policy self-distillation: generalised JSD to the privileged student on every token."""
    return lambda c: c.jsd(c.privileged, cfg.jsd_beta)


def gkd(cfg: MethodConfig) -> PerToken:
    """Generalised JSD to the teacher on every token (full vocabulary)."""
    return lambda c: c.jsd(c.teacher, cfg.jsd_beta)


def sft(cfg: MethodConfig) -> PerToken:
    """Cross-entropy to the reference answer's tokens (the batch's responses are the references)."""
    return lambda c: divergences.token_cross_entropy(c.student_logits, c.token_ids)


# -- the method table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One method: its objective and what it needs from the scoring passes.

    `on_policy=False` trains on the recipe's reference responses instead of rollouts.
    """

    objective: Callable[[MethodConfig], PerToken]
    needs_teacher: bool
    needs_privileged_student: bool
    routes: bool = False
    on_policy: bool = True


METHODS: dict[str, Method] = {
    "dopd": Method(dopd, needs_teacher=True, needs_privileged_student=True, routes=True),
    "vanilla_opd": Method(vanilla_opd, needs_teacher=True, needs_privileged_student=False),
    "opsd": Method(opsd, needs_teacher=False, needs_privileged_student=True),
    "gkd": Method(gkd, needs_teacher=True, needs_privileged_student=False),
    "sft": Method(sft, needs_teacher=False, needs_privileged_student=False, on_policy=False),
}


def scoring_passes(cfg: MethodConfig) -> tuple[bool, bool]:
    """(teacher pass, privileged-student pass) the step must run for `cfg`: the method's own, plus
    the privileged pass the token-drop ablation ranks tokens by."""
    method = METHODS[cfg.name]
    return method.needs_teacher, method.needs_privileged_student or cfg.token_drop != "none"


def step_views(cfg: MethodConfig) -> list[tuple[str, bool]]:
    """The prompt views a training step's passes read, as (model, with p): the student's x always
    (rollout, gradient pass), its x + p when the step scores the privileged student, the teacher's
    x + p or x (`method.teacher_privileged`) when it scores the teacher."""
    teacher, privileged = scoring_passes(cfg)
    return ([("student", False)] + ([("student", True)] if privileged else [])
            + ([("teacher", cfg.teacher_privileged)] if teacher else []))


def check_config(cfg: RunConfig) -> None:
    """The config's checks that need the method table (`train.setup` runs them before anything
    loads; the config itself imports no algorithm). Raises ConfigError."""
    m = cfg.method
    method = METHODS[m.name]
    if m.token_drop != "none" and not method.needs_teacher:
        raise ConfigError(f"config key 'method.token_drop': needs a method with a teacher (the gap is |lT - lP|); "
                          f"{m.name} has none")
    if method.needs_teacher and not cfg.model.teacher:
        raise ConfigError(f"config key 'model.teacher': is required (method {m.name} distils from a teacher)")


# -- the loss of one micro-batch ------------------------------------------------------------------


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


def compute_loss(cfg: MethodConfig, inputs: LossInputs, chunk_size: int,
                 loss_path: LossPath = "auto") -> tuple[torch.Tensor, TokenStats]:
    """The micro-batch loss (per-sequence token mean, then mean over sequences) and its stats.

    ``loss_path`` picks how the chunks run (see ``head_loss``): ``fused`` (a linear student head),
    ``chunked`` (any head), or ``auto`` (fused whenever the head is linear).
    """
    method = METHODS[cfg.name]
    check_inputs(cfg, method, inputs)
    fused = head_loss.use_fused(loss_path, inputs.student_head)
    head_loss.check_heads(inputs.student_head, inputs.teacher_head, inputs.privileged_head, fused, world_size())
    teacher_pass, privileged_pass = inputs.teacher_hidden is not None, inputs.privileged_hidden is not None
    chunk_loss = ChunkLoss(method.objective(cfg), cfg, inputs.privileged_lse is not None, inputs.teacher_lse is not None)
    loss, columns = head_loss.loss_over_chunks(
        chunk_loss, inputs.tokens, inputs.student_hidden, inputs.student_head, per_token_tensors(inputs),
        teacher_head=inputs.teacher_head if teacher_pass else None,
        frozen_privileged_head=inputs.privileged_head if privileged_pass else None,
        privileged_pass=privileged_pass, chunk_size=chunk_size, fused=fused,
    )
    stats = TokenStats(
        loss=columns[:, 0].detach(),
        entropy=columns[:, 1].detach(),
        kl_to_teacher=columns[:, 2].detach() if teacher_pass else None,
        regimes=inputs.regimes,
    )
    return loss, stats


def check_inputs(cfg: MethodConfig, method: Method, inputs: LossInputs) -> None:
    if method.needs_teacher and (inputs.teacher_hidden is None or inputs.teacher_head is None):
        raise ValueError(f"method {cfg.name} needs the teacher pass")
    if method.needs_privileged_student and inputs.privileged_hidden is None:
        raise ValueError(f"method {cfg.name} needs the privileged-student pass")
    if method.routes and inputs.regimes is None:
        raise ValueError(f"method {cfg.name} needs router regimes")


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


# -- what an objective sees: one chunk of tokens -------------------------------------------------


class Chunk:
    """The student's scores of one chunk plus its targets: what a per-token objective reads.

    ``student_scores`` are the student's logits, or (fused path) already their log-softmax; both
    give the same log-probs (log_softmax is shift invariant). Pieces shared by several terms
    (student log-probs, the top-K support, target rows) are computed once per chunk.
    """

    def __init__(self, cfg: MethodConfig, student_scores: torch.Tensor, token_ids: torch.Tensor,
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
            rows = routed_rows(targets, lambda source: source.log_probs())
            return divergences.topk_reverse_kl_from_logprobs(self.log_p_s, rows, self.cfg.top_k, variant)
        support_t = routed_rows(targets, lambda source: source.support_log_probs(self.support))
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


def routed_rows(targets, rows_of: Callable[[Target], torch.Tensor]) -> torch.Tensor:
    """Per row, the rows of the target that row is routed to (each target computed only if used)."""
    result = None
    for source, routed in targets:
        if bool(routed.any()):
            values = rows_of(source)
            result = values if result is None else torch.where(routed[:, None], values, result)
    return result


@dataclass
class ChunkLoss:
    """``objective`` on one chunk, returning its [n, 3] columns: loss, student entropy, KL to teacher.

    ``head_loss.loss_over_chunks`` calls it with the student's scores of the chunk (logits, or
    already log-probs), the chunks of :func:`per_token_tensors` and the targets' heads as its path
    calls them (None: no such pass).
    """

    objective: PerToken
    cfg: MethodConfig
    has_privileged_lse: bool
    has_teacher_lse: bool

    def __call__(self, student_scores, token_ids, regimes, kept, privileged_hidden, teacher_hidden, privileged_lse,
                 teacher_lse, *, privileged_head: Head | None, teacher_head: Head | None, scores_are_log_probs: bool):
        temperature = self.cfg.temperature
        privileged = teacher = None
        if privileged_head is not None:
            privileged = Target(privileged_hidden, privileged_head, privileged_lse if self.has_privileged_lse else None,
                                temperature)
        if teacher_head is not None:
            teacher = Target(teacher_hidden, teacher_head, teacher_lse if self.has_teacher_lse else None, temperature)
        chunk = Chunk(self.cfg, student_scores, token_ids, regimes, privileged=privileged, teacher=teacher,
                      scores_are_log_probs=scores_are_log_probs)
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
