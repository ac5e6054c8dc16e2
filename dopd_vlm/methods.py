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
full-vocabulary work happens per chunk of tokens inside `chunked_head_loss`, so memory stays
O(chunk x V) in forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dopd_vlm import losses
from dopd_vlm.config import MethodConfig
from dopd_vlm.router import HS, HT, LH, LL, REGIME_NAMES
from dopd_vlm.scoring import Head, ResponseTokens


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
    """One micro-batch's valid response tokens as the three passes saw them (N rows)."""

    tokens: ResponseTokens
    student_hidden: torch.Tensor  # [N, H], carries the gradient
    student_head: Head
    privileged_hidden: torch.Tensor | None = None  # [N, H], detached
    teacher_hidden: torch.Tensor | None = None  # [N, H], detached
    teacher_head: Head | None = None
    regimes: torch.Tensor | None = None  # [N] router codes (dopd)


@dataclass
class TokenStats:
    """Detached per-token diagnostics of one micro-batch, concatenated over a step for logging."""

    loss: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N] student entropy
    kl_to_teacher: torch.Tensor | None  # [N] full KL(P_S || P_T), when a teacher pass exists
    regimes: torch.Tensor | None


def compute_loss(cfg: MethodConfig, inputs: LossInputs, chunk_size: int) -> tuple[torch.Tensor, TokenStats]:
    """The micro-batch loss (per-sequence token mean, then mean over sequences) and its stats."""
    spec = SPECS[cfg.name]
    _check_inputs(cfg, spec, inputs)
    per_token = _PER_TOKEN[cfg.name](cfg)
    has_teacher = inputs.teacher_hidden is not None
    student_head, teacher_head = inputs.student_head, inputs.teacher_head

    def per_chunk(student_logits, token_ids, regimes, privileged_hidden, teacher_hidden):
        with torch.no_grad():
            privileged_logits = student_head(privileged_hidden) if privileged_hidden.numel() else None
            teacher_logits = teacher_head(teacher_hidden) if teacher_hidden.numel() else None
        loss = per_token(student_logits, token_ids, regimes, privileged_logits, teacher_logits)
        with torch.no_grad():
            entropy = losses.entropy(student_logits)
            kl = (
                losses.generalized_jsd(student_logits, teacher_logits, beta=1.0)
                if teacher_logits is not None
                else torch.zeros_like(entropy)
            )
        return torch.stack([loss, entropy, kl], dim=-1)

    n = inputs.tokens.token_ids.shape[0]
    empty = inputs.student_hidden.new_zeros(n, 0)
    regimes = inputs.regimes if inputs.regimes is not None else torch.full_like(inputs.tokens.token_ids, -1)
    columns = losses.chunked_head_loss(
        inputs.student_hidden,
        student_head,
        per_chunk,
        inputs.tokens.token_ids,
        regimes,
        inputs.privileged_hidden if inputs.privileged_hidden is not None else empty,
        inputs.teacher_hidden if has_teacher else empty,
        chunk_size=chunk_size,
    )
    token_loss = columns[:, 0]
    loss = sequence_mean(token_loss, inputs.tokens)
    stats = TokenStats(
        loss=token_loss.detach(),
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


def _check_inputs(cfg: MethodConfig, spec: MethodSpec, inputs: LossInputs) -> None:
    if spec.needs_teacher and (inputs.teacher_hidden is None or inputs.teacher_head is None):
        raise ValueError(f"method {cfg.name} needs the teacher pass")
    if spec.needs_privileged_student and inputs.privileged_hidden is None:
        raise ValueError(f"method {cfg.name} needs the privileged-student pass")
    if spec.routes and inputs.regimes is None:
        raise ValueError(f"method {cfg.name} needs router regimes")


# -- per-token objectives: (student_logits, ids, regimes, privileged_logits, teacher_logits) -> [n]


def _dopd(cfg: MethodConfig):
    k, variant = cfg.top_k, cfg.topk_variant
    weights = {LH: cfg.beta_l, LL: cfg.beta_w, HT: cfg.ht_weight, HS: cfg.beta_l}
    uses_teacher = {LH: True, LL: False, HT: True, HS: False}
    if cfg.ablation == "no_teacher":
        uses_teacher = dict.fromkeys(uses_teacher, False)
    elif cfg.ablation == "no_student":
        uses_teacher = dict.fromkeys(uses_teacher, True)
    full_js_in_ht = cfg.ablation not in ("single_objective", "no_teacher")

    def rkl(student_logits, target_logits):
        return losses.topk_reverse_kl(student_logits, target_logits, k, variant, cfg.temperature)

    def per_token(student_logits, ids, regimes, privileged_logits, teacher_logits):
        if cfg.ablation == "no_routing":
            return 0.5 * rkl(student_logits, teacher_logits) + 0.5 * rkl(student_logits, privileged_logits)
        teacher_rows = torch.zeros_like(regimes, dtype=torch.bool)
        weight = torch.zeros(regimes.shape, dtype=torch.float32, device=regimes.device)
        for regime, use_teacher in uses_teacher.items():
            in_regime = regimes == regime
            teacher_rows |= in_regime & use_teacher
            weight[in_regime] = weights[regime]
        target = torch.where(teacher_rows[:, None], teacher_logits, privileged_logits)
        loss = rkl(student_logits, target)
        if full_js_in_ht:
            ht = (regimes == HT).nonzero(as_tuple=True)[0]
            if ht.numel():  # the full vocabulary is materialised for HT rows only
                js = losses.generalized_jsd(student_logits[ht], teacher_logits[ht], 0.5, cfg.temperature)
                loss = loss.index_put((ht,), js)
        return weight * loss

    return per_token


def _vanilla_opd(cfg: MethodConfig):
    def per_token(student_logits, ids, regimes, privileged_logits, teacher_logits):
        if cfg.opd_divergence == "sampled":
            return losses.sampled_token_reverse_kl(
                losses.token_logprobs(student_logits, ids, cfg.temperature),
                losses.token_logprobs(teacher_logits, ids, cfg.temperature),
            )
        if cfg.opd_divergence == "topk":
            return losses.topk_reverse_kl(student_logits, teacher_logits, cfg.top_k, cfg.topk_variant, cfg.temperature)
        return losses.generalized_jsd(student_logits, teacher_logits, 1.0, cfg.temperature)

    return per_token


def _opsd(cfg: MethodConfig):
    def per_token(student_logits, ids, regimes, privileged_logits, teacher_logits):
        return losses.generalized_jsd(student_logits, privileged_logits, cfg.jsd_beta, cfg.temperature)

    return per_token


def _gkd(cfg: MethodConfig):
    def per_token(student_logits, ids, regimes, privileged_logits, teacher_logits):
        return losses.generalized_jsd(student_logits, teacher_logits, cfg.jsd_beta, cfg.temperature)

    return per_token


def _sft(cfg: MethodConfig):
    def per_token(student_logits, ids, regimes, privileged_logits, teacher_logits):
        return losses.token_cross_entropy(student_logits, ids)

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
