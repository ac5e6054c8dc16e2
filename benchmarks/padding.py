"""Benchmark 9: how much of a step's compute is padding, under long-tailed response lengths.

    OMP_NUM_THREADS=1 python benchmarks/padding.py                 # fixed vs budgets vs padding-free
    OMP_NUM_THREADS=1 python benchmarks/padding.py --steps 2 --prompts 32 --cap 512 --variants fixed,budget4096

The step of the paper's shape (64 prompts x 4 rollouts, responses up to --cap tokens, 4 prompts per
fixed micro-batch), DOPD on the tiny Qwen2-VL pair, one process, each grouping in its own child
process: the real `train.setup` and `step.dopd_step`, only the rollout scripted (responses of
prescribed lengths from a `rollout_engine` object, so every variant scores and trains on the same
tokens and the lengths follow the distribution below, which a random tiny student does not).

Response lengths: log-normal with median cap/8 and sigma 1.2, clipped at the cap (about 4 % of
responses cut there), drawn per sequence from its seed. That is the shape on-policy sampling at
temperature 1 has (most responses short, a long right tail, a few percent truncated at the cap;
e.g. the long-tail characterisation in DARTS, arXiv 2605.30859), a model of it, not a measurement
of one model. Prompts: images of mixed sizes (none, 112x112, 224x224, 448x336, two images), a
quarter of the rows with an empty privileged text, the rest with 1-8 box lines.

Reported per variant (medians over the steps): the padded share of the positions each pass
computed (`perf/padding_share/*`: the student pass, the privileged-student and teacher passes),
the share of the three together, and what one HF `generate` call per step would pad (vLLM pads
nothing); the micro-batches per step; the update's peak memory above the step's start (the student
pass, loss and backward; resident set, large blocks returned to the system at once); phase times.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

def variant_overrides(name: str) -> list[str]:
    """`fixed`, `budget<N>` (train.micro_batch_tokens=N: positions per pass, rows x the longest) or
    `packed<N>` (the same with train.padding_free: the rows' lengths summed)."""
    if name == "fixed":
        return []
    budget = int(name.removeprefix("budget").removeprefix("packed"))
    return [f"train.micro_batch_tokens={budget}"] + (["train.padding_free=true"] if name.startswith("packed") else [])


IMAGE_SIZES = [(), ((112, 112),), ((224, 224),), ((448, 336),), ((112, 112), (224, 168))]
SCORED = ("student", "privileged", "teacher")


def response_length(seed: int, cap: int) -> int:
    """One response's length: log-normal, median cap/8, sigma 1.2, clipped to [1, cap]."""
    return max(1, min(cap, round(random.Random(seed).lognormvariate(0.0, 1.2) * cap / 8)))


class ScriptedRollout:
    """A `Models.rollout_engine`: responses of `response_length` tokens (random text tokens, EOS last
    unless cut at the cap), row b's from its seed; nothing to sync."""

    def __init__(self, tokenizer, eos_id: int, cap: int):
        special = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
        self.tokens = [i for i in range(len(tokenizer)) if i not in special]
        self.eos_id, self.cap, self.pad_id = eos_id, cap, tokenizer.pad_token_id

    def sample(self, samples, row_seeds):
        import torch

        from dopd_vlm.vllm_rollout import RolloutSample

        lengths = [response_length(seed, self.cap) for seed in row_seeds]
        ids = torch.full((len(samples), max(lengths)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seed, length) in enumerate(zip(row_seeds, lengths)):
            rng = random.Random(seed + 1)
            ids[row, :length] = torch.tensor([rng.choice(self.tokens) for _ in range(length)])
            if length < self.cap:
                ids[row, length - 1] = self.eos_id
            mask[row, :length] = True
        return RolloutSample(ids, mask, None)

    def sync_weights(self, engine) -> None:
        pass


def write_recipe(folder: Path, rows: int) -> Path:
    """A local-files recipe: images of mixed sizes, a quarter of the rows without p."""
    from PIL import Image

    rng = random.Random(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        sizes = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        images = []
        for k, (width, height) in enumerate(sizes):
            path = folder / "img" / f"{i}_{k}.png"
            Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(path)
            images.append(f"img/{path.name}")
        boxes = [f"{rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'square'])} "
                 f"[{rng.randrange(90)}, {rng.randrange(90)}, {rng.randrange(90, 200)}, {rng.randrange(90, 200)}]"
                 for _ in range(rng.randint(1, 8))]
        question = "How many shapes are there? Count them carefully." if images else "Name a colour and explain why."
        lines.append(json.dumps({"id": f"q{i}", "question": question + " Details." * rng.randint(0, 6), "answer": "2",
                                 "privileged": "" if i % 4 == 3 else "\n".join(boxes), "images": images}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text("kind: local_files\nfiles: {train: train.jsonl}\nallow_empty_privileged: true\n"
                      "images_per_row: [0, 2]\n")
    return recipe


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import dopd_vlm  # noqa: F401
    from dopd_vlm.config import load_config
    from dopd_vlm.distributed import rank, world_size
    from dopd_vlm.rollout import eos_token_ids
    from dopd_vlm.step import dopd_step, step_batches
    from dopd_vlm.lab.tiny import make_tiny_pair
    from dopd_vlm.train import setup

    paths = make_tiny_pair("qwen2_vl", C.ROOT / ".cache" / "bench" / "padding", seed=0)
    recipe = write_recipe(Path(tempfile.mkdtemp(prefix="padding_bench_")), args.prompts)
    overrides = variant_overrides(args.child)
    cfg = load_config(None, [
        f"model.teacher={paths['teacher']}", f"model.student={paths['student']}", f"data.recipe={recipe}",
        "data.eval_splits=[]", "method.name=dopd", "rollout.num_rollouts=4", f"rollout.max_new_tokens={args.cap}",
        f"train.prompts_per_step={args.prompts}", "train.prompts_per_micro_batch=4",
        "train.deepspeed=benchmarks/ds_configs/stage0.json", f"train.steps={args.steps}",
        f"train.output_dir={tempfile.mkdtemp(prefix='padding_run_')}", "optim.lr=1e-5", *overrides,
    ])
    run = setup(cfg)
    tokenizer = run.models.collator.tokenizer
    run.models.rollout_engine = ScriptedRollout(tokenizer, eos_token_ids(run.models.student_module, tokenizer)[0], args.cap)
    steps = []
    for step in range(args.steps):
        micro_batches, seeds = step_batches(run.data, cfg, step, rank(), world_size())
        started = time.perf_counter()
        metrics = dopd_step(run.models, micro_batches, cfg, seeds)
        steps.append({**metrics, "step_time": time.perf_counter() - started})
    C.emit(dict(variant=args.child, steps=steps, generate_padding=generate_padding(run, cfg, args)))


def generate_padding(run, cfg, args) -> float:
    """The padded share one HF `generate` call per step would compute for the same prompts and
    response lengths: every row runs to the longest prompt plus the longest response."""
    from dopd_vlm.distributed import rank, world_size
    from dopd_vlm.step import step_batches
    from dopd_vlm.vllm_rollout import row_seed

    computed = real = 0
    collator = run.models.collator
    for step in range(args.steps):
        micro_batches, seeds = step_batches(run.data, cfg, step, rank(), world_size())
        prompts = [s for batch in micro_batches for s in batch for _ in range(4)]
        lengths = [response_length(row_seed(seed, row), args.cap) for seed in seeds for row in range(16)]
        prompt = collator.prompt_lengths([(s.id, s.question, None, [i.size for i in s.images]) for s in prompts])
        computed += len(prompts) * (max(prompt) + max(lengths))
        real += sum(prompt) + sum(lengths)
    return (computed - real) / computed


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:] or result["steps"]

    def median(key):
        return statistics.median(s.get(key, 0.0) for s in steps)

    row = dict(variant=result["variant"], micro_batches=median("perf/micro_batches"),
               response_length=median("response_length"), at_cap=median("response_at_cap"),
               generate_padding=result["generate_padding"])
    for name in SCORED:
        row[f"padding/{name}"] = median(f"perf/padding_share/{name}")
    # the three scoring / update passes together, weighted by the positions each computed
    row["padding/passes"] = statistics.median(passes_share(s) for s in steps)
    row["update_peak_mib"] = statistics.median(
        1024 * (max(s[f"memory/{p}"] for p in ("student_pass", "loss", "backward")) - s["memory/rollout"]) for s in steps)
    for phase in ("rollout", "score", "update"):
        row[f"time/{phase}"] = statistics.median(C.phase_time(s, phase) for s in steps)
    row["step_s"] = statistics.median(s["step_time"] for s in steps)
    return row


def passes_share(step: dict) -> float:
    """Padded share of the positions the student, privileged-student and teacher passes computed
    together (each pass's padded positions from its share and its positions)."""
    computed = sum(step.get(f"perf/positions/{name}", 0.0) for name in SCORED)
    padded = sum(step.get(f"perf/positions/{name}", 0.0) * step.get(f"perf/padding_share/{name}", 0.0)
                 for name in SCORED)
    return padded / computed if computed else 0.0


def main() -> None:
    p = C.parser_with_child(__doc__)
    p.add_argument("--variants", default="fixed,budget8192,budget16384,packed8192",
                   help="fixed, budget<N> (train.micro_batch_tokens=N), packed<N> (and train.padding_free)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--cap", type=int, default=1024)
    args = p.parse_args()
    if args.child:
        from dopd_vlm.distributed import exit_process

        child(args)
        exit_process(0)
    rows = []
    common = ["--steps", str(args.steps), "--prompts", str(args.prompts), "--cap", str(args.cap)]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    for variant in args.variants.split(","):
        load = os.getloadavg()[0]
        result = C.run_json([C.python(), __file__, "--child", variant, *common], env=env, timeout=3600)
        rows.append({**summarize(result, args.warmup), "load_before": load, "load_after": os.getloadavg()[0]})
        print(f"  {variant}: {rows[-1]}", file=sys.stderr, flush=True)
    payload = dict(benchmark="padding", command="python benchmarks/padding.py", machine=C.machine(),
                   setup=dict(prompts=args.prompts, rollouts=4, prompts_per_micro_batch=4, cap=args.cap,
                              steps=args.steps, warmup=args.warmup,
                              lengths="lognormal(median cap/8, sigma 1.2) clipped at the cap"), rows=rows)
    C.save("padding", payload)
    print(f"machine: {payload['machine']}\nsetup: {payload['setup']}")
    print(C.table(rows, [("variant", "variant"), ("micro_batches", "micro-batches"), ("padding/passes", "padded (3 passes)"),
                         ("padding/student", "student"), ("padding/privileged", "privileged"), ("padding/teacher", "teacher"),
                         ("generate_padding", "HF generate"), ("update_peak_mib", "update peak MiB"),
                         ("time/rollout", "rollout s"), ("time/score", "score s"), ("time/update", "update s"),
                         ("step_s", "step s"), ("load_before", "load"), ("load_after", "load after")]))


if __name__ == "__main__":
    main()
