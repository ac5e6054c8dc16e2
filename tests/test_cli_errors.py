"""Every expected failure through the command line: one line, exit code 2, no traceback.

`dopd-vlm train` (the console script), `python -m dopd_vlm train` and torchrun all run
`cli.main`; the many cases share one process (tests/helpers/cli_driver.py), and a few go through
the real entry points as separate processes, torchrun with 2 ranks among them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from test_data import png
from test_train import REPO, write_config

DRIVER = REPO / "tests" / "helpers" / "cli_driver.py"
ERROR = "dopd-vlm train: error: "
GOOD = {"id": "r0", "question": "What colour is it?", "answer": "red", "privileged": "red box [1,2,3,4]",
        "images": ["img/good.png"]}


def bad_row(**changes) -> dict:
    row = {**GOOD, "id": "r1", **changes}
    return {key: value for key, value in row.items() if value is not None}


# case -> (line 2 of the training file: a row or raw bytes, what the one error line must hold)
DATA_CASES = {
    "truncated_image": (bad_row(images=["img/truncated.png"]),
                        "line 2 field 'images': image 0 (img/truncated.png): cannot decode"),
    "zero_byte_image": (bad_row(images=["img/zero.png"]),
                        "line 2 field 'images': image 0 (img/zero.png): empty file (0 bytes)"),
    "not_an_image": (bad_row(images=["img/text.png"]),
                     "line 2 field 'images': image 0 (img/text.png): cannot decode: not an image"),
    "missing_image": (bad_row(images=["img/missing.png"]),
                      "line 2 field 'images': image 0 (img/missing.png): file not found: "),
    "missing_question": (bad_row(question=None), "line 2 field 'question': missing"),
    "missing_answer": (bad_row(answer=None), "line 2 field 'answer': missing"),
    "images_not_a_list": (bad_row(images={"width": 3}),
                          "line 2 field 'images': image 0: expected a path, bytes or a data: URI, got a mapping without "
                          "'bytes' or 'path' (keys: width)"),
    "malformed_json": (b'{"id": "r1", "question": "What?",\n', "line 2: invalid JSON ("),
    "non_utf8": (b'{"id": "r1", "question": "caf\xe9?", "answer": "a", "privileged": "p"}\n',
                 "line 2: not valid UTF-8 (byte 0xe9"),
    "duplicate_id": (bad_row(id="r0"), "line 2 field 'id': duplicate id 'r0' (also line 1)"),
    "wrong_field_type": (bad_row(question=5), "line 2 field 'question': expected a string, got int"),
    "image_placeholder_in_p": (bad_row(privileged="see <image>"),
                               "line 2 field 'privileged': contains <image>; placeholders belong in the question"),
    "placeholder_count": (bad_row(question="<image> or <image>?"),
                          "line 2 field 'question': 2 <image> placeholder(s) but 1 image(s)"),
    "chat_tokens_in_question": (bad_row(question="Hi<|im_end|>\n<|im_start|>assistant\nred"),
                                "line 2 field 'question': contains the tokenizer's special token '<|im_end|>'"),
    "vision_tokens_in_p": (bad_row(privileged="<|vision_start|><|image_pad|><|vision_end|>"),
                           "line 2 field 'privileged': contains the tokenizer's special token '<|vision_start|>'"),
    "special_token_in_answer": (bad_row(answer="red<|endoftext|>"),
                                "line 2 field 'answer': contains the tokenizer's special token '<|endoftext|>'"),
    "prompt_longer_than_the_context": (bad_row(question=" ".join(["word"] * 20000)), re.compile(
        r"line 2 field 'question': prompt too long: the student view \(x\) has \d+ tokens \(images included\), "
        r"plus 5 response tokens \(rollout.max_new_tokens or the answer\) = \d+ > 4096, the context of "
        r"model.student \(max_position_embeddings\)$")),
}


def write_data(root: Path) -> None:
    img = root / "data" / "img"
    img.mkdir(parents=True)
    (img / "good.png").write_bytes(png(size=(40, 30)))
    (img / "truncated.png").write_bytes(png(size=(64, 64))[:60])
    (img / "zero.png").write_bytes(b"")
    (img / "text.png").write_text("not an image")
    good = json.dumps(GOOD).encode() + b"\n"
    (root / "data" / "test.jsonl").write_bytes(good)
    (root / "recipes").mkdir()
    for case, (line, _) in DATA_CASES.items():
        raw = line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n"
        (root / "data" / f"{case}.jsonl").write_bytes(good + raw)
        write_recipe(root, case, f"../data/{case}.jsonl")
    write_recipe(root, "good", "../data/test.jsonl")
    (root / "recipes" / "not_utf8.yaml").write_bytes(b"kind: local_files\ndescription: caf\xe9\n")
    write_hf_recipes(root)


def write_hf_recipes(root: Path) -> None:
    """`hf_dataset` recipes: a hub id that is not in the cache (offline), a saved folder without a split."""
    rows = {**{key: [value] for key, value in GOOD.items() if key != "images"},
            "images": [[str(root / "data" / "img" / "good.png")]]}
    features = datasets.Features({**{key: datasets.Value("string") for key in GOOD if key != "images"},
                                  "images": datasets.List(datasets.Image())})
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    saved.save_to_disk(str(root / "data" / "saved"))
    recipes = {"hub": {"hub_id": "nobody/no-such-set", "cache_dir": "../hub_cache", "splits": {"train": "train"}},
               "saved": {"from_disk": "../data/saved", "splits": {"train": "train", "test": "validation"}}}
    for name, keys in recipes.items():
        (root / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump({"kind": "hf_dataset", **keys}))


def write_recipe(root: Path, name: str, train: str) -> Path:
    path = root / "recipes" / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"kind": "local_files", "files": {"train": train, "test": "../data/test.jsonl"}}))
    return path


def damaged_checkpoints(root: Path, pairs: dict) -> dict[str, Path]:
    """A student whose model.safetensors is cut in half; a teacher whose tokenizer has one more token."""
    truncated = root / "ckpt" / "truncated_student"
    shutil.copytree(pairs["qwen2_vl"]["student"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    from dopd_vlm.models import load_processor

    other = root / "ckpt" / "other_tokenizer_teacher"
    shutil.copytree(pairs["qwen2_vl"]["teacher"], other)
    processor = load_processor(other)
    processor.tokenizer.add_tokens(["<only_in_teacher>"])
    processor.save_pretrained(other)
    return {"truncated": truncated, "other_tokenizer": other}


def other_cases(root: Path, pairs: dict, config: Path) -> dict[str, tuple[list[str], str | re.Pattern]]:
    """Recipe, config, checkpoint, DeepSpeed and output-folder cases: (overrides, expected line)."""
    checkpoints = damaged_checkpoints(root, pairs)
    (root / "ds_stage4.json").write_text('{"zero_optimization": {"stage": 4}}')
    (root / "a_file").write_text("not a folder")
    return {
        "missing_recipe_file": (["data.recipe=recipes/nope.yaml"], "recipe file not found: recipes/nope.yaml"),
        "recipe_not_utf8": (["data.recipe=recipes/not_utf8.yaml"],
                            "recipe recipes/not_utf8.yaml: not UTF-8 text (byte 0xe9 at offset 34)"),
        "hub_dataset_not_cached": (["data.recipe=recipes/hub.yaml"], re.compile(
            r"^recipe recipes/hub.yaml: hub_id 'nobody/no-such-set': not in the datasets cache \(\S*hub_cache\) and the "
            r"Hub cannot be reached \(Couldn't reach 'nobody/no-such-set' on the Hub \(OfflineModeIsEnabled\)\)")),
        "saved_dataset_without_the_split": (["data.recipe=recipes/saved.yaml"],
                                            "recipe recipes/saved.yaml: key 'splits.test': data/saved has no split "
                                            "'validation' (splits: train)"),
        "config_wrong_type": (["train.steps=many"], "config key 'train.steps': must be an integer, got str 'many'"),
        # checks that need the method table: methods.check_config at set-up (the config imports no algorithm)
        "no_teacher_for_a_method_with_one": (["model.teacher="],
                                             "config key 'model.teacher': is required (method dopd distils from a "
                                             "teacher)"),
        "token_drop_without_a_teacher": (["method.name=opsd", "method.token_drop=top"],
                                         "config key 'method.token_drop': needs a method with a teacher (the gap is "
                                         "|lT - lP|); opsd has none"),
        "truncated_safetensors": ([f"model.student={checkpoints['truncated']}"],
                                  f"checkpoint {checkpoints['truncated']}: model.safetensors is damaged or truncated "
                                  "(Error while deserializing header: incomplete metadata, file not fully covered); "
                                  "re-download or re-export it"),
        "tokenizer_mismatch": ([f"model.teacher={checkpoints['other_tokenizer']}"],
                               "teacher and student tokenizers differ (model.teacher has 501 tokens, model.student 500;"),
        "deepspeed_json": ([f"train.deepspeed={root / 'ds_stage4.json'}"],
                           "ds_stage4.json: 'zero_optimization.stage' is 4; known ZeRO stages: 0, 1, 2, 3"),
        "output_folder": ([f"train.output_dir={root / 'a_file'}"],
                          f"train.output_dir {root / 'a_file'}: cannot write there (File exists)"),
        "prompt_cap": (["data.recipe=recipes/good.yaml", "data.max_prompt_tokens=12"], re.compile(
            r"data/test.jsonl line 1 field 'question': prompt too long: the student view \(x\) has \d+ tokens "
            r"\(images included\) > data.max_prompt_tokens = 12$")),
        "images_for_a_text_only_model": (
            ["data.recipe=recipes/good.yaml", f"model.student={pairs['qwen3']['student']}",
             f"model.teacher={pairs['qwen3']['teacher']}"],
            "data/test.jsonl line 1 field 'images': 1 image(s), but model.student is a text-only model"),
        "template_with_another_field": (["data.privileged_template='{privileged} {question} {hint}'"],
                                        "config key 'data.privileged_template': unknown field {hint}"),
        "override_not_yaml": (["data.privileged_template={privileged} {question}"],
                              "override 'data.privileged_template={privileged} {question}': the value is not valid "
                              "YAML (expected '<document start>', but found '{'"),
        "special_token_in_template": (["data.privileged_template=<|im_end|>{privileged} {question}"],
                                      "config key 'data.privileged_template': contains the tokenizer's special "
                                      "token '<|im_end|>'"),
    }


def assert_one_error_line(result: dict, expected: str | re.Pattern, case: str) -> None:
    assert result["traceback"] is None, f"{case}: {result['traceback']}"
    assert result["code"] == 2, (case, result["stderr"][-3000:])
    assert "Traceback" not in result["stderr"], (case, result["stderr"][-3000:])
    errors = [line for line in result["stderr"].splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, (case, result["stderr"][-3000:])
    line = errors[0].removeprefix(ERROR)
    if isinstance(expected, re.Pattern):
        assert expected.search(line), (case, line)
    else:
        assert expected in line, (case, line)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pairs):
    root = tmp_path_factory.mktemp("cli_errors")
    write_data(root)
    config = write_config(root / "c.yaml", tiny_pairs, recipe="recipes/good.yaml")
    return root, config


def env_for(root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow  # one process serves every case, but imports and data still take minutes on CPU
def test_every_expected_failure_is_one_line_exit_code_2_and_no_traceback(workspace, tiny_pairs):
    root, config = workspace
    cases = {case: ([f"data.recipe=recipes/{case}.yaml"], expected) for case, (_, expected) in DATA_CASES.items()}
    cases.update(other_cases(root, tiny_pairs, config))
    argvs = {case: ["train", "--config", str(config), f"train.output_dir={root / 'runs' / case}", *overrides]
             for case, (overrides, _) in cases.items()}
    argvs["output_folder"].remove(f"train.output_dir={root / 'runs' / 'output_folder'}")
    argvs["stop_after_step_zero"] = ["train", "--config", str(config), "--stop-after-step", "0"]
    cases["stop_after_step_zero"] = ([], "--stop-after-step must be >= 1, got 0")
    (root / "cases.json").write_text(json.dumps(argvs))
    proc = subprocess.run([sys.executable, str(DRIVER), str(root / "cases.json"), str(root / "result.json")],
                          cwd=root, env=env_for(root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((root / "result.json").read_text())
    for case, (_, expected) in cases.items():
        assert_one_error_line(results[case], expected, case)
    assert not (root / "runs" / "prompt_longer_than_the_context" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_the_console_script_python_m_and_two_torchrun_ranks_exit_2_with_the_line(workspace):
    root, config = workspace
    bin_dir = Path(sys.executable).parent
    recipe = "data.recipe=recipes/duplicate_id.yaml"
    expected = "data/duplicate_id.jsonl line 2 field 'id': duplicate id 'r0' (also line 1)"
    launches = {
        "console_script": [str(bin_dir / "dopd-vlm"), "train", "--config", str(config), recipe],
        "python_m": [sys.executable, "-m", "dopd_vlm", "train", "--config", str(config), recipe],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "-m", "dopd_vlm", "train", "--config", str(config), recipe],
    }
    for name, cmd in launches.items():
        proc = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=900)
        errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR)]
        ranks = 2 if name == "torchrun" else 1
        assert errors == [ERROR + expected] * ranks, (name, proc.stderr[-4000:])
        assert "dopd_vlm/" not in proc.stderr, (name, proc.stderr[-4000:])  # no frame of ours: no traceback of ours
        if name == "torchrun":  # torchrun reports each rank's code and exits 1 whatever they were (its own rule)
            assert proc.returncode == 1 and proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-4000:]
        else:
            assert proc.returncode == 2, (name, proc.stderr[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before_group", "after_group"])
def test_a_rank_that_reaches_the_failure_later_still_prints_it(tmp_path, when):
    """torchrun kills the remaining workers once one exits: the first rank to fail waits for the rest."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "helpers" / "late_input_error.py"), when]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR)]
    assert errors == [ERROR + "data/x.jsonl line 1 field 'id': the same failure on every rank"] * 2, proc.stderr[-4000:]
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-4000:]  # torchrun prints its own traceback
    assert f'File "{REPO / "dopd_vlm"}' not in proc.stderr, proc.stderr[-4000:]
