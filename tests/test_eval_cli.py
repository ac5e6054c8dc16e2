"""`dopd-vlm eval` through the command line (separate processes, several evaluations per start:
tests/helpers/cli_driver.py).

The numbers must be training evaluation's: a short run on the shipped arithmetic testbed pair
(warmed up, so accuracies are neither 0 nor 1) logs the initial student's, the teacher's and the
trained student's accuracies; the command, given the run config, reproduces each from the
checkpoints (the run's final/, a LoRA run's adapter, the initial student, the teacher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_cli_errors import DRIVER
from test_train import REPO, launch, metrics_lines

ERROR = "dopd-vlm eval: error: "
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
ASSETS = REPO / "demo_assets"


def run_cases(root: Path, cases: dict[str, list[str]]) -> dict[str, dict]:
    """Each case's argv through `cli.main`, all in one process (cli_driver)."""
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(DRIVER), str(root / "cases.json"), str(root / "result.json")],
                          cwd=root, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((root / "result.json").read_text())


def succeeded(result: dict, case: str) -> None:
    assert result["traceback"] is None and result["code"] == 0, (case, result["traceback"], result["stderr"][-3000:])


def arithmetic_config(root: Path) -> Path:
    """configs/testbed_arithmetic.yaml, short: 16 test samples, one step of 4 prompts, the teacher scored."""
    config = yaml.safe_load((REPO / "configs" / "testbed_arithmetic.yaml").read_text())
    config["model"].update(teacher=str(ASSETS / "arithmetic_teacher"), student=str(ASSETS / "arithmetic_student"))
    config["data"].update(max_eval_samples=16)
    config["method"].update(name="sft")  # trains on the reference chains: moves the student in one step
    config["optim"].update(lr=5e-3, warmup_steps=0)
    config["train"].update(steps=1, prompts_per_step=4, prompts_per_micro_batch=4, teacher_eval="gathered",
                           deepspeed=str(REPO / "ds_configs" / "zero2.json"), output_dir=str(root / "run"))
    path = root / "arithmetic.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_eval_reproduces_training_evaluation_for_checkpoints_adapters_and_two_ranks(tmp_path, tiny_pairs):
    config = arithmetic_config(tmp_path)
    full, adapter_run = tmp_path / "full", tmp_path / "lora"
    launch(tmp_path, config, [
        {"name": "full", "overrides": [f"train.output_dir={full}"]},
        {"name": "lora", "overrides": [f"train.output_dir={adapter_run}", "model.lora.enabled=true",
                                       "model.lora.rank=8", "optim.lr=5e-2", "train.teacher_eval=skip"]},
    ], nproc=1)
    logged = {name: metrics_lines(run) for name, run in (("full", full), ("lora", adapter_run))}
    start, trained, lora_trained = logged["full"][0], logged["full"][-1], logged["lora"][-1]
    # the checkpoints must be told apart by their numbers, or the comparisons below could not fail
    assert len({start["student/test"], trained["student/test"], lora_trained["student/test"],
                start["teacher/test"]}) == 4, (start, trained, lora_trained)
    assert start["student_privileged/test"] != start["student/test"]
    assert (adapter_run / "final" / "adapter_config.json").is_file()

    student = str(ASSETS / "arithmetic_student")
    with_config = ["eval", "--config", str(config)]
    cases = {  # case -> (argv, the logged accuracy it must equal)
        "final": ([*with_config, "--model", str(full / "final")], trained["student/test"]),
        "initial_student": ([*with_config], start["student/test"]),  # model.student of the config
        "initial_student_with_p": ([*with_config, "--privileged"], start["student_privileged/test"]),
        "teacher": ([*with_config, "--model", str(ASSETS / "arithmetic_teacher")], start["teacher/test"]),
        "teacher_with_p": ([*with_config, "--model", str(ASSETS / "arithmetic_teacher"), "--privileged"],
                           start["teacher_privileged/test"]),
        "adapter_naming_its_base": ([*with_config, "--adapter", str(adapter_run / "final")],
                                    lora_trained["student/test"]),
        "adapter_folder_as_model": (["eval", "--config", str(config), "--model", str(adapter_run / "final")],
                                    lora_trained["student/test"]),
        "base_and_adapter": ([*with_config, "--model", student, "--adapter", str(adapter_run / "final")],
                             lora_trained["student/test"]),
        # no config: the same settings as flags and overrides
        "flags_only": (["eval", "--model", str(full / "final"), "--recipe", "arithmetic_chains", "--split", "test",
                        "--limit", "16", "--max-new-tokens", "40", "--batch-size", "8"], trained["student/test"]),
    }
    argvs = {case: [*argv, "--json", str(tmp_path / f"{case}.json")] for case, (argv, _) in cases.items()}
    argvs["stdout_json"] = [*with_config, "--model", str(full / "final"), "--json", "-"]
    argvs["adapter_on_another_base"] = [*with_config, "--model", str(tiny_pairs["qwen3"]["teacher"]),
                                        "--adapter", str(adapter_run / "final")]
    results = run_cases(tmp_path, argvs)
    for case, (_, accuracy) in cases.items():
        succeeded(results[case], case)
        report = json.loads((tmp_path / f"{case}.json").read_text())
        (score,) = report["results"]
        assert score["split"] == "test" and score["total"] == 16 and score["unclosed_think"] == 0, (case, report)
        assert score["accuracy"] == accuracy and score["correct"] == round(accuracy * 16), (case, score, accuracy)
        assert report["view"] == ("privileged" if "with_p" in case else "plain"), case
        assert report["settings"]["max_new_tokens"] == 40 and report["settings"]["batch_size"] == 8, case
        rows = [line.split() for line in results[case]["stdout"].splitlines() if line.startswith("test ")]
        assert rows == [["test", f"{accuracy:.4f}", str(score["correct"]), "16", "0"]], (case, results[case]["stdout"])
    assert json.loads((tmp_path / "adapter_naming_its_base.json").read_text())["model"] == student  # the named base
    stdout = results["stdout_json"]
    succeeded(stdout, "stdout_json")
    assert json.loads(stdout["stdout"])["results"][0]["accuracy"] == trained["student/test"]  # stdout: JSON alone
    assert "split" in stdout["stderr"] and "accuracy" in stdout["stderr"]  # the table went to stderr
    other = results["adapter_on_another_base"]  # a base wider than the adapter's student
    assert other["code"] == 2 and other["traceback"] is None, other["stderr"][-3000:]
    errors = [line for line in other["stderr"].splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and f"adapter {adapter_run / 'final'}: cannot be put on its base model" in errors[0]

    # 2 torchrun ranks share the samples and give the numbers of 1 process, printed once
    out = tmp_path / "two_ranks.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dopd_vlm", "eval", "--config", str(config), "--model", str(full / "final"),
                           "--split", "test", "--split", "ood", "--json", str(out)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    two = json.loads(out.read_text())
    assert two["settings"]["world_size"] == 2 and [s["split"] for s in two["results"]] == ["test", "ood"]
    one = json.loads((tmp_path / "final.json").read_text())["results"][0]
    assert {k: two["results"][0][k] for k in one} == one
    assert proc.stdout.count("unclosed_think") == 1, proc.stdout  # one table, from rank 0


def saved_dataset_recipe(root: Path) -> Path:
    """A recipe of kind hf_dataset over a DatasetDict written by `datasets` (save_to_disk), with images."""
    import datasets

    from test_data import png

    rows = {"qid": ["q0", "q1", "q2"], "question": ["How many shapes?"] * 3, "answer": ["1", "2", "3"],
            "image": [[{"bytes": png(size=(40 + i, 30)), "path": None}] for i in range(3)],
            "caption": ["red circle", "two squares", "three stars"]}
    features = datasets.Features({"qid": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.List(datasets.Image()),
                                  "caption": datasets.Value("string")})
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(root / "saved"))
    recipe = root / "saved_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "hf_dataset", "from_disk": "saved", "splits": {"test": "validation"},
                                      "fields": {"id": "qid", "images": "image", "privileged": "caption"}}))
    return recipe


@pytest.fixture(scope="module")
def fast_cases(tmp_path_factory, tiny_pairs):
    """Every case of the fast tests below through one command-line process: (cases, results)."""
    root = tmp_path_factory.mktemp("eval_cli")
    student = tiny_pairs["qwen3"]["student"]
    orphan = root / "orphan_adapter"  # an adapter whose base folder is gone
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(root / "gone"),
                                                            "peft_type": "LORA"}))
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"student": str(student)}, "data": {"recipe": "synthetic_text"}}))
    plain = ["eval", "--model", str(student), "--recipe", "synthetic_text", "--split", "test", "--limit", "2"]
    errors = {
        "missing_model": (["eval", "--model", str(root / "nope"), "--recipe", "synthetic_text", "--split", "test"],
                          f"checkpoint {root / 'nope'}: no such local folder, and not loadable as a Hub id"),
        "unknown_split": ([*plain[:-4], "--split", "validation"], "has no split 'validation' (splits: train, test, ood)"),
        "missing_recipe": ([*plain[:3], "--recipe", "recipes/nope.yaml", "--split", "test"],
                           "recipe file not found: recipes/nope.yaml"),
        "unknown_recipe": ([*plain[:3], "--recipe", "nope", "--split", "test"], "unknown recipe 'nope'"),
        "adapter_base_missing": (["eval", "--adapter", str(orphan), "--recipe", "synthetic_text", "--split", "test"],
                                 f"adapter {orphan}: its base model {root / 'gone'} (base_model_name_or_path in "
                                 f"adapter_config.json) cannot be loaded: checkpoint {root / 'gone'}: no such local "
                                 "folder"),
        "not_an_adapter": ([*plain, "--adapter", str(student)],
                           f"adapter {student}: no adapter_config.json (not a PEFT adapter folder"),
        "no_recipe_without_config": (["eval", "--model", str(student)],
                                     "--recipe and --split are required without --config"),
        "no_model": (["eval", "--recipe", "synthetic_text", "--split", "test"], "--model is required"),
        "negative_limit": ([*plain, "--limit", "-1"], "--limit must be >= 0, got -1"),
        "zero_batch": ([*plain, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        "config_key": ([*plain, "data.chat_template_kwargs=false"],
                       "config key 'data.chat_template_kwargs': expected a mapping, got bool False"),
        "missing_config": (["eval", "--config", str(root / "none.yaml")], "config file not found"),
        "json_folder_missing": ([*plain, "--json", str(root / "no" / "r.json")],
                                f"--json {root / 'no' / 'r.json'}: its folder does not exist"),
        "images_for_a_text_model": (["eval", "--config", str(config), "--recipe", "synthetic_scenes", "--split", "test",
                                     "--limit", "1"], "1 image(s), but --model is a text-only model"),
        "prompt_too_long": ([*plain, "data.max_prompt_tokens=3"], "> data.max_prompt_tokens = 3"),
        "no_split": (["eval", "--config", str(config), "data.eval_splits=[]"], "no split to evaluate"),
    }
    argvs = {case: argv for case, (argv, _) in errors.items()}
    argvs["datasets_recipe"] = ["eval", "--model", str(tiny_pairs["qwen2_vl"]["student"]), "--recipe",
                                str(saved_dataset_recipe(root)), "--split", "test", "--max-new-tokens", "3",
                                "--privileged", "--json", str(root / "datasets.json")]
    return root, errors, run_cases(root, argvs)


def test_eval_scores_a_datasets_recipe(fast_cases):
    # any recipe kind goes through load_recipe: here a save_to_disk folder written by `datasets`
    root, _, results = fast_cases
    succeeded(results["datasets_recipe"], "datasets_recipe")
    report = json.loads((root / "datasets.json").read_text())
    assert report["recipe"].endswith("saved_recipe.yaml") and report["view"] == "privileged"
    assert [(s["split"], s["total"]) for s in report["results"]] == [("test", 3)]


def test_every_expected_failure_of_eval_is_one_line_exit_code_2(fast_cases):
    root, cases, results = fast_cases
    for case, (_, expected) in cases.items():
        result = results[case]
        assert result["traceback"] is None and result["code"] == 2, (case, result["stderr"][-3000:])
        assert "Traceback" not in result["stderr"], (case, result["stderr"][-3000:])
        errors = [line for line in result["stderr"].splitlines() if line.startswith(ERROR)]
        assert len(errors) == 1 and expected in errors[0], (case, result["stderr"][-3000:])
        assert result["stdout"] == "", case
    assert not (root / "no").exists()
