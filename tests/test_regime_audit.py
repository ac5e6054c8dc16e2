"""benchmarks/regime_audit.py: which regime the student's mistakes go to, and whether its target corrects them."""

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import regime_audit  # noqa: E402

LH, LL, HT, HS = range(4)


def routed(sampled, regimes, teacher_top, teacher_p, privileged_top):
    """A stand-in for explore.RoutedBatch with the fields the audit reads."""
    tops = {"teacher": (torch.tensor(teacher_p)[:, None], torch.tensor(teacher_top)[:, None]),
            "privileged_student": (torch.ones(len(sampled), 1), torch.tensor(privileged_top)[:, None])}
    return types.SimpleNamespace(
        num_tokens=len(sampled), tokens=types.SimpleNamespace(token_ids=torch.tensor(sampled)),
        routing=types.SimpleNamespace(regimes=torch.tensor(regimes)),
        top_alternatives=lambda view, rows, k: tops[view])


def test_a_mistake_is_a_token_the_confident_teacher_would_replace():
    batch = routed(sampled=[1, 2, 3, 4, 5],
                   regimes=[LH, HS, HS, HT, HS],
                   teacher_top=[1, 7, 8, 9, 6],       # tokens 2..5 differ from the teacher's choice
                   teacher_p=[0.9, 0.9, 0.9, 0.3, 0.8],  # ... but token 4's teacher is unsure: not a mistake
                   privileged_top=[1, 7, 3, 9, 5])    # token 2's privileged target picks the teacher's token
    counts = regime_audit.audit_batch(batch)
    assert counts["LH"] == {"tokens": 1, "mistakes": 0, "mistakes_target_corrects": 0}
    assert counts["HT"] == {"tokens": 1, "mistakes": 0, "mistakes_target_corrects": 0}
    assert counts["HS"] == {"tokens": 3, "mistakes": 3, "mistakes_target_corrects": 1}
    assert counts["LL"]["tokens"] == 0


def test_summary_shares_and_spread_over_seeds():
    def totals(hs_mistakes, ht_mistakes):
        return {"LH": {"tokens": 80, "mistakes": 0, "mistakes_target_corrects": 0},
                "LL": {"tokens": 0, "mistakes": 0, "mistakes_target_corrects": 0},
                "HT": {"tokens": 10, "mistakes": ht_mistakes, "mistakes_target_corrects": ht_mistakes},
                "HS": {"tokens": 10, "mistakes": hs_mistakes, "mistakes_target_corrects": hs_mistakes // 2}}

    summary = regime_audit.summarize({"0": totals(8, 2), "1": totals(6, 2)})
    assert summary["HS"]["token_share"] == (pytest.approx(0.1), 0.0)
    assert summary["HS"]["share_of_mistakes"][0] == pytest.approx((0.8 + 0.75) / 2)
    assert summary["HS"]["target_corrects"][0] == pytest.approx(0.5)
    assert summary["LL"]["target_corrects"][0] != summary["LL"]["target_corrects"][0]  # no mistakes: NaN, shown "-"
    table = regime_audit.format_table(summary)
    assert "| HS | 10.0 % ± 0.0 | 77.5 % ± 3.5 |" in table and "| LL |" in table and table.count("| - |") == 2


def test_the_counts_can_be_kept_to_some_tokens():
    """The hidden-operand testbed keeps a second count over the responses to its hidden problems."""
    batch = routed(sampled=[1, 2, 3, 4], regimes=[HS, HS, HT, LH], teacher_top=[7, 8, 3, 4],
                   teacher_p=[0.9, 0.9, 0.9, 0.9], privileged_top=[7, 2, 3, 4])
    kept = regime_audit.audit_batch(batch, keep=torch.tensor([True, False, True, False]))
    assert kept["HS"] == {"tokens": 1, "mistakes": 1, "mistakes_target_corrects": 1}
    assert kept["HT"]["tokens"] == 1 and kept["LH"]["tokens"] == 0
    totals = {}
    regime_audit.add_counts(totals, kept)
    regime_audit.add_counts(totals, regime_audit.audit_batch(batch))
    assert totals["HS"] == {"tokens": 3, "mistakes": 3, "mistakes_target_corrects": 2}
