"""No compute on padding: length-aware micro-batches under a token budget (`train.micro_batch_tokens`,
dopd_vlm/packing.py), padding-free passes (`train.padding_free`) and the padded-share metric.

Fast: the grouping rule and its loss weights (float64), the positions a view computes, packed vs
padded forwards of every family. Slow (torchrun, ZeRO-3 over gloo): 1 vs 2 ranks, fixed vs budget
grouping, on responses of very different lengths; the update's peak memory under a fixed budget.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from dopd_vlm.collate import DualViewCollator, ModelView
from dopd_vlm.config import ConfigError, load_config
from dopd_vlm.families import FAMILIES, VISION_FAMILIES
from dopd_vlm.models import load_model, load_processor
from dopd_vlm.packing import PASSES, PassPositions, budget_groups, fixed_groups, group_cost, loss_scales, split_to
from dopd_vlm.rollout import eos_token_ids
from dopd_vlm.scoring import output_head, packed_view, response_hidden_states, token_logprobs
from test_collate import TEMPLATE, samples_for
from test_train import launch, write_config

# -- the grouping rule (pure) --------------------------------------------------------------------


def long_tail(count: int, cap: int, seed: int) -> list[int]:
    """Lengths like sampling at temperature 1: most short, a few at the cap."""
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(0, 1.2) * cap / 8))) for _ in range(count)]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_budget_groups_hold_every_sequence_once_within_the_budget_longest_first(padding_free):
    for seed in range(20):
        lengths = [prompt + response for prompt, response in zip(long_tail(64, 60, seed), long_tail(64, 400, seed + 1))]
        budget = 900
        groups = budget_groups(lengths, budget, padding_free)
        assert sorted(i for g in groups for i in g) == list(range(64))
        assert all(group_cost([lengths[i] for i in g], padding_free) <= budget for g in groups)
        flat = [lengths[i] for g in groups for i in g]
        assert flat == sorted(lengths, reverse=True)  # consecutive runs of the longest-first order
        # each run is as long as the budget allows: the next sequence would not have fitted
        for group, following in zip(groups, groups[1:]):
            assert group_cost([lengths[i] for i in group + following[:1]], padding_free) > budget
    assert budget_groups([50, 5, 5], 40, padding_free)[0] == [0]  # too long alone: a micro-batch of its own


def test_split_to_equalises_counts_by_halving_the_costliest_micro_batch():
    lengths = [100, 90, 10, 9, 8, 7, 6, 5]
    groups = budget_groups(lengths, 200, padding_free=False)
    assert groups == [[0, 1], [2, 3, 4, 5, 6, 7]]
    split = split_to(groups, lengths, 4, padding_free=False)
    assert split == [[0], [1], [2, 3, 4], [5, 6, 7]]
    assert split_to(groups, lengths, 2, padding_free=False) == groups
    assert len(split_to(groups, lengths, 8, padding_free=False)) == 8
    with pytest.raises(ValueError, match="cannot fill 9"):
        split_to(groups, lengths, 9, padding_free=False)


def test_weighted_micro_batch_means_are_the_step_mean_over_sequences_whatever_the_grouping():
    # What the step's gradient is made of: DeepSpeed divides each micro-batch's loss by the
    # configured accumulation steps (fixed micro-batches per rank) and averages over ranks; weighting
    # each micro-batch's sequence mean by loss_scales gives the mean over the step's sequences.
    rng = random.Random(0)
    world, per_micro, fixed_per_rank = 2, 8, 4
    values = [[rng.uniform(-3, 3) for _ in range(rng.randint(1, 50))] for _ in range(world * per_micro * fixed_per_rank)]
    lengths = [len(v) for v in values]
    target = sum(sum(v) / len(v) for v in values) / len(values)  # the paper's reduction over the step
    ranks = [list(range(r * len(values) // world, (r + 1) * len(values) // world)) for r in range(world)]
    for budget in (0, 60, 200, 10_000):
        per_rank = []
        for rows in ranks:
            if budget:
                local = budget_groups([lengths[i] for i in rows], budget, padding_free=False)
            else:
                local = fixed_groups(len(rows), per_micro)
            per_rank.append([[rows[i] for i in g] for g in local])
        count = max(map(len, per_rank))
        per_rank = [split_to(g, lengths, count, False) for g in per_rank]  # lengths indexed globally
        gradient_weight = 0.0
        for groups in per_rank:
            for group, scale in zip(groups, loss_scales(groups, per_micro)):
                mean = sum(sum(values[i]) / len(values[i]) for i in group) / len(group)
                gradient_weight += scale * mean / fixed_per_rank / world
        assert gradient_weight == pytest.approx(target, rel=1e-12), budget


def test_padding_share_counts_every_pass_and_skips_passes_that_did_not_run():
    positions = PassPositions()
    positions.add("rollout", 100, 60)
    positions.add("student", 50, 40)
    positions.add("teacher", 50, 50)
    metrics = PassPositions.metrics(positions.totals())
    assert metrics["perf/padding_share"] == pytest.approx(50 / 200)
    assert metrics["perf/padding_share/rollout"] == pytest.approx(0.4)
    assert metrics["perf/padding_share/student"] == pytest.approx(0.2)
    assert metrics["perf/padding_share/teacher"] == 0.0
    assert metrics["perf/positions/rollout"] == 100 and metrics["perf/positions/teacher"] == 50
    assert "perf/padding_share/privileged" not in metrics and "perf/positions/privileged" not in metrics
    assert len(positions.totals()) == 2 * len(PASSES)


def test_a_view_counts_its_padding_and_a_vision_batch_padding_row_as_not_real(tiny_pairs):
    processor = load_processor(tiny_pairs["qwen2_vl"]["student"])
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)
    text_only = [s for s in samples_for("qwen2_vl") if not s.images] * 2
    ids, mask = torch.tensor([[7, 8, 9], [7, 0, 0]]), torch.tensor([[True] * 3, [True, False, False]])
    view = collator.scoring_views(text_only, ids, mask).student
    attention = view.inputs["attention_mask"]
    assert attention.shape[0] == 3  # the two samples and the padding row
    computed, real = view.positions()
    assert computed == attention.numel() and real == int(attention[:2].sum())
    assert view.positions(padding_free=True) == (int(attention.sum()), real)


# -- padding-free passes -------------------------------------------------------------------------


def attention_kernels() -> list:
    kernels = ["sdpa", "eager"]
    flash = pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention's varlen kernel needs a GPU "
                               "(run this test there: pytest tests/test_padding.py -k packed)")
    return kernels + [pytest.param("flash_attention_2", marks=flash)]


@pytest.mark.parametrize("kernel", attention_kernels())
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_give_the_padded_hidden_states_and_log_probs(tiny_pairs, family, kernel):
    # Rows of different prompt and response lengths; vision families mix one image, two images of
    # other sizes and no image in one batch (M-RoPE positions per sequence), both padding sides.
    paths = tiny_pairs[family]
    on_gpu = kernel == "flash_attention_2"
    model = load_model(paths["student"], attn_implementation=kernel, dtype=torch.bfloat16 if on_gpu else None)
    model = model.to("cuda" if on_gpu else "cpu").eval()
    processor = load_processor(paths["student"])
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)
    samples = samples_for(family)
    ids = torch.randint(0, 400, (len(samples), 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 2, 5][: len(samples)])
    mask = torch.arange(9)[None] < lengths[:, None]
    views = collator.scoring_views(samples, ids, mask)
    head = output_head(model, model.config.get_text_config().vocab_size)
    tokens = ids[mask].to(model.device)
    device_mask = mask.to(model.device)
    tolerance = 2e-2 if on_gpu else 1e-5
    for side in ("right", "left"):
        for view in (views.student, views.privileged_student):
            if side == "left":
                view = collator.response_view(samples, ids, mask, view is views.privileged_student, padding_side="left")
            view = view.to(model.device)
            with torch.no_grad():
                padded = response_hidden_states(model, view, device_mask)
                packed = response_hidden_states(model, view, device_mask, padding_free=True)
            torch.testing.assert_close(packed, padded, atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(token_logprobs(packed, head, tokens, 64), token_logprobs(padded, head, tokens, 64),
                                       atol=tolerance, rtol=tolerance)
    # The control: one row whose positions run on across sequences (what packing without per-sequence
    # positions would do) gives other hidden states; the comparison above can fail.
    packed = packed_view(model, views.student.to(model.device))
    positions = packed.inputs["position_ids"]
    packed.inputs["position_ids"] = torch.arange(positions.shape[-1], device=positions.device).expand_as(positions)
    with torch.no_grad():
        wrong = backbone_hidden(model, packed, device_mask)
        padded = response_hidden_states(model, views.student.to(model.device), device_mask)
    assert (wrong - padded).abs().max() > 0.5  # 1.2-1.8 here, against a tolerance of 1e-5 (2e-2 in bf16)


def backbone_hidden(model, packed: ModelView, mask: torch.Tensor) -> torch.Tensor:
    from dopd_vlm.scoring import backbone

    hidden = backbone(model)(**packed.inputs, use_cache=False).last_hidden_state
    rows, steps = mask.nonzero(as_tuple=True)
    return hidden[0, packed.logit_index[rows, steps]]


# -- configuration -------------------------------------------------------------------------------


def test_a_budget_that_cannot_hold_one_response_is_a_config_error(tmp_path, tiny_pairs):
    config = write_config(tmp_path / "c.yaml", tiny_pairs)
    assert load_config(config, ["train.micro_batch_tokens=64"]).train.micro_batch_tokens == 64
    with pytest.raises(ConfigError, match="config key 'train.micro_batch_tokens': 5 cannot hold one sequence"):
        load_config(config, ["train.micro_batch_tokens=5", "rollout.max_new_tokens=5"])


# -- the step on 1 and 2 ZeRO-3 ranks ---------------------------------------------------------------

STOP_BIAS = 1.5  # see skewed_pair: responses from 1 token to the cap, most under 8


@pytest.fixture(scope="module")
def skewed_pair(tmp_path_factory, tiny_pairs) -> dict:
    """The tiny Qwen2-VL pair, its student made to stop at very different lengths when sampling at
    temperature 1, as a real student does: its EOS rows of the output layer point along the mean
    final hidden state, so P(EOS) varies from token to token (most responses stop within a few
    tokens, a few run to the cap). A random tiny student (P(EOS) ~ 1/500) runs every response to it."""
    import shutil

    root = tmp_path_factory.mktemp("skewed")
    student = root / "student"
    shutil.copytree(tiny_pairs["qwen2_vl"]["student"], student)
    model = load_model(student)
    tokenizer = load_processor(student).tokenizer
    probe = torch.randint(0, len(tokenizer) - 20, (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=probe).last_hidden_state.flatten(0, 1)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        for eos in eos_token_ids(model, tokenizer):
            model.lm_head.weight[eos] = STOP_BIAS * direction
    model.save_pretrained(student)
    return {"qwen2_vl": {"student": student, "teacher": tiny_pairs["qwen2_vl"]["teacher"]}}


CAP = 16
# Budgets in positions per pass (rows x the longest row; packed: their sum), per method (vanilla
# OPD's views are the shorter plain prompts): with seed 0 the two ranks' own budget groupings differ
# in count, so a rank splits a micro-batch to match the other.
BUDGETS = {"dopd": 220, "vanilla_opd": 100}
GROUPINGS = {
    "fixed": [],
    "budget": ["train.micro_batch_tokens={budget}"],
    "budget_packed": ["train.micro_batch_tokens={budget}", "train.padding_free=true"],
}
# (not kl_to_teacher: a diagnostic that is the full KL where a chunk computes the teacher's full
# logits anyway and a top-K lower bound elsewhere, so it depends on which tokens share a chunk)
COMPARED = ("loss", "grad_norm", "threshold_gap", "threshold_prob_sum", "share/LH", "share/LL", "share/HT", "share/HS",
            "entropy", "token_loss")


@pytest.mark.slow
def test_token_budget_micro_batches_match_the_fixed_grouping_on_one_and_two_zero3_ranks(tmp_path, skewed_pair):
    # The same global batch (8 prompts x 2 rollouts; each fixed micro-batch its own generate call and
    # seed: the same rollouts on 1 and 2 ranks), one step of DOPD and of vanilla OPD under each
    # grouping, on 1 and 2 ZeRO-3 ranks: the loss, the router's thresholds and shares, the gradient
    # and the weights after the step must not depend on the grouping or the rank count.
    lr = 1e-3
    config = write_config(tmp_path / "c.yaml", skewed_pair, train={"steps": 1, "seed": 0, "prompts_per_step": 8},
                          data={"eval_splits": [], "max_eval_samples": 0}, optim={"lr": lr},
                          rollout={"num_rollouts": 2, "max_new_tokens": CAP, "batch_size": 2})
    methods = {"dopd": ["method.name=dopd"], "vanilla_opd": ["method.name=vanilla_opd", "method.teacher_privileged=false"]}
    runs = {f"{method}_{grouping}": [*m, *(o.format(budget=BUDGETS[method]) for o in g)]
            for method, m in methods.items() for grouping, g in GROUPINGS.items()}
    results = {}
    for nproc in (1, 2):
        specs = [{"name": name, "overrides": [*o, f"train.output_dir={tmp_path / str(nproc) / name}"]}
                 for name, o in runs.items()]
        results[nproc] = launch(tmp_path, config, specs, nproc=nproc)
    initial = load_file(skewed_pair["qwen2_vl"]["student"] / "model.safetensors")
    for method in methods:
        reference = results[1][f"{method}_fixed"]["metrics"]
        # the lengths this test is about: some responses stop at once, some reach the cap
        assert reference["response_length_min"] == 1 and reference["response_length_max"] == CAP
        assert 0 < reference["response_at_cap"] < 0.5
        weights = load_file(tmp_path / "1" / f"{method}_fixed" / "final" / "model.safetensors")
        for nproc in (1, 2):
            for grouping in GROUPINGS:
                name, result = f"{method}_{grouping}", results[nproc][f"{method}_{grouping}"]
                got = result["metrics"]
                assert result["finished"], (nproc, name)
                assert got["response_tokens"] == reference["response_tokens"], (nproc, name)
                for key in COMPARED:
                    if key in reference:
                        assert got[key] == pytest.approx(reference[key], rel=2e-5, abs=1e-7), (nproc, name, key)
                trained = load_file(tmp_path / str(nproc) / name / "final" / "model.safetensors")
                # Adam's first step moves each weight by lr x sign(gradient): where a gradient is
                # rounding noise around 0 its sign may flip with the summation order; nowhere else.
                moved = sum(int((trained[k] != initial[k]).sum()) for k in initial)
                differ = sum(int(((trained[k] - weights[k]).abs() > 1e-6).sum()) for k in weights)
                assert moved > 0.5 * sum(v.numel() for v in initial.values()), (nproc, name)
                assert differ <= 1e-4 * moved, (nproc, name, differ)
                assert all(((trained[k] - weights[k]).abs() <= 2.5 * lr).all() for k in weights), (nproc, name)
                if grouping != "fixed" and nproc == 2:
                    assert got["perf/micro_batch_splits"] >= 1, name  # the ranks' counts were evened
                if grouping == "budget_packed":
                    assert got["perf/padding_share/student"] == got["perf/padding_share/teacher"] == 0.0, name
        budget, fixed = (results[1][f"{method}_{grouping}"]["metrics"] for grouping in ("budget", "fixed"))
        assert budget["perf/micro_batches"] != fixed["perf/micro_batches"]  # regrouped, not the prompts' order


@pytest.mark.slow
def test_the_update_peak_memory_stays_within_the_token_budget_whatever_the_response_length(tmp_path, monkeypatch):
    # A measured bound, not a timed test: SFT on reference responses of ~1,000 and ~2,000 tokens
    # (4 prompts in one fixed micro-batch), a 256-wide student. The update's peak (the student pass,
    # loss and backward, above the resident set of the step's start) doubles with the responses under
    # the fixed grouping and stays put under a fixed budget. glibc returns large blocks to the system
    # at once here (MALLOC_MMAP_THRESHOLD_), so the resident set follows what is allocated.
    import yaml

    from dopd_vlm.lab.tiny import TinySize, make_tiny_pair

    size = TinySize(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=1024)
    pair = make_tiny_pair("qwen3", tmp_path / "pair", seed=0, student=size, teacher=size)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    recipes = {}
    for length in (1000, 2000):  # response tokens (about 7 per word with the tiny tokenizer)
        rows = [{"id": f"r{i}", "question": f"Say {i} things.", "answer": "ok", "privileged": "p", "images": [],
                 "reference": " ".join(words[(i + j) % 10] for j in range(length // 7))} for i in range(4)]
        folder = tmp_path / f"data{length}"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / "recipe.yaml").write_text(yaml.safe_dump({"kind": "local_files", "files": {"train": "train.jsonl"}}))
        recipes[length] = folder / "recipe.yaml"
    config = write_config(tmp_path / "c.yaml", {"qwen3": pair}, family="qwen3", method={"name": "sft"},
                          train={"steps": 1, "prompts_per_micro_batch": 4}, data={"eval_splits": [], "max_eval_samples": 0})
    groupings = {"fixed": [], "budget": ["train.micro_batch_tokens=2400"]}
    runs = [{"name": f"{grouping}_{length}", "overrides": [*overrides, f"data.recipe={recipe}",
                                                            f"train.output_dir={tmp_path / f'{grouping}_{length}'}"]}
            for grouping, overrides in groupings.items() for length, recipe in recipes.items()]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    results = launch(tmp_path, config, runs, nproc=1)
    growth = {}
    for name, result in results.items():
        metrics = result["metrics"]
        peak = max(metrics[f"memory/{phase}"] for phase in ("student_pass", "loss", "backward"))
        growth[name] = (peak - metrics["memory/rollout"]) * 1024  # MiB
    print(growth)
    assert results["budget_2000"]["metrics"]["perf/micro_batches"] == 4  # one ~2,000-token sequence each
    assert growth["fixed_2000"] > 1.6 * growth["fixed_1000"]  # the measurement sees the growth
    assert growth["fixed_2000"] > 3 * growth["budget_2000"]
    assert growth["budget_2000"] < 1.25 * growth["budget_1000"] + 16
