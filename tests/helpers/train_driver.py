"""Runs `dopd_vlm.train.train` for a list of runs inside one (torchrun-launched) process group.

Usage: torchrun --nproc_per_node N tests/helpers/train_driver.py SPEC.json RESULT.json
SPEC: {"config": path, "runs": [{"name", "overrides": [...], "resume": bool, "stop_after_step": int|null,
                                 "fault": {...} | absent, "loss_path": "fallback" | absent}]}
RESULT (rank 0): {name: {"metrics": {...}, "phases": {...}, "teacher_unchanged": bool, "finished": bool, "error": str|null}}
Several runs share one process start-up (torch + DeepSpeed imports dominate on CPU). Code paths
(e.g. train.loss_path) are chosen by config overrides.

Faults are injected by wrapping public functions in this process only (the product code has no
test hooks):
  {"nan_loss_steps": [k, ...]}        the loss of step k is NaN on every rank
  {"nan_grad_steps": [k, ...]}        the loss is finite but the gradients of step k are NaN
  {"kill_at_step": k, "rank": r}      rank r is SIGKILLed when step k starts
  {"kill_saving_step": k}             SIGKILL in the middle of writing checkpoint step_k
  {"disk_full_saving_step": k}        writing checkpoint step_k fails with ENOSPC on every rank
  {"exit_rank_at_step": k, "rank": r} rank r exits (crash) when step k starts
  {"vllm_dies_at_step": k, "rank": r} rank r's vLLM engine raises vLLM's EngineDeadError when it
                                      samples in step k (rollout.engine=vllm)
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

import dopd_vlm.step as step_module
import dopd_vlm.train as train_module
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


@contextlib.contextmanager
def injected(fault: dict):
    """The run's faults for the block; the real functions are back after it (runs sharing a
    launch must not inherit each other's faults)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    current = {"step": 0}
    real_step, real_loss, real_save = train_module.dopd_step, step_module.compute_loss, torch.save

    def dopd_step(models, micro_batches, cfg, seeds):
        current["step"] += 1
        step = current["step"]
        if fault.get("kill_at_step") == step and fault.get("rank", 0) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.get("exit_rank_at_step") == step and fault.get("rank", 0) == rank:
            os._exit(17)
        return real_step(models, micro_batches, cfg, seeds)

    def compute_loss(cfg, inputs, chunk_size, loss_path):
        loss, stats = real_loss(cfg, inputs, chunk_size, loss_path)
        if current["step"] in fault.get("nan_loss_steps", ()):
            loss = loss * float("nan")
        if current["step"] in fault.get("nan_grad_steps", ()):
            inputs.student_hidden.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return loss, stats

    def save(obj, path, *args, **kwargs):
        tag = f"step_{fault.get('kill_saving_step', fault.get('disk_full_saving_step'))}"
        if tag in str(path):
            if "kill_saving_step" in fault:
                with open(path, "wb") as partial:
                    partial.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    train_module.dopd_step, step_module.compute_loss, torch.save = dopd_step, compute_loss, save
    if "vllm_dies_at_step" in fault:
        import vllm
        from vllm.v1.engine.exceptions import EngineDeadError

        real_generate = vllm.LLM.generate

        def generate(self, *args, **kwargs):
            if current["step"] == fault["vllm_dies_at_step"] and fault.get("rank", 0) == rank:
                raise EngineDeadError("EngineCore encountered an issue (injected)")
            return real_generate(self, *args, **kwargs)

        vllm.LLM.generate = generate
    try:
        yield
    finally:
        train_module.dopd_step, step_module.compute_loss, torch.save = real_step, real_loss, real_save
        if "vllm_dies_at_step" in fault:
            vllm.LLM.generate = real_generate


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    results = {}
    for run in spec["runs"]:
        cfg = load_config(spec["config"], run["overrides"])
        try:
            with injected(run.get("fault", {})):
                result = train(cfg, resume=run.get("resume", False), stop_after_step=run.get("stop_after_step"))
        except (NonFiniteTraining, CheckpointError, RolloutEngineError) as err:
            results[run["name"]] = {"error": f"{type(err).__name__}: {err}", "finished": False}
            continue
        if result.rollout_engine is not None:  # rollout.engine=vllm: one engine at a time in this process
            result.rollout_engine.close()
        unchanged = teacher_unchanged(result.teacher, cfg.model.teacher) if result.teacher is not None else None
        results[run["name"]] = {"metrics": result.metrics, "phases": result.phases, "teacher_unchanged": unchanged,
                                "finished": result.finished, "error": None}
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump(results, open(result_path, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
