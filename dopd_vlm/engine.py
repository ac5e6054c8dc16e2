"""The DeepSpeed-facing plumbing: engines, a skippable optimizer, checkpoints and export.

- `student_engine` / `frozen_engine`: the trained student (wrapped in
  `scoring.ResponseHiddenStates`) and the frozen models, sharded alike under ZeRO-3;
  `gathered_for_generation`: `generate` with the weights gathered once, not per layer and token;
- `SkippableAdamW`, `gradients_finite`: a step with non-finite loss or gradients is called off on
  every rank (DeepSpeed itself only skips fp16 overflows);
- `save_checkpoint` / `load_latest_checkpoint`: DeepSpeed's format, made atomic by a pointer file;
- `export_student`: the consolidated student with its processor, loadable by transformers alone
  (a LoRA student: its PEFT adapter, and optionally the merged student).

A write that fails (disk full, read-only, quota) raises `run_folder.RunWriteError` (a checkpoint:
`CheckpointError`) on every rank, one line naming the file and the cause, and leaves no partial
checkpoint or export behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dopd_vlm import lora
from dopd_vlm.distributed import first_failure, rank, world_size
from dopd_vlm.errors import InputError
from dopd_vlm.run_folder import CHECKPOINT_POINTER, WRITE_ERRORS, RunWriteError, after_write, write_failure
from dopd_vlm.scoring import ResponseHiddenStates

log = logging.getLogger("dopd_vlm.engine")


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients (train.max_bad_steps)."""


class CheckpointError(RunWriteError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


class CheckpointFileFailed(Exception):
    """A file of a checkpoint could not be written: raised inside DeepSpeed's `save_checkpoint`
    (by `FileNamingCheckpointEngine`), carrying the file and the original error."""

    def __init__(self, path: Path, error: BaseException):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


class FileNamingCheckpointEngine:
    """DeepSpeed's checkpoint engine, each file it saves followed by the run's write hooks
    (the `after_write` hook point, kind "checkpoint") and its failure naming the file. Everything
    else is the wrapped engine's."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: dict, path: str) -> None:
        try:
            self.inner.save(state_dict, path)
            after_write("checkpoint", Path(path))
        except WRITE_ERRORS as err:
            raise CheckpointFileFailed(Path(path), err) from err


# -- engines ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def zero3_loading(ds_config: dict) -> Iterator[None]:
    """Within the block, `from_pretrained` partitions weights as it loads them (ZeRO-3 `zero.Init`);
    a no-op for other stages. Later loads in the process are not affected."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weak reference
    try:
        yield
    finally:
        del keep_alive
        hf_deepspeed.unset_hf_deepspeed_config()


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


class UnskippableOptimizer:
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


def student_engine(student: nn.Module, ds_config: dict, optim, lr_lambda: Callable[[int], float]):
    """The student's DeepSpeed training engine, its LR scheduler and the step-skipping handle.

    A DeepSpeed JSON with an "optimizer" section (e.g. zero3_offload: DeepSpeedCPUAdam) lets
    DeepSpeed build it (a non-finite step then stops the run); otherwise torch's AdamW, which
    needs no JIT-compiled op and can skip a step. Either optimizes the parameters that require
    grad (a LoRA student's adapters).
    """
    import deepspeed

    optimizer = None
    trainable = lora.trainable_parameters(student)
    if "optimizer" not in ds_config:
        ds_config["zero_allow_untested_optimizer"] = True  # an AdamW subclass; DeepSpeed checks exact types
        optimizer = SkippableAdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=ResponseHiddenStates(student), optimizer=optimizer, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    engine.train()
    engine.checkpoint_engine = FileNamingCheckpointEngine(engine.checkpoint_engine)
    return engine, scheduler, optimizer or UnskippableOptimizer()


def frozen_engine(model: nn.Module | None, ds_config: dict):
    """A frozen model (the teacher, a frozen privileged student) in its own DeepSpeed engine."""
    import deepspeed

    if model is None:
        return None
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=frozen_ds_config(ds_config))
    engine.module.eval()
    return engine


@contextlib.contextmanager
def gathered_weights(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with every ZeRO-3 partitioned parameter gathered for the block, to read (a weight
    sync, a comparison); released after it. A no-op for a module that is not partitioned."""
    with gathered_parameters(list(module.parameters())):
        yield module


@contextlib.contextmanager
def gathered_parameters(params: list[nn.Parameter]) -> Iterator[None]:
    """`params` gathered for the block (ZeRO-3), to read; a no-op for parameters not partitioned."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=any(hasattr(p, "ds_id") for p in params)):
        yield


@contextlib.contextmanager
def gathered_for_generation(engine, gather: bool = True) -> Iterator[bool]:
    """Within the block the engine's model runs as a plain model: under ZeRO-3 every parameter is
    gathered once, and the engine's per-module hooks are taken off (they would release each layer
    after its forward, inside any GatheredParameters block, and gather it again for the next
    token: about one copy of the model per generated token). A no-op without ZeRO-3.

    The price is a full copy of the model on every rank for the block. With `gather=False` the
    model stays sharded and gathers layer by layer (a large teacher's evaluation, `train.teacher_eval`).
    Yields `synced_gpus` for `generate`: True when forwards are still collectives across ranks (a
    rank that finished must keep joining the others' forwards), False when each rank may stop alone.
    """
    if engine.zero_optimization_stage() != 3:
        yield False
        return
    if not gather:
        yield world_size() > 1
        return
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # frozen engines: the offload itself
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        try:
            yield False
        finally:
            offload.forward_hooks.clear()
            offload.backward_hooks.clear()
            offload.setup_zero_stage3_hooks()  # DeepSpeed re-records its prefetch trace at the next forward
            stack = parameter_offload.FWD_MODULE_STACK
            if stack and stack[-1] is offload.module:  # set-up pushed the root again; it is still at the bottom
                stack.pop()


def frozen_ds_config(ds_config: dict) -> dict:
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


def gradients_finite(module: nn.Module) -> bool:
    """Whether this rank's (partition of the) accumulated gradients is finite; call at the boundary.
    One device-to-host transfer for all parameters, not one per parameter."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    checks = []
    for param in module.parameters():
        if param.requires_grad:
            grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
            if grad is not None:
                checks.append(torch.isfinite(grad).all())
    return bool(torch.stack(checks).all()) if checks else True


# -- checkpoints: DeepSpeed's format, written atomically --------------------------------------------

LATEST = CHECKPOINT_POINTER


def save_checkpoint(engine, out: Path, step: int) -> None:
    """Save step `step`; `latest_complete` moves to it only once every rank has finished.

    Only trained parameters and their optimizer state are saved (a LoRA student's adapters; its
    frozen base comes from model.student again on resume), with their names, which the resume
    checks.

    DeepSpeed writes the tag directory (every rank its shards); rank 0 then replaces the pointer
    file atomically and durably, so a crash mid-save leaves the previous pointer, which still names
    a complete checkpoint. Every rank reads that pointer on resume: on several nodes `output_dir`
    must be a filesystem all of them share.
    Older checkpoints are deleted only after the pointer has moved. A failed write (disk full,
    read-only, ...) on any rank, of a shard or of the pointer, removes the new directory and raises
    CheckpointError on every rank, one line naming the file and the cause (`run_folder.write_failure`).
    """
    checkpoints = out / "checkpoints"
    tag = f"step_{step}"
    # DeepSpeed's own makedirs (rank 0, before its first barrier) must find the folder there
    failure = first_failure(folder_failure(checkpoints) if rank() == 0 else None)
    if failure is None:
        failure = first_failure(write_shards(engine, checkpoints, tag, step))
    if failure is None:
        failure = first_failure(move_pointer(checkpoints, tag) if rank() == 0 else None)
    if failure is not None:
        if rank() == 0:
            shutil.rmtree(checkpoints / tag, ignore_errors=True)
        left = first_failure("could not be removed" if rank() == 0 and (checkpoints / tag).exists() else None)
        raise CheckpointError(
            f"{failure}; the partial checkpoint {tag} {left or 'was removed'}; last complete checkpoint: "
            f"{latest_tag(out) or 'none'} under {checkpoints} (continue with --resume)"
        )
    if rank() == 0:
        for old in checkpoints.glob("step_*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def folder_failure(folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return write_failure(err, folder)
    return None


def write_shards(engine, checkpoints: Path, tag: str, step: int) -> str | None:
    """DeepSpeed writes this rank's files of checkpoint `tag`; a failed write as one line."""
    try:
        engine.save_checkpoint(str(checkpoints), tag=tag, client_state={"step": step, "trained": trained_names(engine)},
                               save_latest=False, exclude_frozen_parameters=True)
    except CheckpointFileFailed as err:
        failure = write_failure(err.error, err.path)
    except OSError as err:  # DeepSpeed's copy of its recovery scripts (zero_to_fp32.py)
        failure = write_failure(err, Path(err.filename or checkpoints / tag))
    else:
        return None
    # DeepSpeed's save_checkpoint ends with a barrier, which this rank skipped: every collective
    # of it comes before its writes but that one, so the ranks whose writes succeeded wait in it.
    barrier()
    return failure


def move_pointer(checkpoints: Path, tag: str) -> str | None:
    """Rank 0: `latest_complete` names `tag`; a failed write as one line."""
    pointer = checkpoints / LATEST
    try:
        write_durably(pointer, tag, kind="pointer")
    except WRITE_ERRORS as err:
        return write_failure(err, pointer)
    return None


def write_durably(path: Path, text: str, kind: str | None = None) -> None:
    """Replace `path`'s content atomically and durably: a crash (or a power cut) leaves the old
    content or the new, and the new one is on disk before the call returns. A failed write leaves
    the old content (and no temporary file). `kind`: the run's write hooks run (as `kind`) once
    the new content is written, before it replaces the old."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if kind is not None:
            after_write(kind, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def latest_tag(out: Path) -> str | None:
    pointer = out / "checkpoints" / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def load_latest_checkpoint(engine, out: Path) -> int:
    """Load the checkpoint `latest_complete` names; returns its step (0 if there is none)."""
    tag = latest_tag(out)
    if tag is None:
        log.warning("--resume: no complete checkpoint under %s, starting from step 0", out / "checkpoints")
        return 0
    path, client_state = engine.load_checkpoint(str(out / "checkpoints"), tag=tag, load_module_strict=False)
    if path is None:
        raise InputError(f"--resume: checkpoint {out / 'checkpoints' / tag} could not be loaded")
    if client_state.get("trained", trained_names(engine)) != trained_names(engine):  # strict=False hides this
        raise InputError(f"--resume: checkpoint {out / 'checkpoints' / tag} trained other parameters than this run "
                         "(a different model.lora?); resume with the run's own config")
    log.info("resumed from %s (step %d)", path, client_state["step"])
    return int(client_state["step"])


def trained_names(engine) -> list[str]:
    return [name for name, param in engine.module.named_parameters() if param.requires_grad]


def export_student(engine, processor: Any, target: Path, peft_student: Any = None,
                   merged_target: Path | None = None) -> None:
    """Consolidate the student's weights and save_pretrained it with its processor.

    A LoRA student (`peft_student`, PEFT's model around it): its adapter is saved instead
    (`lora.save_adapter`), and the merged student, loadable by transformers alone, at
    `merged_target` if given (`lora.export_merged`, on rank 0).

    A failed write leaves no partial folder (`lora.write_folder`) and raises RunWriteError on
    every rank, naming the folder and the cause.
    """
    module = engine.module.model  # inside ResponseHiddenStates
    failure = None
    if peft_student is not None:
        with gathered_parameters(lora.trainable_parameters(module)):
            if rank() == 0:
                failure = export_failure(target, lambda: lora.save_adapter(peft_student, processor, target))
        if merged_target is not None and rank() == 0 and failure is None:
            failure = export_failure(merged_target, lambda: lora.export_merged(target, merged_target, module.dtype))
    else:
        zero3 = engine.zero_optimization_stage() == 3
        state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
        if rank() == 0:
            state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
            failure = export_failure(target, lambda: lora.write_folder(
                target, lambda tmp: module.save_pretrained(tmp, state_dict=state_dict), processor.save_pretrained))
    failure = first_failure(failure)
    if failure is not None:
        raise RunWriteError(failure)


def export_failure(target: Path, write: Callable[[], None]) -> str | None:
    """`write()` (an export into `target`); its failure as one line."""
    try:
        write()
    except WRITE_ERRORS as err:
        return write_failure(err, target)
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
