"""`dopd-vlm train`: config validation (fast) and real multi-rank DeepSpeed ZeRO-3 runs (slow).

The slow tests launch `torchrun` with 2 (or 1) real processes over gloo; several runs share one
launch (tests/helpers/train_driver.py) because imports dominate on CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dopd_vlm.config import ConfigError, load_config, load_deepspeed_config
from dopd_vlm.data.recipes import RECIPES_DIR

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "helpers" / "train_driver.py"


SHORT_TRAIN_SPLIT = 64  # rows, for at most 5 steps x 4 prompts
GENERATED_RECIPES = ("synthetic_scenes", "synthetic_text", "synthetic_scenes_caption", "arithmetic_chains", "cell_chains")


def short_recipe(name: str, folder: Path) -> str:
    """Built-in recipe `name` with a train split of SHORT_TRAIN_SPLIT rows, written into `folder`.

    Its rows are the first rows of the built-in split (a generated row is a pure function of its
    index); every set-up generates and checks the whole train split, 2000 rows, seconds per run
    and rank that no test needs.
    """
    recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    recipe["splits"]["train"] = SHORT_TRAIN_SPLIT
    path = folder / f"{name}_short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_config(path: Path, pairs: dict, family="qwen2_vl", recipe="synthetic_scenes", **sections) -> Path:
    """A run config for the tiny `pairs`; a built-in generated `recipe` with a short train split."""
    if recipe in GENERATED_RECIPES:
        recipe = short_recipe(recipe, path.parent)
    config = {
        "model": {"teacher": str(pairs[family]["teacher"]), "student": str(pairs[family]["student"]), "dtype": "float32"},
        "data": {"recipe": recipe, "eval_splits": ["test"], "max_eval_samples": 4},
        "method": {"name": "dopd", "top_k": 16},
        "rollout": {"num_rollouts": 2, "max_new_tokens": 5},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "prompts_per_step": 4, "prompts_per_micro_batch": 1,
                  "deepspeed": str(REPO / "ds_configs" / "zero3.json"), "output_dir": str(path.parent / "run")},
    }
    for section, values in sections.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(tmp_path: Path, config: Path | None, runs: list[dict], nproc: int = 2) -> dict:
    """`runs` in one torchrun launch of tests/helpers/train_driver.py; a run without a "config" of
    its own trains `config`. Rank 0's results by run name."""
    spec, result = tmp_path / f"spec_{nproc}.json", tmp_path / f"result_{nproc}.json"
    spec.write_text(json.dumps({"config": config and str(config), "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(DRIVER), str(spec), str(result)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(result.read_text())


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- fast: configuration ------------------------------------------------------------------------


def test_config_overrides_and_validation_errors_name_the_key(tmp_path, tiny_pairs):
    config = write_config(tmp_path / "c.yaml", tiny_pairs)
    cfg = load_config(config, ["method.name=vanilla_opd", "optim.lr=2e-5", "data.eval_splits=[test, ood]"])
    assert cfg.method.name == "vanilla_opd" and cfg.optim.lr == 2e-5 and cfg.data.eval_splits == ["test", "ood"]
    cases = {
        "method.nme=dopd": "unknown config key 'method.nme'",
        "method.name=dpod": "config key 'method.name'",
        "method.beta_w=0.9": "config key 'method.beta_w'",
        "train.steps=many": "config key 'train.steps': must be an integer",
        "train.prompts_per_micro_batch=3": "config key 'train.prompts_per_step'",
        "rollout.top_p=0": "config key 'rollout.top_p'",
        "data.privileged_template=no placeholders": "config key 'data.privileged_template'",
        "nonsense": "expected dotted.key=value",
        "method.ablation=no_routing": None,
        "method.privileged_target=ema": "config key 'method.privileged_target'",
        "method.privileged_target=live": None,
    }
    for override, message in cases.items():
        if message is None:
            load_config(config, [override])
            continue
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
            load_config(config, [override])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="only applies to dopd"):
        load_config(config, ["method.name=gkd", "method.ablation=no_teacher"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_auto_values_are_filled_and_conflicts_rejected(tmp_path, tiny_pairs):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_pairs), ["train.prompts_per_step=8"])
    ds = load_deepspeed_config(REPO / "ds_configs" / "zero3.json", cfg, world_size=2, bf16_enabled=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2  # 1 prompt x 2 rollouts
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3
    offload = load_deepspeed_config(REPO / "ds_configs" / "zero3_offload.json", cfg, world_size=1, bf16_enabled=True)
    assert offload["optimizer"]["params"]["lr"] == cfg.optim.lr and offload["bf16"]["enabled"] is True
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_deepspeed_config(conflicting, cfg, world_size=2, bf16_enabled=False)
    with pytest.raises(ConfigError, match="not divisible"):
        load_deepspeed_config(REPO / "ds_configs" / "zero3.json", cfg, world_size=3, bf16_enabled=False)


def test_the_checkpoint_pointer_is_replaced_atomically_and_durably(tmp_path, monkeypatch):
    from dopd_vlm.engine import write_durably

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_mode) or real_fsync(fd))
    pointer = tmp_path / "latest_complete"
    pointer.write_text("step_1")
    write_durably(pointer, "step_2")
    assert pointer.read_text() == "step_2" and [p.name for p in tmp_path.iterdir()] == ["latest_complete"]
    import stat

    assert [stat.S_ISREG(mode) for mode in synced] == [True, False]  # the file's content, then the directory entry


def test_exit_process_keeps_the_exit_code_and_flushes_output():
    script = ("from dopd_vlm.distributed import init_distributed, exit_process; import logging; init_distributed(); "
              "print('printed', end=''); logging.getLogger('x').warning('logged'); exit_process(3)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and proc.stdout.endswith("printed") and "logged" in proc.stderr


@pytest.mark.slow
def test_single_process_runs_started_together_need_no_port(tmp_path):
    # A 1-process group meets in an in-memory store: runs started at the same moment cannot race
    # for a rendezvous port, not even when the shell exports a MASTER_PORT another run holds
    # (which made every such start fail with DistNetworkError).
    import socket

    script = ("import torch, torch.distributed as dist; from dopd_vlm.distributed import init_distributed, "
              "exit_process; init_distributed(); t = torch.ones(1); dist.all_reduce(t); print(int(t)); exit_process(0)")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(held.getsockname()[1])}
        starts = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outcomes = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in starts]
    for code, out, err in outcomes:
        assert code == 0 and out.strip().splitlines()[-1] == "1", err[-3000:]


# -- slow: real DeepSpeed ZeRO-3 over gloo -----------------------------------------------------
# The training runs of the tests below share two launches, one per world size (process start-up
# and a process's first set-up dominate on CPU): each test's `*_runs` function writes its config
# under its own folder and names its runs; `deepspeed_runs` launches them all.

METHODS = {
    "dopd": ["method.name=dopd"],  # privileged_target=initial, the default
    "dopd_live_target": ["method.name=dopd", "method.privileged_target=live"],
    "vanilla_opd": ["method.name=vanilla_opd", "method.opd_divergence=sampled"],
    "opsd": ["method.name=opsd", "train.teacher_eval=skip"],
    "gkd": ["method.name=gkd", "train.teacher_eval=sharded", "train.eval_max_new_tokens=2"],
    "sft": ["method.name=sft"],
}
OTHER_FAMILIES = {"qwen3": "synthetic_text", "qwen2_5_vl": "synthetic_scenes", "qwen3_vl": "synthetic_scenes"}
TIED_FAMILIES = {"qwen2_vl": "synthetic_scenes", "qwen3_vl": "synthetic_scenes", "qwen3": "synthetic_text"}


def run_of(config: Path, name: str, out: Path, *overrides: str, **options) -> dict:
    """A train_driver run of `config` writing to `out`."""
    return {"name": name, "config": str(config), "overrides": [*overrides, f"train.output_dir={out}"], **options}


def every_method_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", pairs)
    return {2: [run_of(config, name, folder / name, *overrides) for name, overrides in METHODS.items()]}


def uneven_chunks_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    # The same global batch on 1 rank (checkpointed chunked loss: the reference) and on 2 ranks
    # (ZeRO-3 partitioned heads: fused loss run as the head's forward, teacher gathered once).
    config = write_config(folder / "c.yaml", pairs, train={"steps": 1, "loss_chunk_size": 3},
                          rollout={"num_rollouts": 2, "max_new_tokens": 8, "batch_size": 2})
    return {1: [run_of(config, "r", folder / "one", "train.loss_path=chunked")],
            2: [run_of(config, "r", folder / "two", "train.loss_path=fused")]}


def accumulation_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", pairs, method={"name": "sft"}, train={"steps": 1})
    return {1: [run_of(config, f"{stage}_{per_micro}", folder / stage / str(per_micro),
                       f"train.deepspeed={REPO / 'ds_configs' / (stage + '.json')}",
                       f"train.prompts_per_micro_batch={per_micro}")
                for stage in ("zero2", "zero3") for per_micro in (1, 4)]}


def generate_call_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", pairs, train={"steps": 1}, data={"eval_splits": []},
                          rollout={"num_rollouts": 2, "max_new_tokens": 6, "temperature": 1e-4})
    return {1: [run_of(config, str(size), folder / str(size), f"rollout.batch_size={size}") for size in (0, 2)]}


def resume_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", pairs, train={"steps": 4, "save_every": 1})
    return {2: [run_of(config, "full", folder / "full"),
                run_of(config, "first", folder / "parts", stop_after_step=2),
                run_of(config, "rest", folder / "parts", resume=True)]}


def family_runs(config: Path, out: Path, pairs: dict, families: dict[str, str]) -> list[dict]:
    """A run per family (its pair and recipe) writing to out/<family>."""
    return [run_of(config, family, out / family, f"model.student={pairs[family]['student']}",
                   f"model.teacher={pairs[family]['teacher']}", f"data.recipe={short_recipe(recipe, config.parent)}")
            for family, recipe in families.items()]


def other_families_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", pairs, train={"steps": 1})
    return {2: family_runs(config, folder, pairs, OTHER_FAMILIES)}


def tied_runs(folder: Path, pairs: dict, tied: dict) -> dict[int, list[dict]]:
    config = write_config(folder / "c.yaml", tied, model={"dtype": "bfloat16", "gradient_checkpointing": True},
                          train={"steps": 1}, data={"eval_splits": [], "max_eval_samples": 0},
                          rollout={"batch_size": 2})  # one micro-batch per generate call on 1 and 2 ranks
    return {nproc: family_runs(config, folder / where, tied, TIED_FAMILIES) for nproc, where in ((1, "one"), (2, "two"))}


CASES = {"every_method": every_method_runs, "uneven_chunks": uneven_chunks_runs, "accumulation": accumulation_runs,
         "generate_call": generate_call_runs, "resume": resume_runs, "other_families": other_families_runs,
         "tied": tied_runs}


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, tiny_pairs, tied_pairs):
    """Every case's runs: one 1-rank and one 2-rank launch. case -> (its folder, {nproc: {run: result}})."""
    root = tmp_path_factory.mktemp("deepspeed_runs")
    runs, folders = {1: [], 2: []}, {case: root / case for case in CASES}
    for case, plan in CASES.items():
        folders[case].mkdir()
        for nproc, case_runs in plan(folders[case], tiny_pairs, tied_pairs).items():
            runs[nproc] += [{**run, "name": f"{case}/{run['name']}"} for run in case_runs]
    results = {nproc: launch(root, None, nproc_runs, nproc=nproc) for nproc, nproc_runs in runs.items()}
    return {case: (folder, {nproc: {name.removeprefix(f"{case}/"): result for name, result in results[nproc].items()
                                    if name.startswith(f"{case}/")} for nproc in results})
            for case, folder in folders.items()}


@pytest.mark.slow
def test_two_ranks_zero3_every_method_trains_and_exports(deepspeed_runs, tiny_pairs):
    folder, results = deepspeed_runs["every_method"]
    results = results[2]
    for name in METHODS:
        result = results[name]
        assert result["finished"] and torch.isfinite(torch.tensor(result["metrics"]["loss"]))
        assert result["teacher_unchanged"] in (True, None)
        lines = metrics_lines(folder / name)
        assert lines[0]["step"] == 0 and "student/test" in lines[0]
        assert ("teacher_privileged/test" in lines[0]) == (name != "opsd")  # train.teacher_eval=skip
        assert [line["step"] for line in lines[1:]] == [1, 2]
        for key in ("loss", "entropy", "time/rollout", "time/student_pass", "time/loss", "time/backward",
                    "time/optimizer", "memory/rollout", "memory/loss", "memory/backward", "tokens_per_second", "lr"):
            assert key in lines[-1], (name, key)
        for key in ("time/setup/checks", "time/setup/models", "time/setup/engines", "time/eval/baseline",
                    "memory/setup/models", "memory/eval/baseline"):
            assert lines[0][key] > 0, (name, key)
        assert {"time/export", "time/checkpoint", "time/eval"} <= set(result["phases"]), name
        assert "student/test" in lines[-1]
    dopd = metrics_lines(folder / "dopd")[-1]
    assert sum(dopd[f"share/{r}"] for r in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)
    assert "threshold_gap" in dopd and "kl_to_teacher" in dopd
    # the student moved, and its export reloads with transformers alone and generates
    initial = load_file(tiny_pairs["qwen2_vl"]["student"] / "model.safetensors")
    code = (
        "import dopd_vlm, sys, torch; from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "for path in sys.argv[1:]:\n"
        "    m = AutoModelForImageTextToText.from_pretrained(path); p = AutoProcessor.from_pretrained(path)\n"
        "    msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'How many?'}]}]\n"
        "    text = p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "    inputs = p(text=[text], images=[Image.new('RGB', (112, 112), 'red')], return_tensors='pt')\n"
        "    out = m.generate(**inputs, max_new_tokens=3, do_sample=False)\n"
        "    assert out.shape[1] > inputs['input_ids'].shape[1], path\n"
    )
    finals = [folder / name / "final" for name in METHODS]
    for name, final in zip(METHODS, finals):
        exported = load_file(final / "model.safetensors")
        assert any(not torch.equal(exported[k], initial[k]) for k in initial), name
    subprocess.run([sys.executable, "-c", code, *map(str, finals)], check=True, cwd=REPO,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.slow
def test_two_zero3_ranks_with_uneven_loss_chunks_match_one_rank_on_the_chunked_path(deepspeed_runs):
    # Chunks of 3 tokens: ranks hold different numbers of chunks and of HT rows, which must not
    # change the number of collectives (a hang or a crash if it did).
    _, results = deepspeed_runs["uneven_chunks"]
    one, two = results[1]["r"], results[2]["r"]
    assert one["metrics"]["loss"] == pytest.approx(two["metrics"]["loss"], abs=1e-5)
    assert one["metrics"]["threshold_gap"] == pytest.approx(two["metrics"]["threshold_gap"], abs=1e-9)
    assert one["metrics"]["response_tokens"] == two["metrics"]["response_tokens"] > 2 * 3 * 4
    assert two["metrics"]["share/HT"] > 0
    # The same gradient (its global norm: weights after one Adam step are not comparable here, as
    # at the first step the privileged-student regimes' gradients are summation noise around 0,
    # which Adam's first step scales up to +-lr whatever their size)
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-4)
    assert one["metrics"]["grad_norm"] > 0


@pytest.mark.slow
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(deepspeed_runs):
    # 4 prompts in one micro-batch or in 4 accumulated ones: the same step gradient (its norm),
    # under ZeRO-2 and ZeRO-3. (ZeRO-3 advances its accumulation micro-step in the engine's
    # forward: a student pass that bypassed it kept only the last micro-batch's gradient.)
    _, results = deepspeed_runs["accumulation"]
    norms = {name: result["metrics"]["grad_norm"] for name, result in results[1].items()}
    assert sorted(norms) == ["zero2_1", "zero2_4", "zero3_1", "zero3_4"] and norms["zero2_4"] > 0
    for name, norm in norms.items():
        assert norm == pytest.approx(norms["zero2_4"], rel=1e-5), norms


@pytest.mark.slow
def test_one_generate_call_for_the_step_splits_into_the_same_micro_batches(deepspeed_runs):
    # Near-greedy sampling makes the rollouts independent of how they are grouped into generate
    # calls: a whole step in one call (rollout.batch_size=0) and one call per micro-batch must then
    # give the same micro-batches, hence the same loss and gradient.
    _, results = deepspeed_runs["generate_call"]
    whole, per_micro = results[1]["0"]["metrics"], results[1]["2"]["metrics"]
    assert whole["response_tokens"] == per_micro["response_tokens"]
    assert whole["loss"] == pytest.approx(per_micro["loss"], rel=1e-6)
    assert whole["grad_norm"] == pytest.approx(per_micro["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_stop_and_resume_ends_with_the_weights_of_an_uninterrupted_run(deepspeed_runs):
    folder, results = deepspeed_runs["resume"]
    full, parts = folder / "full", folder / "parts"
    assert not results[2]["first"]["finished"] and results[2]["rest"]["finished"]
    assert (parts / "checkpoints" / "latest_complete").read_text() == "step_4"
    a, b = load_file(full / "final" / "model.safetensors"), load_file(parts / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [line["step"] for line in metrics_lines(parts)]
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_text_only_and_other_vision_families_train_under_zero3(deepspeed_runs):
    _, results = deepspeed_runs["other_families"]
    for family in OTHER_FAMILIES:
        assert results[2][family]["finished"] and results[2][family]["teacher_unchanged"], family


@pytest.mark.slow
def test_tied_bf16_checkpointed_students_on_two_zero3_ranks_match_one_rank(deepspeed_runs):
    # The shapes of the paper's real students: LM head tied to the embedding, bf16, gradient
    # checkpointing; ZeRO-3 over 2 ranks (fused loss on the partitioned tied head) against 1 rank.
    folder, results = deepspeed_runs["tied"]
    one, two = results[1], results[2]
    for family in TIED_FAMILIES:
        a, b = one[family]["metrics"], two[family]["metrics"]
        assert one[family]["finished"] and two[family]["finished"]
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2, abs=1e-3), family  # bf16 forwards on 1 and 2 ranks
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=3e-2), family
    code = ("import dopd_vlm, sys; from dopd_vlm.models import load_model\n"
            "for path in sys.argv[1:]:\n"
            "    m = load_model(path); head, embedding = m.get_output_embeddings().weight, m.get_input_embeddings().weight\n"
            "    assert m.config.get_text_config().tie_word_embeddings and head.data_ptr() == embedding.data_ptr(), path\n"
            "    assert str(head.dtype) == 'torch.bfloat16', path\n")
    exports = [str(folder / where / family / "final") for family in TIED_FAMILIES for where in ("one", "two")]
    subprocess.run([sys.executable, "-c", code, *exports], check=True, cwd=REPO,  # reloads with transformers, still tied
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.slow
def test_zero3_generate_gathers_each_parameter_once(tmp_path, tiny_pairs):
    # DeepSpeed's per-module hooks release each layer after its forward, even inside a
    # GatheredParameters block: per-layer gathering re-gathers the model for every new token.
    script, result = REPO / "tests" / "helpers" / "generate_gathers.py", tmp_path / "gathers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tiny_pairs["qwen2_vl"]["student"]), str(result)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(result.read_text())
    assert counts["gathered"] == counts["parameters"] == counts["gathered_after_step"]  # once, also after a step
    assert counts["per_layer"] > 3 * counts["parameters"]  # what it replaces (the counter sees the gathers)
    assert counts["same_tokens"] and counts["train_step_ok"]


@pytest.mark.slow
def test_zero3_scoring_with_uneven_token_counts_across_ranks_does_not_hang(tiny_pairs):
    script = REPO / "tests" / "helpers" / "uneven_chunks.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tiny_pairs["qwen2_vl"]["teacher"])],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 2


def test_phase_timer_records_time_and_the_peak_memory_of_each_phase():
    from dopd_vlm.step import PhaseTimer

    import mmap

    timer = PhaseTimer()
    # 64 MiB mapped and touched, then unmapped: the resident set falls back whatever the process's
    # allocator does with freed memory (after some other tests in the same process, a freed
    # tensor's pages stay resident)
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"\1" * len(big))
    timer.lap("setup/big")  # since the timer started
    big.close()
    for _ in range(2):
        with timer("small"):
            torch.ones(16)
    metrics = timer.metrics()
    assert set(metrics) == {"time/setup/big", "time/small", "memory/setup/big", "memory/small"}
    assert all(value > 0 for value in metrics.values())
    # each phase has its own peak: the small phase's is not the big one's
    assert metrics["memory/setup/big"] - metrics["memory/small"] > 48 / 1024
