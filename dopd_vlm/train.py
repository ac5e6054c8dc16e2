"""The training recipe: `setup(cfg)` builds everything once, `train(cfg)` runs the loop.

    run = setup(cfg)                            process group, data, models, DeepSpeed engines
    baseline accuracies (step 0)                the initial student; the teacher with and without p
    for step in steps:
        step.dopd_step(...)                     rollout -> score -> route -> loss -> update
        evaluate / log / checkpoint             at their cadences
    export the student to output_dir/final (a LoRA student: its adapter; merged: final_merged)

The run owns output_dir for its whole length (`run_folder`: a lock; an earlier run there is
refused unless --resume or --overwrite), every write of it fails into one line naming the file
(`run_folder.RunWriteError`, exit 1), and SIGTERM/SIGUSR1 stop it at a step's end with a
checkpoint (`preemption`).

Launch with `dopd-vlm train`, `python -m dopd_vlm train`, `torchrun` or `deepspeed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dopd_vlm import hooks, prompt_checks
from dopd_vlm.head_loss import check_heads, use_fused
from dopd_vlm.collate import DualViewCollator, check_same_tokenizer, check_shared_vocab
from dopd_vlm.config import RunConfig, load_deepspeed_config
from dopd_vlm.data.dataset import SampleDataset
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.distributed import all_ranks_any, first_failure, init_distributed, rank, world_size
from dopd_vlm.errors import InputError
from dopd_vlm.engine import (
    NonFiniteTraining,
    export_student,
    frozen_engine,
    gathered_for_generation,
    latest_tag,
    load_latest_checkpoint,
    save_checkpoint,
    student_engine,
    zero3_loading,
)
from dopd_vlm.evaluate import evaluate_accuracy
from dopd_vlm.methods import METHODS, check_config
from dopd_vlm.preemption import Preempted, PreemptionSignals
from dopd_vlm.models import (
    check_weight_files,
    context_length,
    head_rows,
    load_model,
    load_processor,
    model_family,
    vision_special_token_ids,
)
from dopd_vlm.rollout import eos_token_ids
from dopd_vlm.run_folder import (
    WRITE_ERRORS,
    RunLock,
    RunWriteError,
    after_write,
    claim,
    release_held_locks,
    remove_earlier_run,
    write_failure,
)
from dopd_vlm.scoring import output_head
from dopd_vlm.step import Models, PhaseTimer, derive_seed, dopd_step, step_batches
from dopd_vlm import lora, vllm_rollout

log = logging.getLogger("dopd_vlm.train")


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: RunConfig
    models: Models
    scheduler: Any
    processor: Any
    data: SampleDataset
    eval_sets: dict[str, SampleDataset]
    out: Path
    start_step: int
    phases: PhaseTimer  # set-up's phases, then the run's evaluations, checkpoints and export
    lock: RunLock


@dataclass
class TrainResult:
    """What `train` leaves behind: the last step's metrics and the live engines (for tests and
    notebooks; the CLI only needs the files in output_dir)."""

    metrics: dict[str, Any]
    student: Any
    teacher: nn.Module | None
    finished: bool
    rollout_engine: Any = None  # rollout.engine=vllm: the live engine (close it when done)
    phases: dict[str, float] | None = None  # time/<phase> and memory/<phase> of set-up, evaluations, checkpoints, export


# -- set-up --------------------------------------------------------------------------------------


def setup(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Run:
    """Join the process group, claim the output folder, load and check data and models, build the
    DeepSpeed engines.

    Everything a user can get wrong (config, data, checkpoints, tokenizers, the output folder)
    fails here as an `InputError`, before the first step, and all of it but what needs the loaded
    weights (LM-head sizes, a DeepSpeed JSON DeepSpeed itself refuses) before any model loads.
    The output folder is claimed first (`run_folder.claim`: its lock; an earlier run there refused
    unless `resume` or `overwrite`); with `overwrite` the earlier run's files are deleted only once
    everything else has succeeded. The returned `Run.lock` is to be released at the run's end; a
    failing set-up releases it itself.
    """
    # DeepSpeed calls torch.distributed's renamed collectives on every step
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    check_config(cfg)  # the config's checks that need the method table
    phases = PhaseTimer()
    if cfg.rollout.engine == "vllm":  # a missing extra fails before anything loads
        vllm_rollout.require_vllm()
    if cfg.model.lora.enabled:
        lora.require_peft()
    init_distributed(cfg.train.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    lock = claim(out, resume=resume, overwrite=overwrite)
    try:
        run = build_run(cfg, out, lock, phases, resume=resume)
        if overwrite:
            remove_earlier_run(out)
    except BaseException:
        lock.release()
        raise
    return run


def build_run(cfg: RunConfig, out: Path, lock: RunLock, phases: PhaseTimer, *, resume: bool) -> Run:
    """`setup` once the folder is claimed: data, models, engines, the resumed checkpoint."""
    dtype = resolve_dtype(cfg.model.dtype, torch.cuda.is_available())
    ds_config = load_deepspeed_config(cfg.train.deepspeed, cfg, world_size(), bf16_enabled=dtype == torch.bfloat16)
    family = model_family(cfg.model.student)
    if cfg.model.teacher:
        model_family(cfg.model.teacher)  # an unsupported or unreadable teacher fails now, not after data loading
    for checkpoint in filter(None, (cfg.model.student, cfg.model.teacher)):
        check_weight_files(checkpoint)  # a truncated download fails now, naming the file
    collator = build_collator(cfg)
    if cfg.rollout.engine == "vllm":  # the engine's constraints, before any model loads
        vllm_rollout.check_student(cfg, torch.cuda.is_available(), world_size())
    data, eval_sets = load_splits(cfg, family)
    data, eval_sets = check_prompts(cfg, collator, data, eval_sets)
    phases.lap("setup/checks")  # config, checkpoints' headers, processors, data, every prompt

    method = METHODS[cfg.method.name]
    initial_privileged = method.needs_privileged_student and cfg.method.privileged_target == "initial"
    with_lora = cfg.model.lora.enabled  # the initial target is then the student with its adapters off
    with zero3_loading(ds_config):
        student = load_model(cfg.model.student, dtype=dtype)
        peft_student = lora.adapt(student, cfg.model, derive_seed(cfg.train.seed, -2)) if with_lora else None
        teacher = load_model(cfg.model.teacher, dtype=dtype) if cfg.model.teacher else None
        frozen_privileged = (load_model(cfg.model.student, dtype=dtype)  # also on resume
                             if initial_privileged and not with_lora else None)
    if cfg.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    vocab_size = check_shared_vocab(collator.teacher_processor, collator.processor,
                                    head_rows(teacher if teacher is not None else student), head_rows(student))
    check_first_samples(collator, cfg, {cfg.data.train_split: data, **eval_sets})
    phases.lap("setup/models")

    engine, scheduler, optimizer = student_engine(student, ds_config, cfg.optim, lambda step: lr_factor(step, cfg))
    models = Models(student=engine, teacher_engine=frozen_engine(teacher, ds_config), collator=collator,
                    vocab_size=vocab_size, optimizer=optimizer,
                    suppress_token_ids=vision_special_token_ids(collator.tokenizer),
                    frozen_privileged_engine=frozen_engine(frozen_privileged, ds_config),
                    peft_student=peft_student, privileged_base=initial_privileged and with_lora)
    check_loss_path(models, cfg)
    start_step = load_latest_checkpoint(engine, out) if resume else 0
    phases.lap("setup/engines")
    if cfg.rollout.engine == "vllm" and method.on_policy:  # one engine per rank, from the student checkpoint
        models.rollout_engine = vllm_rollout.start_engine(cfg, collator, dtype, eos_token_ids(student, collator.tokenizer),
                                                          models.suppress_token_ids)
        if start_step:
            models.rollout_engine.sync_weights(engine)  # the resumed weights, not the checkpoint's initial ones
        phases.lap("setup/vllm")
    return Run(cfg, models, scheduler, collator.processor, data, eval_sets, out, start_step, phases, lock)


def check_loss_path(models: Models, cfg: RunConfig) -> None:
    """train.loss_path works with these output layers on this many ranks (else the first step would fail)."""
    heads = [None if model is None else output_head(model, models.vocab_size)
             for model in (models.student_module, models.teacher, models.frozen_privileged)]
    check_heads(*heads, fused=use_fused(cfg.train.loss_path, heads[0]), world_size=world_size())


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def load_splits(cfg: RunConfig, family: str) -> tuple[SampleDataset, dict[str, SampleDataset]]:
    """The training split and the evaluation splits, validated."""
    d = cfg.data
    data = load_recipe(d.recipe, d.train_split, family=family, skip_bad_rows=d.skip_bad_rows)
    eval_sets = {
        split: load_recipe(d.recipe, split, family=family, skip_bad_rows=d.skip_bad_rows, limit=d.max_eval_samples or None)
        for split in d.eval_splits
    }
    return data, eval_sets


def build_collator(cfg: RunConfig) -> DualViewCollator:
    """The run's collator, from the processors alone: teacher and student must share one tokenizer,
    and the privileged template must not hold a special token."""
    processor = load_processor(cfg.model.student)
    teacher_processor = load_processor(cfg.model.teacher) if cfg.model.teacher else processor
    check_same_tokenizer(teacher_processor, processor)
    collator = DualViewCollator.from_config(processor, teacher_processor, data=cfg.data)
    prompt_checks.check_template(cfg.data.privileged_template, collator.specials)
    return collator


def check_prompts(cfg: RunConfig, collator: DualViewCollator, data: SampleDataset,
                  eval_sets: dict[str, SampleDataset]) -> tuple[SampleDataset, dict[str, SampleDataset]]:
    """Every split's prompts against the models that read them (`prompt_checks`); with
    data.skip_bad_rows, the splits without their bad rows."""
    teacher_context = context_length(cfg.model.teacher) if cfg.model.teacher else None
    limits = prompt_checks.run_limits(cfg, collator, context_length(cfg.model.student), teacher_context)
    skip = cfg.data.skip_bad_rows
    return (prompt_checks.check_split(data, collator, limits, skip_bad_rows=skip),
            prompt_checks.check_splits(eval_sets, collator, limits, skip_bad_rows=skip))


def check_first_samples(collator: DualViewCollator, cfg: RunConfig, splits: dict[str, SampleDataset]) -> None:
    """Every split is non-empty and its first sample collates: fail now, not at step 1000."""
    for split, dataset in splits.items():
        if len(dataset) == 0:
            raise InputError(f"data split '{split}' of recipe {cfg.data.recipe} is empty"
                             + (f" ({len(dataset.skipped)} bad rows skipped)" if dataset.skipped else ""))
        collator.scoring_views([dataset[0]], torch.tensor([[0]]), torch.tensor([[True]]))


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"train.output_dir {out}: cannot write there ({err.strerror})") from None


def lr_factor(step: int, cfg: RunConfig) -> float:
    """The run's learning-rate multiplier at `step` (see `warmup_cosine`)."""
    o = cfg.optim
    return warmup_cosine(step, cfg.train.steps, o.warmup_steps, o.min_lr_ratio)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- the loop ------------------------------------------------------------------------------------


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after_step: int | None = None) -> TrainResult:
    """Run cfg end to end: metrics to output_dir/metrics.jsonl, the student to output_dir/final.

    `resume` continues from the latest complete checkpoint (from step 0 if there is none yet) and
    appends to metrics.jsonl; `overwrite` deletes an earlier run in output_dir and starts over;
    without either, a folder holding an earlier run is refused (`run_folder`). `stop_after_step`
    checkpoints and returns after that step (for time-limited allocations); a later `resume` run
    finishes with exactly the weights of an uninterrupted run. SIGTERM or SIGUSR1 does the same
    at the end of the step under way and raises `Preempted` (`preemption`).
    """
    with PreemptionSignals(before_exit=release_held_locks) as signals:
        run = setup(cfg, resume=resume, overwrite=overwrite)
        try:
            return run_steps(run, signals, resume=resume, stop_after_step=stop_after_step)
        finally:
            run.lock.release()


def run_steps(run: Run, signals: PreemptionSignals, *, resume: bool, stop_after_step: int | None) -> TrainResult:
    """The loop of `train`: steps, evaluation, metrics and checkpoints at their cadences, export."""
    cfg, models, t = run.cfg, run.models, run.cfg.train
    logger = MetricsLogger(run.out, cfg, enabled=rank() == 0, append=resume)
    try:
        if run.start_step == 0:
            with run.phases("eval/baseline"):
                baseline = baseline_accuracies(models, run.eval_sets, cfg)
            logger.write(0, {**baseline, **run.phases.metrics()})
        if signal_name := stop_agreed(run, logger, signals, run.start_step):
            raise Preempted(f"{signal_name} received before step {run.start_step + 1}: nothing trained to "
                            f"save; last complete checkpoint: {latest_tag(run.out) or 'none'} under "
                            f"{run.out / 'checkpoints'} (continue with --resume)")
        metrics, finished = train_steps(run, logger, signals, stop_after_step)
        if not finished:
            return TrainResult(metrics, models.student, models.teacher, False, models.rollout_engine, run.phases.metrics())
        logger.close()
        stop_agreed(run, logger, signals, t.steps)  # the metrics' last writes (TensorBoard's flush at close)
        with run.phases("export"):
            export(run)
    finally:
        logger.close()
    return TrainResult(metrics, models.student, models.teacher, True, models.rollout_engine, run.phases.metrics())


def train_steps(run: Run, logger: MetricsLogger, signals: PreemptionSignals,
                stop_after_step: int | None) -> tuple[dict[str, Any], bool]:
    """Steps start_step+1 .. train.steps: the last step's metrics, and whether it was the run's
    last (not when `stop_after_step` ended it)."""
    cfg, models, t = run.cfg, run.models, run.cfg.train
    from tqdm.auto import tqdm

    metrics: dict[str, Any] = {}
    bad_steps = skipped_total = 0
    # closed on the way out, so that an error line after it starts on a line of its own
    with tqdm(range(run.start_step, t.steps), initial=run.start_step, total=t.steps,
              disable=rank() != 0, desc=cfg.method.name, unit="step") as progress:
        for step in progress:
            micro_batches, seeds = step_batches(run.data, cfg, step, rank(), world_size())
            started = time.perf_counter()
            hooks.run("before_step", step + 1)
            try:
                metrics = dopd_step(models, micro_batches, cfg, seeds)
            except vllm_rollout.RolloutEngineError as err:  # name what is left to resume from
                raise vllm_rollout.RolloutEngineError(
                    f"{err}; the run stopped in step {step + 1}; last complete checkpoint: "
                    f"{latest_tag(run.out) or 'none'} under {run.out / 'checkpoints'}"
                ) from None
            done = step + 1
            bad_steps = bad_steps + 1 if metrics["skipped_step"] else 0
            skipped_total += int(metrics["skipped_step"])
            metrics.update(skipped_steps_total=skipped_total, lr=run.scheduler.get_last_lr()[0],
                           step_time=time.perf_counter() - started)
            metrics["tokens_per_second"] = metrics["response_tokens"] / metrics["step_time"]
            if bad_steps:
                log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", done, bad_steps)
            if bad_steps >= t.max_bad_steps:
                logger.write(done, metrics)
                raise NonFiniteTraining(
                    f"{bad_steps} consecutive steps had non-finite loss or gradients (last: step {done}); "
                    f"weights are those of step {done - bad_steps}; last complete checkpoint: "
                    f"{latest_tag(run.out) or 'none'} under {run.out / 'checkpoints'}"
                )
            last = done == t.steps
            evaluate_now = last or every(done, t.eval_every)
            if evaluate_now:
                with run.phases("eval"):
                    metrics.update(accuracies(models, run.eval_sets, cfg, prefix="student"))
            if evaluate_now or every(done, t.log_every):
                logger.write(done, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            preempted = stop_agreed(run, logger, signals, done)
            stopping = preempted is not None or (stop_after_step is not None and done >= stop_after_step)
            if last or stopping or every(done, t.save_every):
                with run.phases("checkpoint"):
                    save_checkpoint(models.student, run.out, done)
            if stopping and not last:
                if preempted:
                    raise Preempted(f"{preempted} received: stopped after step {done} with checkpoint "
                                    f"{run.out / 'checkpoints' / f'step_{done}'} (continue with --resume)")
                log.info("stopped after step %d as asked; continue with --resume", done)
                return metrics, False
    return metrics, True


def stop_agreed(run: Run, logger: MetricsLogger, signals: PreemptionSignals, done: int) -> str | None:
    """At a step's end, every rank alike (one collective): RunWriteError on every rank if a
    metrics write failed (on rank 0); the signal's name if any rank received a preemption signal
    (the lowest such rank's: a signal may reach some ranks only)."""
    preempted, write_failed = all_ranks_any([signals.received is not None, logger.failure is not None])
    if write_failed:
        raise RunWriteError(f"{first_failure(logger.failure)}; the run stopped after step {done}; last complete "
                            f"checkpoint: {latest_tag(run.out) or 'none'} under {run.out / 'checkpoints'} "
                            "(continue with --resume)")
    return first_failure(signals.received) if preempted else None


def export(run: Run) -> None:
    """The student to output_dir/final (and final_merged); a failed write names the checkpoint it
    can be exported from again."""
    lora_cfg = run.cfg.model.lora
    merged = run.out / "final_merged" if lora_cfg.enabled and lora_cfg.export_merged else None
    try:
        export_student(run.models.student, run.processor, run.out / "final", run.models.peft_student, merged)
    except RunWriteError as err:
        raise RunWriteError(f"{err}; checkpoint {latest_tag(run.out)} under {run.out / 'checkpoints'} is complete: "
                            "run again with --resume to export it") from None


def every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


# -- evaluation ----------------------------------------------------------------------------------


def baseline_accuracies(models: Models, eval_sets, cfg: RunConfig) -> dict[str, float]:
    """The initial student's and the teacher's accuracy, once, so a run reports the gap it closed.

    The teacher is scored on the plain input (what the gap is measured against) and with p, as
    `train.teacher_eval` says (gathered, sharded or not at all). The student is scored plain and
    with p (`student_privileged/`): DOPD's preconditions are a student that reads p better than
    it answers without it, and a teacher better than that with the same p.
    """
    metrics = accuracies(models, eval_sets, cfg, prefix="student")
    metrics.update(accuracies(models, eval_sets, cfg, prefix="student_privileged", privileged=True))
    if models.teacher_engine is not None and cfg.train.teacher_eval != "skip":
        teacher_view = models.collator.for_processor(models.collator.teacher_processor)
        for prefix, privileged in (("teacher", False), ("teacher_privileged", True)):
            metrics.update(accuracies(models, eval_sets, cfg, prefix=prefix, engine=models.teacher_engine,
                                      collator=teacher_view, privileged=privileged,
                                      gather=cfg.train.teacher_eval == "gathered"))
    return metrics


def accuracies(models: Models, eval_sets, cfg: RunConfig, *, prefix: str, engine=None, collator=None,
               privileged: bool = False, gather: bool = True) -> dict[str, float]:
    """Greedy exact-match accuracy per eval split (the student's by default), `<prefix>/<split>`, and
    the count of answers left inside an open think block, `unclosed_think/<prefix>/<split>`; the
    model gathered once for all splits unless `gather` is False (see `engine.gathered_for_generation`)."""
    engine = engine if engine is not None else models.student
    model = models.student_module if engine is models.student else engine.module
    metrics: dict[str, float] = {}
    with gathered_for_generation(engine, gather) as synced_gpus:
        for split, samples in eval_sets.items():
            result = evaluate_accuracy(
                model, collator or models.collator, samples, max_new_tokens=eval_max_new_tokens(cfg),
                batch_size=eval_batch_size(cfg), privileged=privileged, suppress_token_ids=models.suppress_token_ids,
                synced_gpus=synced_gpus, extractor=samples.answer_extractor,
            )
            metrics[f"{prefix}/{split}"] = result.accuracy
            metrics[f"unclosed_think/{prefix}/{split}"] = result.unclosed_think
    return metrics


def eval_max_new_tokens(cfg: RunConfig) -> int:
    """The length cap of greedy evaluation answers: train.eval_max_new_tokens, else the rollouts'."""
    return cfg.train.eval_max_new_tokens or cfg.rollout.max_new_tokens


def eval_batch_size(cfg: RunConfig) -> int:
    """Sequences per greedy evaluation `generate` call: one micro-batch's sequences."""
    return cfg.train.prompts_per_micro_batch * cfg.rollout.num_rollouts


# -- metrics: metrics.jsonl, TensorBoard, optional Weights & Biases ------------------------------


class MetricsLogger:
    """metrics.jsonl, TensorBoard and optional Weights & Biases on rank 0, and the config copy
    (config.json).

    A write that fails (disk full, read-only, quota) is not raised here, where the other ranks
    would not see it: `failure` keeps its one line (`run_folder.write_failure`), writing stops,
    and the loop stops every rank at the step's end (`stop_agreed`). TensorBoard writes from a
    thread of its own; it is flushed after every write so that its failure comes out here, and
    that thread's own traceback is not printed (`QuietTensorBoardThread`).
    """

    def __init__(self, out: Path, cfg: RunConfig, *, enabled: bool, append: bool):
        self.enabled = enabled
        self.failure: str | None = None
        self.jsonl = self.tensorboard = self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl_path, self.tensorboard_dir = out / "metrics.jsonl", out / "tensorboard"
        self.quiet_thread = QuietTensorBoardThread(threading.excepthook)
        threading.excepthook = self.quiet_thread
        config = json.dumps(cfg.to_dict(), indent=2)
        self.attempt("config", out / "config.json", lambda: (out / "config.json").write_text(config))
        self.jsonl = self.attempt("metrics", self.jsonl_path, lambda: open(self.jsonl_path, "a" if append else "w"))
        self.tensorboard = self.attempt("tensorboard", self.tensorboard_dir,
                                        lambda: SummaryWriter(str(self.tensorboard_dir)))
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb_project is set but wandb is not installed; skipping it")
            else:
                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict())

    def attempt(self, kind: str, path: Path, write: Callable[[], Any]) -> Any:
        """`write()`'s result, unless a write failed before or this one fails (then `failure`)."""
        if self.failure is not None:
            return None
        try:
            result = write()
            after_write(kind, path)
        except WRITE_ERRORS as err:
            self.failure = write_failure(err, path)
            return None
        return result

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        self.attempt("metrics", self.jsonl_path, lambda: (self.jsonl.write(line), self.jsonl.flush()))
        self.attempt("tensorboard", self.tensorboard_dir, lambda: self.write_tensorboard(step, metrics))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_tensorboard(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        """Close every file (a failure on the way is kept in `failure`); safe to call twice."""
        if not self.enabled:
            return
        self.enabled = False
        for kind, path, handle in (("metrics", self.jsonl_path, self.jsonl),
                                   ("tensorboard", self.tensorboard_dir, self.tensorboard)):
            if handle is None:
                continue
            self.attempt(kind, path, handle.close)
            if self.failure is not None:  # this close or an earlier write failed: close it, quietly
                with contextlib.suppress(*WRITE_ERRORS):
                    handle.close()
        if self.wandb is not None:
            self.wandb.finish()
        threading.excepthook = self.quiet_thread.previous


class QuietTensorBoardThread:
    """A `threading.excepthook` that leaves out the OSError that ends TensorBoard's writer thread
    (MetricsLogger reports it as one line, from the next flush) and passes every other thread's
    exception on to the hook it replaces."""

    def __init__(self, previous: Callable[[Any], None]):
        self.previous = previous

    def __call__(self, args: Any) -> None:
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            self.previous(args)
