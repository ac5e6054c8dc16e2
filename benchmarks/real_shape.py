"""A DOPD step at the real 2B shape: peak memory and time by phase, bytes per parameter.

    python benchmarks/real_shape.py                          # Qwen3-VL-2B shape, LoRA student, 3 steps
    python benchmarks/real_shape.py --variants lora full_offload --layers 4 --vision-depth 4   # shorter models

Builds a random-weight Qwen3-VL pair with Qwen3-VL-2B's widths (text hidden 2,048, 28 layers,
16 heads / 8 KV heads, MLP 6,144; vision hidden 1,024, 24 blocks, MLP 4,096; a tied head of
151,936 rows), teacher and student alike, stored in bfloat16 as the published checkpoint is
(`dopd_vlm.lab.tiny.make_tiny_pair(dtype=bfloat16)`, cached in .cache/bench/). The tokenizer is the
tiny one (500 tokens), so only the first 500 rows of the head are ever sampled, but every LM-head
product covers all 151,936 rows, as it does for the real model. `--layers` / `--vision-depth`
shorten both models (the widths stay).

Each variant runs `dopd_vlm.train.train` in a fresh child process, on one process, DOPD with
bf16 weights, gradient checkpointing and DeepSpeed ZeRO-3 (ds_configs/zero3.json), 1 prompt x 2
rollouts x `--max-new-tokens` per step, synthetic scenes with one image, a 2-sample evaluation at
the start and the end:

    lora          model.lora (rank 16, attention and MLP projections); privileged_target initial
                  = the student with its adapters off (no second copy)
    full_offload  every student weight trained, ds_configs/zero3_offload.json (optimizer state and
                  parameters on CPU, DeepSpeedCPUAdam); privileged_target initial = a frozen copy

Reported per variant: the trainer's own phase metrics (`time/<phase>`, `memory/<phase>`: wall
seconds and the process's peak resident set during the phase; set-up, evaluation and export
from `TrainResult.phases`, the step's phases as the median over steps 2.. of metrics.jsonl),
the whole run's wall time and peak RSS, and the weights' bytes per parameter (one model loaded
alone, resident-set growth / parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {
    "lora": ["model.lora.enabled=true", "train.deepspeed=ds_configs/zero3.json"],
    "full_offload": ["train.deepspeed=ds_configs/zero3_offload.json"],
}
# Qwen3-VL-2B-Instruct's widths (its config.json); depth from the command line.
TEXT = dict(hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=6144)
VISION = dict(vision_hidden_size=1024, vision_num_heads=16, vision_intermediate_size=4096,
              vision_num_position_embeddings=2304)
VOCAB_ROWS = 151_936


def build_pair(layers: int, vision_depth: int) -> dict[str, Path]:
    import torch

    from dopd_vlm.lab.tiny import TinySize, make_tiny_pair

    size = TinySize(**TEXT, **VISION, num_layers=layers, vision_depth=vision_depth, vocab_multiple=VOCAB_ROWS,
                    tie_word_embeddings=True)
    root = C.ROOT / ".cache" / "bench" / f"qwen3vl_2b_shape_{layers}x{vision_depth}"
    return make_tiny_pair("qwen3_vl", root, seed=0, teacher=size, student=size, dtype=torch.bfloat16)


def weight_bytes_per_parameter(path: Path) -> tuple[int, float]:
    """(parameters, resident bytes per parameter) of one model loaded alone in bf16. transformers
    maps the safetensors files and reads a page when a weight is first used: every weight is
    read once here, so the count holds them all (as a forward pass or DeepSpeed's partitioning would)."""
    import torch

    from dopd_vlm.models import load_model

    before = C.current_rss()
    model = load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    grown = C.current_rss() - before
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return parameters, grown / parameters


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import dopd_vlm  # noqa: F401
    from dopd_vlm.config import load_config
    from dopd_vlm.train import train

    paths = {role: Path(args.pair) / role for role in ("teacher", "student")}
    if args.variant == "weights":
        parameters, bytes_per_parameter = weight_bytes_per_parameter(paths["student"])
        C.emit(dict(variant="weights", parameters=parameters, weight_bytes_per_parameter=bytes_per_parameter))
        return
    out = Path(args.out)
    cfg = load_config(None, [
        f"model.teacher={paths['teacher']}", f"model.student={paths['student']}", "model.dtype=bfloat16",
        "model.gradient_checkpointing=true", "data.recipe=synthetic_scenes", "data.eval_splits=[test]",
        "data.max_eval_samples=2", "method.name=dopd", "method.privileged_target=initial", "rollout.num_rollouts=2",
        f"rollout.max_new_tokens={args.max_new_tokens}", "optim.lr=1e-5", f"train.steps={args.steps}",
        "train.prompts_per_step=1", "train.prompts_per_micro_batch=1", f"train.output_dir={out}",
        *VARIANTS[args.variant],
    ])
    device, _ = C.device_and_dtype()
    resident_before = C.current_rss()  # imports only: the phases' memory/<phase> are absolute
    with C.PeakMemory(device) as mem:
        result = train(cfg)
    rows = metrics_rows(out)
    later = rows[2:] or rows[1:]  # step 1 pays for first-call set-up (DeepSpeed's prefetch trace)
    step_phases = {key: statistics.median(r[key] for r in later) for key in later[0]
                   if key.startswith(("time/", "memory/")) or key == "step_time"}
    C.emit(dict(variant=args.variant, resident_before_gib=C.gib(resident_before), peak_gib=C.gib(mem.peak),
                seconds=mem.seconds, run_phases=getattr(result, "phases", None), step_phases=step_phases, steps=args.steps,
                response_tokens=statistics.median(r["response_tokens"] for r in later),
                load_average_1min=os.getloadavg()[0]))


def metrics_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_child(cmd: list[str], env: dict, limit_gib: float, timeout: float) -> dict:
    """`C.run_json`, with the child stopped once its resident set passes `limit_gib` (the machine's
    other work must not meet the kernel's OOM killer); the stop is raised as RuntimeError."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env}, cwd=C.ROOT)
    started, peak = time.perf_counter(), 0.0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peak = max(peak, next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")) / 2**20)
        except (OSError, StopIteration):
            pass
        if peak > limit_gib or time.perf_counter() - started > timeout:
            child.kill()
            child.communicate()
            raise RuntimeError(f"stopped at a resident set of {peak:.1f} GiB (limit {limit_gib} GiB) "
                               f"after {time.perf_counter() - started:.0f} s")
        time.sleep(0.5)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"exit {child.returncode}: {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run(args) -> dict:
    pair = Path(args.pair) if args.pair else build_pair(args.layers, args.vision_depth)["student"].parent
    runs = [("weights", None), *((variant, None) for variant in args.variants)]
    if args.baseline_code:  # the same variants on another checkout's code, in this same invocation
        runs += [(variant, args.baseline_code) for variant in args.variants]
    rows = []
    for variant, code in runs:
        out = Path(tempfile.mkdtemp(prefix=f"dopd_real_shape_{variant}_"))
        cmd = [C.python(), __file__, "--child", "1", "--variant", variant, "--pair", str(pair), "--out", str(out),
               "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if code:
            env["PYTHONPATH"] = str(Path(code).resolve())
        started = time.perf_counter()
        try:
            row = run_child(cmd, env, args.memory_limit_gib, args.timeout)
        except RuntimeError as err:  # the measured reason, with the phases the run logged before it stopped
            row = dict(variant=variant, failed=str(err)[-2000:], logged_rows=metrics_rows(out))
        shutil.rmtree(out, ignore_errors=True)
        row.update(code=code or "this checkout", command_seconds=time.perf_counter() - started)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(machine=C.machine(), pair=str(pair), rows=rows, args=vars(args))


def main() -> None:
    p = C.parser_with_child(__doc__)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=["lora"], choices=tuple(VARIANTS))
    p.add_argument("--layers", type=int, default=28, help="text decoder layers (Qwen3-VL-2B: 28)")
    p.add_argument("--vision-depth", type=int, default=24, help="vision blocks (Qwen3-VL-2B: 24)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--memory-limit-gib", type=float, default=18.0,
                   help="stop a variant whose resident set passes this (default: %(default)s)")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--pair", help="an existing pair folder (teacher/, student/) instead of building one")
    p.add_argument("--baseline-code", metavar="DIR",
                   help="also run the variants on the dopd_vlm of another checkout (e.g. the commit before a fix)")
    p.add_argument("--name", default="real_shape", help="results file benchmarks/results/NAME.json")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print("saved", C.save(args.name, run(args)))


if __name__ == "__main__":
    main()
