"""Runs `dopd_vlm.train.train` for a list of runs inside one (torchrun-launched) process group.

Usage: torchrun --nproc_per_node N tests/helpers/train_driver.py SPEC.json RESULT.json
SPEC: {"config": path, "runs": [{"name", "overrides": [...], "resume": bool, "stop_after_step": int|null,
                                 "fault": {...} | absent, "config": path | absent (the spec's)}]}
RESULT (rank 0): {name: {"metrics": {...}, "phases": {...}, "teacher_unchanged": bool, "finished": bool, "error": str|null,
                         "compiled_frames": int (frames torch.compile compiled in this process so far)}}
Several runs share one process start-up (torch + DeepSpeed imports dominate on CPU), also runs of
different configs. Code paths (e.g. train.loss_path) are chosen by config overrides. Rank 0 rewrites
RESULT after every run, so a launch that a fault ends (kill -9, a rank exiting) still reports the
runs before it.

Faults are injected through the run's hook points (`dopd_vlm.hooks`), for one run at a time:
  {"nan_loss_steps": [k, ...]}        the loss of step k is NaN on every rank              (after_loss)
  {"nan_grad_steps": [k, ...]}        the loss is finite but the gradients of step k are NaN (after_loss)
  {"kill_at_step": k, "rank": r}      rank r is SIGKILLed when step k starts                 (before_step)
  {"exit_rank_at_step": k, "rank": r} rank r exits (crash) when step k starts                (before_step)
  {"kill_saving_step": k}             SIGKILL once the first file of checkpoint step_k is written (after_write)
  {"disk_full_saving_step": k}        writing checkpoint step_k fails with ENOSPC on every rank  (after_write)
  {"vllm_dies_at_step": k, "rank": r} rank r's vLLM engine raises vLLM's EngineDeadError when it
                                      samples in step k (rollout.engine=vllm)               (before_generate)
"""

import contextlib
import errno
import json
import os
import signal
import sys

import dopd_vlm  # noqa: F401  (before transformers)
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from dopd_vlm import hooks
from dopd_vlm.config import load_config
from dopd_vlm.distributed import exit_process
from dopd_vlm.engine import CheckpointError, NonFiniteTraining, gathered_weights
from dopd_vlm.models import load_model
from dopd_vlm.train import train
from dopd_vlm.vllm_rollout import RolloutEngineError


def teacher_unchanged(teacher, path) -> bool:
    reference = load_model(path).state_dict()
    with gathered_weights(teacher):
        return all(torch.equal(p.detach().cpu(), reference[name]) for name, p in teacher.named_parameters())


class Faults:
    """One run's faults (see the module docstring), as hooks; the step number comes from before_step."""

    def __init__(self, fault: dict):
        self.fault, self.step = fault, 0
        self.rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    def on_this_rank(self, key: str) -> bool:
        return self.fault.get(key) == self.step and self.fault.get("rank", 0) == self.rank

    def before_step(self, step: int) -> None:
        self.step = step
        if self.on_this_rank("kill_at_step"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.on_this_rank("exit_rank_at_step"):
            os._exit(17)

    def after_loss(self, loss, student_hidden):
        if self.step in self.fault.get("nan_loss_steps", ()):
            loss = loss * float("nan")
        if self.step in self.fault.get("nan_grad_steps", ()):
            student_hidden.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return loss

    def after_write(self, kind: str, path) -> None:
        tag = f"step_{self.fault.get('kill_saving_step', self.fault.get('disk_full_saving_step'))}"
        if kind == "checkpoint" and tag in str(path):
            if "kill_saving_step" in self.fault:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def before_generate(self) -> None:
        if self.on_this_rank("vllm_dies_at_step"):
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError("EngineCore encountered an issue (injected)")


@contextlib.contextmanager
def injected(fault: dict):
    """The run's faults for the block (runs sharing a launch must not inherit each other's)."""
    faults = Faults(fault)
    with contextlib.ExitStack() as stack:
        for point in hooks.POINTS:
            stack.enter_context(hooks.registered(point, getattr(faults, point)))
        yield


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    results = {}
    for run in spec["runs"]:
        cfg = load_config(run.get("config", spec["config"]), run["overrides"])
        try:
            with injected(run.get("fault", {})):
                result = train(cfg, resume=run.get("resume", False), stop_after_step=run.get("stop_after_step"))
        except (NonFiniteTraining, CheckpointError, RolloutEngineError) as err:
            results[run["name"]] = {"error": f"{type(err).__name__}: {err}", "finished": False}
            write_results(results, result_path)
            continue
        if result.rollout_engine is not None:  # rollout.engine=vllm: one engine at a time in this process
            result.rollout_engine.close()
        unchanged = teacher_unchanged(result.teacher, cfg.model.teacher) if result.teacher is not None else None
        results[run["name"]] = {"metrics": result.metrics, "phases": result.phases, "teacher_unchanged": unchanged,
                                "finished": result.finished, "error": None, "compiled_frames": counters["frames"]["total"]}
        write_results(results, result_path)


def write_results(results: dict, path: str) -> None:
    """Rank 0's results so far, replaced whole (a killed launch leaves the last complete version)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(f"{path}.tmp", "w") as file:
            json.dump(results, file, indent=1)
        os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
