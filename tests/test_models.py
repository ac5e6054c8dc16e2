"""Tiny offline teacher/student pairs: build, reload through the Auto classes, run, determinism.

The pairs come from the session fixture `tiny_pairs` (tests/conftest.py), built once with seed 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
)

from dopd_vlm.families import FAMILIES, VISION_FAMILIES
from dopd_vlm.models import VISION_SPECIAL_TOKENS, count_parameters, load_model, load_processor, model_family, vision_special_token_ids
from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, TinySize, build_tiny_tokenizer, make_tiny_pair

EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen2Tokenizer"),
}
TOKENS_PER_112PX_IMAGE = 16
ROLES = ("teacher", "student")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _scene(colour: str) -> Image.Image:
    image = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(image).ellipse([20, 30, 70, 80], fill=colour)
    return image


def _vision_inputs(processor, num_images: int):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "How many shapes are there?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    images = [_scene(c) for c in ("red", "blue")[:num_images]]
    return processor(text=[text], images=images, return_tensors="pt")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dopd_vlm", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


# --------------------------------------------------------------------------------------------
# Reloading and running
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_reloads_offline_through_auto_classes(tiny_pairs, family):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model_cls, processor_cls = EXPECTED_CLASSES[family]
    auto_model = AutoModelForImageTextToText if family in VISION_FAMILIES else AutoModelForCausalLM
    auto_processor = AutoProcessor if family in VISION_FAMILIES else AutoTokenizer
    for role in ROLES:
        path = tiny_pairs[family][role]
        model = auto_model.from_pretrained(path)
        processor = auto_processor.from_pretrained(path)
        assert type(model).__name__ == model_cls
        assert type(processor).__name__ == processor_cls
        assert type(load_model(path)).__name__ == model_cls
        assert type(load_processor(path)).__name__ == processor_cls
        assert model_family(model) == model_family(path) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_config_token_ids_and_vocab_padding_come_from_the_tokenizer(tiny_pairs, family):
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    for role, size in (("teacher", TEACHER_SIZE), ("student", STUDENT_SIZE)):
        model = load_model(tiny_pairs[family][role])
        text = model.config.get_text_config()
        assert text.vocab_size == size.padded_vocab_size(len(tokenizer)) >= len(tokenizer)
        assert model.get_output_embeddings().weight.shape[0] == text.vocab_size
        assert model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
        assert model.generation_config.pad_token_id == ids("<|endoftext|>")
        if family in VISION_FAMILIES:
            assert model.config.image_token_id == ids("<|image_pad|>")
            assert model.config.video_token_id == ids("<|video_pad|>")
            assert model.config.vision_start_token_id == ids("<|vision_start|>")
            assert model.config.vision_end_token_id == ids("<|vision_end|>")
    # Default pair: the teacher's LM head is padded to a multiple of 64, the student's is exact.
    assert len(tokenizer) % 64 != 0
    assert TEACHER_SIZE.padded_vocab_size(len(tokenizer)) % 64 == 0
    assert STUDENT_SIZE.padded_vocab_size(len(tokenizer)) == len(tokenizer)


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_forward_with_images_through_chat_template(tiny_pairs, family, num_images):
    processor = load_processor(tiny_pairs[family]["student"])
    inputs = _vision_inputs(processor, num_images)
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    is_image = inputs["input_ids"] == processor.image_token_id
    assert int(is_image.sum()) == TOKENS_PER_112PX_IMAGE * num_images
    assert torch.equal(inputs["mm_token_type_ids"], is_image.long())  # 1 marks image tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * num_images  # 8x8 patches -> 4x4 tokens
    for role in ROLES:
        model = load_model(tiny_pairs[family][role])
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_generate_suppresses_vision_tokens_and_matches_teacher_forcing(tiny_pairs, family):
    """Re-scoring prompt+response in one forward reproduces generate's logits (same positions)."""
    path = tiny_pairs[family]["student"]
    processor, model = load_processor(path), load_model(path)
    inputs = _vision_inputs(processor, 1)
    suppressed = vision_special_token_ids(processor)
    out = model.generate(
        **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=suppressed,
        output_logits=True, return_dict_in_generate=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    response = out.sequences[:, prompt_len:]
    assert response.shape == (1, 4)
    assert not set(response.flatten().tolist()) & set(suppressed)

    mm_token_type_ids = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(response)], dim=1)
    with torch.no_grad():
        rescored = model(
            input_ids=out.sequences,
            attention_mask=torch.ones_like(out.sequences),
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    generated = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(rescored[:, prompt_len - 1 : -1], generated, atol=1e-4, rtol=1e-4)


def test_generate_gives_the_output_layer_contiguous_inputs(tiny_pairs):
    # generate slices the last position of each row ([B, 1, H], not contiguous); on CPU a bf16 linear
    # layer copies its whole weight once per row for such an input (load_model's pre-hook prevents it)
    path = tiny_pairs["qwen3"]["student"]
    tokenizer, model = load_processor(path), load_model(path, dtype=torch.bfloat16)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    prompts = ["How many red circles?", "What colour is the square, and where is it?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert seen and all(seen)


def test_text_family_chat_forward_and_generate(tiny_pairs):
    for role in ROLES:
        path = tiny_pairs["qwen3"][role]
        tokenizer, model = load_processor(path), load_model(path)
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": "How many red circles?"}],
            add_generation_prompt=True, return_dict=True, return_tensors="pt",
        )
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_chat_template_renders_qwen_chatml():
    tokenizer = build_tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Words of the synthetic tasks are single tokens; digits are split one by one, as in Qwen.
    assert tokenizer.tokenize(" red circle [10, 2]") == ["Ġred", "Ġcircle", "Ġ[", "1", "0", ",", "Ġ", "2", "]"]


# --------------------------------------------------------------------------------------------
# Pair properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_larger_than_student(tiny_pairs, family):
    teacher, student = (count_parameters(load_model(tiny_pairs[family][r])) for r in ROLES)
    assert 100_000 < student < teacher < 1_000_000


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_and_student_share_the_tokenizer(tiny_pairs, family):
    teacher, student = (_files(tiny_pairs[family][r]) for r in ROLES)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert teacher[name] == student[name], name
    if family in VISION_FAMILIES:  # same image settings, so the same image tokens
        assert teacher["processor_config.json"] == student["processor_config.json"]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_files_other_seed_other_weights(tiny_pairs, family, tmp_path):
    again = make_tiny_pair(family, tmp_path / "again", seed=0)
    other = make_tiny_pair(family, tmp_path / "other", seed=1)
    for role in ROLES:
        assert _files(again[role]) == _files(tiny_pairs[family][role])
        weights, other_weights = (load_file(p[role] / "model.safetensors") for p in (again, other))
        assert weights.keys() == other_weights.keys()
        embedding = next(k for k in weights if k.endswith("embed_tokens.weight"))
        assert not torch.equal(weights[embedding], other_weights[embedding])
        assert (other[role] / "tokenizer.json").read_bytes() == (again[role] / "tokenizer.json").read_bytes()


def test_make_tiny_pair_skips_an_identical_build_and_refuses_a_different_one(tmp_path):
    paths = make_tiny_pair("qwen3", tmp_path, seed=0)
    weights = paths["student"] / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert make_tiny_pair("qwen3", tmp_path, seed=0) == paths
    assert weights.stat().st_mtime_ns == built_at
    with pytest.raises(FileExistsError, match="overwrite"):
        make_tiny_pair("qwen3", tmp_path, seed=1)
    make_tiny_pair("qwen3", tmp_path, seed=1, overwrite=True)
    assert weights.stat().st_mtime_ns != built_at


def test_vocab_multiple_pads_only_the_lm_head(tmp_path):
    """Teacher and student that differ only by vocab padding (real Qwen sizes do)."""
    padded = TinySize(vocab_multiple=64)
    paths = make_tiny_pair("qwen3", tmp_path, teacher=padded, student=STUDENT_SIZE)
    teacher, student = (load_model(paths[r]) for r in ROLES)
    assert teacher.config.vocab_size == 512 and student.config.vocab_size == 500
    assert count_parameters(teacher) - count_parameters(student) == 2 * 12 * STUDENT_SIZE.hidden_size


def test_vision_special_token_ids():
    tokenizer = build_tiny_tokenizer()
    ids = vision_special_token_ids(tokenizer)
    assert ids == sorted(tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS)))
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
    assert "<|image_pad|>" in tokenizer.convert_ids_to_tokens(ids)


def test_tiny_size_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="num_heads"):
        TinySize(hidden_size=50)
    with pytest.raises(ValueError, match="perfect square"):
        TinySize(vision_num_position_embeddings=60)


# --------------------------------------------------------------------------------------------
# Errors and command line
# --------------------------------------------------------------------------------------------


def test_unsupported_family_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"'llava'.*qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3"):
        make_tiny_pair("llava", tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
    with pytest.raises(ValueError, match=r"'llama'.*qwen2_vl"):
        model_family(LlamaConfig())
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"'llama'"):
        load_model(tmp_path / "llama")


def test_cli_help_explains_program_and_make_tiny():
    program = _run_cli("--help")
    assert program.returncode == 0, program.stderr
    assert "Dual On-policy Distillation" in program.stdout and "make-tiny" in program.stdout
    command = _run_cli("make-tiny", "--help")
    assert command.returncode == 0, command.stderr
    for option in ("--family", "--out", "--seed", "--teacher-hidden", "--student-layers", "--overwrite"):
        assert option in command.stdout


def test_cli_make_tiny_builds_the_same_files_in_a_fresh_process(tiny_pairs, tmp_path):
    result = _run_cli("make-tiny", "--family", "qwen3_vl", "--out", str(tmp_path), "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "qwen3_vl: teacher=" in result.stdout
    for role in ROLES:
        assert _files(tmp_path / "qwen3_vl" / role) == _files(tiny_pairs["qwen3_vl"][role])
