"""Benchmark 3: rollout throughput under DeepSpeed ZeRO-3 with 2 ranks (torchrun; gloo on CPU, nccl on GPU).

    python benchmarks/rollout_zero3.py
    python benchmarks/rollout_zero3.py --scale small --max-new-tokens 32

The student is a ZeRO-3 training engine set up as training sets it up (`engine.student_engine`:
parameters partitioned over the 2 ranks, DeepSpeed's hooks on). Both variants call the same
`dopd_vlm.rollout.sample_responses` (8 sequences per rank, same seeds, hence the same tokens):

- gathered_once: dopd_vlm's path, `engine.gathered_for_generation`: every weight gathered once
  for the call and DeepSpeed's per-module hooks taken off (each rank then decodes on its own);
- per_layer:     DeepSpeed's default, each layer's weights all-gathered (and released) in its
  forward hooks at every decoding step (`generate(synced_gpus=True)`).

Calls alternate between the variants after one warm-up call each; tokens/s counts the valid
response tokens of both ranks; `gathered_copies` is the number of parameter elements one call
all-gathers on a rank (counted at DeepSpeed's communication backend) over the model's size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPE = str(C.ROOT / "benchmarks" / "recipes" / "bench_scenes.yaml")
SCALES = {
    "tiny": {},  # dopd_vlm's tiny student: hidden 64, 2 layers
    "small": dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=768),
}


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import dopd_vlm  # noqa: F401
    import deepspeed.comm.comm as ds_comm

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import RolloutConfig, load_config, load_deepspeed_config
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.distributed import collective_device, init_distributed
    from dopd_vlm.engine import gathered_for_generation, student_engine, zero3_loading
    from dopd_vlm.rollout import sample_responses
    from dopd_vlm.models import load_model, load_processor, model_family, vision_special_token_ids
    from dopd_vlm.lab.tiny import STUDENT_SIZE, make_tiny_pair

    import dataclasses

    size = dataclasses.replace(STUDENT_SIZE, **SCALES[args.scale])
    paths = make_tiny_pair("qwen2_vl", C.ROOT / ".cache" / "bench" / f"rollout_{args.scale}", seed=0, student=size, teacher=size)
    init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_rank = 8
    cfg = load_config(None, [f"model.student={paths['student']}", f"model.teacher={paths['teacher']}",
                             f"train.prompts_per_step={per_rank * world}", f"train.prompts_per_micro_batch={per_rank}",
                             "rollout.num_rollouts=1"])
    ds_config = load_deepspeed_config(C.ROOT / "ds_configs" / "zero3.json", cfg, world, bf16_enabled=torch.cuda.is_available())
    with zero3_loading(ds_config):
        model = load_model(paths["student"], dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    engine, _, _ = student_engine(model, ds_config, cfg.optim, lambda step: 1.0)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters()), "weights are not ZeRO-3 partitioned"
    processor = load_processor(paths["student"])
    collator = DualViewCollator.from_config(processor, data=cfg.data)
    samples = load_recipe(RECIPE, "train", family=model_family(paths["student"]))
    samples = [samples[(rank * per_rank + i) % len(samples)] for i in range(per_rank)]
    rcfg = RolloutConfig(num_rollouts=1, max_new_tokens=args.max_new_tokens)
    suppress = vision_special_token_ids(collator.tokenizer)
    gathered = {"elements": 0}

    def counting(method):
        def wrapper(*a, **k):
            output = k.get("output_tensor", k.get("tensor_list", a[0] if a else None))
            gathered["elements"] += sum(t.numel() for t in (output if isinstance(output, (list, tuple)) else [output]))
            return method(*a, **k)
        return wrapper

    backend = ds_comm.cdb
    backend.all_gather_into_tensor = counting(backend.all_gather_into_tensor)
    backend.all_gather = counting(backend.all_gather)

    def generate(variant: str, seed: int) -> tuple[float, int, int]:
        torch.manual_seed(seed)
        torch.distributed.barrier()
        gathered["elements"] = 0
        start = time.perf_counter()
        with gathered_for_generation(engine, gather=variant == "gathered_once") as synced_gpus:
            _, mask = sample_responses(engine.module.model, collator, samples, rcfg, suppress_token_ids=suppress,
                                       synced_gpus=synced_gpus)
        C.synchronize()
        torch.distributed.barrier()
        elapsed = time.perf_counter() - start
        tokens = torch.tensor([int(mask.sum())], device=collective_device())
        torch.distributed.all_reduce(tokens)
        return elapsed, int(tokens), gathered["elements"]

    variants = ("gathered_once", "per_layer")
    for v in variants:
        generate(v, 0)  # warm-up
    results = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            results[v].append(generate(v, rep + 1))
    params = sum(p.ds_numel for p in engine.module.parameters())
    if rank == 0:
        rows = []
        for v, runs in results.items():
            seconds = statistics.median(t for t, _, _ in runs)
            tokens = statistics.median(n for _, n, _ in runs)
            copies = statistics.median(g for _, _, g in runs) / params
            rows.append(dict(variant=v, seconds_per_generate=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                             gathered_copies=copies))
        C.emit(dict(rows=rows, world=world, sequences_per_rank=per_rank, max_new_tokens=args.max_new_tokens,
                    scale=args.scale, params=params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--scale", choices=tuple(SCALES), default="tiny")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from dopd_vlm.distributed import exit_process

        child(args)
        exit_process(0)  # a torchrun rank: see exit_process
    cmd = [C.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--child",
           "--max-new-tokens", str(args.max_new_tokens), "--reps", str(args.reps), "--scale", args.scale]
    result = C.run_json(cmd, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    base = next(r for r in result["rows"] if r["variant"] == "per_layer")
    for r in result["rows"]:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    payload = dict(benchmark="rollout_zero3", command="python benchmarks/rollout_zero3.py" + (f" --scale {args.scale}" if args.scale != "tiny" else ""),
                   machine=C.machine(), **result)
    C.save(f"rollout_zero3_{args.scale}", payload)
    print(f"machine: {payload['machine']}\n2 ranks ZeRO-3, {result['sequences_per_rank']} sequences/rank, "
          f"{args.max_new_tokens} new tokens, student {result['params']:,} parameters")
    print(C.table(result["rows"], [("variant", "variant"), ("seconds_per_generate", "s / generate"),
                                   ("tokens", "tokens"), ("tokens_per_s", "tokens/s"), ("speedup", "speed-up"),
                                   ("gathered_copies", "model copies gathered")]))


if __name__ == "__main__":
    main()
