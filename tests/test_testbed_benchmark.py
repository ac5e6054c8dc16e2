"""benchmarks/testbed_learning.py: the per-run summary, the seed aggregate and the gap recovered."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import testbed_learning  # noqa: E402

PRE = {"student/plain": 0.4, "student/with_p": 0.6, "teacher/plain": 0.9, "teacher/with_p": 0.95,
       "student/response_tokens": 22.0, "reference_tokens": 22.0}


def metrics(final: float, ht: list[float]) -> list[dict]:
    rows = [{"step": 0, "student/test": 0.4, "student_privileged/test": 0.6}]
    rows += [{"step": i + 1, "loss": 1.0 / (i + 1), "share/HT": share, "entropy": 0.1, "response_length": 20.0}
             for i, share in enumerate(ht)]
    rows[-1]["student/test"] = final
    return rows


def test_summary_takes_the_last_evaluation_and_step_means():
    summary = testbed_learning.summarize_metrics(metrics(0.65, [0.1, 0.3]))
    assert summary["final_test"] == 0.65 and summary["start_test_with_p"] == 0.6
    assert summary["first_loss"] == 1.0
    assert summary["mean_share/HT"] == pytest.approx(0.2)
    assert "mean_share/HS" not in summary  # a method that does not route has no shares


def test_gap_recovered_is_measured_against_the_plain_teacher_with_the_seed_spread():
    rows = [{"method": "dopd", "seed": seed, "rc": 0, **testbed_learning.summarize_metrics(metrics(final, [0.1]))}
            for seed, final in enumerate([0.65, 0.55])]
    rows.append({"method": "dopd", "seed": 2, "rc": 1})  # a failed run is left out, not counted as 0
    agg = testbed_learning.aggregate(rows, PRE)["dopd"]
    assert agg["seeds"] == [0, 1]
    assert agg["gap"][0] == pytest.approx(0.4)  # (0.6 - 0.4) / (0.9 - 0.4)
    assert agg["gap"][1] == pytest.approx(2 ** 0.5 / 10)  # sample stdev of the gaps 0.5 and 0.3
    assert "| dopd | 2 | 0.400 / 0.600 | 0.600 ± 0.071 | 40 % ± 14 |" in testbed_learning.format_table({"dopd": agg})
