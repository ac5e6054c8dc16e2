"""Runs `dopd_vlm.train.train` for a list of runs inside one (torchrun-launched) process group.

Usage: torchrun --nproc_per_node N tests/helpers/train_driver.py SPEC.json RESULT.json
SPEC: {"config": path, "runs": [{"name", "overrides": [...], "resume": bool, "stop_after_step": int|null}]}
RESULT (rank 0): {name: {"metrics": {...}, "teacher_unchanged": bool, "finished": bool}}
Several runs share one process start-up (torch + DeepSpeed imports dominate on CPU).
"""

import json
import sys

import dopd_vlm  # noqa: F401  (before transformers)
import torch
import torch.distributed as dist

from dopd_vlm.config import load_config
from dopd_vlm.models import load_model
from dopd_vlm.rollout import gathered_parameters
from dopd_vlm.train import train


def teacher_unchanged(teacher, path) -> bool:
    reference = load_model(path).state_dict()
    with gathered_parameters(teacher):
        return all(torch.equal(p.detach().cpu(), reference[name]) for name, p in teacher.named_parameters())


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    results = {}
    for run in spec["runs"]:
        cfg = load_config(spec["config"], run["overrides"])
        result = train(cfg, resume=run.get("resume", False), stop_after_step=run.get("stop_after_step"))
        unchanged = teacher_unchanged(result.teacher, cfg.model.teacher) if result.teacher is not None else None
        results[run["name"]] = {"metrics": result.metrics, "teacher_unchanged": unchanged, "finished": result.finished}
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump(results, open(result_path, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
