"""Learning benchmark: DOPD vs vanilla OPD, OPSD and SFT on synthetic scenes, over several seeds.

    python benchmarks/learning.py                                  # 3 seeds, the demo's settings
    python benchmarks/learning.py --seeds 0 1 2 3 4 --steps 300 --update-md
    python benchmarks/learning.py --methods dopd vanilla_opd vanilla_opd_sampled -- optim.lr=5e-4

Step 3 of `dopd-vlm demo` (dopd_vlm/lab/demo.py) repeated per seed: the same warmed-up teacher and
student (shipped / cached by the demo), then one real `dopd-vlm train --config configs/demo.yaml`
run per method and seed. The seed changes the trainer's data order and rollouts; the starting
checkpoints stay fixed. Reports, per method, mean ± sample standard deviation over seeds of the
final greedy accuracy on test and ood, and of the share of the teacher-student gap recovered.
`--update-md` rewrites the section "Learning: DOPD vs baselines on synthetic scenes" of
BENCHMARKS.md (and nothing else) from every stored setting; raw per-seed numbers go to
benchmarks/results/learning_<setting>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, RESULTS, machine, mean_std, write_section  # noqa: E402

SECTION = "Learning: DOPD vs baselines on synthetic scenes"
EXTRA_METHODS = {  # variants that are not demo defaults but worth comparing here
    "vanilla_opd_sampled": ["method.name=vanilla_opd", "method.opd_divergence=sampled"],
    "vanilla_opd_unbiased": ["method.name=vanilla_opd", "method.opd_divergence=topk", "method.topk_variant=unbiased"],
    "dopd_unbiased": ["method.name=dopd", "method.topk_variant=unbiased"],
    "vanilla_opd_plain_teacher": ["method.name=vanilla_opd", "method.teacher_privileged=false"],
    "gkd": ["method.name=gkd"],
    "dopd_frozen_target": ["method.name=dopd", "method.privileged_target=initial"],
    "opsd_frozen_target": ["method.name=opsd", "method.privileged_target=initial"],
}


def main(argv=None) -> int:
    from dopd_vlm.lab import demo

    demo.DEMO_METHODS.update({k: v for k, v in EXTRA_METHODS.items() if k not in demo.DEMO_METHODS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=demo.configured_steps(demo.SCENES))
    parser.add_argument("--methods", nargs="+", default=list(demo.DEFAULT_METHODS), choices=sorted(demo.DEMO_METHODS))
    parser.add_argument("--jobs", type=int, default=0, help="runs side by side (default: one per core)")
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("--cache", default=str(demo.DemoOptions.cache))
    parser.add_argument("--student-warmup-steps", type=int, default=None,
                        help="student warm-up length (default: the demo's); a different one is built and cached")
    parser.add_argument("--student-privileged-prob", type=float, default=None,
                        help="how often the student's warm-up shows p (default: the demo's); 1.0 = p only")
    parser.add_argument("--setting", default="demo",
                        help="name of this setting; results go to benchmarks/results/learning_<setting>.json")
    parser.add_argument("--title", default="", help="one line describing the setting, shown above its table")
    parser.add_argument("--update-md", action="store_true",
                        help="rewrite this benchmark's section of BENCHMARKS.md from every learning_*.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--md-only", action="store_true",
                        help="only rewrite the BENCHMARKS.md section from the stored results; run nothing")
    args = parser.parse_args(argv)
    if args.md_only:
        update_markdown(ROOT / "BENCHMARKS.md")
        return 0

    base = demo.DemoOptions(out=Path(args.out), testbed=demo.SCENES, cache=Path(args.cache), steps=args.steps, methods=tuple(args.methods),
                            jobs=args.jobs, overrides=tuple(args.overrides),
                            student_warmup_steps=args.student_warmup_steps,
                            student_privileged_prob=args.student_privileged_prob)
    started = time.perf_counter()
    models = demo.prepare_models(base)
    per_seed = {}
    for seed in args.seeds:
        print(f"seed {seed}")
        options = demo.DemoOptions(**{**base.__dict__, "seed": seed, "out": Path(args.out) / args.setting / f"seed{seed}"})
        results = demo.run_methods(models, options)
        per_seed[seed] = demo.summarize_runs(results)
        print(demo.format_table(per_seed[seed]))
    minutes = (time.perf_counter() - started) / 60

    aggregate = aggregate_rows(per_seed)
    command = "python benchmarks/learning.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = format_aggregate(aggregate, len(args.seeds))
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "setting": args.setting, "title": args.title, "table": table,
        "command": command.strip(), "machine": machine(), "minutes": round(minutes, 1), "seeds": args.seeds,
        "steps": args.steps, "overrides": args.overrides, "models": {k: str(v) for k, v in models.items()},
        "aggregate": aggregate, "per_seed": per_seed,
    }
    (RESULTS / f"learning_{args.setting}.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.update_md:
        update_markdown(ROOT / "BENCHMARKS.md")
    return 0


def aggregate_rows(per_seed: dict) -> list[dict]:
    """name -> mean/std of accuracy and gap recovered over seeds, in table order."""
    names = [row["name"] for row in next(iter(per_seed.values()))["rows"]]
    out = []
    for name in names:
        rows = [next(r for r in s["rows"] if r["name"] == name) for s in per_seed.values()]
        entry = {"name": name}
        for split in ("test", "ood"):
            entry[f"{split}_acc"] = mean_std([r["accuracy"][split] for r in rows])
            if "gap" in rows[0]:
                entry[f"{split}_gap"] = mean_std([r["gap"][split] for r in rows])
        if "wall_seconds" in rows[0]:
            entry["wall_seconds"] = mean_std([r["wall_seconds"] for r in rows])
        out.append(entry)
    return out


def _pm(value, pattern: str) -> str:
    if value is None or math.isnan(value[0]):
        return "-"
    return f"{pattern.format(value[0])} ± {pattern.format(value[1])}"


def format_aggregate(aggregate: list[dict], seeds: int) -> str:
    lines = [
        f"| model (mean ± std over {seeds} seeds) | test acc | ood acc | test gap recovered | ood gap recovered | wall time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in aggregate:
        gap = lambda s: _pm(e.get(f"{s}_gap"), "{:.0%}").replace("%", "") + (" %" if e.get(f"{s}_gap") else "")  # noqa: E731
        lines.append(
            f"| {e['name']} | {_pm(e['test_acc'], '{:.3f}')} | {_pm(e['ood_acc'], '{:.3f}')} | {gap('test')} | "
            f"{gap('ood')} | {_pm(e.get('wall_seconds'), '{:.0f}')}{' s' if e.get('wall_seconds') else ''} |"
        )
    return "\n".join(lines)


def update_markdown(path: Path) -> None:
    """Rewrite (or append) only this benchmark's section, from every stored setting; other
    sections of the file are left untouched."""
    body = []
    intro = ROOT / "benchmarks" / "learning_intro.md"
    if intro.is_file():
        body += [intro.read_text().strip(), ""]
    for file in sorted(RESULTS.glob("learning_*.json"), key=lambda f: (f.stem != "learning_demo", f.stem)):
        record = json.loads(file.read_text())
        body += [
            f"### Setting `{record['setting']}`" + (f": {record['title']}" if record.get("title") else ""),
            "",
            f"`{record['command']}` ({record['minutes']} min on {record['machine']}); seeds "
            f"{', '.join(map(str, record['seeds']))}, {record['steps']} steps per run.",
            "",
            record["table"],
            "",
        ]
    findings = ROOT / "benchmarks" / "learning_findings.md"
    if findings.is_file():
        body += [findings.read_text().strip(), ""]
    write_section(path, SECTION, body)


if __name__ == "__main__":
    sys.exit(main())
