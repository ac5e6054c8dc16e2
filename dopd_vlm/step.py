"""One DOPD optimizer step, in pipeline order: batches -> rollout -> score -> route -> loss -> update.

    dopd_step(models, micro_batches, cfg, seeds):
        sample_rollouts        the student samples from x, rollout.batch_size         no grad
                               sequences per call (HF generate, or the vLLM engine)
        micro_batch_rows       the rank's sequences regrouped: the prompts' micro-batches, or
                               longest first under train.micro_batch_tokens (packing.py)
        for each micro-batch:  score_targets  (privileged student x+p, teacher x+p)   no grad
        step_thresholds        over every micro-batch and rank (router, a collective)
        mark_kept_tokens       method.token_drop only: the tokens the loss keeps
        update_student         per micro-batch: student_loss (the pass with grad + the
                               method's loss), backward; one optimizer step at the end
        weight sync            rollout.engine=vllm: an applied step's weights to the engine
        step_metrics

Randomness is derived, not carried: a generate call covering global micro-batches g, g+1, ... of
step s is seeded with (seed, s, g), and the prompts of step s are a pure function of (seed, s)
(`step_batches`). A run therefore gives the same rollouts on 1 or N ranks whenever each rank's
micro-batches fall into the same generate calls (`rollout.batch_size` a divisor of a rank's
rollouts), and resuming needs only the step number. How sequences are grouped for scoring and the
update changes no result: each micro-batch's loss is weighted by its share of the step's sequences
(`packing.loss_scales`), the router's thresholds and the token ranking are over the whole step, and
the random token drop draws per sequence from the sequence's own seed.
"""

from __future__ import annotations

import random
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dopd_vlm.collate import DualViewCollator, ScoringViews, reference_responses
from dopd_vlm.data.schema import Sample
from dopd_vlm.distributed import all_ranks_max, all_ranks_sum, all_ranks_true, world_size
from dopd_vlm import hooks, lora
from dopd_vlm.engine import gathered_for_generation, gradients_finite
from dopd_vlm.methods import METHODS, LossInputs, TokenStats, compute_loss, scoring_passes, step_views, summarize
from dopd_vlm.models import device_of
from dopd_vlm.packing import PassPositions, budget_groups, fixed_groups, loss_scales, split_to
from dopd_vlm.rollout import sample_responses
from dopd_vlm.router import Thresholds, assign_regimes, compute_thresholds, kept_tokens
from dopd_vlm.scoring import Head, ResponseTokens, output_head, response_hidden_states, token_logprobs, token_logprobs_and_lse
from dopd_vlm.vllm_rollout import logprob_gap_metrics, logprob_gaps, row_seed

if TYPE_CHECKING:
    from dopd_vlm.config import RunConfig


@dataclass
class Models:
    """What a step touches: DeepSpeed engines (the student's trains `ResponseHiddenStates(model)`;
    the frozen ones are inference engines sharded like it), the collator and the shared vocabulary."""

    student: Any
    teacher_engine: Any | None
    collator: DualViewCollator
    vocab_size: int
    optimizer: Any = None  # SkippableAdamW, or DeepSpeed's own (then a non-finite step stops the run)
    suppress_token_ids: list[int] = field(default_factory=list)
    frozen_privileged_engine: Any | None = None  # method.privileged_target=initial: the starting student
    rollout_engine: Any = None  # rollout.engine=vllm: this rank's vllm_rollout.VllmRollout
    peft_student: Any = None  # model.lora: PEFT's model around student_module (saving the adapter)
    privileged_base: bool = False  # model.lora + privileged_target=initial: the student with adapters off

    @property
    def student_module(self) -> nn.Module:
        """The student model itself (the engine trains it wrapped in ``ResponseHiddenStates``)."""
        return self.student.module.model

    @property
    def teacher(self) -> nn.Module | None:
        return None if self.teacher_engine is None else self.teacher_engine.module

    @property
    def frozen_privileged(self) -> nn.Module | None:
        return None if self.frozen_privileged_engine is None else self.frozen_privileged_engine.module

    @property
    def privileged_student(self) -> nn.Module:
        """The model of the privileged-student pass: the trained student, or its frozen initial copy."""
        return self.frozen_privileged if self.frozen_privileged is not None else self.student_module

    @contextmanager
    def privileged_pass(self) -> Iterator[nn.Module]:
        """The privileged student for a no-grad pass, in eval mode (no LoRA dropout in a target): the
        trained student, its frozen initial copy, or (a LoRA student's initial target) the student
        with its adapters switched off: the base model, without a second copy of it."""
        model = self.privileged_student
        with evaluation_mode(model), lora.adapters_off(model) if self.privileged_base else nullcontext():
            yield model

    def privileged_head(self) -> Head | None:
        """A frozen privileged target's output layer for the loss; None: the trained student's own."""
        if self.frozen_privileged is not None:
            return output_head(self.frozen_privileged, self.vocab_size)
        if self.privileged_base and lora.adapted(self.student_module.get_output_embeddings()):
            return output_head(self.student_module, self.vocab_size, with_adapter=False)
        return None  # the student's own head (also the base's when no adapter sits on it)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class ScoredMicroBatch:
    """One micro-batch after rollout and the no-grad passes (phase 1 of a step)."""

    views: ScoringViews
    tokens: ResponseTokens
    privileged_hidden: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    privileged_logprobs: torch.Tensor | None = None
    teacher_lse: torch.Tensor | None = None  # logsumexp of the target logits: top-K losses reuse it
    privileged_lse: torch.Tensor | None = None
    kept: torch.Tensor | None = None  # [N] bool, method.token_drop: the tokens the loss keeps
    rollout_logprob_gap: torch.Tensor | None = None  # [N] vLLM: |engine - student pass| log-prob per token
    sequence_seeds: Sequence[int] = ()  # per sequence: its sampling seed (the random token drop's)
    loss_scale: float = 1.0  # the loss's weight: its sequences over a fixed micro-batch's (packing.loss_scales)


def dopd_step(models: Models, micro_batches: Sequence[Sequence[Sample]], cfg: RunConfig,
              seeds: Sequence[int]) -> dict[str, float]:
    """One optimizer step: rollout -> score -> route -> loss -> backward/step (see module doc)."""
    timer = PhaseTimer()
    with timer("rollout"):
        rollouts = Rollouts.cat([sample_rollouts(models, [micro_batches[i] for i in group], cfg, [seeds[i] for i in group])
                                 for group in rollout_groups(len(micro_batches), cfg)])
        groups, splits = micro_batch_rows(models, rollouts, cfg)
        batches = [rollouts.views(models, rows, cfg) for rows in groups]
    scales = loss_scales(groups, cfg.train.prompts_per_micro_batch * cfg.rollout.num_rollouts)
    scored = [score_targets(models, views, cfg, timer, seeds=[rollouts.seeds[i] for i in rows], loss_scale=scale)
              for views, rows, scale in zip(batches, groups, scales)]
    thresholds = step_thresholds(scored, cfg) if METHODS[cfg.method.name].routes else None
    if cfg.method.token_drop != "none":
        mark_kept_tokens(scored, cfg)
    losses, stats, applied = update_student(models, scored, cfg, thresholds, timer)
    if applied and models.rollout_engine is not None:  # a skipped step changed no weight
        with timer("weight_sync"):
            models.rollout_engine.sync_weights(models.student)
    positions = pass_positions(rollouts, groups, batches, cfg.train.padding_free)
    metrics = step_metrics(scored, losses, stats, applied, thresholds, timer, positions, cfg)
    metrics.update(length_metrics(rollouts, len(groups), splits, cfg))
    grad_norm = models.student.get_global_grad_norm()
    if applied and grad_norm is not None:  # DeepSpeed's global norm before clipping
        metrics["grad_norm"] = float(grad_norm)
    return metrics


# -- batches ------------------------------------------------------------------------------------


def step_batches(data: Sequence[Sample], cfg: RunConfig, step: int, rank: int, world: int):
    """This rank's micro-batches of step `step` and their sampling seeds (see module docstring).

    The step's prompts come from an epoch-wise permutation seeded by (seed, epoch); micro-batch
    g of the step goes to rank g // (micro-batches per rank).
    """
    t = cfg.train
    per_step = t.prompts_per_step
    first = step * per_step
    indices = [epoch_order(len(data), t.seed, (first + i) // len(data))[(first + i) % len(data)] for i in range(per_step)]
    per_micro = t.prompts_per_micro_batch
    per_rank = per_step // per_micro // world
    micro_batches, seeds = [], []
    for g in range(rank * per_rank, (rank + 1) * per_rank):
        micro_batches.append([data[i] for i in indices[g * per_micro : (g + 1) * per_micro]])
        seeds.append(derive_seed(t.seed, step, g))
    return micro_batches, seeds


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(derive_seed(seed, epoch, -1)).shuffle(order)
    return order


def derive_seed(*parts: int) -> int:
    """A seed that is a pure function of `parts` (e.g. (seed, step, micro-batch))."""
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**31 - 1)
    return value


# -- rollout and the no-grad passes -----------------------------------------------------------------


def rollout_groups(num_micro_batches: int, cfg: RunConfig) -> list[range]:
    """This rank's micro-batches in groups sampled by one `generate` call (`rollout.batch_size`
    sequences, 0 = all of them): one call waits for its longest response, so fewer calls are faster."""
    per_micro = cfg.train.prompts_per_micro_batch * cfg.rollout.num_rollouts
    size = cfg.rollout.batch_size // per_micro or num_micro_batches
    return [range(start, min(start + size, num_micro_batches)) for start in range(0, num_micro_batches, size)]


class GenerateCall(NamedTuple):
    """One sampling call of a step's rollouts: sequences [start, stop), for the positions it computed."""

    start: int
    stop: int
    steps: int  # decoding steps (HF generate runs every row until the last one stops)
    padding_row: bool = False  # HF: the vision padding row ran with the call
    padded: bool = True  # False: an engine that computes each sequence's own tokens only (vLLM)


@dataclass
class Rollouts:
    """A rank's sampled sequences of a step, in the order of its micro-batches and their rollouts,
    and the sampling calls that made them (reference responses, not sampled, have none)."""

    samples: list[Sample]
    response_ids: torch.Tensor  # [S, R] long, padded with the pad token
    response_mask: torch.Tensor  # [S, R] bool, up to and including the first EOS
    seeds: list[int]  # per sequence: row_seed(its micro-batch's seed, its row)
    pad_id: int
    logprobs: torch.Tensor | None = None  # [S, R] the vLLM engine's log-probs
    calls: list[GenerateCall] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return self.response_mask.sum(dim=1).tolist()

    @classmethod
    def cat(cls, parts: Sequence["Rollouts"]) -> "Rollouts":
        """One step's rollouts from its generate calls' (responses padded to the longest call's width)."""
        if len(parts) == 1:
            return parts[0]
        width = max(part.response_ids.shape[1] for part in parts)

        def padded(tensor: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

        ids = torch.cat([padded(p.response_ids, parts[0].pad_id) for p in parts])
        mask = torch.cat([padded(p.response_mask, False) for p in parts])
        logprobs = (torch.cat([padded(p.logprobs, 0.0) for p in parts]) if parts[0].logprobs is not None else None)
        calls, offset = [], 0
        for part in parts:
            calls += [call._replace(start=call.start + offset, stop=call.stop + offset) for call in part.calls]
            offset += len(part)
        return cls([s for p in parts for s in p.samples], ids, mask, [seed for p in parts for seed in p.seeds],
                   parts[0].pad_id, logprobs, calls)

    def views(self, models: Models, rows: Sequence[int], cfg: RunConfig) -> ScoringViews:
        """The scoring views of sequences `rows`: responses cut to the longest of them."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.response_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1)
        teacher, privileged = scoring_passes(cfg.method)
        views = models.collator.scoring_views(
            [self.samples[i] for i in rows], self.response_ids[index, :width], mask[:, :width],
            privileged_student=privileged, teacher=teacher, teacher_privileged=cfg.method.teacher_privileged,
        )
        if self.logprobs is not None:
            views = replace(views, rollout_logprobs=self.logprobs[index, :width])
        return views


def sample_rollouts(models: Models, micro_batches: Sequence[Sequence[Sample]], cfg: RunConfig,
                    seeds: Sequence[int]) -> Rollouts:
    """Sample cfg.rollout.num_rollouts responses per prompt of every micro-batch in one call (HF
    `generate` seeded by the first micro-batch's seed, or the vLLM engine, each row seeded from its
    own micro-batch's seed); off-policy methods take the recipe's reference responses."""
    repeated = [[s for s in samples for _ in range(cfg.rollout.num_rollouts)] for samples in micro_batches]
    everything = [s for rows in repeated for s in rows]
    row_seeds = [row_seed(seed, row) for rows, seed in zip(repeated, seeds) for row in range(len(rows))]
    pad_id = models.collator.tokenizer.pad_token_id
    if not METHODS[cfg.method.name].on_policy:
        ids, mask = reference_responses(models.collator, everything)
        return Rollouts(everything, ids, mask, row_seeds, pad_id)
    if models.rollout_engine is not None:
        sampled = models.rollout_engine.sample(everything, row_seeds)
        call = GenerateCall(0, len(everything), sampled.ids.shape[1], padded=False)
        return Rollouts(everything, sampled.ids, sampled.mask, row_seeds, pad_id, sampled.logprobs, [call])
    torch.manual_seed(seeds[0])
    with gathered_for_generation(models.student) as synced_gpus:
        ids, mask = sample_responses(models.student_module, models.collator, everything, cfg.rollout,
                                     suppress_token_ids=models.suppress_token_ids, synced_gpus=synced_gpus)
    padding_row = models.collator.vision and not any(s.images for s in everything)
    return Rollouts(everything, ids, mask, row_seeds, pad_id, calls=[GenerateCall(0, len(everything), ids.shape[1], padding_row)])


def micro_batch_rows(models: Models, rollouts: Rollouts, cfg: RunConfig) -> tuple[list[list[int]], int]:
    """The rank's sequences (indices into `rollouts`) in the micro-batches that score and train on
    them: the prompts' micro-batches, or under `train.micro_batch_tokens` longest first within the
    budget, as many on every rank (a collective; see packing.py); and how many micro-batches this
    rank split to match the rank with the most."""
    t = cfg.train
    per_micro = t.prompts_per_micro_batch * cfg.rollout.num_rollouts
    if not t.micro_batch_tokens:
        return fixed_groups(len(rollouts), per_micro), 0
    lengths = [prompt + response for prompt, response in zip(longest_prompts(models, rollouts, cfg), rollouts.lengths)]
    groups = budget_groups(lengths, t.micro_batch_tokens, t.padding_free)
    count = int(all_ranks_max(len(groups)))
    return split_to(groups, lengths, count, t.padding_free), count - len(groups)


def longest_prompts(models: Models, rollouts: Rollouts, cfg: RunConfig) -> list[int]:
    """Per sequence, its prompt's tokens in the longest view the step's passes read (the plain
    student view, and the privileged and teacher views the method scores), counted without building
    the views (`DualViewCollator.prompt_lengths`); each distinct prompt is counted once."""
    collator = models.collator
    processors = {"student": collator.processor, "teacher": collator.teacher_processor}
    distinct = list({id(s): s for s in rollouts.samples}.values())
    longest = dict.fromkeys(map(id, distinct), 0)
    for model, with_p in step_views(cfg.method):
        prompts = [(s.id, s.question, s.privileged if with_p else None, [image.size for image in s.images]) for s in distinct]
        for sample, length in zip(distinct, collator.prompt_lengths(prompts, processors[model])):
            longest[id(sample)] = max(longest[id(sample)], length)
    return [longest[id(s)] for s in rollouts.samples]


@torch.no_grad()
def score_targets(models: Models, views: ScoringViews, cfg: RunConfig, timer: "PhaseTimer", *,
                  seeds: Sequence[int] = (), loss_scale: float = 1.0) -> ScoredMicroBatch:
    """The no-grad passes: hidden states at response positions, and the router's log-probs.
    `seeds` (per sequence) and `loss_scale` are the micro-batch's, kept for the loss."""
    device = device_of(models.student_module)
    tokens = ResponseTokens.from_mask(views.response_ids, views.response_mask).to(device)
    scored = ScoredMicroBatch(views=views, tokens=tokens, sequence_seeds=seeds, loss_scale=loss_scale)
    chunk, mask = cfg.train.loss_chunk_size, views.response_mask.to(device)
    padding_free = cfg.train.padding_free
    if views.privileged_student is not None:
        with models.privileged_pass() as model:
            with timer("score/privileged"):
                scored.privileged_hidden = response_hidden_states(model, views.privileged_student.to(device), mask,
                                                                  padding_free)
            with timer("score/router"):
                scored.privileged_logprobs, scored.privileged_lse = token_logprobs_and_lse(
                    scored.privileged_hidden, output_head(model, models.vocab_size), tokens.token_ids, chunk)
    if views.teacher is not None:
        with timer("score/teacher"):
            scored.teacher_hidden = response_hidden_states(models.teacher, views.teacher.to(device), mask, padding_free)
        with timer("score/router"):
            scored.teacher_logprobs, scored.teacher_lse = token_logprobs_and_lse(
                scored.teacher_hidden, output_head(models.teacher, models.vocab_size), tokens.token_ids, chunk)
    return scored


# -- route -------------------------------------------------------------------------------------------


def step_thresholds(scored: Sequence[ScoredMicroBatch], cfg: RunConfig) -> Thresholds:
    """The router's thresholds over every micro-batch of the step and every rank (a collective)."""
    return compute_thresholds(
        [s.teacher_logprobs for s in scored],
        [s.privileged_logprobs for s in scored],
        [torch.ones_like(s.tokens.token_ids, dtype=torch.bool) for s in scored],  # all valid tokens
        trim=cfg.method.trim,
        normalize=cfg.method.normalize,
    )


def mark_kept_tokens(scored: Sequence[ScoredMicroBatch], cfg: RunConfig) -> None:
    """method.token_drop: the tokens each micro-batch's loss keeps, ranked by gap over the whole
    step and every rank (a collective), or drawn per sequence from its own seed (so the draw does
    not depend on how sequences are grouped into micro-batches or ranks)."""
    teacher, privileged, generators, counts = [], [], [], []
    for s in scored:
        per_sequence = torch.bincount(s.tokens.seq_index, minlength=s.tokens.num_sequences).tolist()
        counts.append(len(per_sequence))
        teacher += s.teacher_logprobs.split(per_sequence)
        privileged += s.privileged_logprobs.split(per_sequence)
        generators += [torch.Generator(s.tokens.token_ids.device).manual_seed(derive_seed(seed, 1))
                       for seed in s.sequence_seeds]
    masks = kept_tokens(teacher, privileged, cfg.method.token_drop, cfg.method.token_drop_fraction, generators)
    for s, count in zip(scored, counts):
        s.kept = torch.cat(masks[:count]) if count else torch.ones(0, dtype=torch.bool, device=s.tokens.token_ids.device)
        masks = masks[count:]


# -- loss and update ---------------------------------------------------------------------------------


def student_loss(models: Models, scored: ScoredMicroBatch, cfg: RunConfig, thresholds: Thresholds | None,
                 timer: "PhaseTimer"):
    """The only pass with gradient, and the method's loss on it: (loss, token stats, hidden states)."""
    device = device_of(models.student_module)
    views = scored.views
    regimes = None
    if thresholds is not None:
        everything = torch.ones_like(scored.tokens.token_ids, dtype=torch.bool)
        regimes = assign_regimes(scored.teacher_logprobs, scored.privileged_logprobs, everything, thresholds)
    with timer("student_pass"):  # through the engine's forward: ZeRO counts its micro-steps there
        student_hidden = models.student(views.student.to(device), views.response_mask.to(device), cfg.train.padding_free)
    inputs = LossInputs(
        tokens=scored.tokens,
        student_hidden=student_hidden,
        student_head=output_head(models.student_module, models.vocab_size),
        privileged_hidden=scored.privileged_hidden,
        privileged_head=models.privileged_head(),
        teacher_hidden=scored.teacher_hidden,
        teacher_head=_head(models.teacher, models.vocab_size),
        regimes=regimes,
        privileged_lse=scored.privileged_lse,
        teacher_lse=scored.teacher_lse,
        kept=scored.kept,
    )
    with timer("loss"):
        loss, stats = compute_loss(cfg.method, inputs, cfg.train.loss_chunk_size, cfg.train.loss_path)
    return hooks.loss_after_hooks(loss, student_hidden), stats, student_hidden


def _head(model: nn.Module | None, vocab_size: int):
    return None if model is None else output_head(model, vocab_size)


def update_student(models: Models, scored: Sequence[ScoredMicroBatch], cfg: RunConfig,
                   thresholds: Thresholds | None, timer: "PhaseTimer"):
    """Student pass with gradient, loss and backward per micro-batch; one optimizer step.

    Each micro-batch's loss is weighted by its `loss_scale` (1 with the fixed grouping), and the
    last micro-batch is DeepSpeed's accumulation boundary, however many there are (the same number
    on every rank, `micro_batch_rows`). A non-finite loss still runs a (zero) backward so every
    rank keeps DeepSpeed's micro-step bookkeeping in lockstep; if any loss or gradient was
    non-finite on any rank, the optimizer step is called off everywhere. Returns (the micro-batches'
    weighted losses, token stats, step applied).
    """
    losses, stats, finite = [], [], True
    for index, s in enumerate(scored):
        boundary = index == len(scored) - 1
        models.student.set_gradient_accumulation_boundary(boundary)
        loss, token_stats, student_hidden = student_loss(models, s, cfg, thresholds, timer)
        if s.views.rollout_logprobs is not None:  # the engine/trainer drift metric
            s.rollout_logprob_gap = rollout_logprob_gap(models, s, student_hidden, cfg)
        loss = loss * s.loss_scale
        loss_finite = all_ranks_true(bool(torch.isfinite(loss)))
        finite &= loss_finite
        with timer("backward"):
            models.student.backward(loss if loss_finite else 0.0 * student_hidden.sum())
        if boundary:  # decide before stepping
            finite &= all_ranks_true(gradients_finite(models.student_module))
            models.optimizer.skip_next_step = not finite
        with timer("optimizer"):
            models.student.step()
        models.optimizer.skip_next_step = False
        losses.append(loss.item())
        stats.append(token_stats)
    return losses, stats, finite


@torch.no_grad()
def rollout_logprob_gap(models: Models, scored: ScoredMicroBatch, student_hidden: torch.Tensor, cfg: RunConfig):
    """|the sampling engine's log-prob - the student pass's log-prob| of every sampled token."""
    head = output_head(models.student_module, models.vocab_size)
    student = token_logprobs(student_hidden.detach(), head, scored.tokens.token_ids, cfg.train.loss_chunk_size)
    return logprob_gaps(scored.views.rollout_logprobs, scored.views.response_mask, student)


# -- metrics -----------------------------------------------------------------------------------------


def pass_positions(rollouts: Rollouts, groups: Sequence[Sequence[int]], batches: Sequence[ScoringViews],
                   padding_free: bool) -> PassPositions:
    """The positions each pass of the step computed on this rank, and the real ones among them
    (`perf/padding_share`). A generate call computes every row to its longest prompt plus its
    decoding steps (finished rows included); the scoring and student passes compute their views."""
    positions = PassPositions()
    prompts = [0] * len(rollouts)
    for rows, views in zip(groups, batches):
        real_rows = views.student.inputs["attention_mask"][: len(rows)].sum(dim=1) - views.response_mask.sum(dim=1)
        for row, length in zip(rows, real_rows.tolist()):
            prompts[row] = length
        for name, view in (("student", views.student), ("privileged", views.privileged_student),
                           ("teacher", views.teacher)):
            if view is not None:
                positions.add(name, *view.positions(padding_free))
    lengths = rollouts.lengths
    for call in rollouts.calls:
        real = sum(prompts[call.start: call.stop]) + sum(lengths[call.start: call.stop])
        rows = call.stop - call.start + int(call.padding_row)
        positions.add("rollout", rows * (max(prompts[call.start: call.stop]) + call.steps) if call.padded else real, real)
    return positions


def length_metrics(rollouts: Rollouts, num_micro_batches: int, splits: int, cfg: RunConfig) -> dict[str, float]:
    """The spread of the step's response lengths over all ranks (`response_length_min` / `_max`,
    `response_at_cap`: the share that reached rollout.max_new_tokens) and its micro-batches
    (`perf/micro_batches` per rank, `perf/micro_batch_splits`: the splits, over all ranks, that gave
    every rank as many as the busiest)."""
    lengths = rollouts.lengths
    at_cap, total, split_total = all_ranks_sum([sum(n >= cfg.rollout.max_new_tokens for n in lengths), len(lengths), splits])
    return {"response_length_max": all_ranks_max(max(lengths)), "response_length_min": -all_ranks_max(-min(lengths)),
            "response_at_cap": at_cap / total, "perf/micro_batches": float(num_micro_batches),
            "perf/micro_batch_splits": split_total}


def step_metrics(scored, losses, stats, applied: bool, thresholds: Thresholds | None,
                 timer: "PhaseTimer", positions: PassPositions, cfg: RunConfig) -> dict[str, float]:
    """Step metrics over all ranks: token-level means from every rank's tokens, sums of counts.
    `loss` is the step's objective: the weighted micro-batch losses over the fixed micro-batches of
    the step (prompts_per_step / prompts_per_micro_batch), i.e. the mean over all its sequences."""
    loss_sum, tokens, sequences, *position_totals = all_ranks_sum(
        [sum(losses), sum(s.tokens.token_ids.numel() for s in scored), sum(s.tokens.num_sequences for s in scored),
         *positions.totals()]
    )
    fixed_micro_batches = cfg.train.prompts_per_step // cfg.train.prompts_per_micro_batch
    metrics = {"loss": loss_sum / fixed_micro_batches, **summarize(all_ranks_stats(stats)),
               **PassPositions.metrics(position_totals)}
    metrics.update(timer.metrics(), skipped_step=float(not applied), response_tokens=tokens,
                   response_length=tokens / sequences)
    if thresholds is not None:
        metrics.update(threshold_gap=thresholds.gap, threshold_prob_sum=thresholds.prob_sum)
    if scored and scored[0].rollout_logprob_gap is not None:
        metrics.update(logprob_gap_metrics([s.rollout_logprob_gap for s in scored]))
    if scored and scored[0].kept is not None:
        dropped, = all_ranks_sum([sum(int((~s.kept).sum()) for s in scored)])
        metrics["share/dropped"] = dropped / max(tokens, 1)
    return metrics


def all_ranks_stats(stats: list[TokenStats]) -> list[TokenStats]:
    """Every rank's per-token stats (small: a few floats per token), for exact global means."""
    if world_size() == 1:
        return stats
    local = [TokenStats(*(t.cpu() if t is not None else None for t in (s.loss, s.entropy, s.kl_to_teacher, s.regimes)))
             for s in stats]
    gathered: list[list[TokenStats]] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return [s for rank_stats in gathered for s in rank_stats]


class PhaseTimer:
    """Wall time and peak memory per phase: `time/<phase>` (seconds, summed over a phase's runs) and
    `memory/<phase>` (GiB, the highest peak of its runs: the device's allocated memory on CUDA, the
    process's resident set on CPU). On CUDA each phase boundary synchronises the device, so
    asynchronous kernels are charged to the phase that launched them.

    A phase is a block (`with timer("rollout"): ...`) or, for a straight sequence such as set-up,
    a lap (`timer.lap("setup/models")`: everything since the previous lap or the timer's start).
    """

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.lap_start = self.start_phase()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self.start_phase()
        try:
            yield
        finally:
            self.end_phase(name, start)

    def lap(self, name: str) -> None:
        """Record everything since the previous lap (or the timer's creation) as phase `name`."""
        self.end_phase(name, self.lap_start)
        self.lap_start = self.start_phase()

    @staticmethod
    def start_phase() -> float:
        _synchronize()
        reset_peak_memory()
        return time.perf_counter()

    def end_phase(self, name: str, start: float) -> None:
        _synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak_memory() / 2**30)

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{name}": value for name, value in self.totals.items()},
                **{f"memory/{name}": value for name, value in self.peaks.items()}}


def reset_peak_memory() -> None:
    """Start a new peak for `peak_memory`: CUDA's allocator statistics, or on CPU (Linux) the
    kernel's high-water mark of the process's resident set (`/proc/self/clear_refs`)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: the peak since the process started
        pass


def peak_memory() -> int:
    """Bytes at the peak since `reset_peak_memory`: allocated on the CUDA device, else resident."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
