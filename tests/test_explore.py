"""dopd_vlm.lab.explore: the explorer's routed batch agrees with plain forward passes and the router;
presentation helpers and metrics.jsonl reading."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import DataConfig, MethodConfig, RolloutConfig
from dopd_vlm.data import load_recipe
from dopd_vlm.lab.explore import draw_boxes, find_runs, read_run, regime_html, score_and_route, token_texts
from dopd_vlm.methods import compute_loss
from dopd_vlm.models import load_model, load_processor, vision_special_token_ids
from dopd_vlm.rollout import sample_responses
from dopd_vlm.router import NUM_REGIMES, REGIME_NAMES, route

RECIPES = {"qwen2_vl": "synthetic_scenes", "qwen3": "synthetic_text"}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def routed(request, tiny_pairs):
    family = request.param
    paths = tiny_pairs[family]
    student, teacher = load_model(paths["student"]).eval(), load_model(paths["teacher"]).eval()
    processor = load_processor(paths["student"])
    collator = DualViewCollator.from_config(processor, load_processor(paths["teacher"]), data=DataConfig())
    samples = [s for s in load_recipe(RECIPES[family], "test", family=family, limit=3) for _ in range(2)]
    torch.manual_seed(0)
    ids, mask = sample_responses(student, collator, samples, RolloutConfig(max_new_tokens=10),
                                 suppress_token_ids=vision_special_token_ids(processor))
    batch = score_and_route(student, teacher, collator, samples, ids, mask, chunk_size=7)
    return batch, student, teacher, collator


def _full_forward_logprobs(model, view, response_ids, response_mask, vocab_size):
    """log p(y_n) from the model's ordinary forward pass (all positions, full logits)."""
    logits = model(**view.inputs).logits[..., :vocab_size].float()
    rows, steps = response_mask.nonzero(as_tuple=True)
    picked = logits[rows, view.logit_index[rows, steps]].log_softmax(-1)
    return picked, picked.gather(-1, response_ids[rows, steps][:, None]).squeeze(-1)


def test_logprobs_match_plain_forward_passes(routed):
    batch, student, teacher, _ = routed
    views = batch.views
    assert batch.num_tokens == int(views.response_mask.sum()) > 0
    for model, view, logprobs in (
        (student, views.student, batch.student_logprobs),
        (student, views.privileged_student, batch.privileged_logprobs),
        (teacher, views.teacher, batch.teacher_logprobs),
    ):
        with torch.no_grad():
            _, expected = _full_forward_logprobs(model, view, views.response_ids, views.response_mask, batch.vocab_size)
        torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)
    # The privileged view really differs from the plain one (p is in the prompt).
    assert not torch.allclose(batch.student_logprobs, batch.privileged_logprobs)


def test_routing_is_the_routers(routed):
    batch = routed[0]
    expected = route(batch.teacher_logprobs, batch.privileged_logprobs, torch.ones(batch.num_tokens, dtype=torch.bool))
    assert torch.equal(batch.routing.regimes, expected.regimes)
    assert ((batch.routing.regimes >= 0) & (batch.routing.regimes < NUM_REGIMES)).all()
    assert sum(batch.shares.values()) == pytest.approx(1.0)
    torch.testing.assert_close(batch.gap, (batch.teacher_logprobs.double() - batch.privileged_logprobs.double()).abs())


def test_table_rows_follow_tokens(routed):
    batch, _, _, collator = routed
    table = batch.table(collator.tokenizer)
    assert len(table) == batch.num_tokens
    first = table[0]
    assert set(first) == {"seq", "pos", "token", "regime", "A", "lT", "lP", "lS", "qT", "qP"}
    assert first["regime"] in REGIME_NAMES and first["A"] == pytest.approx(abs(first["lT"] - first["lP"]))
    for b in range(batch.tokens.num_sequences):
        rows = batch.sequence(b)
        assert [table[i]["pos"] for i in rows.tolist()] == list(range(len(rows)))
        assert len(rows) == int(batch.views.response_mask[b].sum())
    order = batch.highest_gap(4)
    assert (batch.gap[order][:-1] >= batch.gap[order][1:]).all() and batch.gap[order[0]] == batch.gap.max()


def test_top_alternatives_are_the_models_top_tokens(routed):
    batch, _, teacher, _ = routed
    rows = batch.highest_gap(3)
    probs, ids = batch.top_alternatives("teacher", rows, k=4)
    assert probs.shape == ids.shape == (3, 4)
    assert (probs[:, :-1] >= probs[:, 1:]).all() and (ids < batch.vocab_size).all()
    views = batch.views
    with torch.no_grad():
        full, _ = _full_forward_logprobs(teacher, views.teacher, views.response_ids, views.response_mask, batch.vocab_size)
    torch.testing.assert_close(probs[:, 0], full[rows].exp().max(-1).values, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="view must be one of"):
        batch.top_alternatives("oracle", rows)


def test_loss_inputs_feed_every_method(routed):
    batch = routed[0]
    for cfg in (MethodConfig(top_k=8), MethodConfig(name="vanilla_opd", top_k=8), MethodConfig(name="opsd")):
        with torch.no_grad():
            loss, stats = compute_loss(cfg, batch.loss_inputs(), chunk_size=5)
        assert torch.isfinite(loss) and stats.loss.shape == (batch.num_tokens,)


def test_regime_html_colours_every_token_and_escapes(routed):
    batch, _, _, collator = routed
    page = regime_html(batch, collator.tokenizer)
    assert page.count('title="L') + page.count('title="H') == batch.num_tokens
    assert "<|" not in page  # special tokens such as <|im_end|> are escaped, not swallowed as tags
    only_first = regime_html(batch, collator.tokenizer, sequences=[0])
    assert only_first.count("A=") == len(batch.sequence(0))


def test_token_texts_decode_one_by_one(routed):
    tokenizer = routed[3].tokenizer
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(tokenizer, ids)) == "a red circle"
    assert token_texts(tokenizer, torch.tensor([tokenizer.eos_token_id])) == ["<|im_end|>"]


def test_draw_boxes_scales_and_outlines():
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    out = draw_boxes(image, [{"box": [2, 2, 8, 6], "color": "red", "shape": "circle"}], scale=3)
    assert out.size == (60, 30) and image.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((2 * 3, 5 * 3)) == (0, 0, 0)  # left edge of the box
    assert out.getpixel((50, 25)) == (255, 255, 255)  # outside any box


# -- metrics.jsonl --------------------------------------------------------------------------


def _write_run(run_dir, lines, config=None, tail=""):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))


def test_read_run_series_baseline_and_resume(tmp_path):
    lines = [
        {"step": 0, "student/test": 0.1, "teacher/test": 0.5, "teacher_privileged/test": 0.7},
        {"step": 1, "loss": 3.0, "share/LH": 0.5},
        {"step": 2, "loss": 2.0, "share/LH": 0.4, "student/test": 0.2},
        {"step": 2, "loss": 1.5, "share/LH": 0.3, "student/test": 0.25},  # resumed: rewritten step
    ]
    _write_run(tmp_path / "a", lines, {"method": {"name": "dopd", "ablation": "no_routing"}},
               tail='{"step": 3, "lo')  # a run still writing its last line
    run = read_run(tmp_path / "a" / "metrics.jsonl")
    assert run.name == "a" and run.method == "dopd (no_routing)"
    assert run.series("loss") == ([1, 2], [3.0, 1.5])
    assert run.series("student/test") == ([0, 2], [0.1, 0.25])
    assert run.baseline["teacher_privileged/test"] == 0.7
    assert run.splits() == ["test"] and run.last("loss") == 1.5 and run.last("missing") is None
    assert "share/LH" in run.keys() and "step" not in run.keys()


def test_find_runs_names_runs_below_the_folder(tmp_path):
    _write_run(tmp_path / "demo" / "dopd", [{"step": 0}], {"method": {"name": "dopd"}})
    _write_run(tmp_path / "demo" / "opd" / "seed1", [{"step": 0}], {"method": {"name": "vanilla_opd"}})
    runs = find_runs(tmp_path / "demo")
    assert [(r.name, r.method) for r in runs] == [("dopd", "dopd"), ("opd/seed1", "vanilla_opd")]
    assert [r.name for r in find_runs(tmp_path / "demo" / "dopd")] == ["dopd"]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        find_runs(tmp_path / "nothing")
