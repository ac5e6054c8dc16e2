"""`dopd-vlm demo`: the whole pipeline, shortened, and the pieces it is built from.

The pipeline tests run what `make demo` runs (the shipped arithmetic pair -> one real
`dopd-vlm train` subprocess per method -> table and plots), and the scenes testbed's own
warm-ups, with 2 training steps and 8 eval samples per split, so they check plumbing and report,
not learning (benchmarks/testbed_learning.py and benchmarks/learning.py measure learning).
"""

import json
import math

import pytest
import torch

from dopd_vlm.lab import demo
from dopd_vlm.cli import build_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_short_demo_writes_table_plots_and_sane_numbers(tmp_path):
    options = demo.DemoOptions(
        out=tmp_path / "out", testbed="scenes", cache=tmp_path / "cache", steps=2, eval_every=1, eval_samples=8,
        teacher_warmup_steps=2, student_warmup_steps=2, jobs=2, progress=False,
    )
    lines = []
    try:
        summary = demo.run_demo(options, log=lines.append)
    except BaseException:  # a failure or a hang (pytest-timeout): show what the training runs printed
        for log_file in sorted((tmp_path / "out").glob("*/train.log")):
            print(f"--- {log_file}\n" + "\n".join(log_file.read_text().splitlines()[-30:]))
        raise

    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    for name in ("teacher (image only)", "teacher (image + boxes p)", "student, initial", "DOPD", "vanilla OPD", "OPSD", "SFT"):
        assert name in table
    assert table in "\n".join(lines)  # printed as well as written
    assert json.loads((out / "results.json").read_text().replace("NaN", "null"))["steps"] == 2
    for png in ("accuracy.png", "regimes.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    rows = {row["name"]: row for row in summary["rows"]}
    assert len(rows) == 3 + len(demo.DEFAULT_METHODS)
    for row in summary["rows"]:
        for split in ("test", "ood"):
            assert 0.0 <= row["accuracy"][split] <= 1.0
            gap = row.get("gap", {}).get(split)
            assert gap is None or math.isnan(gap) or math.isfinite(gap)
        if "method" in row:
            assert 0 < row["wall_seconds"] < 600
    for method in demo.DEFAULT_METHODS:
        metrics = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "student/test" in m] == [0, 1, 2]
        assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
        assert (out / method / "final" / "model.safetensors").is_file()
    dopd_rows = [json.loads(line) for line in (out / "dopd" / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(abs(sum(r[f"share/{n}"] for n in ("LH", "LL", "HT", "HS")) - 1) < 1e-6 for r in dopd_rows)

    # a second run reuses both warm-ups from the cache
    lines.clear()
    demo.prepare_models(options, log=lines.append)
    assert all("cached" in line for line in lines) and len(lines) == 2


def test_shipped_teacher_is_the_current_warmup():
    """The demo only uses demo_assets/ if its manifest matches the warm-up spec and weights;
    otherwise `make demo` would spend ~20 minutes rebuilding it."""
    teacher_cfg, _ = demo.warmup_configs()
    spec = demo.warmup_spec("teacher", teacher_cfg)
    assert demo.checkpoint_matches(demo.SHIPPED_TEACHER, spec), (
        "demo_assets/qwen2_vl_teacher is stale: run `dopd-vlm demo --rebuild-teacher`"
    )
    manifest = json.loads((demo.SHIPPED_TEACHER / demo.MANIFEST).read_text())
    assert manifest["accuracy"]["test_privileged"] > manifest["accuracy"]["test"] > 0.3


def test_warmup_is_deterministic(tiny_pairs):
    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import DataConfig
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.lab.warmup import WarmupConfig, warm_up

    path = tiny_pairs["qwen2_vl"]["student"]
    collator = DualViewCollator.from_config(load_processor(path), data=DataConfig())
    samples = list(load_recipe("synthetic_scenes", "train", limit=8))
    cfg = WarmupConfig(steps=2, batch_size=4, warmup_steps=1, seed=3)
    weights = []
    for _ in range(2):
        model = load_model(path)
        losses = warm_up(model, collator, samples, cfg, progress=False)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], load_model(path).state_dict()["lm_head.weight"])


def test_the_default_demo_distils_the_arithmetic_testbeds_shipped_pair(tmp_path):
    options = demo.DemoOptions(out=tmp_path / "out", steps=2, eval_every=2, eval_samples=8,
                               methods=("dopd", "vanilla_opd"), jobs=2, progress=False)
    assert options.testbed == "arithmetic"
    lines = []
    summary = demo.run_demo(options, log=lines.append)
    pair = demo.TESTBEDS["arithmetic"].shipped_pair()
    assert summary["models"] == {role: str(path) for role, path in pair.items()}
    assert "teacher: shipped warm-up" in lines[0] and "arithmetic testbed" in lines[2]
    rows = {row["name"]: row for row in summary["rows"]}
    # the shipped pair's manifests say what the table must show at step 0 (8 samples: a prefix of their 200)
    assert set(rows) == {"teacher (question only)", "teacher (question + hint p)", "student, initial", "DOPD", "vanilla OPD"}
    assert all(0.0 <= row["accuracy"][split] <= 1.0 for row in rows.values() for split in ("test", "ood"))
    assert rows["teacher (question only)"]["accuracy"]["test"] > rows["student, initial"]["accuracy"]["test"]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "dopd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "student/ood" in m] == [0, 2] and "teacher/ood" in metrics[0]
    assert any("section 'Learning on the arithmetic testbed'" in line for line in lines)


def test_warmup_options_are_refused_for_a_testbed_that_ships_its_pair(tmp_path, capsys):
    code = build_parser().parse_args(["demo", "--testbed", "arithmetic", "--rebuild-teacher", "--out", str(tmp_path)])
    assert code.run(code) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dopd-vlm demo: error: the warm-up options are for --testbed scenes; testbed 'arithmetic' ships "
                   "its pair (benchmarks/testbed_learning.py --rebuild warms one up)"]


def test_gap_recovered_and_table():
    assert demo.gap_recovered(0.5, 0.3, 0.7) == pytest.approx(0.5)
    assert demo.gap_recovered(0.2, 0.3, 0.7) == pytest.approx(-0.25)
    assert math.isnan(demo.gap_recovered(0.5, 0.4, 0.4))
    summary = {
        "splits": ["test"],
        "rows": [
            {"name": "teacher", "accuracy": {"test": 0.7}},
            {"name": "DOPD", "accuracy": {"test": 0.5}, "gap": {"test": 0.5}, "wall_seconds": 12.3},
            {"name": "none", "accuracy": {"test": 0.4}, "gap": {"test": math.nan}},
        ],
    }
    table = demo.format_table(summary)
    assert "| DOPD | 0.500 | 50% | 12 s |" in table and "n/a" in table


def test_training_runs_share_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    cpus = demo.available_cpus(tmp_path / "absent")
    assert cpus >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # a 1-CPU container on a bigger host
    assert demo.available_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert demo.available_cpus(quota) == cpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert demo.threads_per_job(jobs=1) == 1  # the user's setting wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert demo.threads_per_job(jobs=1) == demo.available_cpus()


def test_demo_command_line():
    args = build_parser().parse_args(["demo", "--steps", "3", "--methods", "dopd", "sft", "--", "optim.lr=5e-4"])
    assert args.steps == 3 and args.methods == ["dopd", "sft"] and args.overrides == ["optim.lr=5e-4"]
    assert build_parser().parse_args(["demo"]).testbed == "arithmetic"
    assert [demo.configured_steps(name) for name in ("arithmetic", "cells", "scenes")] == [200, 200, 300]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--methods", "nope"])
    command = demo.train_command("vanilla_opd", {"teacher": "t", "student": "s"}, "o", demo.DemoOptions(steps=7))
    assert command[1:5] == ["-m", "dopd_vlm", "train", "--config"]
    assert "method.name=vanilla_opd" in command and "train.steps=7" in command
