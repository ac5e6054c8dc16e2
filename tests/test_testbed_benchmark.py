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


def test_ood_gap_is_measured_against_the_models_ood_accuracy():
    pre = {**PRE, "student/ood": 0.2, "teacher/ood": 0.6}
    rows = [{"method": "gkd", "seed": seed, "rc": 0, "final_ood": ood,
             **testbed_learning.summarize_metrics(metrics(0.5, [0.1]))} for seed, ood in enumerate([0.3, 0.5])]
    agg = testbed_learning.aggregate(rows, pre)["gkd"]
    assert agg["ood"][0] == pytest.approx(0.4) and agg["ood_gap"][0] == pytest.approx(0.5)  # (0.4 - 0.2) / 0.4
    assert "| 0.400 ± 0.141 | 50 % ± 35 |" in testbed_learning.format_table({"gkd": agg})
    no_gap = {**pre, "teacher/ood": 0.23}  # a teacher no better than the student out of distribution
    assert "ood_gap" not in testbed_learning.aggregate(rows, no_gap)["gkd"]
    del rows[0]["final_ood"]  # a run without its OOD evaluation: no OOD column rather than a partial mean
    assert "ood" not in testbed_learning.aggregate(rows, pre)["gkd"]


def test_per_step_series_are_kept_and_plotted(tmp_path):
    steps = [{"step": i + 1, "loss": 1.0, "share/HT": 0.1 * i, "share/HS": 0.2, "entropy": 0.3, "kl_to_teacher": 0.5}
             for i in range(4)]
    summary = testbed_learning.summarize_metrics([{"step": 0, "student/test": 0.4}, *steps,
                                                  {"step": 4, "student/test": 0.5}])
    assert summary["series"]["share/HT"] == [0.0, 0.1, 0.2, 0.3] and set(summary["series"]) == set(testbed_learning.SERIES)
    methods = [f"m{i}" for i in range(len(testbed_learning.METHODS))]  # more methods than a 10-colour cycle
    record = {"setting": "s", "seeds": [0, 1], "runs": [{"method": m, "seed": s, "rc": 0, **summary}
                                                        for m in methods for s in (0, 1)]
              + [{"method": "sft", "seed": 0, "rc": 1}]}
    testbed_learning.plot_record(record, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_a_setting_is_extended_only_with_the_same_models_steps_and_overrides(tmp_path):
    import argparse
    import json

    stored = {"setting": "s", "command": "python x", "seeds": [0], "steps": 80, "overrides": ["optim.lr=2e-3"],
              "models": {"teacher": "T", "student": "S"}, "preconditions": PRE, "runs": []}
    result_file = tmp_path / "s.json"
    result_file.write_text(json.dumps(stored))
    pair = {"teacher": Path("T"), "student": Path("S")}
    same = argparse.Namespace(setting="s", steps=80, overrides=["optim.lr=2e-3"], seeds=[1, 2], eval_samples=10)
    testbed = testbed_learning.TESTBEDS["arithmetic"]
    record = testbed_learning.start_record(testbed, result_file, same, pair)
    assert record["seeds"] == [0, 1, 2] and len(record["commands"]) == 2 and record["preconditions"] == PRE
    other = argparse.Namespace(**{**vars(same), "overrides": ["optim.lr=1e-3"]})
    with pytest.raises(SystemExit, match="extend it with the same ones"):
        testbed_learning.start_record(testbed, result_file, other, pair)


@pytest.mark.parametrize("name", sorted(testbed_learning.TESTBEDS))
def test_the_shipped_pair_is_the_one_the_recorded_settings_measured(name):
    # every recorded setting's models are shipped (the testbed's pair, or another checkpoint in
    # the repo that the record names) and their manifests hold the accuracies the setting measured;
    # the first settings name the /tmp folders of the pair shipped byte for byte since
    import hashlib
    import json

    testbed = testbed_learning.TESTBEDS[name]
    files = testbed_learning.setting_files(testbed)
    assert files, f"no recorded setting of the {name} testbed"
    for file in files:
        record = json.loads(file.read_text())
        pre = record["preconditions"]
        pair = {role: testbed.shipped_pair()[role] if Path(path).is_absolute() else testbed_learning.ROOT / path
                for role, path in record["models"].items()}
        for role, folder in pair.items():
            manifest = json.loads((folder / "warmup_manifest.json").read_text())
            assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == manifest["sha256"], folder
            assert manifest["accuracy_greedy_200_samples"]["test"] == pre[f"{role}/plain"], (file.name, role)


def test_runs_of_one_setting_stored_by_two_processes_are_all_kept(tmp_path):
    import copy
    import json

    result_file = tmp_path / "s.json"
    fresh = {"setting": "s", "command": "python x --seeds 0", "seeds": [0], "steps": 80, "overrides": [],
             "models": {"teacher": "T", "student": "S"}, "preconditions": PRE, "runs": []}
    first, second = copy.deepcopy(fresh), {**copy.deepcopy(fresh), "command": "python x --seeds 1"}  # started together
    row = {"rc": 0, "seconds": 60, **testbed_learning.summarize_metrics(metrics(0.5, [0.1]))}
    testbed_learning.add_run(result_file, first, {"method": "dopd", "seed": 0, **row})
    testbed_learning.add_run(result_file, second, {"method": "dopd", "seed": 1, **row})
    testbed_learning.add_run(result_file, second, {"method": "dopd", "seed": 1, **row, "seconds": 120})  # a rerun replaces
    stored = json.loads(result_file.read_text())
    assert sorted((r["seed"], r["seconds"]) for r in stored["runs"]) == [(0, 60), (1, 120)]
    assert stored["minutes"] == 4.0 and stored["commands"] == ["python x --seeds 0", "python x --seeds 1"]
    assert stored["aggregate"]["dopd"]["seeds"] == [0, 1]


def test_the_operands_a_cell_chain_response_wrote_are_read_back():
    import cells_reading

    assert cells_reading.read_operands("1*7+7=4 4*8=2 answer 2") == [1, 7, 7, 8]
    assert cells_reading.read_operands("7-1-9=7 7+5*6=2 2+5=7 answer 7") == [7, 1, 9, 5, 6, 5]
    assert cells_reading.read_operands("answer 3") == [] and cells_reading.read_operands("1*7") == []


def test_where_p_hides_information_the_gap_is_also_measured_to_the_p_free_ceiling():
    rows = [{"method": "dopd", "seed": seed, "rc": 0, **testbed_learning.summarize_metrics(metrics(final, [0.1]))}
            for seed, final in enumerate([0.55, 0.45])]
    hidden = {**PRE, "teacher/plain": 0.6, "p_free_ceiling": 0.65}
    agg = testbed_learning.aggregate(rows, hidden)["dopd"]
    assert agg["gap"][0] == pytest.approx(0.5) and agg["gap_ceiling"][0] == pytest.approx(0.4)  # 0.1 / 0.2, 0.1 / 0.25
    table = testbed_learning.format_table({"dopd": agg})
    assert "gap to the p-free ceiling" in table and "| 50 % ± 35 | 40 % ± 28 |" in table
    assert "p-free ceiling" in testbed_learning.format_preconditions({**hidden, "student/ood": 0.1, "teacher/ood": 0.1},
                                                                      "longer")
    plain = testbed_learning.aggregate(rows, {**PRE, "p_free_ceiling": 1.0})["dopd"]  # nothing hidden: no column
    assert "gap_ceiling" not in plain and "ceiling" not in testbed_learning.format_table({"dopd": plain})


def test_a_testbeds_settings_are_its_own_files_not_its_variants(tmp_path):
    import json

    for name, testbed in (("testbed_arithmetic_s.json", None), ("testbed_arithmetic_hidden_s.json", "arithmetic_hidden")):
        (tmp_path / name).write_text(json.dumps({"testbed": testbed} if testbed else {}))  # old records name no testbed
    tb = testbed_learning.TESTBEDS
    assert [f.name for f in testbed_learning.setting_files(tb["arithmetic"], tmp_path)] == ["testbed_arithmetic_s.json"]
    assert [f.name for f in testbed_learning.setting_files(tb["arithmetic_hidden"], tmp_path)] == [
        "testbed_arithmetic_hidden_s.json"]
    assert testbed_learning.repo_relative(testbed_learning.ROOT / "demo_assets" / "x") == "demo_assets/x"
    assert testbed_learning.repo_relative(tmp_path) == str(tmp_path)


def test_one_benchmark_run_of_a_variant_end_to_end(tmp_path):
    """The benchmark's plumbing on one step: preconditions with the p-free ceiling, one real
    `dopd-vlm train` run of the HT-only ablation, its row, aggregate, table and plot."""
    import json

    code = testbed_learning.main([
        "--testbed", "arithmetic_hidden", "--seeds", "0", "--steps", "1", "--eval-samples", "4", "--train-rows", "64",
        "--methods", "dopd_ht_only", "--setting", "plumbing", "--out", str(tmp_path / "runs"),
        "--results", str(tmp_path / "results"), "train.prompts_per_step=4", "train.prompts_per_micro_batch=4"])
    assert code == 0
    record = json.loads((tmp_path / "results" / "testbed_arithmetic_hidden_plumbing.json").read_text())
    assert record["testbed"] == "arithmetic_hidden" and record["models"]["teacher"] == "demo_assets/arithmetic_hidden_teacher"
    pre = record["preconditions"]
    assert 0 < pre["p_free_ceiling"] < 1 and 0 <= pre["teacher/with_p/where_p_matters"] <= 1
    (row,) = record["runs"]
    assert row["rc"] == 0 and "method.regime_weights=ht_only" in row["command"], row
    assert 0 <= row["final_test"] <= 1 and 0 <= row["final_ood"] <= 1 and "share/HT" in row["series"]
    assert 0 <= row["final_where_p_matters"] <= 1 and 0 <= row["final_elsewhere"] <= 1
    assert "gap_ceiling" in record["aggregate"]["dopd_ht_only"] and "| dopd_ht_only | 1 |" in record["table"]
    assert (tmp_path / "results" / "testbed_arithmetic_hidden_plumbing.png").stat().st_size > 10_000


def test_where_p_matters_is_a_hidden_operand_or_an_answer_the_rule_changes():
    from dopd_vlm.data import load_recipe

    tb = testbed_learning.TESTBEDS
    assert testbed_learning.where_p_matters(tb["arithmetic"], load_recipe("arithmetic_chains", "test", limit=5)) is None
    hidden = load_recipe("arithmetic_chains_hidden", "test", limit=40)
    assert testbed_learning.where_p_matters(tb["arithmetic_hidden"], hidden) == [
        s.meta["hidden_position"] == 0 for s in hidden]
    rule, usual = load_recipe("arithmetic_chains_rule", "test", limit=40), load_recipe("arithmetic_chains", "test", limit=40)
    matters = testbed_learning.where_p_matters(tb["arithmetic_rule"], rule)
    assert matters == [r.answer != u.answer for r, u in zip(rule, usual)] and 0 < sum(matters) < 40
    pre = {"share_where_p_matters": 0.5, "p_free_ceiling/where_p_matters": 0.3,
           **{f"{role}/{view}/{subset}": 0.5 for role in ("teacher", "student") for view in ("plain", "with_p")
              for subset in ("where_p_matters", "elsewhere")}}
    table = testbed_learning.format_subset_table({"sft": {"where_p_matters": (0.25, 0.05), "elsewhere": (0.75, 0.0)}}, pre)
    assert "p-free ceiling there 0.300" in table and "| sft (final) | 0.250 ± 0.050 | 0.750 ± 0.000 |" in table
    assert testbed_learning.format_subset_table({}, PRE) == ""  # not a variant: no table


def test_the_map_judges_each_variant_on_its_gap_and_compares_dopd_with_vanilla_opd_per_seed():
    import testbed_map

    pre = {**PRE, "teacher/plain": 0.6, "p_free_ceiling": 0.65}
    finals = {"dopd_initial": [0.45, 0.5, 0.55], "vanilla_opd": [0.5, 0.5, 0.5], "sft": [0.41, 0.42, 0.43]}
    record = {"preconditions": pre, "runs": [{"method": m, "seed": s, "rc": 0, "final_test": f}
                                             for m, values in finals.items() for s, f in enumerate(values)]
              + [{"method": "sft", "seed": 3, "rc": 1}]}
    assert testbed_map.judged_gap(pre) == "gap_ceiling" and testbed_map.judged_gap(PRE) == "gap"
    assert testbed_map.per_seed_gaps(record, "dopd_initial", "gap_ceiling") == pytest.approx({0: 0.2, 1: 0.4, 2: 0.6})
    versus = testbed_map.compare(record, "gap_ceiling")
    assert versus["difference"][0] == pytest.approx(0.0) and versus["seeds"] == [0, 1, 2] and not versus["ahead"]
    gaps = {m: testbed_map.mean_std(testbed_map.per_seed_gaps(record, m, "gap").values()) for m in finals}
    assert testbed_map.best_methods(gaps) == ["dopd_initial", "vanilla_opd"]  # sft's band is below the best's
    assert testbed_map.ahead_beyond_spread((0.5, 0.05), (0.3, 0.1)) and not testbed_map.ahead_beyond_spread((0.5, 0.1), (0.3, 0.1))
    assert testbed_map.points((-0.42, 0.14)) == "-42 ± 14 points"
