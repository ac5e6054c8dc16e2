"""Distillation methods: the method table, each method's per-token objective, the step summary.

A method is one row of `METHODS`: which scoring passes it needs, whether it routes, and its
per-token objective, a function of the method's config returning `Chunk -> [n] losses`
(`head_loss.Chunk` gives the student's log-probs, the targets and the divergences on one chunk of
tokens). Everything else — chunking, the fused LM-head gradient, ZeRO-3 — is `head_loss.evaluate`'s.

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
computes which tokens, `chunks` gives them zero loss).

Loss reduction (paper): mean over each sequence's valid tokens, then mean over sequences.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from dopd_vlm import divergences, head_loss
from dopd_vlm.head_loss import Chunk, LossInputs, LossPath, PerToken
from dopd_vlm.distributed import world_size
from dopd_vlm.router import HS, HT, LH, LL, REGIME_NAMES

if TYPE_CHECKING:
    from dopd_vlm.config import MethodConfig

Ablation = Literal["none", "no_routing", "no_teacher", "no_student"]
RegimeWeights = Literal["paper", "equal", "ht_only"]
Divergence = Literal["routed", "topk_rkl", "js", "reverse_kl"]
OpdDivergence = Literal["sampled", "topk", "full"]


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


ABLATIONS = typing.get_args(Ablation)
REGIME_WEIGHTS = typing.get_args(RegimeWeights)
DIVERGENCES = typing.get_args(Divergence)
OPD_DIVERGENCES = typing.get_args(OpdDivergence)


# -- the loss of one micro-batch ------------------------------------------------------------------


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

    ``loss_path`` picks how the chunks run (see ``chunks``): ``fused`` (a linear student head),
    ``chunked`` (any head), or ``auto`` (fused whenever the head is linear).
    """
    method = METHODS[cfg.name]
    check_inputs(cfg, method, inputs)
    fused = head_loss.use_fused(loss_path, inputs.student_head)
    head_loss.check_partitioned_heads(inputs, fused, world_size())
    loss, columns = head_loss.evaluate(method.objective(cfg), cfg, inputs, chunk_size, fused)
    stats = TokenStats(
        loss=columns[:, 0].detach(),
        entropy=columns[:, 1].detach(),
        kl_to_teacher=columns[:, 2].detach() if inputs.teacher_hidden is not None else None,
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
