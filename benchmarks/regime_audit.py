"""Regime audit on the arithmetic testbed: what the DOPD router does with the student's mistakes.

    python benchmarks/regime_audit.py                                   # the shipped pair
    python benchmarks/regime_audit.py --student runs/.../dopd_live/final --name after_dopd_live

The student samples training-sized batches (16 test prompts x 2 rollouts, temperature 1, as in
configs/testbed_arithmetic.yaml), the three passes score them and the router routes each batch
(`explore.score_and_route`: the trainer's passes and `router.route`). Per regime it counts the
tokens, the *mistakes* among them (the teacher's most likely token given p differs from the sampled
one, while the teacher puts >= 0.5 on its choice: a token the teacher would correct) and, for
the regimes that distil from the privileged student (LL, HS), whether that target's most likely
token is the teacher's (a target that would correct the mistake too). The question: do the
student's mistakes go to the teacher (HT, LH) or to a privileged student that would not correct
them (HS)? Rows for several students (the initial one, and runs' exported finals) go to
benchmarks/results/regime_audit.json; `--update-md` writes the section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, machine, write_section  # noqa: E402

SECTION = "Regime audit on the arithmetic testbed"
CONFIG = ROOT / "configs" / "testbed_arithmetic.yaml"
RESULT_FILE = RESULTS / "regime_audit.json"
CONFIDENT = 0.5  # the teacher's probability on its own choice for a differing sampled token to count as a mistake


def audit_batch(routed) -> dict[str, dict[str, int]]:
    """Per regime: tokens, mistakes, and mistakes whose regime target would correct them."""
    import torch

    from dopd_vlm.router import REGIME_NAMES

    rows = range(routed.num_tokens)
    teacher_p, teacher_top = routed.top_alternatives("teacher", rows, 1)
    _, privileged_top = routed.top_alternatives("privileged_student", rows, 1)
    sampled = routed.tokens.token_ids.cpu()
    mistake = (teacher_top[:, 0] != sampled) & (teacher_p[:, 0] >= CONFIDENT)
    privileged_corrects = privileged_top[:, 0] == teacher_top[:, 0]
    regimes = routed.routing.regimes.cpu()
    out = {}
    for code, name in enumerate(REGIME_NAMES):
        here = regimes == code
        target_corrects = privileged_corrects if name in ("LL", "HS") else torch.ones_like(here)
        out[name] = {"tokens": int(here.sum()), "mistakes": int((here & mistake).sum()),
                     "mistakes_target_corrects": int((here & mistake & target_corrects).sum())}
    return out


def audit(teacher: Path, student: Path, seeds: list[int], batches: int) -> dict:
    """Counts summed over `batches` batches per seed, per seed."""
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import load_config
    from dopd_vlm.data import load_recipe
    from dopd_vlm.explore import score_and_route
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.rollout import sample_responses

    cfg = load_config(CONFIG, [f"model.teacher={teacher}", f"model.student={student}"])
    prompts_per_batch = cfg.train.prompts_per_step
    test = load_recipe(cfg.data.recipe, "test", family="qwen3")
    teacher_model = load_model(teacher, dtype=torch.float32).eval()
    student_model = load_model(student, dtype=torch.float32).eval()
    collator = DualViewCollator.from_config(load_processor(student), load_processor(teacher), data=cfg.data)
    per_seed = {}
    for seed in seeds:
        totals: dict[str, dict[str, int]] = {}
        for b in range(batches):
            prompts = [test[(b * prompts_per_batch + i) % len(test)] for i in range(prompts_per_batch)]
            batch = [s for s in prompts for _ in range(cfg.rollout.num_rollouts)]
            torch.manual_seed(seed * 1000 + b)
            with torch.no_grad():
                ids, mask = sample_responses(student_model, collator, batch, cfg.rollout)
                routed = score_and_route(student_model, teacher_model, collator, batch, ids, mask,
                                         trim=cfg.method.trim, normalize=cfg.method.normalize)
                for name, counts in audit_batch(routed).items():
                    slot = totals.setdefault(name, dict.fromkeys(counts, 0))
                    for key, value in counts.items():
                        slot[key] += value
        per_seed[str(seed)] = totals
    return per_seed


def summarize(per_seed: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """Per regime, mean and spread over seeds of: token share, share of all mistakes it receives,
    mistake rate within it, and the share of its mistakes its target would correct."""
    import statistics

    def stats(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    out = {}
    for name in next(iter(per_seed.values())):
        shares, of_mistakes, rates, corrected = [], [], [], []
        for totals in per_seed.values():
            tokens = sum(r["tokens"] for r in totals.values())
            mistakes = sum(r["mistakes"] for r in totals.values())
            r = totals[name]
            shares.append(r["tokens"] / tokens)
            of_mistakes.append(r["mistakes"] / mistakes if mistakes else 0.0)
            rates.append(r["mistakes"] / r["tokens"] if r["tokens"] else 0.0)
            corrected.append(r["mistakes_target_corrects"] / r["mistakes"] if r["mistakes"] else float("nan"))
        out[name] = {"token_share": stats(shares), "share_of_mistakes": stats(of_mistakes),
                     "mistake_rate": stats(rates), "target_corrects": stats([c for c in corrected if c == c] or [float("nan")])}
    return out


def format_table(summary: dict) -> str:
    lines = ["| regime | share of tokens | share of the student's mistakes | mistakes among its tokens | "
             "its mistakes whose target picks the teacher's token |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [f"{100 * s[key][0]:.1f} % ± {100 * s[key][1]:.1f}" if s[key][0] == s[key][0] else "-"
                 for key in ("token_share", "share_of_mistakes", "mistake_rate", "target_corrects")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown() -> None:
    record = json.loads(RESULT_FILE.read_text())
    body = [
        "`python benchmarks/regime_audit.py` on the shipped arithmetic pair (`demo_assets/arithmetic_*`): per "
        f"student, {record['batches']} batches of 16 test prompts × 2 rollouts (temperature 1) per seed, seeds "
        f"{', '.join(map(str, record['seeds']))} (mean ± std over seeds), routed per batch as a training step is "
        f"({record['machine']}). A *mistake* is a sampled token whose teacher (given p) prefers another token with "
        f"probability ≥ {CONFIDENT}; for LL/HS the last column says how often the privileged student's top token is "
        "that teacher token (LH/HT distil from the teacher itself: 100 %). Raw counts: `benchmarks/results/regime_audit.json`.",
        "",
    ]
    for name, row in record["students"].items():
        body += [f"**Student `{name}`** (`{row['path']}`):", "", format_table(summarize(row["per_seed"])), ""]
    findings = ROOT / "benchmarks" / "regime_audit_findings.md"
    if findings.is_file():
        body += [findings.read_text().strip(), ""]
    write_section(ROOT / "BENCHMARKS.md", SECTION, body)


def main(argv=None) -> int:
    import yaml

    model = yaml.safe_load(CONFIG.read_text())["model"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / model["teacher"]))
    parser.add_argument("--student", default=str(ROOT / model["student"]))
    parser.add_argument("--name", default="initial", help="the student's row name in the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=8, help="batches per seed")
    parser.add_argument("--update-md", action="store_true", help="only rewrite BENCHMARKS.md from the results")
    args = parser.parse_args(argv)
    if not args.update_md:
        record = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.is_file() else {"students": {}}
        if record["students"] and (record["seeds"], record["batches"]) != (args.seeds, args.batches):
            sys.exit(f"{RESULT_FILE} holds rows of seeds {record['seeds']} x {record['batches']} batches; use those")
        record.update(seeds=args.seeds, batches=args.batches, machine=machine(), teacher=args.teacher)
        record["students"][args.name] = {"path": args.student,
                                         "per_seed": audit(Path(args.teacher), Path(args.student), args.seeds, args.batches)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        RESULT_FILE.write_text(json.dumps(record, indent=2) + "\n")
        print(format_table(summarize(record["students"][args.name]["per_seed"])))
    update_markdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
