"""How many parameter elements a ZeRO-3 student all-gathers for one `generate` call, per rank.

Usage: torchrun --nproc_per_node 2 tests/helpers/generate_gathers.py STUDENT_DIR RESULT.json
The student is set up as training sets it up (`engine.student_engine`, ZeRO-3, hooks and all);
the same prompts are sampled with `engine.gathered_for_generation` and without it (DeepSpeed's
per-layer gathering). Counting happens at DeepSpeed's communication backend, so every all-gather
path of ZeRO-3 is seen. Rank 0 writes {"parameters", "gathered": elements, "per_layer": elements,
"same_tokens": bool, "train_step_ok": bool}.
"""

import json
import sys

import dopd_vlm  # noqa: F401  (before transformers)
import deepspeed.comm.comm as ds_comm
import torch
import torch.distributed as dist

from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import DataConfig, OptimConfig, RolloutConfig
from dopd_vlm.data import load_recipe
from dopd_vlm.distributed import exit_process, init_distributed
from dopd_vlm.engine import gathered_for_generation, student_engine, zero3_loading
from dopd_vlm.models import load_model, load_processor, vision_special_token_ids
from dopd_vlm.rollout import sample_responses

COUNT = {"elements": 0}


def counting(method):
    def wrapper(*args, **kwargs):
        output = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
        tensors = output if isinstance(output, (list, tuple)) else [output]
        COUNT["elements"] += sum(t.numel() for t in tensors)
        return method(*args, **kwargs)

    return wrapper


def sample(engine, collator, samples, gather: bool):
    torch.manual_seed(0)
    COUNT["elements"] = 0
    with gathered_for_generation(engine, gather) as synced_gpus:
        ids, mask = sample_responses(engine.module.model, collator, samples, RolloutConfig(max_new_tokens=12),
                                     suppress_token_ids=vision_special_token_ids(collator.tokenizer),
                                     synced_gpus=synced_gpus)
    return COUNT["elements"], ids, mask


def main(student: str, result: str) -> None:
    init_distributed(timeout_s=300)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with zero3_loading(config):
        model = load_model(student, dtype=torch.float32)
    engine, _, _ = student_engine(model, config, OptimConfig(lr=1e-3), lambda step: 1.0)
    collator = DualViewCollator.from_config(load_processor(student), data=DataConfig())
    rank = dist.get_rank()
    samples = [load_recipe("synthetic_scenes", "train", limit=8)[rank * 4 + i] for i in range(4)]
    backend = ds_comm.cdb
    backend.all_gather_into_tensor = counting(backend.all_gather_into_tensor)
    backend.all_gather = counting(backend.all_gather)
    gathered, ids, mask = sample(engine, collator, samples, gather=True)
    per_layer, ids_again, mask_again = sample(engine, collator, samples, gather=False)
    # the hooks are back: a training forward/backward/step still works after a gathered rollout
    views = collator.scoring_views(samples, ids, mask, privileged_student=False, teacher=False)
    loss = engine(views.student, views.response_mask).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    again, _, _ = sample(engine, collator, samples, gather=True)
    if rank == 0:
        parameters = sum(p.ds_numel for p in engine.module.parameters())
        json.dump({"parameters": parameters, "gathered": gathered, "per_layer": per_layer, "gathered_after_step": again,
                   "same_tokens": bool(torch.equal(ids, ids_again) and torch.equal(mask, mask_again)),
                   "train_step_ok": bool(torch.isfinite(loss))}, open(result, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
