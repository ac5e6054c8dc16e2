"""Learning benchmark on the arithmetic-chains testbed: DOPD (live and initial privileged target),
vanilla OPD, SFT and the token ablation of vanilla OPD (the paper's Fig. 4), over several seeds.

    python benchmarks/testbed_learning.py                              # warm-ups built or cached
    python benchmarks/testbed_learning.py --seeds 0 1 2 --steps 100 --teacher T --student S
    python benchmarks/testbed_learning.py --update-md                  # BENCHMARKS.md from results

The testbed (data_recipes/arithmetic_chains.yaml, configs/testbed_arithmetic.yaml): mod-10
chains written in steps of two operations, p = the first step's value (never the final answer),
tiny Qwen3 teacher and student of the same size that differ only by their supervised warm-up on
the reference chains (`dopd_vlm.warmup`): the teacher for TEACHER_WARMUP.steps, the student for
STUDENT_WARMUP.steps, both shown p half of the time. `--teacher/--student` use given checkpoints
instead (recorded in the results). Every method sees the same checkpoints, data and p; the seed
changes the trainer's data order and rollouts.

Measured once (greedy, so the same for every run): the preconditions -- student accuracy plain
and with p, teacher plain and with p, the student's greedy response length. Per run: final test
accuracy, the gap recovered (final - student) / (teacher - student) against the plain-view
teacher, the run's step-0 student accuracies (a check that every run starts from the same
student), HT share and entropy (mean over steps) and rollout response length. Raw per-run rows go
to benchmarks/results/testbed_arithmetic_<setting>.json after every run, so an interrupted
benchmark keeps what it measured; `--update-md` rewrites the section SECTION of BENCHMARKS.md
(and nothing else) from every stored setting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, machine, write_section  # noqa: E402

SECTION = "Learning on the arithmetic testbed"
CONFIG = ROOT / "configs" / "testbed_arithmetic.yaml"
RECIPE = "arithmetic_chains"
FAMILY = "qwen3"
TEMPLATE = "Hint: {privileged}\n{question}"
METHODS = {
    "dopd_live": ["method.name=dopd", "method.privileged_target=live"],
    "dopd_initial": ["method.name=dopd", "method.privileged_target=initial"],
    "vanilla_opd": ["method.name=vanilla_opd"],
    "sft": ["method.name=sft"],
    "opd_drop_top20": ["method.name=vanilla_opd", "method.token_drop=top", "method.token_drop_fraction=0.2"],
    "opd_drop_random20": ["method.name=vanilla_opd", "method.token_drop=random", "method.token_drop_fraction=0.2"],
    "opd_drop_bottom20": ["method.name=vanilla_opd", "method.token_drop=bottom", "method.token_drop_fraction=0.2"],
    "opsd": ["method.name=opsd"],
}
DEFAULT_METHODS = [name for name in METHODS if name != "opsd"]


def testbed_sizes():
    from dopd_vlm.tiny import TinySize

    # head_dim 32 (64 / 2 heads), the size vLLM's CPU backend accepts; one size for both models:
    # the capability gap comes from the warm-ups alone.
    size = TinySize(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256)
    return size, size


def warmup_configs():
    from dopd_vlm.warmup import WarmupConfig

    common = dict(batch_size=64, lr=3e-3, privileged_prob=0.5, warmup_steps=50, min_lr_ratio=1.0, seed=0)
    return WarmupConfig(steps=3000, **common), WarmupConfig(steps=1250, **common)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# -- the warmed pair --------------------------------------------------------------------------


def prepare_pair(cache: Path) -> dict[str, Path]:
    """The warmed-up teacher and student, from `cache` if a previous call built the same spec."""
    import torch

    from dopd_vlm.tiny import make_tiny_pair

    teacher_size, student_size = testbed_sizes()
    teacher_cfg, student_cfg = warmup_configs()
    spec = {"recipe": RECIPE, "template": TEMPLATE, "teacher_size": asdict(teacher_size),
            "student_size": asdict(student_size), "teacher_warmup": asdict(teacher_cfg),
            "student_warmup": asdict(student_cfg), "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / key
    targets = {"teacher": folder / "teacher", "student": folder / "student"}
    base = make_tiny_pair(FAMILY, folder / "init", teacher=teacher_size, student=student_size)
    for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        if not (targets[role] / "manifest.json").is_file():
            print(f"warming up the {role}: {cfg.steps} steps of {cfg.batch_size} (cached in {targets[role]})", flush=True)
            warm_and_save(base[role], targets[role], cfg, spec)
    return targets


def warm_and_save(base: Path, target: Path, cfg, spec: dict) -> None:
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.data import load_recipe
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.warmup import warm_up

    processor = load_processor(base)
    model = load_model(base, dtype=torch.float32)
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)
    torch.set_num_threads(1)  # float reductions depend on the thread count
    started = time.perf_counter()
    losses = warm_up(model, collator, load_recipe(RECIPE, "train", family=FAMILY), cfg, progress=False)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    manifest = {"spec": spec, "warmup_seconds": round(time.perf_counter() - started), "final_loss": losses[-1]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)


def preconditions(pair: dict[str, Path], eval_samples: int) -> dict[str, float]:
    """Greedy test accuracy of both models plain and with p, and the student's response length."""
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import RolloutConfig
    from dopd_vlm.data import load_recipe
    from dopd_vlm.evaluate import evaluate_accuracy
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.rollout import sample_responses

    test = load_recipe(RECIPE, "test", family=FAMILY, limit=eval_samples or None)
    out: dict[str, float] = {}
    for role, path in pair.items():
        model = load_model(path, dtype=torch.float32).eval()
        collator = DualViewCollator(load_processor(path), privileged_template=TEMPLATE, max_privileged_tokens=0)
        for view, privileged in (("plain", False), ("with_p", True)):
            out[f"{role}/{view}"] = evaluate_accuracy(
                model, collator, test, max_new_tokens=40, batch_size=100, privileged=privileged,
                extractor=test.answer_extractor).accuracy
        if role == "student":
            _, mask = sample_responses(model, collator, list(test), RolloutConfig(num_rollouts=1, max_new_tokens=40),
                                       greedy=True)
            out["student/response_tokens"] = float(mask.sum(1).float().mean())
    out["reference_tokens"] = statistics.fmean(
        len(collator.tokenizer(s.reference)["input_ids"]) + 1 for s in test)
    return out


# -- runs ---------------------------------------------------------------------------------------


def run_one(method: str, seed: int, args, pair: dict[str, Path], recipe: Path, out: Path) -> dict:
    """One `dopd-vlm train` run; its summary from metrics.jsonl."""
    run_dir = out / f"seed{seed}" / method
    command = [
        sys.executable, "-m", "dopd_vlm", "train", "--config", str(CONFIG),
        f"model.teacher={pair['teacher']}", f"model.student={pair['student']}", f"data.recipe={recipe}",
        f"data.max_eval_samples={args.eval_samples}", f"train.steps={args.steps}", f"train.seed={seed}",
        f"train.output_dir={run_dir}", *METHODS[method], *args.overrides,
    ]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    row = {"method": method, "seed": seed, "rc": code, "seconds": round(time.perf_counter() - started),
           "command": " ".join(command[1:])}
    if code == 0:
        row.update(summarize_metrics([json.loads(line) for line in open(run_dir / "metrics.jsonl")]))
    return row


def summarize_metrics(rows: list[dict]) -> dict:
    """Final and step-0 accuracies, and step means of the routing and length diagnostics."""
    start = next(r for r in rows if r["step"] == 0)
    final = [r for r in rows if r["step"] > 0 and "student/test" in r][-1]
    steps = [r for r in rows if r["step"] > 0 and "loss" in r]
    summary = {"final_test": final["student/test"], "start_test": start["student/test"],
               "start_test_with_p": start.get("student_privileged/test"), "first_loss": steps[0]["loss"]}
    for key in ("share/HT", "share/HS", "entropy", "response_length", "kl_to_teacher"):
        values = [r[key] for r in steps if key in r]
        if values:
            summary[f"mean_{key}"] = statistics.fmean(values)
            summary[f"last20_{key}"] = statistics.fmean(values[-20:])
    return summary


def write_recipe(out: Path, train_rows: int) -> Path:
    """The built-in recipe with `train_rows` training rows (rows are a function of their index,
    so these are the first rows of the warm-ups' split)."""
    import yaml

    from dopd_vlm.data.recipes import RECIPES_DIR

    recipe = yaml.safe_load((RECIPES_DIR / f"{RECIPE}.yaml").read_text())
    recipe["splits"] = {**recipe["splits"], "train": train_rows}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- aggregation ---------------------------------------------------------------------------------


def aggregate(rows: list[dict], pre: dict[str, float]) -> dict[str, dict]:
    student, teacher = pre["student/plain"], pre["teacher/plain"]
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == method and r["rc"] == 0]
        if not done:
            continue
        finals = [r["final_test"] for r in done]
        gaps = [(f - student) / (teacher - student) for f in finals]
        out[method] = {"seeds": [r["seed"] for r in done], "final": mean_std(finals), "gap": mean_std(gaps)}
        for key in ("start_test", "start_test_with_p", "first_loss", "mean_share/HT", "mean_share/HS",
                    "mean_entropy", "last20_entropy", "mean_response_length", "last20_kl_to_teacher"):
            values = [r[key] for r in done if key in r]
            if values:
                out[method][key] = statistics.fmean(values)
    return out


def format_table(agg: dict[str, dict]) -> str:
    lines = ["| method | seeds | start (plain / with p) | final test acc. | gap recovered | HT share | HS share | "
             "entropy (mean / last 20) | KL to teacher (last 20) | rollout tokens | step-1 loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, a in agg.items():
        def pct(key):
            return f"{a[key]:.3f}" if key in a else "-"
        entropy = f"{a['mean_entropy']:.3f} / {a['last20_entropy']:.3f}" if "mean_entropy" in a else "-"
        start = f"{a['start_test']:.3f} / {a['start_test_with_p']:.3f}" if "start_test_with_p" in a else "-"
        lines.append(
            f"| {method} | {len(a['seeds'])} | {start} | {a['final'][0]:.3f} ± {a['final'][1]:.3f} | "
            f"{100 * a['gap'][0]:.0f} % ± {100 * a['gap'][1]:.0f} | {pct('mean_share/HT')} | {pct('mean_share/HS')} | "
            f"{entropy} | {pct('last20_kl_to_teacher')} | {a.get('mean_response_length', float('nan')):.1f} | "
            f"{pct('first_loss')} |"
        )
    return "\n".join(lines)


def format_preconditions(pre: dict[str, float]) -> str:
    return (f"student {pre['student/plain']:.3f} plain / {pre['student/with_p']:.3f} with p; "
            f"teacher {pre['teacher/plain']:.3f} plain / {pre['teacher/with_p']:.3f} with p; "
            f"student greedy response {pre['student/response_tokens']:.1f} tokens "
            f"(reference chains {pre['reference_tokens']:.1f} incl. EOS)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    parser.add_argument("--eval-samples", type=int, default=200, help="test samples per evaluation")
    parser.add_argument("--train-rows", type=int, default=20000, help="training rows the runs draw from")
    parser.add_argument("--teacher", default="", help="a warmed teacher instead of the built/cached one")
    parser.add_argument("--student", default="", help="a warmed student instead of the built/cached one")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "testbed_arithmetic"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "testbed_arithmetic"))
    parser.add_argument("--setting", default="default", help="name of this setting in the results")
    parser.add_argument("--update-md", action="store_true", help="only rewrite BENCHMARKS.md from stored results")
    parser.add_argument("--resummarize", action="store_true",
                        help="only re-read the setting's finished runs under --out into its results file")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    if args.update_md:
        update_markdown(ROOT / "BENCHMARKS.md")
        return 0
    if args.resummarize:
        resummarize(RESULTS / f"testbed_arithmetic_{args.setting}.json", Path(args.out) / args.setting)
        return 0
    if bool(args.teacher) != bool(args.student):
        parser.error("--teacher and --student go together")
    started = time.perf_counter()
    pair = ({"teacher": Path(args.teacher), "student": Path(args.student)} if args.teacher
            else prepare_pair(Path(args.cache)))
    out = Path(args.out) / args.setting
    out.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(out, args.train_rows)
    pre = preconditions(pair, args.eval_samples)
    print("preconditions:", format_preconditions(pre), flush=True)
    record = {"setting": args.setting, "command": " ".join(["python", *sys.argv]), "machine": machine(),
              "seeds": args.seeds, "steps": args.steps, "overrides": args.overrides,
              "models": {k: str(v) for k, v in pair.items()}, "preconditions": pre, "runs": []}
    result_file = RESULTS / f"testbed_arithmetic_{args.setting}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            row = run_one(method, seed, args, pair, recipe, out)
            record["runs"].append(row)
            record["minutes"] = round((time.perf_counter() - started) / 60, 1)
            record["aggregate"] = aggregate(record["runs"], pre)
            record["table"] = format_table(record["aggregate"])
            result_file.write_text(json.dumps(record, indent=2) + "\n")
            print(f"seed {seed} {method}: rc {row['rc']}, {row['seconds']} s, final {row.get('final_test')}", flush=True)
    print(record["table"])
    return 0


def resummarize(result_file: Path, out: Path) -> None:
    """Summaries of the stored runs again from their metrics.jsonl (after the summary grew)."""
    record = json.loads(result_file.read_text())
    for row in record["runs"]:
        if row["rc"] == 0:
            metrics = out / f"seed{row['seed']}" / row["method"] / "metrics.jsonl"
            row.update(summarize_metrics([json.loads(line) for line in open(metrics)]))
    record["aggregate"] = aggregate(record["runs"], record["preconditions"])
    record["table"] = format_table(record["aggregate"])
    result_file.write_text(json.dumps(record, indent=2) + "\n")


def update_markdown(path: Path) -> None:
    """Rewrite (or append) only this benchmark's section, from every stored setting."""
    body = []
    findings = ROOT / "benchmarks" / "testbed_learning_findings.md"
    for file in sorted(RESULTS.glob("testbed_arithmetic_*.json")):
        record = json.loads(file.read_text())
        body += [f"### Setting `{record['setting']}`", "",
                 f"`{record['command']}` ({record.get('minutes', '?')} min on {record['machine']}); seeds "
                 f"{', '.join(map(str, record['seeds']))}, {record['steps']} steps per run. Preconditions: "
                 f"{format_preconditions(record['preconditions'])}.", "",
                 format_table(aggregate(record["runs"], record["preconditions"])), ""]
    if findings.is_file():
        body += [findings.read_text().strip(), ""]
    write_section(path, SECTION, body)


if __name__ == "__main__":
    sys.exit(main())
