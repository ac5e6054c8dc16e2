"""The DeepSpeed-facing plumbing: engines, a skippable optimizer, checkpoints and export.

- `student_engine` / `frozen_engine_module`: the trained student (wrapped in
  `scoring.ResponseHiddenStates`) and the frozen models, sharded alike under ZeRO-3;
- `SkippableAdamW`, `gradients_finite`: a step with non-finite loss or gradients is called off on
  every rank (DeepSpeed itself only skips fp16 overflows);
- `save_checkpoint` / `load_latest_checkpoint`: DeepSpeed's format, made atomic by a pointer file;
- `export_student`: the consolidated student with its processor, loadable by transformers alone.
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

from dopd_vlm.distributed import all_ranks_true, rank
from dopd_vlm.errors import InputError
from dopd_vlm.scoring import ResponseHiddenStates

log = logging.getLogger("dopd_vlm.engine")


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients (train.max_bad_steps)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


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
    needs no JIT-compiled op and can skip a step.
    """
    import deepspeed

    optimizer = None
    if "optimizer" not in ds_config:
        ds_config["zero_allow_untested_optimizer"] = True  # an AdamW subclass; DeepSpeed checks exact types
        optimizer = SkippableAdamW(student.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                   weight_decay=optim.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=ResponseHiddenStates(student), optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    engine.train()
    return engine, scheduler, optimizer or UnskippableOptimizer()


def frozen_engine_module(model: nn.Module | None, ds_config: dict) -> nn.Module | None:
    """A frozen model (the teacher, a frozen privileged student) in its own DeepSpeed engine."""
    import deepspeed

    if model is None:
        return None
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=frozen_ds_config(ds_config))
    return engine.module.eval()


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
    """Whether this rank's (partition of the) accumulated gradients is finite; call at the boundary."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    for param in module.parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return False
    return True


# -- checkpoints: DeepSpeed's format, written atomically --------------------------------------------

LATEST = "latest_complete"


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
        if rank() == 0:
            shutil.rmtree(checkpoints / tag, ignore_errors=True)
        barrier()
        reason = f"{failure.strerror or failure}" if failure is not None else "failed on another rank"
        raise CheckpointError(
            f"writing checkpoint {checkpoints / tag} failed: {reason}; the previous complete checkpoint "
            f"({latest_tag(out) or 'none'}) is intact"
        )
    barrier()
    if rank() == 0:
        tmp = checkpoints / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, checkpoints / LATEST)
        for old in checkpoints.glob("step_*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_tag(out: Path) -> str | None:
    pointer = out / "checkpoints" / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def load_latest_checkpoint(engine, out: Path) -> int:
    """Load the checkpoint `latest_complete` names; returns its step (0 if there is none)."""
    tag = latest_tag(out)
    if tag is None:
        log.warning("--resume: no complete checkpoint under %s, starting from step 0", out / "checkpoints")
        return 0
    path, client_state = engine.load_checkpoint(str(out / "checkpoints"), tag=tag)
    if path is None:
        raise InputError(f"--resume: checkpoint {out / 'checkpoints' / tag} could not be loaded")
    log.info("resumed from %s (step %d)", path, client_state["step"])
    return int(client_state["step"])


def export_student(engine, processor: Any, target: Path) -> None:
    """Consolidate the student's weights and save_pretrained it with its processor."""
    module = engine.module.model  # inside ResponseHiddenStates
    zero3 = engine.zero_optimization_stage() == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
    if rank() == 0:
        state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    barrier()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
