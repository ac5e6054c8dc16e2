"""Length-aware micro-batches: which of a rank's sequences share a scoring and update micro-batch,
and how much of what each pass computes is padding.

After the rollout a rank holds its step's sequences (prompt + response), of very different lengths
when sampling at temperature 1: most responses stop early, a few run to the cap. A padded pass
computes every row of a micro-batch to the length of its longest, so where the sequences go decides
the compute wasted on padding and the activation memory of the passes.

- **Fixed grouping** (`train.micro_batch_tokens: 0`, the default): micro-batch g holds the sequences
  of prompts g·P .. (g+1)·P - 1 (P = `train.prompts_per_micro_batch`, with their rollouts), in
  prompt order (`fixed_groups`).
- **Token budget** (`train.micro_batch_tokens: N`): the sequences are sorted longest first and cut
  into consecutive runs whose cost stays within N (`budget_groups`): rows x the longest row for a
  padded pass, the sum of the rows' lengths for a padding-free one (`train.padding_free`). Rows of
  one run have similar lengths, so little is padded, and a run of long sequences holds few of them:
  every pass computes at most N positions (plus a vision batch's one padding row), whatever the
  lengths, which bounds its activation memory.

Every rank must run equally many micro-batches (under ZeRO-3 each forward and backward is a
collective), so a rank with fewer splits its costliest micro-batches until the counts agree
(`split_to`); a rank's sequences are never fewer than the largest count, since every rank holds
the same number. Each micro-batch's loss (its sequences' mean) is weighted by its share of a fixed
micro-batch's sequences (`loss_scales`), so the step's gradient is the paper's objective (the mean
over the step's sequences of each sequence's token mean) whatever the grouping.

Pure functions on lengths; the step (`step.micro_batch_rows`) supplies them and the collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# The passes whose positions `PassPositions` counts: the rollout (generation from the plain view),
# the student's pass with gradient, and the no-grad privileged-student and teacher passes.
PASSES = ("rollout", "student", "privileged", "teacher")


def fixed_groups(num_sequences: int, per_micro_batch: int) -> list[list[int]]:
    """Consecutive runs of `per_micro_batch` sequences: the micro-batches of the prompt order."""
    return [list(range(start, min(start + per_micro_batch, num_sequences)))
            for start in range(0, num_sequences, per_micro_batch)]


def group_cost(lengths: Sequence[int], padding_free: bool) -> int:
    """Positions a pass computes for sequences of these lengths: their sum without padding, else
    rows x the longest."""
    if not lengths:
        return 0
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


def budget_groups(lengths: Sequence[int], budget: int, padding_free: bool) -> list[list[int]]:
    """Sequence indices in micro-batches of cost <= `budget` (`group_cost`), longest first.

    The sequences are sorted by length, longest first (ties in index order), and cut into
    consecutive runs, each as long as the budget allows. A sequence longer than the budget on its
    own gets a micro-batch of its own (the load-time checks refuse such prompts, `prompt_checks`).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and group_cost([lengths[i] for i in groups[-1]] + [lengths[index]], padding_free) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def split_to(groups: Sequence[Sequence[int]], lengths: Sequence[int], count: int,
             padding_free: bool) -> list[list[int]]:
    """`groups` split until there are `count` of them: each time the costliest group of two or more
    sequences is cut into halves (its first half, the longer sequences, stays in place)."""
    result = [list(group) for group in groups]
    if count > sum(map(len, result)):
        raise ValueError(f"{sum(map(len, result))} sequences cannot fill {count} micro-batches")
    while len(result) < count:
        splittable = [i for i, group in enumerate(result) if len(group) > 1]
        target = max(splittable, key=lambda i: (group_cost([lengths[j] for j in result[i]], padding_free), -i))
        group = result[target]
        half = (len(group) + 1) // 2
        result[target: target + 1] = [group[:half], group[half:]]
    return result


def loss_scales(groups: Sequence[Sequence[int]], per_micro_batch: int) -> list[float]:
    """Each micro-batch's loss weight: its sequences over a fixed micro-batch's (1 for every fixed
    micro-batch). DeepSpeed divides every micro-batch's loss by the configured accumulation steps
    and averages over ranks, so sum(weight x micro-batch mean) over a step is the mean over all of
    the step's sequences."""
    return [len(group) / per_micro_batch for group in groups]


@dataclass
class PassPositions:
    """Token positions each pass computed in a step and how many of them were real (a sample's
    prompt or response token): the rest is padding (rows padded to the longest, the finished rows
    of a generate call, a vision batch's padding row)."""

    computed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    real: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))

    def add(self, name: str, computed: int, real: int) -> None:
        self.computed[name] += computed
        self.real[name] += real

    def totals(self) -> list[float]:
        """[computed, real] per pass in PASSES order (to sum over ranks)."""
        return [float(value) for name in PASSES for value in (self.computed[name], self.real[name])]

    @staticmethod
    def metrics(totals: Sequence[float]) -> dict[str, float]:
        """`perf/padding_share` (padded over computed positions, all passes), and for each pass
        that ran `perf/padding_share/<pass>` and `perf/positions/<pass>` (the positions it
        computed), from `totals` summed over ranks."""
        pairs = {name: (totals[2 * i], totals[2 * i + 1]) for i, name in enumerate(PASSES)}
        computed = sum(c for c, _ in pairs.values())
        real = sum(r for _, r in pairs.values())
        out = {"perf/padding_share": (computed - real) / computed if computed else 0.0}
        for name, (c, r) in pairs.items():
            if c:
                out[f"perf/padding_share/{name}"] = (c - r) / c
                out[f"perf/positions/{name}"] = c
        return out
