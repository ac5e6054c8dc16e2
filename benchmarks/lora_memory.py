"""Benchmark 6: peak memory and step time of full fine-tuning vs a LoRA student (`model.lora`).

    python benchmarks/lora_memory.py                 # ~54M-parameter student, 6 steps per variant
    python benchmarks/lora_memory.py --steps 3 --layers 4   # a smoke run (not the recorded numbers)

Runs dopd_vlm's real training loop (`train()`, method dopd, no ZeRO: benchmarks/ds_configs/stage0.json)
on a Qwen2-VL-shaped student of `--layers` x (hidden 512, intermediate 2048) next to the small tiny
teacher, one variant per fresh process (peak memory is per process), all in this one invocation:

    full            every student weight trained (AdamW state for all of them), privileged_target=live
    lora            model.lora: rank 16 on the language model's attention and MLP projections, live
    full_initial    method.privileged_target=initial: a frozen copy of the student is loaded too
    lora_initial    the same with LoRA: the initial target is the student with its adapters off

Peak memory: the process's peak resident set size during `train()` (model loading included) above
what it held before (benchmarks/_common.PeakMemory; CUDA: allocator peak). Step time: median of the
trainer's `step_time` after `--warmup` steps (wall clock: on a shared machine other jobs inflate it),
and the CPU seconds of the whole `train()` call (this process's threads only; 1 thread). Ratios
are full / lora of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPE = str(C.ROOT / "benchmarks" / "recipes" / "bench_scenes.yaml")
VARIANTS = {
    "full": ["method.privileged_target=live"],
    "lora": ["model.lora.enabled=true", "method.privileged_target=live"],
    "full_initial": ["method.privileged_target=initial"],
    "lora_initial": ["model.lora.enabled=true", "method.privileged_target=initial"],
}


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import dopd_vlm  # noqa: F401
    from dopd_vlm.config import load_config
    from dopd_vlm.models import load_model
    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, make_tiny_pair
    from dopd_vlm.train import train

    student_size = dataclasses.replace(STUDENT_SIZE, hidden_size=512, num_layers=args.layers, num_heads=8,
                                       num_kv_heads=2, intermediate_size=2048)
    paths = make_tiny_pair("qwen2_vl", C.ROOT / ".cache" / "bench" / f"lora_{args.layers}", seed=0,
                           teacher=TEACHER_SIZE, student=student_size)
    parameters = sum(p.numel() for p in load_model(paths["student"]).parameters())
    out = Path(tempfile.mkdtemp(prefix=f"dopd_lora_{args.variant}_"))
    cfg = load_config(None, [
        f"model.teacher={paths['teacher']}", f"model.student={paths['student']}", "model.dtype=float32",
        f"data.recipe={RECIPE}", "data.eval_splits=[]", "method.name=dopd",
        "rollout.num_rollouts=2", f"rollout.max_new_tokens={args.max_new_tokens}",
        "optim.lr=1e-5", f"train.steps={args.steps}", "train.prompts_per_step=4", "train.prompts_per_micro_batch=2",
        "train.deepspeed=benchmarks/ds_configs/stage0.json", f"train.output_dir={out}",
        "train.eval_every=0", "train.save_every=0", *VARIANTS[args.variant],
    ])
    device, _ = C.device_and_dtype()
    with C.PeakMemory(device) as mem:
        result = train(cfg)
    trainable = sum(p.numel() for p in result.student.module.parameters() if p.requires_grad)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after step 0
    shutil.rmtree(out)  # checkpoints and the export: not measured here
    C.emit(dict(variant=args.variant, student_parameters=parameters, trainable_parameters=trainable,
                peak_bytes=mem.peak, peak_gib=C.gib(mem.peak), train_seconds=mem.seconds, train_cpu_seconds=mem.cpu_seconds,
                step_times=[r["step_time"] for r in rows], losses=[r["loss"] for r in rows],
                load_average_1min=os.getloadavg()[0]))  # the machine is shared: how loaded it was


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        from dopd_vlm.distributed import exit_process

        child(args)
        exit_process(0)
    common = ["--layers", str(args.layers), "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for variant in args.variants.split(","):
        row = C.run_json([C.python(), __file__, "--variant", variant, *common], env=env, timeout=1800)
        row["step_s"] = statistics.median(row["step_times"][args.warmup:] or row["step_times"])
        rows.append(row)
    by_name = {row["variant"]: row for row in rows}
    ratios = {f"{full}/{lora}": dict(peak=by_name[full]["peak_bytes"] / by_name[lora]["peak_bytes"],
                                     step_time=by_name[full]["step_s"] / by_name[lora]["step_s"],
                                     train_cpu_time=by_name[full]["train_cpu_seconds"] / by_name[lora]["train_cpu_seconds"])
              for full, lora in (("full", "lora"), ("full_initial", "lora_initial"))
              if full in by_name and lora in by_name}
    payload = dict(benchmark="lora_memory", command=" ".join(["python benchmarks/lora_memory.py", *sys.argv[1:]]),
                   machine=C.machine(), setup=dict(layers=args.layers, steps=args.steps, warmup=args.warmup,
                                                   prompts=4, rollouts=2, max_new_tokens=args.max_new_tokens,
                                                   lora_rank=16, method="dopd"),
                   rows=rows, ratios=ratios)
    path = C.save("lora_memory", payload)
    print(f"machine: {payload['machine']}\nsetup: {payload['setup']}\nraw: {path}")
    print(C.table(rows, [("variant", "variant"), ("student_parameters", "student params"),
                         ("trainable_parameters", "trained params"), ("peak_gib", "peak GiB"), ("step_s", "step s")]))
    for name, ratio in ratios.items():
        print(f"{name}: peak memory x{ratio['peak']:.2f}, step time x{ratio['step_time']:.2f}, "
              f"CPU time of train() x{ratio['train_cpu_time']:.2f}")


if __name__ == "__main__":
    main()
