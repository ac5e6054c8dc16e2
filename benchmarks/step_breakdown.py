"""Benchmark 4: where the time of a DOPD step goes, and response tokens per second.

    python benchmarks/step_breakdown.py                   # single process and ZeRO-3 x 2 ranks
    python benchmarks/step_breakdown.py --modes single --method vanilla_opd

Runs dopd_vlm's real training loop (`train()`, the tiny Qwen2-VL pair, the 8 benchmark prompts,
4 rollouts each, 16 new tokens) and reads the trainer's own phase timers (`time/<phase>` in
metrics.jsonl; on CUDA each phase boundary synchronises the device):

    rollout          student generate (weights gathered once under ZeRO-3) + building the views
    score/privileged privileged-student backbone pass (no grad)
    score/teacher    teacher backbone pass (no grad)
    score/router     router log-probs (LM head on response positions, chunked)
    student_pass     student backbone pass with grad
    loss             LM head + routed loss (forward, and the gradient w.r.t. the logits)
    backward         engine.backward (through the student)
    optimizer        engine.step
    other            thresholds, regimes, metrics, Python glue (step time minus the above)

Times are medians over the steps after `--warmup`; tokens/s = response tokens of all ranks / step
time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPE = str(C.ROOT / "benchmarks" / "recipes" / "bench_scenes.yaml")
PHASES = ("rollout", "score/privileged", "score/teacher", "score/router", "student_pass", "loss", "backward",
          "optimizer")


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import dopd_vlm  # noqa: F401
    from dopd_vlm.config import load_config
    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, make_tiny_pair
    from dopd_vlm.train import train

    paths = make_tiny_pair("qwen2_vl", C.ROOT / ".cache" / "bench" / "breakdown", seed=0,
                           teacher=TEACHER_SIZE, student=STUDENT_SIZE)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(tempfile.gettempdir()) / f"dopd_breakdown_{os.environ.get('MASTER_PORT', os.getpid())}"
    ds = "ds_configs/zero3.json" if args.zero3 else "benchmarks/ds_configs/stage0.json"
    cfg = load_config(None, [
        f"model.teacher={paths['teacher']}", f"model.student={paths['student']}",
        f"data.recipe={RECIPE}", "data.eval_splits=[]", f"method.name={args.method}",
        "rollout.num_rollouts=4", f"rollout.max_new_tokens={args.max_new_tokens}",
        "optim.lr=1e-5", f"train.steps={args.steps}", "train.prompts_per_step=8",
        f"train.prompts_per_micro_batch={8 // world}", f"train.deepspeed={ds}", f"train.output_dir={out}",
        "train.eval_every=0", "train.save_every=0",
    ])
    train(cfg, overwrite=True)  # a scratch folder named by the port: a rerun replaces it
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after step 0
        steps = [{"total": r["step_time"], "response_tokens": r["response_tokens"],  # all ranks
                  **{phase: r.get(f"time/{phase}", 0.0) for phase in PHASES}} for r in rows]
        C.emit(dict(mode="zero3x2" if args.zero3 else "single", method=args.method, world=world, steps=steps))


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:] or result["steps"]
    row = dict(mode=result["mode"], method=result["method"])
    total = statistics.median(s["total"] for s in steps)
    accounted = 0.0
    for phase in PHASES:
        value = statistics.median(s.get(phase, 0.0) for s in steps)
        row[phase] = value
        accounted += value
    row["other"] = max(total - accounted, 0.0)
    row["step"] = total
    tokens = statistics.median(s["response_tokens"] for s in steps)
    row["tokens_per_s"] = tokens / total
    row["response_tokens"] = tokens
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="single,zero3")
    p.add_argument("--method", default="dopd")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero3", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from dopd_vlm.distributed import exit_process

        child(args)
        exit_process(0)  # a torchrun rank: see exit_process
    common = ["--child", "--method", args.method, "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for mode in args.modes.split(","):
        if mode == "single":
            cmd = [C.python(), __file__, *common]
        else:
            cmd = [C.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *common, "--zero3"]
        rows.append(summarize(C.run_json(cmd, env=env, timeout=1200), args.warmup))
    payload = dict(benchmark="step_breakdown", command="python benchmarks/step_breakdown.py", machine=C.machine(),
                   setup=dict(prompts=8, rollouts=4, max_new_tokens=args.max_new_tokens, steps=args.steps, warmup=args.warmup),
                   rows=rows)
    C.save(f"step_breakdown_{args.method}", payload)
    print(f"machine: {payload['machine']}\nsetup: {payload['setup']}")
    columns = [("mode", "mode")] + [(p_, p_) for p_ in PHASES] + [("other", "other"), ("step", "step s"),
                                                                  ("tokens_per_s", "tokens/s")]
    print(C.table(rows, columns))
    for row in rows:  # shares, for the prose
        print(row["mode"], ", ".join(f"{k} {100 * row[k] / row['step']:.0f}%" for k in (*PHASES, "other")))


if __name__ == "__main__":
    main()
