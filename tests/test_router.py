"""Tests for dopd_vlm.router: the regime table, thresholds, global reductions."""

from __future__ import annotations

import math
import statistics
from datetime import timedelta
from fractions import Fraction

import pytest
import torch

from dopd_vlm.router import (
    HS,
    HT,
    LH,
    LL,
    NORMALIZATIONS,
    REGIME_NAMES,
    UNROUTED,
    AffineNorm,
    Thresholds,
    assign_regimes,
    compute_thresholds,
    kept_tokens,
    regime_counts,
    regime_shares,
    route,
    route_micro_batches,
    trimmed_mean,
)

B, T = 8, 12


def random_batch(seed: int, batch: int = B, steps: int = T, ties: bool = False):
    """(teacher log-probs, privileged-student log-probs, mask) with ragged right padding.

    ``ties=True`` draws log-probs from a few dyadic values, so equal gaps, qT == qP and equal
    probability sums are common.
    """
    g = torch.Generator().manual_seed(seed)
    if ties:
        choices = torch.tensor([-4.0, -2.0, -1.0, -0.5, -0.25, 0.0], dtype=torch.float64)
        teacher = choices[torch.randint(len(choices), (batch, steps), generator=g)]
        priv = choices[torch.randint(len(choices), (batch, steps), generator=g)]
    else:
        teacher = -3.0 * torch.rand(batch, steps, generator=g, dtype=torch.float64) ** 2
        priv = -3.0 * torch.rand(batch, steps, generator=g, dtype=torch.float64) ** 2
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    return teacher, priv, mask


# --------------------------------------------------------------------------- pure-Python reference


def reference_trimmed_mean(values: list[float], trim: float) -> float:
    kept = math.ceil((1 - Fraction(str(trim))) * len(values))
    return math.fsum(sorted(values)[:kept]) / kept


def reference_normalizer(values: list[float], normalize: str):
    if normalize == "none":
        return lambda x: x
    if normalize == "minmax":
        low, high = min(values), max(values)
        return lambda x: (x - low) / ((high - low) or 1.0)
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return lambda x: (x - mean) / (std or 1.0)


def reference_quantities(teacher: float, priv: float):
    # exp through torch so that ties at the thresholds are decided on identical bits.
    as_tensor = torch.tensor([teacher, priv], dtype=torch.float64)
    q_teacher, q_priv = as_tensor.exp().tolist()
    return abs(teacher - priv), q_teacher, q_priv


def reference_thresholds(teacher, priv, mask, trim, normalize):
    rows = zip(teacher.flatten().tolist(), priv.flatten().tolist(), mask.flatten().tolist())
    valid = [reference_quantities(t, p) for t, p, m in rows if m]
    columns = list(zip(*valid))
    norms = [reference_normalizer(list(column), normalize) for column in columns]
    return [reference_trimmed_mean([norm(x) for x in column], trim) for norm, column in zip(norms, columns)]


def reference_regime(teacher: float, priv: float, thresholds: Thresholds) -> int:
    """The table of ALGORITHM.md §2, one token, in plain Python."""
    gap, q_teacher, q_priv = reference_quantities(teacher, priv)
    gap = (gap - thresholds.gap_norm.shift) / thresholds.gap_norm.scale
    q_teacher = (q_teacher - thresholds.teacher_prob_norm.shift) / thresholds.teacher_prob_norm.scale
    q_priv = (q_priv - thresholds.priv_student_prob_norm.shift) / thresholds.priv_student_prob_norm.scale
    if gap < thresholds.gap:
        return LH if q_priv + q_teacher >= thresholds.teacher_prob + thresholds.priv_student_prob else LL
    return HT if q_teacher >= q_priv else HS


def reference_regimes(teacher, priv, mask, thresholds) -> torch.Tensor:
    out = [
        reference_regime(t, p, thresholds) if m else UNROUTED
        for t, p, m in zip(teacher.flatten().tolist(), priv.flatten().tolist(), mask.flatten().tolist())
    ]
    return torch.tensor(out, dtype=torch.int64).reshape(teacher.shape)


# --------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_definition():
    assert trimmed_mean(torch.arange(1.0, 21.0), 0.05) == 10.0  # n=20: drop the single largest (20)
    assert trimmed_mean(torch.arange(1.0, 20.0), 0.05) == 10.0  # n=19: floor(0.95) = 0 dropped
    assert trimmed_mean(torch.arange(1.0, 101.0), 0.29) == 36.0  # drop 29 (not 28: rounding-safe)
    assert trimmed_mean(torch.arange(1.0, 101.0), 0.0) == 50.5
    assert trimmed_mean(torch.tensor([5.0, 1.0, 5.0, 5.0]), 0.25) == pytest.approx(11 / 3)  # ties at the cut
    assert trimmed_mean(torch.tensor([7.0]), 0.5) == 7.0
    assert math.isnan(trimmed_mean(torch.zeros(0), 0.05))
    with pytest.raises(ValueError):
        trimmed_mean(torch.ones(3), 1.0)


def test_trimmed_mean_is_order_independent_bitwise():
    values = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shuffled = values[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    assert trimmed_mean(values, 0.05) == trimmed_mean(shuffled, 0.05)
    assert trimmed_mean(values, 0.05) == pytest.approx(reference_trimmed_mean(values.tolist(), 0.05), abs=1e-14)


# --------------------------------------------------------------------------- regimes


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_route_matches_brute_force_reference(ties, normalize):
    for seed in range(3):
        teacher, priv, mask = random_batch(seed, ties=ties)
        routing = route(teacher, priv, mask, trim=0.05, normalize=normalize)
        expected = reference_thresholds(teacher, priv, mask, 0.05, normalize)
        got = [routing.thresholds.gap, routing.thresholds.teacher_prob, routing.thresholds.priv_student_prob]
        assert got == pytest.approx(expected, abs=1e-12)
        assert routing.thresholds.num_tokens == int(mask.sum())
        assert torch.equal(routing.regimes, reference_regimes(teacher, priv, mask, routing.thresholds))


def test_every_valid_token_in_exactly_one_regime():
    teacher, priv, mask = random_batch(3)
    routing = route(teacher, priv, mask)
    assert routing.regimes.shape == teacher.shape and routing.regimes.dtype == torch.int64
    assert torch.isin(routing.regimes[mask], torch.tensor([LH, LL, HT, HS])).all()
    assert (routing.regimes[~mask] == UNROUTED).all()
    one_hot = torch.stack([routing.regimes == code for code in range(len(REGIME_NAMES))])
    assert torch.equal(one_hot.sum(0), mask.long())
    assert int(routing.counts.sum()) == int(mask.sum())
    assert sum(routing.shares.values()) == pytest.approx(1.0)
    assert routing.shares == regime_shares(routing.regimes)


def test_ties_at_the_boundaries_go_to_the_greater_or_equal_side():
    ones = torch.ones(1, dtype=torch.bool)
    half = math.log(0.5)

    def regime(teacher, priv, **thresholds):
        t = torch.tensor([teacher], dtype=torch.float64)
        p = torch.tensor([priv], dtype=torch.float64)
        return assign_regimes(t, p, ones, Thresholds(num_tokens=1, **thresholds)).item()

    # A == Ā (0.5 exactly) is high-gap: HT if qT > qP, HS if qT < qP.
    assert regime(0.0, -0.5, gap=0.5, teacher_prob=0.0, priv_student_prob=0.0) == HT
    assert regime(-1.5, -1.0, gap=0.5, teacher_prob=0.0, priv_student_prob=0.0) == HS
    # qT == qP on the high-gap side (A = 0 = Ā): HT.
    assert regime(half, half, gap=0.0, teacher_prob=1.0, priv_student_prob=1.0) == HT
    # qP + qT == q̄P + q̄T exactly (0.5 + 0.5 == 0.5 + 0.5) on the low-gap side: LH; just below: LL.
    assert regime(half, half, gap=1.0, teacher_prob=0.5, priv_student_prob=0.5) == LH
    assert regime(half, half, gap=1.0, teacher_prob=0.5, priv_student_prob=0.5 + 1e-12) == LL


def test_masked_positions_are_never_routed_whatever_their_values():
    teacher, priv, mask = random_batch(4)
    is_image_token = torch.zeros_like(mask)
    is_image_token[:, :3] = True
    text_mask = mask & ~is_image_token
    reference = route(teacher, priv, text_mask)
    for garbage in (math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0):
        dirty_teacher = teacher.masked_fill(~text_mask, garbage)
        dirty_priv = priv.masked_fill(~text_mask, -garbage if garbage == garbage else garbage)
        routing = route(dirty_teacher, dirty_priv, text_mask)
        assert routing.thresholds == reference.thresholds
        assert torch.equal(routing.regimes, reference.regimes)
        assert (routing.regimes[is_image_token] == UNROUTED).all()


# --------------------------------------------------------------------------- invariances


def _split_micro_batches(teacher, priv, mask, row_splits):
    """Micro-batches of rows, each cropped to its own longest valid length (different padding)."""
    pieces = []
    for rows in torch.split(torch.arange(teacher.shape[0]), row_splits):
        width = int(mask[rows].sum(1).max())
        pieces.append((teacher[rows, :width], priv[rows, :width], mask[rows, :width]))
    return [list(x) for x in zip(*pieces)]


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_micro_batch_lists_equal_the_concatenated_batch(normalize):
    teacher, priv, mask = random_batch(5)
    whole = route(teacher, priv, mask, normalize=normalize)
    teachers, privs, masks = _split_micro_batches(teacher, priv, mask, [3, 1, 4])
    assert compute_thresholds(teachers, privs, masks, normalize=normalize) == whole.thresholds  # bitwise
    routings = route_micro_batches(teachers, privs, masks, normalize=normalize)
    start = 0
    for routing, micro_mask in zip(routings, masks):
        rows = micro_mask.shape[0]
        width = micro_mask.shape[1]
        assert routing.thresholds == whole.thresholds
        assert torch.equal(routing.regimes, whole.regimes[start : start + rows, :width])
        start += rows
    assert torch.equal(regime_counts([r.regimes for r in routings]), whole.counts)


def test_padding_amount_does_not_matter():
    teacher, priv, mask = random_batch(6)
    g = torch.Generator().manual_seed(7)
    extra = 9
    padded_teacher = torch.cat([teacher, torch.randn(B, extra, generator=g, dtype=torch.float64)], 1)
    padded_priv = torch.cat([priv, torch.randn(B, extra, generator=g, dtype=torch.float64)], 1)
    padded_mask = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1)
    plain, padded = route(teacher, priv, mask), route(padded_teacher, padded_priv, padded_mask)
    assert padded.thresholds == plain.thresholds
    assert torch.equal(padded.regimes[:, :T], plain.regimes)
    assert (padded.regimes[:, T:] == UNROUTED).all()


# --------------------------------------------------------------------------- normalisation


def test_normalisation_keeps_the_gap_split_and_uses_global_statistics():
    teacher, priv, mask = random_batch(8)
    plain = route(teacher, priv, mask, normalize="none")
    for normalize in ("minmax", "zscore"):
        routing = route(teacher, priv, mask, normalize=normalize)
        low_gap = lambda regimes: (regimes == LH) | (regimes == LL)  # noqa: E731
        assert torch.equal(low_gap(routing.regimes), low_gap(plain.regimes))  # invariant
        assert routing.thresholds.normalize == normalize
    minmax = compute_thresholds(teacher, priv, mask, normalize="minmax").teacher_prob_norm
    q_teacher = teacher[mask].exp()
    assert minmax.apply(q_teacher).min().item() == 0.0 and minmax.apply(q_teacher).max().item() == 1.0
    zscore = compute_thresholds(teacher, priv, mask, normalize="zscore").priv_student_prob_norm
    normalized = zscore.apply(priv[mask].exp())
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert normalized.std(correction=0).item() == pytest.approx(1.0, abs=1e-12)


def test_normalisation_changes_the_probability_comparisons():
    # qT on a narrow scale, qP on a wide one: raw qT < qP, but relative to their own spreads the
    # first token's teacher is the more confident one.
    teacher = torch.log(torch.tensor([[0.30, 0.29, 0.28, 0.01]], dtype=torch.float64))
    priv = torch.log(torch.tensor([[0.50, 0.90, 0.10, 0.95]], dtype=torch.float64))
    mask = torch.ones_like(teacher, dtype=torch.bool)
    none = route(teacher, priv, mask, trim=0.0)
    minmax = route(teacher, priv, mask, trim=0.0, normalize="minmax")
    assert none.regimes.tolist() != minmax.regimes.tolist()
    assert torch.equal(minmax.regimes, reference_regimes(teacher, priv, mask, minmax.thresholds))


def test_constant_values_do_not_divide_by_zero():
    teacher = torch.full((2, 3), -1.0, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for normalize in NORMALIZATIONS:
        thresholds = compute_thresholds(teacher, teacher.clone(), mask, normalize=normalize)
        assert all(math.isfinite(x) for x in (thresholds.gap, thresholds.teacher_prob, thresholds.priv_student_prob))
        assert (assign_regimes(teacher, teacher, mask, thresholds) == HT).all()  # A = 0 = Ā; qT == qP


# --------------------------------------------------------------------------- API details


def test_no_gradient_and_mixed_dtypes():
    teacher, priv, mask = random_batch(9)
    teacher = teacher.float().requires_grad_(True)
    priv_bf16 = priv.bfloat16()
    routing = route(teacher, priv_bf16, mask)
    assert not routing.regimes.requires_grad
    assert isinstance(routing.thresholds.gap, float)


def test_empty_mask_and_bad_inputs():
    teacher, priv, mask = random_batch(10)
    empty = route(teacher, priv, torch.zeros_like(mask))
    assert empty.thresholds.num_tokens == 0 and math.isnan(empty.thresholds.gap)
    assert (empty.regimes == UNROUTED).all()
    assert regime_shares(empty.regimes) == {name: 0.0 for name in REGIME_NAMES}
    with pytest.raises(ValueError):
        route(teacher, priv[:, :3], mask)
    with pytest.raises(ValueError):
        route(teacher, priv, mask, normalize="robust")
    with pytest.raises(ValueError):
        compute_thresholds([teacher], [priv, priv], [mask])
    assert AffineNorm().apply(teacher) is teacher


# --------------------------------------------------------------------------- token ablation


def _gap_problem(seed=5, sizes=(7, 0, 12, 5)):
    g = torch.Generator().manual_seed(seed)
    teacher = [-torch.rand(n, generator=g) * 4 for n in sizes]
    priv = [-torch.rand(n, generator=g) * 4 for n in sizes]
    return teacher, priv


@pytest.mark.parametrize("mode", ["top", "bottom"])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.99])
def test_token_drop_removes_exactly_the_highest_or_lowest_gap_share_of_the_step(mode, fraction):
    teacher, priv = _gap_problem()
    kept = kept_tokens(teacher, priv, mode, fraction)
    assert [k.shape for k in kept] == [t.shape for t in teacher] and all(k.dtype == torch.bool for k in kept)
    gaps = torch.cat([(t.double() - p.double()).abs() for t, p in zip(teacher, priv)])
    keep = torch.cat(kept)
    dropped = math.floor(fraction * gaps.numel() + 1e-9)
    assert int((~keep).sum()) == dropped
    if dropped and dropped < gaps.numel():  # brute force: every dropped gap is beyond every kept one
        if mode == "top":
            assert gaps[~keep].min() >= gaps[keep].max()
        else:
            assert gaps[~keep].max() <= gaps[keep].min()
    # micro-batch split does not matter: the same tokens from one concatenated batch
    single = kept_tokens([torch.cat(teacher)], [torch.cat(priv)], mode, fraction)[0]
    assert torch.equal(single, keep)


def test_random_token_drop_is_seeded_per_micro_batch_and_none_keeps_all():
    teacher, priv = _gap_problem(sizes=(4000, 3000))

    def draw(seed):
        return kept_tokens(teacher, priv, "random", 0.2, [torch.Generator().manual_seed(seed + i) for i in range(2)])

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other[0])
    share = 1 - torch.cat(first).float().mean().item()
    assert 0.18 < share < 0.22
    assert all(k.all() for k in kept_tokens(teacher, priv, "none", 0.2))
    with pytest.raises(ValueError):
        kept_tokens(teacher, priv, "middle", 0.2)


# --------------------------------------------------------------------------- multi-process


def _distributed_worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        teacher, priv, mask = random_batch(11)
        results = {}
        for normalize in NORMALIZATIONS:
            # Unequal halves: rank 0 gets 3 rows, rank 1 the other 5 as two micro-batches.
            if rank == 0:
                results[normalize] = compute_thresholds(teacher[:3], priv[:3], mask[:3], normalize=normalize)
            else:
                routings = route_micro_batches(
                    [teacher[3:5], teacher[5:]], [priv[3:5], priv[5:]], [mask[3:5], mask[5:]], normalize=normalize
                )
                results[normalize] = routings[0].thresholds
        # A rank without any valid token still takes part and gets the global thresholds.
        local_mask = mask if rank == 1 else torch.zeros_like(mask)
        results["empty_rank"] = compute_thresholds(teacher, priv, local_mask)
        results["local_only"] = compute_thresholds(teacher[:3], priv[:3], mask[:3], reduce_across_ranks=False)
        # token ablation: each rank's share of the global ranking (rank 1: two micro-batches)
        t, p = teacher[mask], priv[mask]
        mine = ([t[:4]], [p[:4]]) if rank == 0 else ([t[4:9], t[9:]], [p[4:9], p[9:]])
        results["kept_top"] = torch.cat(kept_tokens(*mine, "top", 0.3))
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_thresholds_equal_single_process_global(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    teacher, priv, mask = random_batch(11)
    for normalize in NORMALIZATIONS:
        single = compute_thresholds(teacher, priv, mask, normalize=normalize)
        assert per_rank[0][normalize] == per_rank[1][normalize] == single
    assert per_rank[0]["empty_rank"] == per_rank[1]["empty_rank"] == compute_thresholds(teacher, priv, mask)
    assert per_rank[0]["local_only"] == compute_thresholds(teacher[:3], priv[:3], mask[:3])
    single = kept_tokens([teacher[mask]], [priv[mask]], "top", 0.3)[0]
    assert torch.equal(torch.cat([per_rank[0]["kept_top"], per_rank[1]["kept_top"]]), single)
