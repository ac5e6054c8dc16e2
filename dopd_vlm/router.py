"""The shared DOPD router (docs/algorithm.md §2): which regime each response token belongs to.

For every valid response token (text only: image/vision/prompt/padding positions are masked
out by the caller's ``mask``)::

    lT = log π_T(y_n | x, p, y<n)      qT = exp(lT)
    lP = log π_S(y_n | x, p, y<n)      qP = exp(lP)      (privileged student, detached)
    A  = |lT − lP|

and, with batch thresholds Ā, q̄T, q̄P::

    LH: A < Ā and qP+qT ≥ q̄P+q̄T      LL: A < Ā and qP+qT < q̄P+q̄T
    HT: A ≥ Ā and qT ≥ qP              HS: A ≥ Ā and qT < qP

Design decisions (the paper is silent on them; see the functions for details):

- Thresholds are trimmed means: sort ascending, drop the largest ``floor(trim·n)`` values
  (i.e. keep the smallest ``ceil((1 − trim)·n)``), average the rest (:func:`trimmed_mean`).
  Ā, q̄T and q̄P are each trimmed separately; the LH/LL test compares qP+qT with q̄P+q̄T.
- Thresholds cover the *global* batch: every micro-batch given (list inputs) and, when
  torch.distributed is initialised, every rank. Ranks exchange their valid values with
  variable-count all-gathers, so every rank computes identical thresholds, equal to what one
  process would compute on the concatenated global batch.
- Everything is computed in float64 on values sorted first, so the result does not depend on
  how tokens are split into micro-batches or ranks, nor on padding.
- Optional normalisation (none / minmax / zscore) of A, qT and qP with global statistics.
- Nothing here carries gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from dopd_vlm.choices import NORMALIZATIONS, TOKEN_DROPS

LH, LL, HT, HS = 0, 1, 2, 3
REGIME_NAMES = ("LH", "LL", "HT", "HS")
NUM_REGIMES = len(REGIME_NAMES)
UNROUTED = -1  # regime code of every position outside the mask

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class AffineNorm:
    """x -> (x − shift) / scale, the normalisation of one routed quantity (identity by default)."""

    shift: float = 0.0
    scale: float = 1.0

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        if self.shift == 0.0 and self.scale == 1.0:
            return values
        return (values - self.shift) / self.scale


@dataclass(frozen=True)
class Thresholds:
    """Batch thresholds of the router, in the (possibly normalised) space the comparisons use.

    ``gap`` is Ā, ``teacher_prob`` q̄T, ``priv_student_prob`` q̄P; ``prob_sum`` = q̄P + q̄T.
    The ``*_norm`` fields map raw A, qT, qP into that space (identity for ``normalize="none"``).
    ``num_tokens`` is the number of valid tokens they were computed on (global). With no valid
    token at all the thresholds are NaN, and nothing is routed anyway.
    """

    gap: float
    teacher_prob: float
    priv_student_prob: float
    num_tokens: int
    trim: float = 0.05
    normalize: str = "none"
    gap_norm: AffineNorm = field(default_factory=AffineNorm)
    teacher_prob_norm: AffineNorm = field(default_factory=AffineNorm)
    priv_student_prob_norm: AffineNorm = field(default_factory=AffineNorm)

    @property
    def prob_sum(self) -> float:
        return self.teacher_prob + self.priv_student_prob


@dataclass(frozen=True)
class Routing:
    """Regimes of one batch: codes LH/LL/HT/HS (0..3) per position, UNROUTED (−1) outside the mask.

    ``counts[r]`` is the number of this batch's tokens in regime ``r`` (local, not reduced
    across ranks); ``shares`` gives the fractions by regime name, for logging.
    """

    regimes: torch.Tensor
    thresholds: Thresholds
    counts: torch.Tensor

    @property
    def shares(self) -> dict[str, float]:
        return _shares_from_counts(self.counts)


# --------------------------------------------------------------------------- statistics


def trimmed_mean(values: torch.Tensor, trim: float = 0.05) -> float:
    """Mean of ``values`` after discarding the largest ``floor(trim·n)`` of the n values.

    Equivalently: sort ascending, keep the smallest ``n − floor(trim·n) = ceil((1 − trim)·n)``
    values and average them. Which of several tied values at the cut is dropped does not change
    the mean, so the result is deterministic. trim = 0 is the plain mean; n = 0 gives NaN.
    The summation runs over the sorted values, so the result does not depend on their order.
    """
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    flat = values.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return math.nan
    # The epsilon absorbs binary rounding of trim·n (0.29 * 100 == 28.999999999999996).
    num_dropped = math.floor(trim * n + 1e-9)
    num_kept = max(n - num_dropped, 1)
    return flat.sort().values[:num_kept].mean().item()


def _fit_norm(sorted_values: torch.Tensor, normalize: str) -> AffineNorm:
    """Global normalisation statistics of one quantity (values already sorted, float64).

    minmax: (x − min)/(max − min); zscore: (x − mean)/std with the population std. A zero
    range or std (all values equal) keeps scale 1 rather than dividing by zero.
    """
    if normalize == "none" or sorted_values.numel() == 0:
        return AffineNorm()
    if normalize == "minmax":
        low, high = sorted_values[0].item(), sorted_values[-1].item()
        return AffineNorm(shift=low, scale=(high - low) or 1.0)
    mean = sorted_values.mean().item()
    std = sorted_values.std(correction=0).item()
    return AffineNorm(shift=mean, scale=std or 1.0)


# --------------------------------------------------------------------------- gathering


def _as_list(x: TensorOrList) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _valid_logprobs(
    teacher_logprobs: TensorOrList, priv_student_logprobs: TensorOrList, mask: TensorOrList
) -> torch.Tensor:
    """[n, 2] float64 (lT, lP) of the valid tokens of all micro-batches, in row-major order."""
    teachers, privs, masks = _as_list(teacher_logprobs), _as_list(priv_student_logprobs), _as_list(mask)
    if not (len(teachers) == len(privs) == len(masks)) or not teachers:
        raise ValueError(
            f"need the same, non-zero number of teacher/privileged-student/mask tensors, got "
            f"{len(teachers)}/{len(privs)}/{len(masks)}"
        )
    pieces = []
    for teacher, priv, valid in zip(teachers, privs, masks):
        _check_same_shape(teacher, priv, valid)
        valid = valid.detach().bool()
        pieces.append(torch.stack([teacher.detach()[valid].double(), priv.detach()[valid].double()], dim=-1))
    return torch.cat(pieces)


def _check_same_shape(teacher: torch.Tensor, priv: torch.Tensor, mask: torch.Tensor) -> None:
    if not (teacher.shape == priv.shape == mask.shape):
        raise ValueError(
            f"teacher log-probs {tuple(teacher.shape)}, privileged-student log-probs "
            f"{tuple(priv.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )


def _all_gather_rows(local_rows: torch.Tensor, process_group) -> tuple[torch.Tensor, list[int]]:
    """Concatenation, in rank order, of every rank's ``local_rows`` [n_rank, C] (n varies by rank),
    and every rank's n.

    all_gather needs equal shapes: gather the counts, pad every rank to the largest count
    (at least 1 row, some backends dislike empty tensors), gather, and cut the padding off.
    Tensors stay on the inputs' device, so that must be one the backend accepts.
    """
    world_size = dist.get_world_size(process_group)
    count = torch.tensor([local_rows.shape[0]], dtype=torch.int64, device=local_rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=process_group)
    counts = [int(c.item()) for c in counts]

    padded = local_rows.new_zeros((max(max(counts), 1), local_rows.shape[1]))
    padded[: local_rows.shape[0]] = local_rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=process_group)
    return torch.cat([rows[:n] for rows, n in zip(gathered, counts)]), counts


def _is_distributed(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


# --------------------------------------------------------------------------- routed quantities


def _gap_and_probs(teacher_logprobs: torch.Tensor, priv_student_logprobs: torch.Tensor):
    """A = |lT − lP|, qT = exp(lT), qP = exp(lP) in float64 (one definition, used everywhere)."""
    teacher = teacher_logprobs.detach().to(torch.float64)
    priv = priv_student_logprobs.detach().to(torch.float64)
    return (teacher - priv).abs(), teacher.exp(), priv.exp()


# --------------------------------------------------------------------------- public API


@torch.no_grad()
def compute_thresholds(
    teacher_logprobs: TensorOrList,
    priv_student_logprobs: TensorOrList,
    mask: TensorOrList,
    *,
    trim: float = 0.05,
    normalize: str = "none",
    process_group: Optional[dist.ProcessGroup] = None,
    reduce_across_ranks: bool = True,
) -> Thresholds:
    """Router thresholds Ā, q̄T, q̄P over all valid tokens of the global batch.

    Inputs are either one tensor each (same shape, e.g. [B, T]) or lists with one tensor per
    micro-batch (shapes may differ between micro-batches, not within one). ``mask`` is True at
    valid response text tokens; values elsewhere are never read (they may be NaN or garbage).

    When torch.distributed is initialised with more than one rank in ``process_group`` (None:
    the default group) and ``reduce_across_ranks`` is True, all ranks' valid values are
    gathered first, so every rank returns the same thresholds, equal to a single process's on
    the concatenated global batch. This is a collective: every rank must call it.

    ``normalize`` maps A, qT, qP each by its own global statistics before the trimmed means:
    ``"minmax"`` to [0, 1], ``"zscore"`` to zero mean / unit population std. Since the maps are
    increasing and affine and trimmed means commute with them, ``A < Ā`` (low/high gap) is
    invariant under normalisation. ``qT ≥ qP`` and ``qP+qT ≥ q̄P+q̄T`` are NOT: qT and qP get
    different shifts and scales, so normalisation changes how the two probabilities are weighed
    against each other (that is its purpose; with ``"none"`` they are compared on the raw scale).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")

    valid = _valid_logprobs(teacher_logprobs, priv_student_logprobs, mask)
    if reduce_across_ranks and _is_distributed(process_group):
        valid, _ = _all_gather_rows(valid, process_group)

    # Sorting first makes every statistic independent of token order (micro-batch split,
    # rank count, padding), hence bitwise reproducible.
    gap, teacher_prob, priv_prob = (q.sort().values for q in _gap_and_probs(valid[:, 0], valid[:, 1]))
    gap_norm = _fit_norm(gap, normalize)
    teacher_norm = _fit_norm(teacher_prob, normalize)
    priv_norm = _fit_norm(priv_prob, normalize)
    return Thresholds(
        gap=trimmed_mean(gap_norm.apply(gap), trim),
        teacher_prob=trimmed_mean(teacher_norm.apply(teacher_prob), trim),
        priv_student_prob=trimmed_mean(priv_norm.apply(priv_prob), trim),
        num_tokens=valid.shape[0],
        trim=trim,
        normalize=normalize,
        gap_norm=gap_norm,
        teacher_prob_norm=teacher_norm,
        priv_student_prob_norm=priv_norm,
    )


@torch.no_grad()
def assign_regimes(
    teacher_logprobs: torch.Tensor,
    priv_student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    thresholds: Thresholds,
) -> torch.Tensor:
    """Regime code per position (int64, same shape as the inputs); UNROUTED where mask is False.

    Applies the table of docs/algorithm.md §2 with the given thresholds (after the thresholds'
    normalisation). Ties go to the ``≥`` side: A == Ā is high-gap, qT == qP is HT, and
    qP+qT == q̄P+q̄T is LH.
    """
    _check_same_shape(teacher_logprobs, priv_student_logprobs, mask)
    gap, teacher_prob, priv_prob = _gap_and_probs(teacher_logprobs, priv_student_logprobs)
    gap = thresholds.gap_norm.apply(gap)
    teacher_prob = thresholds.teacher_prob_norm.apply(teacher_prob)
    priv_prob = thresholds.priv_student_prob_norm.apply(priv_prob)

    low_gap = gap < thresholds.gap
    confident = (priv_prob + teacher_prob) >= thresholds.prob_sum
    teacher_ahead = teacher_prob >= priv_prob
    low_gap_regime = torch.where(confident, LH, LL)
    high_gap_regime = torch.where(teacher_ahead, HT, HS)
    regimes = torch.where(low_gap, low_gap_regime, high_gap_regime)
    return regimes.masked_fill(~mask.bool(), UNROUTED)


def route(
    teacher_logprobs: torch.Tensor,
    priv_student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    trim: float = 0.05,
    normalize: str = "none",
    process_group: Optional[dist.ProcessGroup] = None,
    reduce_across_ranks: bool = True,
) -> Routing:
    """Thresholds from this batch (and the other ranks'), then its regimes. See compute_thresholds."""
    thresholds = compute_thresholds(
        teacher_logprobs,
        priv_student_logprobs,
        mask,
        trim=trim,
        normalize=normalize,
        process_group=process_group,
        reduce_across_ranks=reduce_across_ranks,
    )
    regimes = assign_regimes(teacher_logprobs, priv_student_logprobs, mask, thresholds)
    return Routing(regimes=regimes, thresholds=thresholds, counts=regime_counts(regimes))


def route_micro_batches(
    teacher_logprobs: Sequence[torch.Tensor],
    priv_student_logprobs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    *,
    trim: float = 0.05,
    normalize: str = "none",
    process_group: Optional[dist.ProcessGroup] = None,
    reduce_across_ranks: bool = True,
) -> list[Routing]:
    """One Routing per micro-batch, all sharing thresholds computed over every micro-batch
    (and every rank): the router of one optimizer step with gradient accumulation."""
    thresholds = compute_thresholds(
        teacher_logprobs,
        priv_student_logprobs,
        masks,
        trim=trim,
        normalize=normalize,
        process_group=process_group,
        reduce_across_ranks=reduce_across_ranks,
    )
    routings = []
    for teacher, priv, mask in zip(teacher_logprobs, priv_student_logprobs, masks):
        regimes = assign_regimes(teacher, priv, mask, thresholds)
        routings.append(Routing(regimes=regimes, thresholds=thresholds, counts=regime_counts(regimes)))
    return routings


# --------------------------------------------------------------------------- token ablations


@torch.no_grad()
def kept_tokens(
    teacher_logprobs: Sequence[torch.Tensor],
    priv_student_logprobs: Sequence[torch.Tensor],
    mode: str,
    fraction: float,
    generators: Sequence[torch.Generator] = (),
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> list[torch.Tensor]:
    """The paper's token ablation (its Fig. 4): which tokens of each micro-batch a loss keeps when
    the `fraction` of the step's tokens with the highest (`top`), lowest (`bottom`) or random
    (`random`) privileged advantage gap A = |lT − lP| is dropped. One bool [n_i] mask per micro-batch.

    `top` / `bottom` rank the tokens of every micro-batch and every rank together (a collective,
    like `compute_thresholds`): exactly floor(fraction · n) tokens are dropped globally, ties
    broken by the order of the gathered values, so the result does not depend on how tokens are
    split into micro-batches or ranks. `random` draws each token with the micro-batch's generator
    (seeded per step and global micro-batch by the caller), no communication.
    """
    if mode not in TOKEN_DROPS:
        raise ValueError(f"mode must be one of {TOKEN_DROPS}, got {mode!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    gaps = [(t.detach().double() - p.detach().double()).abs() for t, p in zip(teacher_logprobs, priv_student_logprobs)]
    if mode == "none":
        return [torch.ones_like(g, dtype=torch.bool) for g in gaps]
    if mode == "random":
        return [torch.rand(g.shape, generator=gen, dtype=torch.float64, device=g.device) >= fraction
                for g, gen in zip(gaps, generators)]
    local = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
    start, everything = 0, local
    if _is_distributed(process_group):
        rows, counts = _all_gather_rows(local[:, None], process_group)
        everything, start = rows[:, 0], sum(counts[: dist.get_rank(process_group)])
    n = everything.numel()
    dropped = math.floor(fraction * n + 1e-9)
    if dropped == 0:
        return [torch.ones_like(g, dtype=torch.bool) for g in gaps]
    order = torch.sort(everything, descending=mode == "top", stable=True).indices
    keep = torch.ones(n, dtype=torch.bool, device=everything.device)
    keep[order[:dropped]] = False
    mine = keep[start : start + local.numel()]
    return list(mine.split([g.numel() for g in gaps]))


# --------------------------------------------------------------------------- metrics


def regime_counts(regimes: TensorOrList) -> torch.Tensor:
    """Number of routed tokens per regime: int64 [NUM_REGIMES], indexed by regime code."""
    counts = torch.zeros(NUM_REGIMES, dtype=torch.int64)
    for tensor in _as_list(regimes):
        routed = tensor.detach().reshape(-1)
        routed = routed[routed != UNROUTED]
        counts += torch.bincount(routed, minlength=NUM_REGIMES).cpu()
    return counts


def _shares_from_counts(counts: torch.Tensor) -> dict[str, float]:
    total = int(counts.sum())
    return {name: (int(counts[code]) / total if total else 0.0) for code, name in enumerate(REGIME_NAMES)}


def regime_shares(regimes: TensorOrList) -> dict[str, float]:
    """Share of routed tokens in each regime, by name ({"LH": .., "LL": .., "HT": .., "HS": ..}).

    Accepts one regimes tensor or a list (micro-batches); all shares are 0.0 if nothing is routed.
    """
    return _shares_from_counts(regime_counts(regimes))
