"""The DOPD training recipe: one readable file from config to exported student.

    for each optimizer step:
        rollout   the student samples responses from the plain view         (rollout.py)
        score     teacher (x+p) and privileged student (x+p), no grad       (scoring.py)
        route     one set of thresholds over the step's micro-batches/ranks (router.py)
        loss      student pass with grad + the method's per-token loss      (methods.py)
        step      engine.backward / engine.step (DeepSpeed)

`dopd_step` is that loop body; `train` wraps it with DeepSpeed engines, evaluation,
checkpoints and logging. Launch with `python -m dopd_vlm train`, `torchrun` or `deepspeed`.

Randomness is derived, not carried: rollouts of global micro-batch g at step s are sampled
with seed (seed, s, g), and the prompts of step s are a pure function of (seed, s). A run
therefore gives the same batches on 1 or N ranks, and resuming needs only the step number.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dopd_vlm.collate import DualViewCollator, ScoringViews, check_shared_vocab, reference_responses
from dopd_vlm.config import RunConfig, load_deepspeed_config
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.data.schema import Sample
from dopd_vlm.distributed import all_ranks_sum, all_ranks_true, init_distributed
from dopd_vlm.distributed import rank as _rank, world_size as _world_size
from dopd_vlm.evaluate import evaluate_accuracy
from dopd_vlm.methods import SPECS, LossInputs, TokenStats, compute_loss, summarize
from dopd_vlm.models import load_model, load_processor, model_family, vision_special_token_ids
from dopd_vlm.rollout import eos_token_ids, sample_responses
from dopd_vlm.router import Thresholds, compute_thresholds, assign_regimes
from dopd_vlm.scoring import ResponseHiddenStates, ResponseTokens, output_head, response_hidden_states, token_logprobs, token_logprobs_and_lse
from dopd_vlm import vllm_rollout

log = logging.getLogger("dopd_vlm.train")


# --------------------------------------------------------------------------------------------
# The DOPD step
# --------------------------------------------------------------------------------------------


@dataclass
class Models:
    """What a step touches. `student` is the DeepSpeed engine training `ResponseHiddenStates(model)`."""

    student: Any
    teacher: nn.Module | None
    collator: DualViewCollator
    vocab_size: int
    optimizer: Any = None  # SkippableAdamW, or DeepSpeed's own (then a non-finite step stops the run)
    suppress_token_ids: list[int] = field(default_factory=list)
    frozen_privileged: nn.Module | None = None  # method.privileged_target=initial: the starting student
    rollout_engine: Any = None  # rollout.engine=vllm: this rank's vllm_rollout.VllmRollout

    @property
    def privileged_student(self) -> nn.Module:
        """The model of the privileged-student pass: the trained student, or its frozen initial copy."""
        return self.frozen_privileged if self.frozen_privileged is not None else self.student_module

    @property
    def student_module(self) -> nn.Module:
        """The student model itself (the engine trains it wrapped in ``ResponseHiddenStates``)."""
        return self.student.module.model


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
    rollout_logprob_gap: torch.Tensor | None = None  # vLLM: |engine - student pass| log-prob per token


def dopd_step(models: Models, micro_batches: Sequence[Sequence[Sample]], cfg: RunConfig, seeds: Sequence[int]) -> dict[str, float]:
    """One optimizer step: rollout -> score -> route -> loss -> backward/step (see module doc)."""
    timer = _Timer()
    scored = []
    for samples, seed in zip(micro_batches, seeds):
        with timer("rollout"):
            views = rollout_views(models, samples, cfg, seed)
        with timer("score"):
            scored.append(score_targets(models, views, cfg))
    thresholds = step_thresholds(scored, cfg) if SPECS[cfg.method.name].routes else None
    with timer("update"):
        losses, stats, applied = update_student(models, scored, cfg, thresholds)
    # --- vLLM seam: an applied step's weights go to the rollout engine (a skipped step changed none)
    if applied and models.rollout_engine is not None:
        with timer("weight_sync"):
            models.rollout_engine.sync_weights(models.student)
    # --- end of vLLM seam
    metrics = step_metrics(scored, losses, stats, applied, thresholds, timer)
    grad_norm = models.student.get_global_grad_norm()
    if applied and grad_norm is not None:  # DeepSpeed's global norm before clipping
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def step_thresholds(scored: Sequence["ScoredMicroBatch"], cfg: RunConfig) -> Thresholds:
    """The router's thresholds over every micro-batch of the step and every rank (a collective)."""
    return compute_thresholds(
        [s.teacher_logprobs for s in scored],
        [s.privileged_logprobs for s in scored],
        [torch.ones_like(s.tokens.token_ids, dtype=torch.bool) for s in scored],  # all valid tokens
        trim=cfg.method.trim,
        normalize=cfg.method.normalize,
    )


def update_student(models: Models, scored, cfg: RunConfig, thresholds: Thresholds | None):
    """Student pass with gradient, loss and backward per micro-batch; one optimizer step.

    A non-finite loss still runs a (zero) backward so every rank keeps DeepSpeed's micro-step
    bookkeeping in lockstep; if any loss or gradient was non-finite on any rank, the optimizer
    step is called off everywhere. Returns (micro-batch losses, token stats, step applied).
    """
    losses, stats, finite = [], [], True
    for index, s in enumerate(scored):
        loss, token_stats, student_hidden = student_loss(models, s, cfg, thresholds)
        if s.views.rollout_logprobs is not None:  # vLLM seam: the engine/trainer drift metric
            s.rollout_logprob_gap = rollout_logprob_gap(models, s, student_hidden, cfg)
        loss_finite = all_ranks_true(bool(torch.isfinite(loss)))
        finite &= loss_finite
        models.student.backward(loss if loss_finite else 0.0 * student_hidden.sum())
        if index == len(scored) - 1:  # the accumulation boundary: decide before stepping
            finite &= all_ranks_true(gradients_finite(models.student_module))
            models.optimizer.skip_next_step = not finite
        models.student.step()
        models.optimizer.skip_next_step = False
        losses.append(loss.item())
        stats.append(token_stats)
    return losses, stats, finite


def step_metrics(scored, losses, stats, applied: bool, thresholds: Thresholds | None, timer: "_Timer") -> dict[str, float]:
    """Step metrics over all ranks: token-level means from every rank's tokens, sums of counts."""
    loss_sum, tokens, sequences = all_ranks_sum(
        [sum(losses), sum(s.tokens.token_ids.numel() for s in scored), sum(s.tokens.num_sequences for s in scored)]
    )
    metrics = {"loss": loss_sum / (len(losses) * _world_size()), **summarize(all_ranks_stats(stats))}
    metrics.update(timer.seconds(), skipped_step=float(not applied), response_tokens=tokens,
                   response_length=tokens / sequences)
    if thresholds is not None:
        metrics.update(threshold_gap=thresholds.gap, threshold_prob_sum=thresholds.prob_sum)
    if scored and scored[0].rollout_logprob_gap is not None:  # vLLM seam
        metrics.update(vllm_rollout.logprob_gap_metrics([s.rollout_logprob_gap for s in scored]))
    return metrics


@torch.no_grad()
def rollout_logprob_gap(models: Models, scored: "ScoredMicroBatch", student_hidden: torch.Tensor, cfg: RunConfig):
    """|vLLM's log-prob - the student pass's log-prob| of every sampled token (same weights)."""
    head = output_head(models.student_module, models.vocab_size)
    student = token_logprobs(student_hidden.detach(), head, scored.tokens.token_ids, cfg.train.loss_chunk_size)
    views = scored.views
    return vllm_rollout.logprob_gaps(views.rollout_logprobs, views.response_mask, student)


def rollout_views(models: Models, samples: Sequence[Sample], cfg: RunConfig, seed: int) -> ScoringViews:
    """Sample cfg.rollout.num_rollouts responses per prompt; build the views the method needs."""
    spec = SPECS[cfg.method.name]
    repeated = [s for s in samples for _ in range(cfg.rollout.num_rollouts)]
    rollout_logprobs = None
    if spec.on_policy and models.rollout_engine is not None:  # vLLM seam: the engine samples
        sampled = models.rollout_engine.sample(repeated, seed)
        response_ids, response_mask, rollout_logprobs = sampled.ids, sampled.mask, sampled.logprobs
    elif spec.on_policy:
        torch.manual_seed(seed)
        response_ids, response_mask = sample_responses(
            models.student_module, models.collator, repeated, cfg.rollout,
            suppress_token_ids=models.suppress_token_ids, synced_gpus=_world_size() > 1,
        )
    else:
        response_ids, response_mask = reference_responses(models.collator, repeated)
    views = models.collator.scoring_views(
        repeated, response_ids, response_mask,
        privileged_student=spec.needs_privileged_student,
        teacher=spec.needs_teacher,
        teacher_privileged=cfg.method.teacher_privileged,
    )
    return replace(views, rollout_logprobs=rollout_logprobs)


@torch.no_grad()
def score_targets(models: Models, views: ScoringViews, cfg: RunConfig) -> ScoredMicroBatch:
    """The no-grad passes: hidden states at response positions, and the router's log-probs."""
    device = _device(models.student_module)
    tokens = ResponseTokens.from_mask(views.response_ids, views.response_mask)
    tokens = ResponseTokens(tokens.token_ids.to(device), tokens.seq_index.to(device), tokens.num_sequences)
    scored = ScoredMicroBatch(views=views, tokens=tokens)
    chunk = cfg.train.loss_chunk_size
    if views.privileged_student is not None:
        privileged = models.privileged_student
        scored.privileged_hidden = response_hidden_states(privileged, *_on(device, views.privileged_student, views.response_mask))
        head = output_head(privileged, models.vocab_size)
        scored.privileged_logprobs, scored.privileged_lse = token_logprobs_and_lse(
            scored.privileged_hidden, head, tokens.token_ids, chunk
        )
    if views.teacher is not None:
        scored.teacher_hidden = response_hidden_states(models.teacher, *_on(device, views.teacher, views.response_mask))
        head = output_head(models.teacher, models.vocab_size)
        scored.teacher_logprobs, scored.teacher_lse = token_logprobs_and_lse(
            scored.teacher_hidden, head, tokens.token_ids, chunk
        )
    return scored


def student_loss(models: Models, scored: ScoredMicroBatch, cfg: RunConfig, thresholds: Thresholds | None):
    """The only pass with gradient, and the method's loss on it."""
    device = _device(models.student_module)
    views = scored.views
    regimes = None
    if thresholds is not None:
        everything = torch.ones_like(scored.tokens.token_ids, dtype=torch.bool)
        regimes = assign_regimes(scored.teacher_logprobs, scored.privileged_logprobs, everything, thresholds)
    inputs = LossInputs(
        tokens=scored.tokens,
        student_hidden=models.student(*_on(device, views.student, views.response_mask)),  # the engine's forward
        student_head=output_head(models.student_module, models.vocab_size),
        privileged_hidden=scored.privileged_hidden,
        privileged_head=output_head(models.frozen_privileged, models.vocab_size) if models.frozen_privileged is not None else None,
        teacher_hidden=scored.teacher_hidden,
        teacher_head=output_head(models.teacher, models.vocab_size) if models.teacher is not None else None,
        regimes=regimes,
        privileged_lse=scored.privileged_lse,
        teacher_lse=scored.teacher_lse,
    )
    loss, stats = compute_loss(cfg.method, inputs, cfg.train.loss_chunk_size)
    return loss, stats, inputs.student_hidden


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next update can be called off (a step with non-finite loss or gradients).

    DeepSpeed's ZeRO optimizers only skip steps on fp16 overflow; with bf16/fp32 a NaN gradient
    would be applied. The trainer decides on every rank alike, then sets `skip_next_step`.
    """

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            return None
        return super().step(closure)


def gradients_finite(module: nn.Module) -> bool:
    """Whether this rank's (partition of the) accumulated gradients is finite; call at the boundary."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    for param in module.parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return False
    return True


def all_ranks_stats(stats: list[TokenStats]) -> list[TokenStats]:
    """Every rank's per-token stats (small: a few floats per token), for exact global means."""
    if _world_size() == 1:
        return stats
    local = [TokenStats(*(t.cpu() if t is not None else None for t in (s.loss, s.entropy, s.kl_to_teacher, s.regimes)))
             for s in stats]
    gathered: list[list[TokenStats]] = [None] * _world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return [s for rank_stats in gathered for s in rank_stats]


def _on(device: torch.device, view, response_mask: torch.Tensor):
    """(view, response_mask) moved to ``device``."""
    view.inputs = {k: v.to(device) for k, v in view.inputs.items()}
    view.logit_index = view.logit_index.to(device)
    return view, response_mask.to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Timer:
    """Wall time per phase of a step (rollout / score / update)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()

    def seconds(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.totals.items()}


# --------------------------------------------------------------------------------------------
# Set-up, loop, evaluation, checkpoints
# --------------------------------------------------------------------------------------------


def train(cfg: RunConfig, *, resume: bool = False, stop_after_step: int | None = None) -> "TrainResult":
    """Run cfg end to end: metrics to output_dir/metrics.jsonl, the student to output_dir/final.

    `resume` continues from the latest complete checkpoint. `stop_after_step` checkpoints and
    returns after that step (for time-limited allocations); a later `resume` run finishes with
    exactly the weights of an uninterrupted run.
    """
    import deepspeed

    # DeepSpeed calls torch.distributed's renamed collectives on every step
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)

    if cfg.rollout.engine == "vllm":  # vLLM seam: a missing extra fails before anything loads
        vllm_rollout.require_vllm()
    init_distributed(cfg.train.collective_timeout_s)
    rank, world = _rank(), _world_size()
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    _configure_logging(rank)
    on_gpu = torch.cuda.is_available()
    dtype = _dtype(cfg.model.dtype, on_gpu)
    ds_config = load_deepspeed_config(cfg.train.deepspeed, cfg, world, bf16_enabled=dtype == torch.bfloat16)
    family = model_family(cfg.model.student)
    if cfg.model.teacher:
        model_family(cfg.model.teacher)  # an unsupported or unreadable teacher fails now, not after data loading
    if cfg.rollout.engine == "vllm":  # vLLM seam: the engine's constraints, before any model loads
        vllm_rollout.check_student(cfg, on_gpu, world)
    data = load_recipe(cfg.data.recipe, cfg.data.train_split, family=family, skip_bad_rows=cfg.data.skip_bad_rows)
    eval_sets = {
        split: load_recipe(cfg.data.recipe, split, family=family, skip_bad_rows=cfg.data.skip_bad_rows,
                           limit=cfg.data.max_eval_samples or None)
        for split in cfg.data.eval_splits
    }
    spec = SPECS[cfg.method.name]

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    hf_ds_config = _hf_deepspeed_config(ds_config) if zero3 else None  # keep alive through loading
    student = load_model(cfg.model.student, dtype=dtype)
    teacher = load_model(cfg.model.teacher, dtype=dtype) if cfg.model.teacher else None
    frozen_privileged = None
    if spec.needs_privileged_student and cfg.method.privileged_target == "initial":
        frozen_privileged = load_model(cfg.model.student, dtype=dtype)  # the starting weights, also on resume
    del hf_ds_config
    _unset_hf_deepspeed_config()
    if cfg.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    processor = load_processor(cfg.model.student)
    teacher_processor = load_processor(cfg.model.teacher) if teacher is not None else processor
    vocab_size = _rows(student.get_output_embeddings().weight)
    if teacher is not None:
        teacher_rows = _rows(teacher.get_output_embeddings().weight)
        vocab_size = check_shared_vocab(teacher_processor, processor, teacher_rows, vocab_size)
    collator = DualViewCollator(processor, teacher_processor, privileged_template=cfg.data.privileged_template,
                                max_privileged_tokens=cfg.data.max_privileged_tokens)
    for split, dataset in {cfg.data.train_split: data, **eval_sets}.items():  # fail now, not at step 1000
        if len(dataset) == 0:
            raise SystemExit(f"data split '{split}' of recipe {cfg.data.recipe} is empty")
        collator.scoring_views([dataset[0]], torch.tensor([[0]]), torch.tensor([[True]]))

    # A DeepSpeed JSON with an "optimizer" section (e.g. zero3_offload: DeepSpeedCPUAdam) lets
    # DeepSpeed build it; otherwise torch's AdamW, which needs no JIT-compiled op.
    optimizer = None
    if "optimizer" not in ds_config:
        ds_config["zero_allow_untested_optimizer"] = True  # an AdamW subclass; DeepSpeed checks exact types
        optimizer = SkippableAdamW(
            student.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
    engine, _, _, scheduler = deepspeed.initialize(
        model=ResponseHiddenStates(student), optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg)),
    )
    teacher, frozen_privileged = (_frozen_engine_module(model, ds_config) for model in (teacher, frozen_privileged))
    engine.train()
    models = Models(engine, teacher, collator, vocab_size, optimizer or _Unskippable(),
                    vision_special_token_ids(collator.tokenizer), frozen_privileged)

    start_step = 0
    if resume:
        start_step = load_latest_checkpoint(engine, out)
    if cfg.rollout.engine == "vllm" and SPECS[cfg.method.name].on_policy:  # vLLM seam: one engine per rank
        models.rollout_engine = vllm_rollout.start_engine(cfg, collator, dtype, eos_token_ids(student, collator.tokenizer),
                                                          models.suppress_token_ids)
        if start_step:
            models.rollout_engine.sync_weights(engine)  # the resumed weights, not the checkpoint's initial ones
    logger = MetricsLogger(out, cfg, enabled=rank == 0, append=start_step > 0)
    if start_step == 0:
        logger.write(0, baseline_accuracies(models, eval_sets, cfg))

    from tqdm.auto import tqdm

    progress = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
                    disable=rank != 0, desc=f"{cfg.method.name}", unit="step")
    metrics: dict[str, Any] = {}
    bad_steps = skipped_total = 0
    for step in progress:
        micro_batches, seeds = step_batches(data, cfg, step, rank, world)
        started = time.perf_counter()
        try:
            metrics = dopd_step(models, micro_batches, cfg, seeds)
        except vllm_rollout.RolloutEngineError as err:  # vLLM seam: name what is left to resume from
            logger.close()
            raise vllm_rollout.RolloutEngineError(
                f"{err}; the run stopped in step {step + 1}; last complete checkpoint: "
                f"{_latest_tag(out) or 'none'} under {out / 'checkpoints'}"
            ) from None
        bad_steps = bad_steps + 1 if metrics["skipped_step"] else 0
        skipped_total += int(metrics["skipped_step"])
        metrics["skipped_steps_total"] = skipped_total
        if bad_steps:
            log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step + 1, bad_steps)
        if bad_steps >= cfg.train.max_bad_steps:
            logger.write(step + 1, metrics)
            logger.close()
            raise NonFiniteTraining(
                f"{bad_steps} consecutive steps had non-finite loss or gradients (last: step {step + 1}); "
                f"weights are those of step {step + 1 - bad_steps}; last complete checkpoint: "
                f"{_latest_tag(out) or 'none'} under {out / 'checkpoints'}"
            )
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["step_time"] = time.perf_counter() - started
        metrics["tokens_per_second"] = metrics["response_tokens"] / metrics["step_time"]
        done = step + 1
        last = done == cfg.train.steps
        evaluate_now = last or _every(done, cfg.train.eval_every)
        if evaluate_now:
            metrics.update(accuracies(models, eval_sets, cfg, prefix="student"))
        if evaluate_now or _every(done, cfg.train.log_every):
            logger.write(done, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        stopping = stop_after_step is not None and done >= stop_after_step
        if last or stopping or _every(done, cfg.train.save_every):
            save_checkpoint(engine, out, done)
        if stopping and not last:
            log.info("stopped after step %d as asked; continue with --resume", done)
            logger.close()
            return TrainResult(metrics, engine, teacher, finished=False, rollout_engine=models.rollout_engine)
    export_student(engine, processor, out / "final", zero3)
    logger.close()
    return TrainResult(metrics, engine, teacher, finished=True, rollout_engine=models.rollout_engine)


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


@dataclass
class TrainResult:
    """What `train` leaves behind: the last step's metrics and the live engines (for tests and
    notebooks; the CLI only needs the files in output_dir)."""

    metrics: dict[str, Any]
    student: Any
    teacher: nn.Module | None
    finished: bool
    rollout_engine: Any = None  # rollout.engine=vllm: the live engine (close it when done)


def step_batches(data, cfg: RunConfig, step: int, rank: int, world: int):
    """This rank's micro-batches of step `step` and their sampling seeds (see module docstring).

    The step's prompts come from an epoch-wise permutation seeded by (seed, epoch); micro-batch
    g of the step goes to rank g // (micro-batches per rank).
    """
    t = cfg.train
    per_step = t.prompts_per_step
    first = step * per_step
    indices = [_epoch_order(len(data), t.seed, (first + i) // len(data))[(first + i) % len(data)] for i in range(per_step)]
    per_micro = t.prompts_per_micro_batch
    num_micro = per_step // per_micro
    per_rank = num_micro // world
    micro_batches, seeds = [], []
    for g in range(rank * per_rank, (rank + 1) * per_rank):
        micro_batches.append([data[i] for i in indices[g * per_micro : (g + 1) * per_micro]])
        seeds.append(_mix_seed(t.seed, step, g))
    return micro_batches, seeds


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(_mix_seed(seed, epoch, -1)).shuffle(order)
    return order


def _mix_seed(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**31 - 1)
    return value


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def baseline_accuracies(models: Models, eval_sets, cfg: RunConfig) -> dict[str, float]:
    """The initial student's and the teacher's accuracy, once, so a run reports the gap it closed.

    The teacher is scored on the plain input (what the gap is measured against) and with p.
    """
    metrics = accuracies(models, eval_sets, cfg, prefix="student")
    if models.teacher is not None:
        collator = models.collator
        teacher_view = DualViewCollator(collator.teacher_processor, privileged_template=collator.privileged_template,
                                        max_privileged_tokens=collator.max_privileged_tokens)
        for prefix, privileged in (("teacher", False), ("teacher_privileged", True)):
            metrics.update(accuracies(models, eval_sets, cfg, prefix=prefix, model=models.teacher,
                                      collator=teacher_view, privileged=privileged))
    return metrics


def accuracies(models: Models, eval_sets, cfg: RunConfig, *, prefix: str, model=None, collator=None,
               privileged=False) -> dict[str, float]:
    """Greedy exact-match accuracy per eval split (the student's by default)."""
    model = model if model is not None else models.student_module
    batch = cfg.train.prompts_per_micro_batch * cfg.rollout.num_rollouts
    return {
        f"{prefix}/{split}": evaluate_accuracy(
            model, collator or models.collator, samples, max_new_tokens=cfg.rollout.max_new_tokens,
            batch_size=batch, privileged=privileged, suppress_token_ids=models.suppress_token_ids,
        ).accuracy
        for split, samples in eval_sets.items()
    }


# --------------------------------------------------------------------------------------------
# Distributed set-up and DeepSpeed helpers
# --------------------------------------------------------------------------------------------


def _dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def _rows(weight: torch.Tensor) -> int:
    """Rows of a (possibly ZeRO-3 partitioned) LM-head weight."""
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def _hf_deepspeed_config(ds_config: dict):
    """Make from_pretrained partition weights at load (zero.Init) under ZeRO-3."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _unset_hf_deepspeed_config() -> None:
    from transformers.integrations import deepspeed as hf_ds

    hf_ds.unset_hf_deepspeed_config()


def _frozen_engine_module(model: nn.Module | None, ds_config: dict) -> nn.Module | None:
    """A frozen model (the teacher, a frozen privileged student) in its own DeepSpeed engine."""
    import deepspeed

    if model is None:
        return None
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=_frozen_ds_config(ds_config))
    return engine.module.eval()


def _frozen_ds_config(ds_config: dict) -> dict:
    """A frozen model: same ZeRO-3 sharding as the student, no optimizer; stage 0 otherwise."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    config = {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "bf16": ds_config.get("bf16", {"enabled": False}),
        "zero_optimization": {"stage": 0},
    }
    if stage == 3:
        zero = {k: v for k, v in ds_config["zero_optimization"].items() if not k.startswith("offload_optimizer")}
        config["zero_optimization"] = zero
    return config


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"train.output_dir {out}: cannot write there ({err.strerror})") from None


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed's format, written atomically
# --------------------------------------------------------------------------------------------

LATEST = "latest_complete"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


def save_checkpoint(engine, out: Path, step: int) -> None:
    """Save step `step`; `latest_complete` moves to it only once every rank has finished.

    DeepSpeed writes the tag directory; the pointer file is replaced atomically afterwards, so
    a crash mid-save leaves the previous pointer, which still names a complete checkpoint.
    Older checkpoints are deleted only after the pointer has moved. A failed write (disk
    full, ...) removes the partial directory and raises CheckpointError on every rank.
    """
    checkpoints = out / "checkpoints"
    tag = f"step_{step}"
    failure = None
    try:
        engine.save_checkpoint(str(checkpoints), tag=tag, client_state={"step": step}, save_latest=False)
    except OSError as err:
        failure = err
    if not all_ranks_true(failure is None):
        if _rank() == 0:
            shutil.rmtree(checkpoints / tag, ignore_errors=True)
        _barrier()
        reason = f"{failure.strerror or failure}" if failure is not None else "failed on another rank"
        raise CheckpointError(
            f"writing checkpoint {checkpoints / tag} failed: {reason}; the previous complete checkpoint "
            f"({_latest_tag(out) or 'none'}) is intact"
        )
    _barrier()
    if _rank() == 0:
        tmp = checkpoints / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, checkpoints / LATEST)
        for old in checkpoints.glob("step_*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients (train.max_bad_steps)."""


class _Unskippable:
    """Stands in for SkippableAdamW when DeepSpeed builds the optimizer: it cannot skip a step,
    so one non-finite step must stop the run before it is applied."""

    @property
    def skip_next_step(self) -> bool:
        return False

    @skip_next_step.setter
    def skip_next_step(self, skip: bool) -> None:
        if skip:
            raise NonFiniteTraining(
                "non-finite loss or gradients with a DeepSpeed-built optimizer (the JSON's 'optimizer' "
                "section), which cannot skip a step; the step was not applied"
            )


def _latest_tag(out: Path) -> str | None:
    pointer = out / "checkpoints" / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def load_latest_checkpoint(engine, out: Path) -> int:
    """Load the checkpoint `latest_complete` names; returns its step (0 if there is none)."""
    pointer = out / "checkpoints" / LATEST
    if not pointer.is_file():
        log.warning("--resume: no complete checkpoint under %s, starting from step 0", out / "checkpoints")
        return 0
    tag = pointer.read_text().strip()
    path, client_state = engine.load_checkpoint(str(out / "checkpoints"), tag=tag)
    if path is None:
        raise SystemExit(f"--resume: checkpoint {out / 'checkpoints' / tag} could not be loaded")
    log.info("resumed from %s (step %d)", path, client_state["step"])
    return int(client_state["step"])


def export_student(engine, processor, target: Path, zero3: bool) -> None:
    """Consolidate the student's weights and save_pretrained it with its processor."""
    module = engine.module.model  # inside ResponseHiddenStates
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
    if _rank() == 0:
        state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, TensorBoard, optional Weights & Biases
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    def __init__(self, out: Path, cfg: RunConfig, *, enabled: bool, append: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.jsonl = open(out / "metrics.jsonl", "a" if append else "w")
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        self.wandb = None
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb_project is set but wandb is not installed; skipping it")
            else:
                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict())

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish()
