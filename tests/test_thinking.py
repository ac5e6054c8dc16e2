"""Chat-template arguments (`data.chat_template_kwargs`) and thinking models.

The tiny pairs of `template_pairs` carry chat templates written to behave like the published
ones (dopd_vlm/lab/tiny.py): Qwen3's (string content, `enable_thinking`; with it false the generation
prompt holds an empty, closed think block), Qwen2-VL's (a default system turn, `add_vision_id`) and
Qwen3-VL-Thinking's (the generation prompt opens `<think>`). The 2-rank run is in
tests/test_eval_cli.py, with the command that evaluates its result.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AddedToken, GenerationConfig

from dopd_vlm import prompt_checks
from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import CHAT_TEMPLATE_PARAMETERS, ConfigError, load_config
from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor, after_thinking
from dopd_vlm.data.schema import Sample, SampleHeader
from dopd_vlm.evaluate import decode_responses, evaluate_accuracy
from dopd_vlm.models import load_model, load_processor
from dopd_vlm.lab.tiny import QWEN3_CHAT, build_tiny_tokenizer
from dopd_vlm.vllm_rollout import engine_request
from test_collate import image, sample_with_logits, view_logprobs
from test_train import REPO, launch, metrics_lines, short_recipe, write_config

TEMPLATE = "Boxes:\n{privileged}\n{question}"
THINKING_OFF = {"enable_thinking": False}
# what each pair is rendered with in these tests (a variable its template reads)
KWARGS = {"qwen3_thinking": THINKING_OFF, "qwen2_vl_system": {"add_vision_id": True}, "qwen3_vl_thinking": {}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def collator_for(pairs, name, kwargs=None, **options) -> DualViewCollator:
    paths = pairs[name]
    return DualViewCollator(load_processor(paths["student"]), load_processor(paths["teacher"]),
                            privileged_template=TEMPLATE, max_privileged_tokens=0,
                            chat_template_kwargs=KWARGS[name] if kwargs is None else kwargs, **options)


def samples_for(name: str) -> list[Sample]:
    if name == "qwen3_thinking":
        return [Sample("t0", "How many shapes are there?", "2", "red circle [1, 2, 3, 4]", ()),
                Sample("t1", "What colour is the circle?", "red", "red circle [10, 20, 30, 40]", ())]
    return [Sample("v0", "How many shapes?", "1", "red circle [10, 10, 40, 40]", (image(0),)),
            Sample("v1", "Which image has more shapes?", "first", "a: red square\nb: none", (image(1), image(2, (56, 84)))),
            Sample("v2", "Say yes.", "yes", "the answer is yes", ())]


# -- the option ---------------------------------------------------------------------------------


def test_chat_template_kwargs_are_a_validated_mapping_of_template_variables():
    base = ["model.student=s", "model.teacher=t"]
    cfg = load_config(None, [*base, "data.chat_template_kwargs={enable_thinking: false, add_vision_id: true}"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False, "add_vision_id": True}
    assert load_config(None, base).data.chat_template_kwargs == {}
    cases = {
        "data.chat_template_kwargs=false": "config key 'data.chat_template_kwargs': expected a mapping, got bool False",
        "data.chat_template_kwargs=[enable_thinking]": "config key 'data.chat_template_kwargs': expected a mapping",
        "data.chat_template_kwargs={1: x}": "config key 'data.chat_template_kwargs.1': keys must be strings, got int 1",
        "data.chat_template_kwargs={add_generation_prompt: false}":
            "config key 'data.chat_template_kwargs.add_generation_prompt': is an argument of apply_chat_template",
        "data.chat_template_kwargs={tokenize: true}": "config key 'data.chat_template_kwargs.tokenize'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [*base, override])
        assert str(err.value).startswith(message) and "\n" not in str(err.value), (override, str(err.value))
    # evaluation's loading checks the data section alike, but needs no teacher
    with pytest.raises(ConfigError, match="data.chat_template_kwargs.messages"):
        load_config(None, ["data.chat_template_kwargs={messages: []}"], training=False)
    assert load_config(None, ["data.chat_template_kwargs={enable_thinking: true}"], training=False).model.teacher == ""


def test_the_refused_names_are_apply_chat_templates_own_parameters():
    # the list in config.py must follow transformers: every parameter of either method is refused
    for method in (transformers.PreTrainedTokenizerBase.apply_chat_template,
                   transformers.ProcessorMixin.apply_chat_template):
        own = [name for name, p in inspect.signature(method).parameters.items()
               if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert set(own) <= set(CHAT_TEMPLATE_PARAMETERS), set(own) - set(CHAT_TEMPLATE_PARAMETERS)


# -- rendered prompts ----------------------------------------------------------------------------


def test_prompts_are_rendered_with_the_arguments_as_the_published_templates_render_them(template_pairs, caplog):
    qwen3 = samples_for("qwen3_thinking")[0]
    vision = samples_for("qwen2_vl_system")[0]
    user = "<|im_start|>user\n"
    expected = {
        ("qwen3_thinking", None): f"{user}How many shapes are there?<|im_end|>\n<|im_start|>assistant\n",
        ("qwen3_thinking", "kwargs"):
            f"{user}How many shapes are there?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        ("qwen2_vl_system", None): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                   f"{user}<|vision_start|><|image_pad|><|vision_end|>How many shapes?<|im_end|>\n"
                                   "<|im_start|>assistant\n",
        ("qwen2_vl_system", "kwargs"): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                       f"{user}Picture 1: <|vision_start|><|image_pad|><|vision_end|>How many shapes?"
                                       "<|im_end|>\n<|im_start|>assistant\n",
        ("qwen3_vl_thinking", None): f"{user}<|vision_start|><|image_pad|><|vision_end|>How many shapes?<|im_end|>\n"
                                     "<|im_start|>assistant\n<think>\n",
    }
    for (name, with_kwargs), text in expected.items():
        collator = collator_for(template_pairs, name, None if with_kwargs else {})
        sample = qwen3 if name == "qwen3_thinking" else vision
        assert collator.prompt_text(sample, privileged=False) == text, (name, with_kwargs)
        # the privileged view: the same turn, p joined to the question by the privileged template
        privileged = collator.prompt_text(sample, privileged=True)
        assert privileged == text.replace(sample.question, TEMPLATE.format(privileged=sample.privileged,
                                                                           question=sample.question)), name
        assert collator.generation_opens_think() == (name == "qwen3_vl_thinking"), name
    # a variable the template never reads is left out (transformers would warn on every prompt), once logged
    collator = collator_for(template_pairs, "qwen2_vl_system", {"enable_thinking": False, "add_vision_id": True})
    with caplog.at_level(logging.WARNING, logger="dopd_vlm.collate"):
        for _ in range(3):
            assert collator.prompt_text(vision, privileged=False) == expected[("qwen2_vl_system", "kwargs")]
    warnings = [r.getMessage() for r in caplog.records if "enable_thinking" in r.getMessage()]
    assert len(warnings) == 1 and "never reads it" in warnings[0], warnings


def test_the_vision_padding_row_is_rendered_with_the_arguments(template_pairs):
    collator = collator_for(template_pairs, "qwen2_vl_system")
    batch = collator.rollout_batch([samples_for("qwen2_vl_system")[2]])  # no image: a padding row follows
    padding_row = collator.tokenizer.decode(batch["input_ids"][-1][batch["attention_mask"][-1].bool()])
    assert padding_row.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                  "Picture 1: <|vision_start|>")


def test_the_vllm_engine_samples_the_collators_rendered_prompt(template_pairs):
    # vllm_rollout renders no message itself: it sends the collator's rollout view (and checks vLLM's
    # token ids against the collator's on every call), so the arguments reach it through the collator
    for name in ("qwen3_thinking", "qwen2_vl_system"):
        collator = collator_for(template_pairs, name)
        for sample in samples_for(name):
            request = engine_request(collator, sample)
            assert request["prompt"] == collator.prompt_text(sample, privileged=False)
            assert list(request.get("multi_modal_data", {}).get("image", [])) == list(sample.images)
    assert engine_request(collator_for(template_pairs, "qwen3_thinking"),
                          samples_for("qwen3_thinking")[0])["prompt"].endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", list(KWARGS))
def test_every_view_lines_up_with_what_generate_scored(template_pairs, name):
    # Teacher-forced log-probs at each view's logit_index equal the ones generate assigned while
    # sampling from that view's prompt: the student's x, the privileged student's x + p, the
    # teacher's x + p (its own processor), all rendered with the arguments.
    paths = template_pairs[name]
    student, teacher = load_model(paths["student"]).eval(), load_model(paths["teacher"]).eval()
    collator = collator_for(template_pairs, name)
    samples = samples_for(name)
    teacher_view = collator.for_processor(collator.teacher_processor)
    drawn = {"student": sample_with_logits(student, collator, samples, seed=3),
             "privileged_student": sample_with_logits(student, collator, samples, seed=4, privileged=True),
             "teacher": sample_with_logits(teacher, teacher_view, samples, seed=5, privileged=True)}
    with torch.no_grad():
        for view_name, model in (("student", student), ("privileged_student", student), ("teacher", teacher)):
            ids, mask, generated = drawn[view_name]
            assert mask.any(dim=1).all()
            view = getattr(collator.scoring_views(samples, ids, mask), view_name)
            rows, steps = mask.nonzero(as_tuple=True)
            assert torch.equal(view.inputs["input_ids"][rows, view.logit_index[rows, steps] + 1], ids[mask])
            torch.testing.assert_close(view_logprobs(model, view, ids, mask), generated[mask], atol=1e-5, rtol=1e-5,
                                       msg=f"{name}: {view_name}")


@pytest.mark.parametrize("name", list(KWARGS))
def test_prompt_length_checks_count_the_rendered_arguments(template_pairs, name):
    # counted from the texts and image sizes alone, equal to the processor's real count with the
    # arguments; the arguments' own tokens (the empty think block, "Picture 1: ") are counted
    collator = collator_for(template_pairs, name)
    plain = collator_for(template_pairs, name, {})
    samples = samples_for(name)
    headers = [SampleHeader(s.id, s.question, s.answer, s.privileged, tuple(i.size for i in s.images), "here")
               for s in samples]
    cfg = load_config(None, ["model.student=s", "model.teacher=t", f"data.chat_template_kwargs={KWARGS[name]}"])
    for view in prompt_checks.run_limits(cfg, collator, None, None).views:
        counted = prompt_checks.prompt_lengths(collator, headers, view)
        without = prompt_checks.prompt_lengths(plain, headers, view)
        for sample, count, before in zip(samples, counted, without):
            real = collator.for_processor(view.processor).rollout_batch([sample], privileged=view.privileged)
            assert count == int(real["attention_mask"][0].sum()), (name, view.name, sample.id)
            extra = {"qwen3_thinking": len(collator.tokenizer("<think>\n\n</think>\n\n")["input_ids"]),
                     "qwen2_vl_system": len(sample.images) * len(collator.tokenizer("Picture 1: ")["input_ids"]),
                     "qwen3_vl_thinking": 0}[name]
            assert count - before == extra, (name, view.name, sample.id)


# -- answers of thinking models ------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, opened_by_prompt, answer_text",
    [
        ("<think>\nthe sum is 3, so</think>\n\n4", False, "4"),  # closed: the text after it, not the 3 inside
        ("<think>a</think> <think>b</think>\n5", False, "5"),  # the last </think>
        ("<think>\nthe sum is 3", False, None),  # opened by the response, never closed (cut by the cap)
        ("3 <think>wait", False, None),  # a think block opened after the last one closed
        ("3", False, "3"),  # no think block: the whole response
        ("the sum is 3", True, None),  # the prompt opened it (Qwen3-VL-Thinking), the response never closed it
        ("the sum is 3</think>\n\n3", True, "3"),
        ("</think>\n\n7", False, "7"),  # closing an (empty) block opened by the prompt
        ("", False, ""),
    ],
)
def test_the_answer_is_read_after_the_last_think_block(response, opened_by_prompt, answer_text):
    assert after_thinking(response, opened_by_prompt) == answer_text


class ScriptedGenerator(nn.Module):
    """Writes fixed responses (row b of a generate call gets responses[b]), whatever its prompt: the
    model evaluation's counting is checked with. Everything `rollout.sample_responses` calls."""

    def __init__(self, tokenizer, responses: list[str], eos_at_end: list[bool]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
        self.rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos
                     for text, eos in zip(responses, eos_at_end)]
        self.pad = tokenizer.pad_token_id

    def generate(self, input_ids, generation_config, **_):
        width = max(map(len, self.rows))
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + width), self.pad, dtype=torch.long)
        out[:, : input_ids.shape[1]] = input_ids
        for b, row in enumerate(self.rows[: input_ids.shape[0]]):
            out[b, input_ids.shape[1]: input_ids.shape[1] + len(row)] = torch.tensor(row)
        return out


@pytest.mark.parametrize("name", ["qwen3_thinking", "qwen3_vl_thinking"])
def test_evaluation_reads_answers_after_thinking_and_counts_unclosed_blocks(template_pairs, name):
    collator = collator_for(template_pairs, name)
    tokenizer = collator.tokenizer
    opened = name == "qwen3_vl_thinking"  # that template's generation prompt opens <think>
    prefix = "" if opened else "<think>\n"
    responses = [f"{prefix}the sum is 3</think>\n\n3",  # correct
                 f"{prefix}3 or 4? it is 3</think>\n\n4",  # wrong: the 3s are reasoning
                 f"{prefix}the sum is 3",  # cut by the cap inside its reasoning: unclosed
                 "3",  # no think block: with the opening prompt, unclosed; otherwise correct
                 f"{prefix}answer 3</think> answer 3"]  # correct (regex) / wrong (whole response)
    eos = [True, True, False, True, True]
    samples = [Sample(f"s{i}", "What is 1+2?", "3", "one plus two", ()) for i in range(len(responses))]
    if name == "qwen3_vl_thinking":
        samples = [Sample(s.id, s.question, s.answer, s.privileged, (Image.new("RGB", (56, 56)),)) for s in samples]
    model = ScriptedGenerator(tokenizer, responses, eos)
    for extractor, correct in ((WHOLE_RESPONSE, 1 + (not opened)), (AnswerExtractor("regex", r"answer (\S+)"), 1)):
        result = evaluate_accuracy(model, collator, samples, max_new_tokens=64, batch_size=len(samples),
                                   extractor=extractor)
        assert (result.correct, result.total, result.unclosed_think) == (correct, 5, 1 + opened), (name, extractor)


def test_think_tags_survive_decoding_even_where_a_tokenizer_marks_them_special():
    qwen3 = build_tiny_tokenizer(chat=QWEN3_CHAT)  # <think>, </think> added and not special, as in Qwen3's
    added_special = build_tiny_tokenizer()
    added_special.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")],
                             special_tokens=True)
    declared_special = build_tiny_tokenizer()
    declared_special.add_special_tokens({"extra_special_tokens": ["<think>", "</think>"]},
                                        replace_extra_special_tokens=False)
    text = "<think>\nthe sum is 3</think>\n\n3"
    for tokenizer in (qwen3, added_special, declared_special):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
        assert [ids.count(tag) for tag in tokenizer.convert_tokens_to_ids(["<think>", "</think>"])] == [1, 1]
        row = torch.tensor([ids])
        assert decode_responses(tokenizer, row, torch.ones_like(row, dtype=torch.bool)) == [text]
        # what decoding with skip_special_tokens reads: the tags survive only where they are not special
        kept = tokenizer.decode(ids, skip_special_tokens=True)
        assert kept == (text if tokenizer is qwen3 else "\nthe sum is 3\n\n3")


# -- 2 ranks -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_zero3_ranks_train_and_evaluate_thinking_models_with_the_arguments(tmp_path, template_pairs):
    # enable_thinking=false on both pairs: Qwen3's template closes an empty think block; Qwen3-VL-
    # Thinking's never reads it (left out, as the published one ignores it) and opens the block, so
    # its answers are unclosed unless the model writes </think>. Training evaluation and
    # `dopd-vlm eval` (the same 2-rank sharding) must count them alike.
    config = write_config(tmp_path / "c.yaml", template_pairs, family="qwen3_thinking", recipe="synthetic_text",
                          train={"steps": 1}, data={"chat_template_kwargs": THINKING_OFF})
    vl = template_pairs["qwen3_vl_thinking"]
    vl_overrides = [f"model.student={vl['student']}", f"model.teacher={vl['teacher']}",
                    f"data.recipe={short_recipe('synthetic_scenes', tmp_path)}"]
    results = launch(tmp_path, config, [
        {"name": "qwen3_thinking", "overrides": [f"train.output_dir={tmp_path / 'qwen3'}"]},
        {"name": "qwen3_vl_thinking", "overrides": [*vl_overrides, f"train.output_dir={tmp_path / 'qwen3_vl'}"]},
    ])
    for name in ("qwen3_thinking", "qwen3_vl_thinking"):
        assert results[name]["finished"] and results[name]["teacher_unchanged"], name
    logged = {name: metrics_lines(tmp_path / name) for name in ("qwen3", "qwen3_vl")}
    for lines in logged.values():
        for prefix in ("student", "student_privileged", "teacher", "teacher_privileged"):
            assert 0 <= lines[0][f"unclosed_think/{prefix}/test"] <= 4
        assert "unclosed_think/student/test" in lines[-1]
    start = logged["qwen3_vl"][0]
    assert start["unclosed_think/student/test"] > 0  # the prompt opened the think blocks the student never closed
    out = tmp_path / "eval.json"  # the initial student (model.student), as training evaluated it at step 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "dopd_vlm", "eval", "--config", str(config), "--json", str(out), *vl_overrides],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    (score,) = report["results"]
    assert (score["accuracy"], score["unclosed_think"]) == (start["student/test"], start["unclosed_think/student/test"])
    assert report["settings"]["chat_template_kwargs"] == THINKING_OFF and report["settings"]["generation_opens_think"]
