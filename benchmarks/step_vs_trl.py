"""Benchmark 2: end-to-end optimizer-step time, dopd_vlm vs TRL's DistillationTrainer.

    python benchmarks/step_vs_trl.py            # single process and ZeRO-3 x 2 ranks (torchrun, gloo)
    python benchmarks/step_vs_trl.py --modes single --steps 12
    python benchmarks/step_vs_trl.py --scale 50m --max-new-tokens 64 --steps 5 --warmup 1   # where compute dominates

Same tiny Qwen2-VL teacher/student (dopd_vlm.models.make_tiny_pair, seed 0), same 8 prompts with
images every step (benchmarks/recipes/bench_scenes.yaml), one rollout per prompt, same
generation length cap, AdamW, gradient clipping 1.0, no gradient checkpointing, float32 on CPU
(bf16 on CUDA). Each trainer runs in its own process(es); the first `--warmup` steps are dropped
and the median of the rest is reported.

- trl:          trl.DistillationTrainer (on-policy generalised JSD, beta=1: reverse KL over the full
                vocabulary; the teacher sees the same prompt as the student: 2 forward passes).
- vanilla_opd:  dopd_vlm's vanilla OPD with the teacher on the same plain prompt (2 passes, the
                same work as TRL's), top-K reverse KL (the default).
- dopd:         dopd_vlm's DOPD: privileged student + privileged teacher + student (3 passes).
- *_vllm:       the same with rollout.engine=vllm (a colocated vLLM engine per rank samples the
                rollouts; the weights are synced into it after every step: time/weight_sync).

Our step time is train()'s own `step_time` (rollout, scoring, routing, loss, backward, optimizer
step); TRL's is the wall time between the Trainer callbacks `on_step_begin` and `on_step_end`
(generation, loss, backward, optimizer step). Our phases come from the step's own timers:
rollout (sampling and building the views), score (the no-grad passes and the router's log-probs),
update (student pass, loss, backward, optimizer step), weight sync (vLLM); `padded` is the step's
`perf/padding_share` (all passes). Each row records the 1-minute load average before and after it.

Scales (`--scale`; the same shapes for TRL and us, teacher and student alike):
- tiny: the default tiny pair (0.2 M parameters): Python overhead decides the ratio;
- 50m: a 53.8 M-parameter pair (text 768 wide, 6 layers, 12 heads of 64, MLP 3,072; a small
  vision tower), random weights: generation and the passes decide it (CPU-sized);
- 2b: 2B-shaped random models, for GPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPE = str(C.ROOT / "benchmarks" / "recipes" / "bench_scenes.yaml")
TRAINERS = ("trl", "vanilla_opd", "dopd", "vanilla_opd_vllm", "dopd_vllm")
PROMPTS = 8
LR = 1e-5


def tiny_pair(family: str, scale: str) -> dict[str, Path]:
    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, TinySize, make_tiny_pair

    if scale == "tiny":
        # TRL requires equal vocab_size in both configs, so the teacher's LM head is not padded here
        # (dopd_vlm's default tiny teacher pads it to a multiple of 64, which dopd_vlm slices off).
        teacher = dataclasses.replace(TEACHER_SIZE, vocab_multiple=1)
        return make_tiny_pair(family, C.ROOT / ".cache" / "bench" / family, seed=0, teacher=teacher, student=STUDENT_SIZE)
    if scale == "50m":
        size = TinySize(hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=4, intermediate_size=3072,
                        vision_hidden_size=128, vision_depth=2, vision_num_heads=4, vision_intermediate_size=256)
        return make_tiny_pair(family, C.ROOT / ".cache" / "bench" / f"{family}_50m", seed=0, teacher=size, student=size)
    # A 2B-shaped student (Qwen3-VL-2B text widths, real vocabulary rows) and an equally shaped teacher,
    # random weights: for GPU runs only.
    size = TinySize(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                    vision_hidden_size=1024, vision_depth=24, vision_num_heads=16, vision_intermediate_size=4096,
                    vision_num_position_embeddings=2304, vocab_multiple=151_936)
    return make_tiny_pair(family, C.ROOT / ".cache" / "bench" / f"{family}_2b", seed=0, teacher=size, student=size)


def ds_zero3() -> dict:
    return json.loads((C.ROOT / "ds_configs" / "zero3.json").read_text())


# ----------------------------------------------------------------------------------------- TRL


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    import dopd_vlm  # noqa: F401  (torchvision shim)
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.models import load_model, load_processor, model_family, vision_special_token_ids
    from trl import DistillationConfig, DistillationTrainer

    paths = tiny_pair(args.family, args.scale)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    student = load_model(paths["student"], dtype=dtype)
    teacher = load_model(paths["teacher"], dtype=dtype)
    processor = load_processor(paths["student"])
    processor.tokenizer.padding_side = "left"  # what TRL sets when it loads the processor itself
    samples = load_recipe(RECIPE, "train", family=model_family(paths["student"]))
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}] for s in samples],
        "images": [list(s.images) for s in samples],
    })
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        per_device_train_batch_size=PROMPTS // world,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        beta=1.0,
        gradient_checkpointing=False,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
        generation_kwargs={"suppress_tokens": vision_special_token_ids(processor)},
        deepspeed=ds_zero3() if args.zero3 else None,
        disable_tqdm=True,
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):  # synchronised, as dopd_vlm's own step timer
        def on_step_begin(self, *a, **k):
            C.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            C.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=processor, callbacks=[StepTimer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return dict(step_times=times, response_length=statistics.mean(lengths) if lengths else None)


# ----------------------------------------------------------------------------------------- ours


def run_ours(args) -> dict:
    import dopd_vlm  # noqa: F401
    from dopd_vlm.config import load_config
    from dopd_vlm.train import train

    paths = tiny_pair(args.family, args.scale)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One output directory for all ranks (train() writes metrics and checkpoints there from rank 0).
    out = os.path.join(tempfile.gettempdir(), f"dopd_bench_{args.child}_{os.environ.get('MASTER_PORT', os.getpid())}")
    ds = "ds_configs/zero3.json" if args.zero3 else "benchmarks/ds_configs/stage0.json"
    method = args.child.removesuffix("_vllm")
    overrides = [
        f"model.teacher={paths['teacher']}", f"model.student={paths['student']}",
        f"data.recipe={RECIPE}", "data.eval_splits=[]",
        f"method.name={method}", f"method.teacher_privileged={'false' if method == 'vanilla_opd' else 'true'}",
        f"rollout.engine={'vllm' if args.child.endswith('_vllm') else 'hf'}",
        "rollout.num_rollouts=1", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"optim.lr={LR}", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
        f"train.steps={args.steps}", f"train.prompts_per_step={PROMPTS}",
        f"train.prompts_per_micro_batch={PROMPTS // world}", f"train.deepspeed={ds}",
        f"train.output_dir={out}", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
    ]
    cfg = load_config(None, overrides)
    train(cfg, overwrite=True)  # a scratch folder named by the port: a rerun replaces it
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > 0 and "step_time" in r]
    phases = {name: [C.phase_time(r, name) for r in rows] for name in C.PHASES}
    return dict(step_times=[r["step_time"] for r in rows], response_length=statistics.mean(r["response_length"] for r in rows),
                phases=phases, padded=[r["perf/padding_share"] for r in rows])


# ----------------------------------------------------------------------------------------- driver


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    result = run_trl(args) if args.child == "trl" else run_ours(args)
    if int(os.environ.get("RANK", "0")) == 0:
        C.emit(dict(trainer=args.child, mode="zero3x2" if args.zero3 else "single", **result))


def summarize(result: dict, warmup: int) -> dict:
    times = result["step_times"][warmup:] or result["step_times"]
    row = dict(trainer=result["trainer"], mode=result["mode"], median_s=statistics.median(times),
               mean_s=statistics.mean(times), steps=len(times), response_length=result.get("response_length"))
    for name, values in result.get("phases", {}).items():
        row[f"time/{name}"] = statistics.median(values[warmup:] or values)
    if result.get("padded"):
        row["padded"] = statistics.median(result["padded"][warmup:] or result["padded"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="single,zero3", help="single and/or zero3 (2 ranks, torchrun)")
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--scale", choices=("tiny", "50m", "2b"), default="tiny",
                   help="50m: 53.8M-parameter pair (CPU); 2b: 2B-shaped random models (GPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--zero3", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from dopd_vlm.distributed import exit_process

        child(args)
        exit_process(0)  # a torchrun rank: see exit_process

    tiny_pair(args.family, args.scale)  # build once, before the timed children
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    common = ["--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens), "--family", args.family, "--scale", args.scale]
    rows = []
    for mode in args.modes.split(","):
        for trainer in args.trainers.split(","):
            if mode == "single":
                cmd = [C.python(), __file__, "--child", trainer, *common]
            else:
                cmd = [C.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       __file__, "--child", trainer, "--zero3", *common]
            started, load = time.perf_counter(), os.getloadavg()[0]
            try:
                row = summarize(C.run_json(cmd, env=env, timeout=3600), args.warmup)
            except RuntimeError as err:
                print(f"  {trainer} [{mode}] FAILED: {str(err)[-2000:]}", file=sys.stderr, flush=True)
                row = dict(trainer=trainer, mode=mode, median_s=float("nan"), error=str(err).splitlines()[0][:200])
            rows.append({**row, "load_before": load, "load_after": os.getloadavg()[0]})
            print(f"  {trainer} [{mode}]: median {row['median_s']:.3f} s/step (wall {time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    for row in rows:
        ref = next((r for r in rows if r["trainer"] == "trl" and r["mode"] == row["mode"]), None)
        if ref and ref["median_s"] == ref["median_s"]:
            row["vs_trl"] = row["median_s"] / ref["median_s"]
    payload = dict(benchmark="step_vs_trl", command="python benchmarks/step_vs_trl.py", machine=C.machine(),
                   setup=dict(prompts=PROMPTS, rollouts=1, max_new_tokens=args.max_new_tokens, steps=args.steps,
                              warmup=args.warmup, family=args.family, scale=args.scale), rows=rows)
    C.save("step_vs_trl" + ("" if args.scale == "tiny" else f"_{args.scale}") + ("_vllm" if "_vllm" in args.trainers else ""), payload)
    print(f"machine: {payload['machine']}\nsetup: {payload['setup']}")
    print(C.table(rows, [("mode", "mode"), ("trainer", "trainer"), ("median_s", "s/step (median)"), ("vs_trl", "vs TRL"),
                         ("response_length", "resp. tokens"), ("time/rollout", "rollout s"), ("time/score", "score s"),
                         ("time/update", "update s"), ("time/weight_sync", "weight sync s"), ("padded", "padded"),
                         ("load_before", "load"), ("load_after", "load after")]))


if __name__ == "__main__":
    main()
