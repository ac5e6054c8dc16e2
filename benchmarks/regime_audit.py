"""Regime audit on a reasoning testbed: what the DOPD router does with the student's mistakes.

    python benchmarks/regime_audit.py                                   # the shipped arithmetic pair
    python benchmarks/regime_audit.py --testbed cells                   # the shipped vision pair
    python benchmarks/regime_audit.py --student runs/.../dopd_live/final --name after_dopd_live

The student samples training-sized batches (the testbed config's prompts per step x rollouts,
temperature 1, from the test split), the three passes score them and the router routes each batch
(`explore.score_and_route`: the trainer's passes and `router.route`). Per regime it counts the
tokens, the *mistakes* among them (the teacher's most likely token given p differs from the sampled
one, while the teacher puts >= 0.5 on its choice: a token the teacher would correct) and, for
the regimes that distil from the privileged student (LL, HS), whether that target's most likely
token is the teacher's (a target that would correct the mistake too). The question: do the
student's mistakes go to the teacher (HT, LH) or to a privileged student that would not correct
them (HS)? Rows for several students (the initial one, and runs' exported finals) go to
benchmarks/results/regime_audit_<testbed>.json; `--update-md` writes the testbed's section of BENCHMARKS.md.
Where some problems hide an operand that only p gives (`arithmetic_hidden`), the counts are also
kept for the responses to those problems alone (`per_seed_hidden`): the tokens whose right
continuation the plain student cannot know.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, machine, mean_std, repo_relative, write_section  # noqa: E402

from dopd_vlm.lab.testbeds import TESTBEDS, Testbed  # noqa: E402

CONFIDENT = 0.5  # the teacher's probability on its own choice for a differing sampled token to count as a mistake


def audit_batch(routed, keep=None) -> dict[str, dict[str, int]]:
    """Per regime: tokens, mistakes, and mistakes whose regime target would correct them;
    `keep` ([N] bool over the tokens) restricts the counts to some tokens."""
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
        here = regimes == code if keep is None else (regimes == code) & keep
        target_corrects = privileged_corrects if name in ("LL", "HS") else torch.ones_like(here)
        out[name] = {"tokens": int(here.sum()), "mistakes": int((here & mistake).sum()),
                     "mistakes_target_corrects": int((here & mistake & target_corrects).sum())}
    return out


def result_path(testbed: Testbed) -> Path:
    return RESULTS / f"regime_audit_{testbed.name}.json"


def add_counts(totals: dict, counts: dict) -> None:
    for name, row in counts.items():
        slot = totals.setdefault(name, dict.fromkeys(row, 0))
        for key, value in row.items():
            slot[key] += value


def audit(testbed: Testbed, teacher: Path, student: Path, seeds: list[int], batches: int,
          prompts_per_batch: int) -> dict[str, dict]:
    """Counts summed over `batches` batches per seed, per seed (`per_seed`), and the same over
    the responses to problems with a hidden operand (`per_seed_hidden`, where there are any)."""
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import load_config
    from dopd_vlm.data import load_recipe
    from dopd_vlm.lab.explore import score_and_route
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.rollout import sample_responses

    cfg = load_config(testbed.config, [f"model.teacher={teacher}", f"model.student={student}"])
    test = load_recipe(cfg.data.recipe, "test", family=testbed.family)
    teacher_model = load_model(teacher, dtype=torch.float32).eval()
    student_model = load_model(student, dtype=torch.float32).eval()
    collator = DualViewCollator.from_config(load_processor(student), load_processor(teacher), data=cfg.data)
    any_hidden = any(s.meta.get("hidden_position", -1) >= 0 for s in test)
    out: dict[str, dict] = {"per_seed": {}, **({"per_seed_hidden": {}} if any_hidden else {})}
    for seed in seeds:
        totals: dict[str, dict[str, int]] = {}
        hidden_totals: dict[str, dict[str, int]] = {}
        for b in range(batches):
            prompts = [test[(b * prompts_per_batch + i) % len(test)] for i in range(prompts_per_batch)]
            batch = [s for s in prompts for _ in range(cfg.rollout.num_rollouts)]
            torch.manual_seed(seed * 1000 + b)
            with torch.no_grad():
                ids, mask = sample_responses(student_model, collator, batch, cfg.rollout)
                routed = score_and_route(student_model, teacher_model, collator, batch, ids, mask,
                                         trim=cfg.method.trim, normalize=cfg.method.normalize)
                add_counts(totals, audit_batch(routed))
                if any_hidden:
                    hidden = torch.tensor([s.meta.get("hidden_position", -1) >= 0 for s in batch])
                    add_counts(hidden_totals, audit_batch(routed, keep=hidden[routed.tokens.seq_index.cpu()]))
        out["per_seed"][str(seed)] = totals
        if any_hidden:
            out["per_seed_hidden"][str(seed)] = hidden_totals
    return out


def summarize(per_seed: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """Per regime, mean and spread over seeds of: token share, share of all mistakes it receives,
    mistake rate within it, and the share of its mistakes its target would correct."""
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
        out[name] = {"token_share": mean_std(shares), "share_of_mistakes": mean_std(of_mistakes),
                     "mistake_rate": mean_std(rates), "target_corrects": mean_std(corrected)}
    return out


def format_table(summary: dict) -> str:
    lines = ["| regime | share of tokens | share of the student's mistakes | mistakes among its tokens | "
             "its mistakes whose target picks the teacher's token |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [f"{100 * s[key][0]:.1f} % ± {100 * s[key][1]:.1f}" if s[key][0] == s[key][0] else "-"
                 for key in ("token_share", "share_of_mistakes", "mistake_rate", "target_corrects")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown(testbed: Testbed) -> None:
    result_file = result_path(testbed)
    record = json.loads(result_file.read_text())
    flag = "" if testbed.name == "arithmetic" else f" --testbed {testbed.name}"
    body = [
        f"`python benchmarks/regime_audit.py{flag}` on the shipped pair of the {testbed.title} (`{testbed.config.name}`): per "
        f"student, {record['batches']} batches of {record.get('prompts_per_batch', 16)} test prompts × 2 rollouts (temperature 1) per seed, seeds "
        f"{', '.join(map(str, record['seeds']))} (mean ± std over seeds), routed per batch as a training step is "
        f"({record['machine']}). A *mistake* is a sampled token whose teacher (given p) prefers another token with "
        f"probability ≥ {CONFIDENT}; for LL/HS the last column says how often the privileged student's top token is "
        "that teacher token (LH/HT distil from the teacher itself: 100 %). Raw counts: "
        f"`benchmarks/results/{result_file.name}`.",
        "",
    ]
    for name, row in record["students"].items():
        body += [f"**Student `{name}`** (`{row['path']}`):", "", format_table(summarize(row["per_seed"])), ""]
        if "per_seed_hidden" in row:
            body += [f"The same, on the responses to the problems whose question hides an operand (student `{name}`):", "",
                     format_table(summarize(row["per_seed_hidden"])), ""]
    findings = ROOT / "benchmarks" / f"regime_audit_{testbed.name}_findings.md"
    if findings.is_file():
        body += [findings.read_text().strip(), ""]
    write_section(ROOT / "BENCHMARKS.md", f"Regime audit on the {testbed.title}", body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default="arithmetic", choices=sorted(TESTBEDS))
    parser.add_argument("--teacher", help="default: the testbed's shipped teacher")
    parser.add_argument("--student", help="default: the testbed's shipped student")
    parser.add_argument("--name", default="initial", help="the student's row name in the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=8, help="batches per seed")
    parser.add_argument("--prompts-per-batch", type=int, help="default: the testbed config's train.prompts_per_step")
    parser.add_argument("--update-md", action="store_true", help="only rewrite BENCHMARKS.md from the results")
    args = parser.parse_args(argv)
    testbed = TESTBEDS[args.testbed]
    result_file = result_path(testbed)
    if not args.update_md:
        pair = testbed.shipped_pair()
        teacher, student = Path(args.teacher or pair["teacher"]), Path(args.student or pair["student"])
        prompts = args.prompts_per_batch or testbed.settings.train.prompts_per_step
        record = json.loads(result_file.read_text()) if result_file.is_file() else {"students": {}}
        stored = (record.get("seeds"), record.get("batches"), record.get("prompts_per_batch", 16))
        if record["students"] and stored != (args.seeds, args.batches, prompts):
            sys.exit(f"{result_file} holds rows of seeds {stored[0]} x {stored[1]} batches of {stored[2]} prompts; use those")
        record.update(seeds=args.seeds, batches=args.batches, prompts_per_batch=prompts, machine=machine(),
                      teacher=repo_relative(teacher))
        record["students"][args.name] = {"path": repo_relative(student),
                                         **audit(testbed, teacher, student, args.seeds, args.batches, prompts)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(record, indent=2) + "\n")
        print(format_table(summarize(record["students"][args.name]["per_seed"])))
    update_markdown(testbed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
