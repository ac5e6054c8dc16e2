"""When does DOPD help? The map over the kind of privileged information (issue 24).

    python benchmarks/testbed_map.py                  # BENCHMARKS.md section from the stored results
    python benchmarks/testbed_map.py --setting p32_s200_lr1e-3

Reads, for each variant of the arithmetic testbed (`arithmetic`: p is computable from the
question, a capability gap; `arithmetic_hidden`: p holds part of what the answer needs, an
information gap; `arithmetic_rule`: p is one rule shared by every problem), the stored results of
one setting of `benchmarks/testbed_learning.py` and the initial student's rows of
`benchmarks/regime_audit.py`, and writes one table per question to the BENCHMARKS.md section
"When does DOPD help? The kind of p": which method recovers most of the gap, by how much (mean ±
sample std over seeds), DOPD against vanilla OPD, and the mechanism measured (the ablations that
remove the privileged-student targets or every regime but HT, and where the router sends the
student's mistakes). Nothing is run here; the findings (benchmarks/testbed_map_findings.md) are
appended as written.

Which gap the goal is judged on: the gap recovered against the teacher's plain accuracy
(`gap`, as every testbed reports it) and, where the question lacks information p gives
(`arithmetic_hidden`), against the p-free ceiling (`gap_ceiling`: the best accuracy any
answerer without p can expect, exact from the test split). The goal is judged on the p-free
ceiling there: it is what a student can reach at all, it does not depend on any model (so it
cannot favour a method), and it is the stricter of the two whenever the teacher's plain view
guesses the hidden operand worse than the best p-free guess. Both scale every method alike.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, mean_std, write_section  # noqa: E402

from dopd_vlm.lab.demo import gap_recovered  # noqa: E402
from dopd_vlm.lab.testbeds import TESTBEDS  # noqa: E402

VARIANTS = ("arithmetic", "arithmetic_hidden", "arithmetic_rule")
METHODS = ("dopd_initial", "vanilla_opd", "opsd_initial", "sft", "dopd_no_student", "dopd_ht_only")
SECTION = "When does DOPD help? The kind of p"
FINDINGS = ROOT / "benchmarks" / "testbed_map_findings.md"


def judged_gap(pre: dict) -> str:
    """The gap the goal is judged on: to the p-free ceiling where p hides information, else to
    the teacher's plain accuracy (module docstring)."""
    return "gap_ceiling" if pre.get("p_free_ceiling", 1.0) < 1.0 - 1e-9 else "gap"


def per_seed_gaps(record: dict, method: str, key: str) -> dict[int, float]:
    pre = record["preconditions"]
    top = pre["p_free_ceiling"] if key == "gap_ceiling" else pre["teacher/plain"]
    return {r["seed"]: gap_recovered(r["final_test"], pre["student/plain"], top)
            for r in record["runs"] if r["method"] == method and r["rc"] == 0}


def ahead_beyond_spread(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether `first` (mean, std) is ahead of `second` with their one-std bands apart."""
    return first[0] - first[1] > second[0] + second[1]


def compare(record: dict, key: str, a: str = "dopd_initial", b: str = "vanilla_opd") -> dict:
    """`a` against `b`: both (mean, std) over seeds, the per-seed differences (same seeds, same
    first rollouts), and whether `a` is ahead beyond the spread."""
    gaps_a, gaps_b = per_seed_gaps(record, a, key), per_seed_gaps(record, b, key)
    shared = sorted(set(gaps_a) & set(gaps_b))
    return {"a": mean_std(gaps_a.values()), "b": mean_std(gaps_b.values()),
            "difference": mean_std([gaps_a[s] - gaps_b[s] for s in shared]), "seeds": shared,
            "ahead": ahead_beyond_spread(mean_std(gaps_a.values()), mean_std(gaps_b.values()))}


def pct(value: tuple[float, float]) -> str:
    return "-" if math.isnan(value[0]) else f"{100 * value[0]:.0f} % ± {100 * value[1]:.0f}"


def points(value: tuple[float, float]) -> str:
    """A difference of two gaps, in points of the gap."""
    return "-" if math.isnan(value[0]) else f"{100 * value[0]:+.0f} ± {100 * value[1]:.0f} points"


def best_methods(gaps: dict[str, tuple[float, float]]) -> list[str]:
    """The method with the highest mean, then those whose one-std band reaches its band (tied)."""
    ran = {m: g for m, g in gaps.items() if not math.isnan(g[0])}
    if not ran:
        return []
    best = max(ran, key=lambda m: ran[m][0])
    return [best] + [m for m in ran if m != best and not ahead_beyond_spread(ran[best], ran[m])]


def audit_row(name: str) -> dict | None:
    """The initial student's regime audit: per regime, its share of tokens and of the mistakes,
    and how often its target picks the teacher's token on them."""
    path = RESULTS / f"regime_audit_{name}.json"
    if not path.is_file():
        return None
    import regime_audit

    record = json.loads(path.read_text())
    return regime_audit.summarize(record["students"]["initial"]["per_seed"]) if "initial" in record["students"] else None


def variant_rows(setting: str) -> list[dict]:
    rows = []
    for name in VARIANTS:
        path = RESULTS / f"testbed_{name}_{setting}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        key = judged_gap(record["preconditions"])
        gaps = {m: mean_std(per_seed_gaps(record, m, key).values()) for m in METHODS}
        seeds = {m: sorted(per_seed_gaps(record, m, key)) for m in METHODS}
        rows.append({"name": name, "record": record, "key": key, "gaps": gaps, "seeds": seeds,
                     "best": best_methods({m: g for m, g in gaps.items() if seeds[m]}),
                     "dopd_vs_opd": compare(record, key), "audit": audit_row(name)})
    return rows


def format_map(rows: list[dict]) -> list[str]:
    head = ["| kind of p (testbed) | student plain / with p | teacher plain / with p | p-free ceiling | gap judged against |"
            + "".join(f" {m} |" for m in METHODS) + " best (tied within the spread) | DOPD − vanilla OPD (per seed) | "
            "DOPD ahead beyond the spread |",
            "|---|---|---|---|---|" + "---|" * len(METHODS) + "---|---|---|"]
    for row in rows:
        pre, testbed = row["record"]["preconditions"], TESTBEDS[row["name"]]
        against = "p-free ceiling" if row["key"] == "gap_ceiling" else "teacher plain"
        cells = [f"{testbed.kind_of_p} (`{row['name']}`)", f"{pre['student/plain']:.3f} / {pre['student/with_p']:.3f}",
                 f"{pre['teacher/plain']:.3f} / {pre['teacher/with_p']:.3f}", f"{pre.get('p_free_ceiling', 1.0):.3f}", against]
        cells += [f"{pct(row['gaps'][m])} (n={len(row['seeds'][m])})" if row["seeds"][m] else "not run" for m in METHODS]
        versus = row["dopd_vs_opd"]
        best = row["best"]
        cells += [f"**{best[0]}**" + (f" ({', '.join(best[1:])})" if best[1:] else "") if best else "-",
                  points(versus["difference"]) + f" (seeds {', '.join(map(str, versus['seeds']))})",
                  "yes" if versus["ahead"] else "no"]
        head.append("| " + " | ".join(cells) + " |")
    return head


def format_mechanism(rows: list[dict]) -> list[str]:
    lines = ["| testbed | HS: share of the student's mistakes | HS target picks the teacher's token | HT: share of tokens / of mistakes | "
             "DOPD's privileged-student targets → teacher (no_student − DOPD) | only HT tokens (ht_only − DOPD) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        audit = row["audit"]
        record, key = row["record"], row["key"]
        effects = []
        for ablation in ("dopd_no_student", "dopd_ht_only"):
            effects.append(points(compare(record, key, ablation, "dopd_initial")["difference"]) if row["seeds"][ablation] else "not run")
        if audit:
            hs, ht = audit["HS"], audit["HT"]
            cells = [pct(hs["share_of_mistakes"]), pct(hs["target_corrects"]), f"{pct(ht['token_share'])} / {pct(ht['share_of_mistakes'])}"]
        else:
            cells = ["not run"] * 3
        lines.append(f"| `{row['name']}` | " + " | ".join(cells + effects) + " |")
    return lines


def update_markdown(setting: str) -> None:
    rows = variant_rows(setting)
    body = [
        f"`python benchmarks/testbed_map.py --setting {setting}`: the three variants of the arithmetic testbed "
        "(same expressions, tokenizer, model sizes, budget, evaluation and extractor; each pair is the arithmetic pair "
        "warmed up further on its variant, `dopd_vlm.lab.testbeds`), setting "
        f"`{setting}` of `benchmarks/testbed_learning.py` (the same for every method), mean ± sample std over seeds. "
        "Gap recovered = (final − student) / (top − student) with top = the teacher's plain accuracy, or the p-free "
        "ceiling where the question lacks what p gives (`benchmarks/testbed_map.py` says why). \"Ahead beyond the "
        "spread\": DOPD's mean minus its std above vanilla OPD's mean plus its std. Per-variant tables, plots and "
        "commands: the sections \"Learning on the arithmetic testbed…\"; the regime audits: \"Regime audit on the "
        "arithmetic testbed…\".",
        "",
        *format_map(rows),
        "",
        "Mechanism (regime audit of the initial student; ablation effects in points of the judged gap, per seed):",
        "",
        *format_mechanism(rows),
        "",
    ]
    if FINDINGS.is_file():
        body += [FINDINGS.read_text().strip(), ""]
    write_section(ROOT / "BENCHMARKS.md", SECTION, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="p32_s200_lr1e-3")
    args = parser.parse_args(argv)
    update_markdown(args.setting)
    for line in format_map(variant_rows(args.setting)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
