"""Issue #7, bad input: every case stops the load before training with ONE line naming the file,
row and field (or the config key), or, where the user asked for `skip_bad_rows`, is skipped,
counted and logged. Odd but valid images load as RGB and go through the real processors.

Bad-row cases already in tests/test_data.py (missing/corrupt/truncated image files, missing or
empty fields, wrong field mapping, malformed JSON, skip_bad_rows) are not repeated in strict
mode here; the skip table below runs every row-level case with skip_bad_rows as well.
"""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dopd_vlm.collate import DualViewCollator, check_shared_vocab, reference_responses
from dopd_vlm.config import ConfigError, DataConfig, load_config, load_deepspeed_config
from dopd_vlm.data import RecipeError, Sample, load_recipe
from dopd_vlm.families import VISION_FAMILIES
from dopd_vlm.models import load_model, load_processor, model_family
from test_data import MAPPING, png, row, write_local
from test_train import REPO, write_config

TEMPLATE = "Boxes:\n{privileged}\n{question}"


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


def jsonl_line(value) -> bytes:
    return (json.dumps(value) + "\n").encode()


# -- row-level cases: strict error and counted skip ------------------------------------------

# name -> (the bad row, line 2 of the file, as raw JSONL bytes; what the one-line error must contain)
ROW_CASES = {
    "missing_image_file": (jsonl_line(row(1, ["img/nope.png"])),
                           "field 'pics' (images): image 0 (img/nope.png): file not found: "),
    "zero_byte_image_file": (jsonl_line(row(1, ["img/zero.png"])),
                             "field 'pics' (images): image 0 (img/zero.png): empty file (0 bytes)"),
    "zero_byte_image_data": (jsonl_line(row(1, ["data:image/png;base64,"])),
                             "field 'pics' (images): image 0 (bytes): empty (0 bytes)"),
    "corrupt_image": (jsonl_line(row(1, ["img/corrupt.png"])),
                      "field 'pics' (images): image 0 (img/corrupt.png): cannot decode: not an image"),
    "truncated_image": (jsonl_line(row(1, ["img/truncated.png"])),
                        "field 'pics' (images): image 0 (img/truncated.png): cannot decode"),
    "extreme_aspect_ratio": (jsonl_line(row(1, ["img/sliver.png"])),
                             "image 0 (img/sliver.png): 300x1 pixels: aspect ratio above 200:1"),
    "image_of_wrong_type": (jsonl_line(row(1, [5])),
                            "field 'pics' (images): image 0: expected a path, bytes or a data: URI, got int"),
    "non_utf8_bytes": (b'{"uid": "u1", "prompt": "caf\xe9?", "label": "a", "hint": "p", "pics": []}\n',
                       "line 2: not valid UTF-8 (byte 0xe9 at offset 28 of the line)"),
    "malformed_json": (b'{"uid": "u1", "prompt": "q?",\n', "line 2: invalid JSON ("),
    "not_a_json_object": (b'["u1", "q?"]\n', "line 2: expected a JSON object, got list"),
    "lone_surrogate": (b'{"uid": "u1", "prompt": "q\\ud800?", "label": "a", "hint": "p", "pics": []}\n',
                       "field 'prompt' (question): not valid Unicode (unpaired surrogate"),
    "no_question": (jsonl_line({k: v for k, v in row(1, []).items() if k != "prompt"}),
                    "field 'prompt' (question): missing"),
    "blank_question": (jsonl_line(row(1, [], prompt=" \t ")), "field 'prompt' (question): empty"),
    "no_answer": (jsonl_line({k: v for k, v in row(1, []).items() if k != "label"}),
                  "field 'label' (answer): missing"),
    "null_answer": (jsonl_line(row(1, [], label=None)), "field 'label' (answer): missing"),
    "no_privileged": (jsonl_line({k: v for k, v in row(1, []).items() if k != "hint"}),
                      "field 'hint' (privileged): missing"),
    "empty_privileged": (jsonl_line(row(1, [], hint="")), "field 'hint' (privileged): empty"),
    "more_placeholders_than_images": (
        jsonl_line(row(1, ["img/a.png"], prompt="Compare <image> with <image>.")),
        "field 'prompt' (question): 2 <image> placeholder(s) but 1 image(s)"),
    "placeholder_without_image": (jsonl_line(row(1, [], prompt="<image> What is it?")),
                                  "field 'prompt' (question): 1 <image> placeholder(s) but 0 image(s)"),
    "placeholder_in_privileged": (jsonl_line(row(1, ["img/a.png"], hint="see <image>")),
                                  "field 'hint' (privileged): contains <image>"),
}


def write_case(tmp_path, bad_line: bytes, **extra):
    """Good line 1, the bad line 2, good line 3; the odd image files next to the good ones."""
    path = write_local(tmp_path, [row(0, ["img/a.png"]), row(2, [])], extra=extra)
    img = tmp_path / "data" / "img"
    (img / "zero.png").write_bytes(b"")
    (img / "corrupt.png").write_bytes(b"not an image at all")
    (img / "truncated.png").write_bytes(png(size=(64, 64))[:60])
    (img / "sliver.png").write_bytes(png(size=(300, 1)))
    data = tmp_path / "data" / "train.jsonl"
    good = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(good[0] + bad_line + good[1])
    return path


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_row_is_one_line_naming_file_row_and_field(tmp_path, case):
    bad_line, expected = ROW_CASES[case]
    with pytest.raises(RecipeError) as error:
        load_recipe(write_case(tmp_path, bad_line), "train")
    message = one_line(error.value)
    assert re.match(r"\S*data/train\.jsonl line 2[: ]", message), message
    assert expected in message, message


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_skip_bad_rows_skips_counts_and_logs_every_row_level_case(tmp_path, caplog, case):
    bad_line, expected = ROW_CASES[case]
    with caplog.at_level(logging.WARNING, logger="dopd_vlm.data"):
        ds = load_recipe(write_case(tmp_path, bad_line, skip_bad_rows=True), "train")
    assert [s.id for s in ds] == ["u0", "u2"]
    assert len(ds.skipped) == 1 and expected in ds.skipped[0] and "\n" not in ds.skipped[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith("skipping bad row: ")] == [f"skipping bad row: {ds.skipped[0]}"]
    assert any("skipped 1 bad rows of 3" in w for w in warnings)


def test_only_unreadable_lines_with_skip_is_no_usable_rows(tmp_path):
    path = write_case(tmp_path, b"{oops\n", skip_bad_rows=True)
    (tmp_path / "data" / "train.jsonl").write_bytes(b"{oops\n\xff\xfe\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path, "train")
    assert "train.jsonl: no usable rows" in one_line(error.value)


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    path = write_local(tmp_path, [row(0, [])])
    lines = [json.dumps(row(i, [])).encode() for i in range(3)]
    (tmp_path / "data" / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(lines) + b"\r\n")
    assert [s.id for s in load_recipe(path, "train")] == ["u0", "u1", "u2"]


def test_decompression_bomb_is_a_row_error(tmp_path, monkeypatch):
    path = write_local(tmp_path, [row(0, ["img/a.png"])])  # a.png is 20x16 = 320 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, "train")
    message = one_line(error.value)
    assert "line 1 field 'pics' (images): image 0 (img/a.png): cannot decode: Image size (320 pixels)" in message


# -- recipe / mapping errors (whole file: never skipped) --------------------------------------


def test_wrong_field_mapping_is_named_even_with_skip_bad_rows(tmp_path):
    # a mapped column the file lacks (test_data covers answer); a whole-file error, never a skip
    wrong = write_local(tmp_path, [row(0, [])], extra={"fields": {**MAPPING, "images": "pictures"},
                                                       "skip_bad_rows": True})
    with pytest.raises(RecipeError) as error:
        load_recipe(wrong, "train")
    message = one_line(error.value)
    assert "train.jsonl field 'pictures' (images): missing (no such column" in message
    # a mapping key that is not a canonical field
    bad_key = write_local(tmp_path, [row(0, [])], extra={"fields": {"prompt": "question"}})
    with pytest.raises(RecipeError) as error:
        load_recipe(bad_key, "train")
    message = one_line(error.value)
    assert "local.yaml: key 'fields.prompt': not allowed (allowed: id, question" in message


# -- image paths relative to the data file -----------------------------------------------------


def test_image_paths_are_relative_to_the_data_file_not_the_working_dir(tmp_path, monkeypatch):
    rows = [row(0, ["img/a.png", "../shared/c.png", str(tmp_path / "data" / "img" / "b.png")])]
    path = write_local(tmp_path, rows)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "c.png").write_bytes(png((1, 2, 3)))
    monkeypatch.chdir(tmp_path / "data" / "img")  # relative to the cwd, ../shared would be data/shared
    images = load_recipe(path, "train")[0].images
    assert [im.getpixel((0, 0)) for im in images] == [(200, 30, 30), (1, 2, 3), (30, 30, 200)]
    (tmp_path / "shared" / "c.png").unlink()
    with pytest.raises(RecipeError) as error:
        load_recipe(path, "train")
    message = one_line(error.value)
    assert message.endswith(f"image 1 (../shared/c.png): file not found: {tmp_path / 'shared' / 'c.png'}")


# -- odd but valid images: RGB, and through the real processors ---------------------------------


def odd_images() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))  # fully transparent: white, not black
    palette_t = Image.new("P", (16, 16), 0)
    palette_t.putpalette([0, 0, 255] * 256)
    palette_t.info["transparency"] = 0
    return {
        "gray.png": (Image.new("L", (32, 24), 100), (100, 100, 100)),
        "bilevel.png": (Image.new("1", (24, 24), 1), (255, 255, 255)),
        "palette.png": (Image.new("RGB", (24, 32), (0, 0, 255)).convert("P"), (0, 0, 255)),
        "palette_transparent.png": (palette_t, (255, 255, 255)),
        "rgba.png": (rgba, (255, 255, 255)),
        "gray_alpha.png": (Image.new("LA", (20, 20), (0, 0)), (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (32, 32), (0, 0, 0, 0)), (255, 255, 255)),
        "gray16.png": (Image.fromarray(np.full((24, 40), 65535 // 2, dtype=np.uint16)), (127, 127, 127)),
        "one_pixel.png": (Image.new("RGB", (1, 1), (9, 8, 7)), (9, 8, 7)),
        "large.jpg": (Image.new("RGB", (8000, 6000), (250, 250, 250)), None),
    }


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    images = odd_images()
    rows = []
    for name, (image, _) in images.items():
        image.save(root / name, **({"quality": 60} if name.endswith(".jpg") else {}))
        with Image.open(root / name) as stored:  # the file really has the odd mode (I;16, CMYK, ...)
            assert stored.mode == image.mode, name
        rows.append({"id": name, "question": "What is it?", "answer": "x", "privileged": "p", "images": [name]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_recipe({"kind": "local_files", "files": {"train": str(root / "train.jsonl")}}, "train")
    return list(ds), images  # decoded once, shared read-only by the tests below


def test_odd_images_load_as_8bit_rgb(odd_dataset):
    samples, images = odd_dataset
    assert [s.id for s in samples] == list(images)
    for sample in samples:
        (image,) = sample.images
        original, pixel = images[sample.id]
        assert image.mode == "RGB" and image.size == original.size, sample.id
        if pixel is not None:
            assert image.getpixel((0, 0)) == pixel, sample.id
    corner = np.asarray(samples[-1].images[0].crop((0, 0, 64, 64)), dtype=np.int16)
    assert abs(corner - 250).max() <= 3  # the 8000x6000 JPEG


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_odd_images_go_through_the_real_processor(odd_dataset, tiny_pairs, family):
    """1x1 is upsampled by the Qwen processors to their minimum (4 merged patches, e.g. 56x56
    pixels for Qwen2-VL); 8000x6000 is downsampled to their maximum pixel budget."""
    samples, _ = odd_dataset
    processor = load_processor(tiny_pairs[family]["student"])
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)
    batch = collator.rollout_batch(samples)
    grids = batch["image_grid_thw"]
    assert grids.shape == (len(samples), 3)
    image_processor = processor.image_processor
    pixels = grids[:, 1] * grids[:, 2] * image_processor.patch_size**2  # after resizing
    one_pixel = [s.id for s in samples].index("one_pixel.png")
    assert grids[one_pixel].tolist() == [1, 2 * image_processor.merge_size, 2 * image_processor.merge_size]
    assert int(pixels[one_pixel]) == image_processor.size["shortest_edge"]  # min_pixels
    assert int(pixels.max()) <= image_processor.size["longest_edge"]  # max_pixels
    small = samples[:-1]  # the privileged views too (without re-resizing the large image)
    views = collator.scoring_views(small, torch.full((len(small), 2), 5), torch.ones(len(small), 2, dtype=torch.bool))
    assert torch.equal(views.privileged_student.inputs["image_grid_thw"], grids[:-1])


# -- placeholders ------------------------------------------------------------------------------


def test_image_placeholders_place_images_in_the_text(tmp_path, tiny_pairs):
    rows = [row(0, ["img/a.png", "img/b.png"], prompt="Left: <image> Right: <image> Which is redder?")]
    sample = load_recipe(write_local(tmp_path, rows), "train")[0]
    collator = DualViewCollator(load_processor(tiny_pairs["qwen2_vl"]["student"]), privileged_template=TEMPLATE, max_privileged_tokens=0)
    for privileged in (False, True):
        text = collator.prompt_text(sample, privileged)
        assert "<image>" not in text
        assert re.search(r"Left: <\|vision_start\|>.*<\|vision_end\|> Right: <\|vision_start\|>.*"
                         r"<\|vision_end\|> Which is redder\?", text), text
    assert collator.rollout_batch([sample])["image_grid_thw"].shape[0] == 2
    image = sample.images[0]
    with pytest.raises(ValueError) as error:
        collator.prompt_text(Sample("s9", "<image> and <image>?", "a", "p", (image,)), False)
    assert "sample 's9': the question has 2 <image> placeholder(s) for 1 image(s)" in one_line(error.value)
    with pytest.raises(ValueError) as error:
        collator.prompt_text(Sample("s8", "<image> what?", "a", "see <image>", (image,)), True)
    assert "sample 's8': the privileged text" in one_line(error.value)


# -- over-long privileged text -----------------------------------------------------------------


def test_max_privileged_tokens_is_a_validated_config_key(tmp_path, tiny_pairs):
    assert DataConfig().max_privileged_tokens == 1024
    config = write_config(tmp_path / "c.yaml", tiny_pairs)
    assert load_config(config, ["data.max_privileged_tokens=0"]).data.max_privileged_tokens == 0
    for value, expected in [("-1", "must be >= 0"), ("many", "must be an integer")]:
        with pytest.raises(ConfigError) as error:
            load_config(config, [f"data.max_privileged_tokens={value}"])
        assert f"config key 'data.max_privileged_tokens': {expected}" in one_line(error.value)
    with pytest.raises(ValueError, match="max_privileged_tokens must be an integer >= 0"):
        DualViewCollator(load_processor(tiny_pairs["qwen3"]["student"]), privileged_template=TEMPLATE,
                         max_privileged_tokens=-5)


def test_overlong_privileged_text_is_truncated_counted_and_logged_once(tiny_pairs, caplog):
    processor = load_processor(tiny_pairs["qwen3"]["student"])
    tokenizer = processor
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=40)
    long_p = " ".join(f"red circle [{i},{i},{i + 9},{i + 9}]" for i in range(200))
    samples = [Sample("long-0", "How many shapes?", "200", long_p, ()),
               Sample("short", "How many?", "1", "red circle [1,2,3,4]", ()),
               Sample("long-1", "Count them.", "200", long_p, ())]
    response = torch.tensor([[7, 8, 9, 10]] * 3)
    mask = torch.tensor([[True, True, True, False]] * 3)
    with caplog.at_level(logging.DEBUG, logger="dopd_vlm.collate"):
        for _ in range(3):  # every view and every repetition: still one count per sample
            views = collator.scoring_views(samples, response, mask)
    cut = collator.privileged_text(samples[0])
    assert long_p.startswith(cut.rstrip()) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 40
    assert collator.privileged_text(samples[1]) == samples[1].privileged
    assert collator.truncated_privileged == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sample 'long-0'" in warnings[0] and "data.max_privileged_tokens" in warnings[0]
    # never the question nor the response: the plain view keeps the question, every view ends
    # in the same response tokens
    assert torch.equal(views.response_ids, response) and torch.equal(views.response_mask, mask)
    for view in (views.student, views.privileged_student, views.teacher):
        ids, index = view.inputs["input_ids"], view.logit_index
        for b in range(3):
            assert ids[b, index[b, :3] + 1].tolist() == [7, 8, 9]
    assert "Count them." in tokenizer.decode(views.privileged_student.inputs["input_ids"][2])
    plain = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=0)
    assert plain.privileged_text(samples[0]) == long_p and plain.truncated_privileged == 0


def test_training_evaluation_and_warm_up_see_the_same_truncated_privileged_prompt(tiny_pairs):
    # One builder for every prompt with p: the step-0 teacher-with-p baseline (evaluation) and the
    # warm-ups must see exactly the privileged view training scores, truncation included.
    from dopd_vlm.lab.warmup import supervised_loss

    model = load_model(tiny_pairs["qwen3"]["student"]).eval()
    processor = load_processor(tiny_pairs["qwen3"]["student"])
    collator = DualViewCollator(processor, privileged_template=TEMPLATE, max_privileged_tokens=12)
    long_p = " ".join(f"step {i}: add {i}" for i in range(60))
    sample = Sample("long", "What is the total?", "7", long_p, ())
    response, mask = torch.tensor([[7, 8, 9]]), torch.tensor([[True, True, True]])
    training = collator.scoring_views([sample], response, mask).privileged_student
    prompt_length = int(training.logit_index[0, 0]) + 1
    training_prompt = training.inputs["input_ids"][0, :prompt_length]
    evaluation_prompt = collator.rollout_batch([sample], privileged=True)["input_ids"][0]  # what evaluation generates from
    assert evaluation_prompt.tolist() == training_prompt.tolist()
    assert len(training_prompt) < len(processor(long_p)["input_ids"])  # p was cut
    with torch.no_grad():  # the warm-up's loss with p is the loss on that same view
        warm = supervised_loss(model, collator, [sample], privileged=[True])
        ids, answer_mask = reference_responses(collator, [sample])
        view = collator.scoring_views([sample], ids, answer_mask).privileged_student
        logits = model(**view.inputs).logits[0, view.logit_index[0]]
        expected = torch.nn.functional.cross_entropy(logits.float(), ids[0])
    torch.testing.assert_close(warm, expected, rtol=1e-5, atol=1e-6)


# -- models: tokenizer mismatch, unsupported family ---------------------------------------------


def test_teacher_student_tokenizer_mismatch_is_one_line(tiny_pairs):
    student = load_processor(tiny_pairs["qwen3"]["student"])
    teacher = load_processor(tiny_pairs["qwen3"]["teacher"])
    teacher.add_tokens(["<only_in_teacher>"])
    with pytest.raises(ValueError) as error:
        check_shared_vocab(teacher, student, 4096, 4096)
    message = one_line(error.value)
    assert "tokenizers differ (model.teacher has" in message and "<only_in_teacher>" in message


def test_unsupported_or_unreadable_checkpoint_is_one_line_naming_it(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text('{"model_type": "brand_new_arch"}')
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "llama": "Unsupported model family 'llama': dopd_vlm supports qwen2_vl",
        tmp_path / "new": "Unsupported model family 'brand_new_arch'",
        tmp_path / "empty": "no config.json in this folder",
        tmp_path / "missing": "no such local folder, and not loadable as a Hub id",
    }
    for path, expected in cases.items():
        for call in (model_family, load_model):
            with pytest.raises(ValueError) as error:
                call(path)
            message = one_line(error.value)
            assert message.startswith(f"checkpoint {path}: ") and expected in message, message


def test_incomplete_safetensors_are_named_before_any_model_loads(tmp_path, tiny_pairs):
    import json as json_module
    import shutil

    from dopd_vlm.errors import InputError
    from dopd_vlm.models import check_weight_files

    folder = tmp_path / "student"
    shutil.copytree(tiny_pairs["qwen2_vl"]["student"], folder)
    check_weight_files(folder)  # complete
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    for cut, reason in ((len(full) - 100, "incomplete metadata, file not fully covered"), (5, "header too small")):
        weights.write_bytes(full[:cut])
        with pytest.raises(InputError) as error:
            check_weight_files(folder)
        assert one_line(error.value) == (f"checkpoint {folder}: model.safetensors is damaged or truncated (Error while "
                                         f"deserializing header: {reason}); re-download or re-export it")
    weights.write_bytes(full)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json_module.dumps(index))
    with pytest.raises(InputError) as error:
        check_weight_files(folder)
    assert one_line(error.value) == (f"checkpoint {folder}: model-00001-of-00002.safetensors, listed in "
                                     "model.safetensors.index.json, is missing")


# -- configuration: DeepSpeed JSON, unknown keys and methods, output folder ---------------------


@pytest.fixture
def cfg(tmp_path, tiny_pairs):
    return load_config(write_config(tmp_path / "c.yaml", tiny_pairs))


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "config key 'train.deepspeed': file not found"),
        ('{"zero_optimization": {"stage": 3,}}', "invalid DeepSpeed JSON: Expecting property name"),
        (b'{"x": "\xff"}', "invalid DeepSpeed JSON: not UTF-8"),
        ("[1, 2]", "a DeepSpeed config must be a JSON object, got list"),
        ('{"zero_optimization": {"stage": 4}}', "'zero_optimization.stage' is 4; known ZeRO stages: 0, 1, 2, 3"),
        ('{"zero_optimization": {"stage": "three"}}', "'zero_optimization.stage' is \"three\""),
        ('{"zero_optimization": 3}', "'zero_optimization' must be a JSON object, got 3"),
        ('{"gradient_accumulation_steps": 7}', "'gradient_accumulation_steps' is 7 but the run config implies 4"),
        ('{"scheduler": {"type": "WarmupLR"}}', "'scheduler': remove it"),
        ('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}', "'fp16.enabled' and 'bf16.enabled' are both on"),
        # DeepSpeed's own ZeRO schema, checked before the models load rather than in deepspeed.initialize
        ('{"zero_optimization": {"stage": 3, "overlap_comms": true}}',
         "'zero_optimization.overlap_comms': Extra inputs are not permitted"),
        ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}',
         "'zero_optimization.offload_param.device': Input should be 'none', 'cpu' or 'nvme'"),
    ],
)
def test_invalid_deepspeed_config_is_one_line(tmp_path, cfg, content, expected):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as error:
        load_deepspeed_config(path, cfg, world_size=1, bf16_enabled=False)
    message = one_line(error.value)
    assert expected in message and "ds.json" in message, message


def test_shipped_deepspeed_configs_pass_the_checks(cfg):
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        load_deepspeed_config(REPO / "ds_configs" / name, cfg, world_size=1, bf16_enabled=True)


def test_unknown_method_or_key_in_a_config_file_is_one_line(tmp_path, tiny_pairs):
    cases = [
        ({"method": {"name": "dpo"}}, "config key 'method.name': 'dpo' is not one of dopd, vanilla_opd"),
        ({"method": {"nmae": "dopd"}}, "unknown config key 'method.nmae' (known in this section: name"),
        ({"trian": {"steps": 3}}, "unknown config key 'trian' (known in this section: model, data"),
        ({"data": {"privileged_template": "{privileged} <image> {question}"}},
         "config key 'data.privileged_template': must not contain <image>"),
        ({"data": {"max_eval_samples": -2}}, "config key 'data.max_eval_samples': must be >= 0"),
    ]
    for change, expected in cases:
        path = write_config(tmp_path / "c.yaml", tiny_pairs)
        config = yaml.safe_load(path.read_text())
        for section, values in change.items():
            config.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert expected in one_line(error.value), str(error.value)
    path.write_bytes(b"model:\n  student: caf\xe9\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "c.yaml: not UTF-8 text (byte 0xe9" in one_line(error.value)


def test_output_dir_that_cannot_be_written_stops_before_training(tmp_path):
    from dopd_vlm.errors import InputError
    from dopd_vlm.train import check_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out, reason in [(blocker / "run", "Not a directory"), (blocker, "File exists")]:
        with pytest.raises(InputError) as error:
            check_output_dir(out)
        message = one_line(error.value)
        assert message == f"train.output_dir {out}: cannot write there ({reason})", message
    check_output_dir(tmp_path / "fine" / "run")  # creates missing parents
    assert (tmp_path / "fine" / "run").is_dir() and not list((tmp_path / "fine" / "run").iterdir())


def test_a_build_lock_left_by_an_interrupted_op_build_is_one_line_not_a_silent_hang(tmp_path):
    import os
    import threading

    from dopd_vlm.distributed import lock_held_here, wait_for_build_locks
    from dopd_vlm.errors import InputError

    folder = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("")
    lock = folder / "lock"
    wait_for_build_locks(tmp_path, stale_after_s=0.5, poll_s=0.05)  # no lock: nothing to wait for
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()  # a build that ends: waited for
    wait_for_build_locks(tmp_path, stale_after_s=60, poll_s=0.05)
    assert not lock.exists()
    lock.touch()
    fd = os.open(lock, os.O_RDONLY)  # held by a live process (this one): never stale
    assert lock_held_here(lock)
    os.close(fd)
    assert not lock_held_here(lock)
    hour_ago = lock.stat().st_mtime - 3600
    for f in folder.iterdir():
        os.utime(f, (hour_ago, hour_ago))
    with pytest.raises(InputError, match=f"^{lock}: left by an interrupted build .* for 60 min\\); delete it$"):
        wait_for_build_locks(tmp_path, stale_after_s=0.5, poll_s=0.05)
