"""LoRA students through PEFT (`model.lora`): config, targets, the maths at initialisation, the
initial privileged target with the adapters off, the fused loss with an adapted or frozen head.

Multi-process runs (ZeRO-2/3, resume, export, 1 vs 2 ranks) are the slow tests at the end; they
share launches (tests/helpers/train_driver.py).
"""

import json
import os
import subprocess
import sys
import types

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dopd_vlm import lora
from dopd_vlm.methods import LossInputs
from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import LORA_TARGETS, ConfigError, DataConfig, LoraConfig, ModelConfig, load_config
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.methods import compute_loss
from dopd_vlm.models import load_model, load_processor
from dopd_vlm.scoring import LMHead, ResponseHiddenStates, ResponseTokens, output_head, token_logprobs
from dopd_vlm.step import Models, PhaseTimer, score_targets
from helpers.method_configs import config_id, method_configs
from test_train import REPO, launch, metrics_lines, write_config

RECIPES = {"qwen2_vl": "synthetic_scenes", "qwen2_5_vl": "synthetic_scenes", "qwen3_vl": "synthetic_scenes",
           "qwen3": "synthetic_text"}
LORA = {"enabled": True, "rank": 4, "alpha": 8.0}


def lora_student(path, seed=0, **options):
    model = load_model(path, dtype=torch.float32)
    cfg = ModelConfig(student=str(path), lora=LoraConfig(**{**LORA, **options}))
    return model, lora.adapt(model, cfg, seed)


def perturb_adapters(model, seed=1):
    """B = 0 at initialisation: give every adapter a nonzero update, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def scoring_batch(path, family, n=2):
    processor = load_processor(path)
    collator = DualViewCollator.from_config(processor, data=DataConfig())
    samples = [load_recipe(RECIPES[family], "train", family=family, limit=n)[i] for i in range(n)]
    ids = torch.randint(3, 200, (n, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, 5, dtype=torch.bool)
    return collator, collator.scoring_views(samples, ids, mask, privileged_student=True, teacher=False)


def student_logprobs(model, views, vocab):
    hidden = response_hidden_states_of(model, views)
    return token_logprobs(hidden, output_head(model, vocab), views.response_ids[views.response_mask], 4)


def response_hidden_states_of(model, views):
    with torch.no_grad():
        return ResponseHiddenStates(model)(views.student, views.response_mask)


# -- config and targets -----------------------------------------------------------------------------


def test_lora_keys_are_validated_with_one_line_errors(tmp_path, tiny_pairs):
    config = write_config(tmp_path / "c.yaml", tiny_pairs, model={"lora": LORA})
    cfg = load_config(config)
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == list(LORA_TARGETS)
    assert not load_config(write_config(tmp_path / "d.yaml", tiny_pairs)).model.lora.enabled  # off by default
    cases = {
        "model.lora.rank=0": "config key 'model.lora.rank': must be >= 1, got 0",
        "model.lora.alpha=0": "config key 'model.lora.alpha'",
        "model.lora.dropout=1.0": "config key 'model.lora.dropout'",
        "model.lora.target_modules=[]": "config key 'model.lora.target_modules': must not be empty",
        "model.lora.ranks=4": "unknown config key 'model.lora.ranks'",
        "model.lora.target_modules=[q_proj,lm_head]": None,
    }
    for override, message in cases.items():
        if message is None:
            load_config(config, [override])
            continue
        with pytest.raises(ConfigError, match=message) as err:
            load_config(config, [override])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.lora.dropout': must be 0 when .* lm_head"):
        load_config(config, ["model.lora.target_modules=[q_proj,lm_head]", "model.lora.dropout=0.1"])


def test_targets_are_the_language_model_unless_the_vision_tower_is_asked_for(tiny_pairs, tied_pairs):
    path = tiny_pairs["qwen2_5_vl"]["student"]  # its vision MLP has gate/up/down_proj too
    model = load_model(path)
    names = lora.target_names(model, LoraConfig(enabled=True), str(path))
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert len(names) == 7 * model.config.text_config.num_hidden_layers
    with_vision = lora.target_names(model, LoraConfig(enabled=True, vision=True), str(path))
    assert set(names) < set(with_vision) and any(n.startswith("model.visual.") for n in with_vision)
    assert lora.target_names(model, LoraConfig(enabled=True, target_modules=["lm_head"]), str(path)) == ["lm_head"]
    for targets, vision in ((["q_proj", "qproj"], False), (["qkv"], False), (["embed_tokens"], True)):
        with pytest.raises(ConfigError, match="config key 'model.lora.target_modules': '[a-z_]+' names no linear layer"):
            lora.target_names(model, LoraConfig(enabled=True, target_modules=targets, vision=vision), str(path))
    assert lora.target_names(model, LoraConfig(enabled=True, target_modules=["qkv"], vision=True), str(path))
    text = load_model(tiny_pairs["qwen3"]["student"])
    assert len(lora.target_names(text, LoraConfig(enabled=True), "qwen3")) == 7 * text.config.num_hidden_layers
    tied = load_model(tied_pairs["qwen3"]["student"])
    with pytest.raises(ConfigError, match="lm_head is tied to the input embeddings"):
        lora.target_names(tied, LoraConfig(enabled=True, target_modules=["lm_head"]), "tied")


# -- the maths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(RECIPES))
def test_at_initialisation_the_lora_student_scores_exactly_like_the_base(tiny_pairs, family):
    path = tiny_pairs[family]["student"]
    base = load_model(path, dtype=torch.float32)
    model, peft_student = lora_student(path, target_modules=[*LoraConfig().target_modules, "lm_head"])
    _, views = scoring_batch(path, family)
    vocab = base.get_output_embeddings().weight.shape[0]
    expected = student_logprobs(base, views, vocab)
    torch.testing.assert_close(student_logprobs(model, views, vocab), expected, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    again, _ = lora_student(path)  # the seed fixes the adapters' initialisation
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(lora.merged_weights(model), lora.merged_weights(again)))
    perturb_adapters(model)
    assert not torch.allclose(student_logprobs(model, views, vocab), expected)  # the adapters do count


def test_the_initial_target_with_adapters_off_equals_a_frozen_copy(tiny_pairs):
    # method.privileged_target=initial: the privileged pass of a LoRA student (adapters switched off,
    # no second model) gives the values the frozen-copy path gives, also through an adapted lm_head
    path = tiny_pairs["qwen2_vl"]["student"]
    collator, views = scoring_batch(path, "qwen2_vl")
    model, _ = lora_student(path, target_modules=["q_proj", "v_proj", "lm_head"])
    perturb_adapters(model)
    frozen = load_model(path, dtype=torch.float32).requires_grad_(False)
    vocab = frozen.get_output_embeddings().weight.shape[0]
    engine = types.SimpleNamespace(module=ResponseHiddenStates(model))  # score_targets reads .module.model
    cfg = load_config(None, [f"model.student={path}", "method.name=opsd", "train.loss_chunk_size=3"])

    def models(**target):
        return Models(student=engine, teacher_engine=None, collator=collator, vocab_size=vocab, **target)

    def scored(**target):
        return score_targets(models(**target), views, cfg, PhaseTimer())

    base = scored(privileged_base=True)
    copy = scored(frozen_privileged_engine=types.SimpleNamespace(module=frozen))
    live = scored()
    for key in ("privileged_hidden", "privileged_logprobs", "privileged_lse"):
        torch.testing.assert_close(getattr(base, key), getattr(copy, key), rtol=0, atol=0)
    assert not torch.allclose(live.privileged_logprobs, base.privileged_logprobs)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # switched back on
    head = models(privileged_base=True).privileged_head()
    hidden = base.privileged_hidden
    torch.testing.assert_close(head(hidden), output_head(frozen, vocab)(hidden), rtol=0, atol=0)
    assert models().privileged_head() is None  # live: the student's own head


class _Head(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.lm_head.weight.data.copy_(weight)


def _adapted_head_problem(seed=0, n_per_seq=(5, 7, 1, 4)):
    V, H = 40, 8
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_seq)
    tokens = ResponseTokens(torch.randint(0, V, (n,), generator=g),
                            torch.repeat_interleave(torch.arange(len(n_per_seq)), torch.tensor(n_per_seq)),
                            len(n_per_seq))
    holder = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lm_head"]),
                                          _Head(torch.randn(V + 3, H, generator=g, dtype=torch.float64)))
    holder.double()
    with torch.no_grad():  # both adapter matrices from the seed (PEFT draws A from the global RNG)
        holder.lm_head.lora_A.default.weight.copy_(torch.randn(3, H, generator=g, dtype=torch.float64))
        holder.lm_head.lora_B.default.weight.copy_(torch.randn(V + 3, 3, generator=g, dtype=torch.float64))
    teacher = nn.Linear(H, V, bias=False, dtype=torch.float64).requires_grad_(False)
    teacher.weight.data.copy_(torch.randn(V, H, generator=g, dtype=torch.float64) * 2)
    tensors = [torch.randn(n, H, generator=g, dtype=torch.float64) for _ in range(3)]
    return tokens, holder.lm_head, teacher, tensors, torch.randint(0, 4, (n,), generator=g), V


def _adapted_head_loss(cfg, fused, module, frozen_base=False):
    tokens, layer, teacher, (hidden, privileged, teacher_hidden), regimes, V = _adapted_head_problem()
    if frozen_base:  # no adapter in use: a frozen linear head (LoRA on the other layers only)
        layer.enable_adapters(False)
    hidden.requires_grad_(True)
    head = LMHead(layer if fused else nn.Sequential(layer), V)  # Sequential: not linear, PEFT's own forward
    inputs = LossInputs(tokens, hidden, head, privileged, teacher_hidden, LMHead(teacher, V), regimes)
    loss, stats = compute_loss(cfg, inputs, chunk_size=5, loss_path="fused" if fused else "chunked")
    (loss * 0.7).backward()
    grads = [hidden.grad] + [p.grad for p in (layer.lora_A.default.weight, layer.lora_B.default.weight,
                                              layer.base_layer.weight)]
    return loss.detach(), stats.loss, grads


@pytest.mark.parametrize("cfg", list(method_configs(6)), ids=config_id)
def test_the_fused_loss_includes_an_adapted_head_as_peft_computes_it(cfg):
    # the reference runs PEFT's own forward of the LoRA layer, chunk by chunk; a fused loss that read
    # the base weight alone would differ (values and the adapter's gradients)
    fused, reference = _adapted_head_loss(cfg, True, None), _adapted_head_loss(cfg, False, None)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-6, atol=1e-7)
    for got, expected in zip(fused[2][:3], reference[2][:3]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert fused[2][2].abs().sum() > 0 and fused[2][3] is None  # lora_B trained, the base weight frozen


def test_the_fused_loss_with_a_frozen_head_trains_nothing_in_it():
    cfg = next(method_configs(6))  # dopd
    fused, reference = (_adapted_head_loss(cfg, path, None, frozen_base=True) for path in (True, False))
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[2][0], reference[2][0], rtol=1e-6, atol=1e-7)
    assert all(grad is None for grad in fused[2][1:])  # adapters off (frozen by PEFT), base frozen


def test_merged_weights_are_peft_merge_and_unload(tiny_pairs):
    path = tiny_pairs["qwen3_vl"]["student"]
    model, _ = lora_student(path, target_modules=["q_proj", "down_proj", "lm_head"])
    perturb_adapters(model)
    merged = {name: tensor.clone() for name, tensor in lora.merged_weights(model)}
    reference, peft_reference = lora_student(path, target_modules=["q_proj", "down_proj", "lm_head"])
    perturb_adapters(reference)
    plain = dict(peft_reference.merge_and_unload().named_parameters())
    assert merged.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)


def test_gradient_checkpointing_reaches_the_adapters(tiny_pairs):
    path = tiny_pairs["qwen2_vl"]["student"]
    model, _ = lora_student(path)
    perturb_adapters(model)  # B = 0 would give A no gradient
    model.gradient_checkpointing_enable()
    model.train()
    _, views = scoring_batch(path, "qwen2_vl")
    ResponseHiddenStates(model)(views.student, views.response_mask).pow(2).sum().backward()
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


# -- slow: real DeepSpeed runs (tests/helpers/train_driver.py), shared launches ----------------------

METHODS = {
    "dopd_live": ["method.name=dopd", "method.privileged_target=live"],
    "dopd_initial": ["method.name=dopd", "method.privileged_target=initial"],
    "vanilla_opd": ["method.name=vanilla_opd", "method.opd_divergence=sampled"],
    "opsd_live": ["method.name=opsd", "method.privileged_target=live"],
    "opsd_initial": ["method.name=opsd", "method.privileged_target=initial"],
    "gkd": ["method.name=gkd"],
    "sft": ["method.name=sft"],
}
WITH_HEAD = "model.lora.target_modules=[q_proj,v_proj,down_proj,lm_head]"  # the fused loss on an adapted head
RESUME = ["train.steps=2", "train.save_every=1"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_pairs):
    """One 2-rank ZeRO-3 launch: every method with LoRA (some with an adapted lm_head), ZeRO-2,
    ZeRO-3 with offload (DeepSpeed's own CPU Adam), an uninterrupted run and the same stopped and resumed; one 1-rank launch of the run the
    2-rank `dopd_head` run is compared with (the same global batch: one micro-batch per generate
    call, rollout.batch_size = 1 prompt x 2 rollouts)."""
    root = tmp_path_factory.mktemp("lora_runs")
    config = write_config(root / "c.yaml", tiny_pairs, model={"lora": LORA}, train={"steps": 1},
                          rollout={"batch_size": 2}, data={"eval_splits": []})

    def run(name, *overrides, **options):
        return {"name": name, "overrides": [*overrides, f"train.output_dir={root / name}"], **options}

    runs = [run(name, *overrides) for name, overrides in METHODS.items()]
    runs += [run("dopd_head", WITH_HEAD, "model.lora.export_merged=true", "data.eval_splits=[test]"),
             run("dopd_live_head", "method.privileged_target=live", WITH_HEAD),
             run("zero2_head", WITH_HEAD, f"train.deepspeed={REPO / 'ds_configs' / 'zero2.json'}"),
             run("offload_head", WITH_HEAD, f"train.deepspeed={REPO / 'ds_configs' / 'zero3_offload.json'}"),  # DeepSpeedCPUAdam
             run("full", WITH_HEAD, *RESUME),
             {**run("parts", WITH_HEAD, *RESUME), "name": "first", "stop_after_step": 1},
             {**run("parts", WITH_HEAD, *RESUME), "name": "rest", "resume": True}]
    two = launch(root, config, runs)
    one = launch(root, config, [{"name": "dopd_head", "overrides": [WITH_HEAD, f"train.output_dir={root / 'one'}"]}],
                 nproc=1)
    return root, two, one["dopd_head"]


def adapter_of(run_dir):
    return load_file(run_dir / "final" / "adapter_model.safetensors")


@pytest.mark.slow
def test_every_method_trains_only_the_adapters_on_two_zero3_ranks(lora_runs, tiny_pairs):
    root, two, _ = lora_runs
    base = load_file(tiny_pairs["qwen2_vl"]["student"] / "model.safetensors")
    for name in [*METHODS, "dopd_head", "dopd_live_head", "zero2_head", "offload_head"]:
        result = two[name]
        assert result["finished"] and torch.isfinite(torch.tensor(result["metrics"]["loss"])), name
        assert result["teacher_unchanged"] in (True, None), name
        adapter = adapter_of(root / name)
        assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), name  # the adapter alone
        assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items()), name  # B moved from 0
        assert not (root / name / "final" / "model.safetensors").exists(), name
        if "head" in name:
            assert any(k.startswith("base_model.model.lm_head.lora_B") for k in adapter), name
    assert metrics_lines(root / "dopd_head")[-1]["student/test"] >= 0  # evaluation generates with the adapter
    checkpoint_bytes = sum(f.stat().st_size for f in (root / "full" / "checkpoints").rglob("*") if f.is_file())
    assert checkpoint_bytes < sum(v.numel() * v.element_size() for v in base.values())  # no frozen base saved


@pytest.mark.slow
def test_two_zero3_ranks_match_one_rank_with_an_adapted_head(lora_runs):
    _, two, one = lora_runs
    a, b = one["metrics"], two["dopd_head"]["metrics"]
    assert a["response_tokens"] == b["response_tokens"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert a["grad_norm"] > 0 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_resume_gives_the_adapter_of_an_uninterrupted_run(lora_runs):
    root, two, _ = lora_runs
    assert not two["first"]["finished"] and two["rest"]["finished"]
    assert (root / "parts" / "checkpoints" / "latest_complete").read_text() == "step_2"
    full, parts = adapter_of(root / "full"), adapter_of(root / "parts")
    assert full.keys() == parts.keys()
    for key in full:
        torch.testing.assert_close(parts[key], full[key], rtol=0, atol=0, msg=key)
    for a, b in zip(metrics_lines(root / "full")[1:], metrics_lines(root / "parts")[1:]):
        assert a["loss"] == b["loss"] and a["response_tokens"] == b["response_tokens"]


@pytest.mark.slow
def test_the_adapter_loads_with_peft_and_the_merged_student_with_transformers(lora_runs, tiny_pairs):
    from transformers import AutoModelForImageTextToText

    root, _, _ = lora_runs
    final, merged_dir = root / "dopd_head" / "final", root / "dopd_head" / "final_merged"
    student = tiny_pairs["qwen2_vl"]["student"]
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(student.resolve()) and config["r"] == LORA["rank"]
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(student), final).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    base = AutoModelForImageTextToText.from_pretrained(student).eval()
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in (with_adapter, merged, base)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[1], logits[2], atol=1e-4)  # the merged student is the trained one
    assert (merged_dir / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_lora_input_errors_are_one_line_exit_2(tmp_path, tiny_pairs, tied_pairs):
    from test_cli_errors import DRIVER as CLI_DRIVER, assert_one_error_line

    config = write_config(tmp_path / "c.yaml", tiny_pairs, model={"lora": LORA}, data={"eval_splits": []})
    cases = {
        "unknown_target": (["model.lora.target_modules=[q_proj,qkv]"],
                           "config key 'model.lora.target_modules': 'qkv' names no linear layer of the student's "
                           "language model"),
        "rank_zero": (["model.lora.rank=0"], "config key 'model.lora.rank': must be >= 1, got 0"),
        "tied_head": ([f"model.student={tied_pairs['qwen2_vl']['student']}", "model.lora.target_modules=[lm_head]"],
                      "config key 'model.lora.target_modules': lm_head is tied to the input embeddings"),
    }
    argvs = {case: ["train", "--config", str(config), f"train.output_dir={tmp_path / case}", *overrides]
             for case, (overrides, _) in cases.items()}
    (tmp_path / "cases.json").write_text(json.dumps(argvs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(CLI_DRIVER), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for case, (_, expected) in cases.items():
        assert_one_error_line(results[case], expected, case)
