"""dopd_vlm.data: synthetic scenes, local files, validation errors, answer matching."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from dopd_vlm.data import (
    RecipeError,
    answers_match,
    load_recipe,
    normalize_answer,
    read_recipe,
    to_rgb,
)
from dopd_vlm.data.recipes import RECIPES_DIR
from dopd_vlm.data.synthetic_scenes import COLORS, QUESTION_TYPES

SCENES = yaml.safe_load((RECIPES_DIR / "synthetic_scenes.yaml").read_text())


def scenes(split="train", limit=60, family="qwen2_vl", **keys):
    """A split of the default scenes recipe with some keys replaced."""
    return load_recipe({**SCENES, **keys}, split, family=family, limit=limit)


def texts(ds):
    return [(s.id, s.question, s.answer, s.privileged) for s in ds]


def image_bytes(ds):
    return [[image.tobytes() for image in s.images] for s in ds]


def scene_keys(ds):
    """(objects, question) of every sample, read without decoding images."""
    columns = ds.hf.select_columns(["question", "meta"])
    return {(json.dumps(row["meta"]["objects"]), row["question"]) for row in columns}


# -- synthetic scenes ------------------------------------------------------------------------


def test_same_seed_gives_identical_samples():
    first, second = scenes(limit=30), scenes(limit=30)
    assert texts(first) == texts(second)
    assert image_bytes(first) == image_bytes(second)
    assert [s.meta for s in first] == [s.meta for s in second]


def test_limit_takes_a_prefix_and_another_seed_differs():
    assert texts(scenes(limit=5)) == texts(scenes(limit=20))[:5]
    other = scenes(limit=30, seed=1)
    assert texts(other) != texts(scenes(limit=30))
    assert image_bytes(other) != image_bytes(scenes(limit=30))


def test_train_and_test_are_disjoint_and_ood_has_more_objects():
    train, test, ood = (load_recipe("synthetic_scenes", name) for name in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (2000, 200, 200)
    assert not scene_keys(train) & scene_keys(test)
    counts = {
        name: [len(row["objects"]) for row in ds.hf["meta"]]
        for name, ds in [("train", train), ("test", test), ("ood", ood)]
    }
    assert set(counts["train"]) == set(counts["test"]) == {1, 2, 3, 4}
    assert set(counts["ood"]) == {5, 6}


def test_every_question_type_appears():
    types = {row["question_type"] for row in scenes(limit=200).hf["meta"]}
    assert types == set(QUESTION_TYPES)


def _box_line(obj):
    return f"{obj['color']} {obj['shape']} [{','.join(map(str, obj['box']))}]"


def test_privileged_boxes_match_the_drawn_pixels():
    for sample in scenes(limit=40):
        pixels = np.asarray(sample.images[0])
        size = sample.meta["image_size"]
        assert pixels.shape == (size, size, 3)
        assert sample.privileged.splitlines() == [_box_line(o) for o in sample.meta["objects"]]
        for obj in sample.meta["objects"]:
            x1, y1, x2, y2 = obj["box"]
            # Neighbours are at least 4 px away, so a 3 px margin holds only this object.
            lo_x, lo_y, hi_x, hi_y = max(0, x1 - 3), max(0, y1 - 3), x2 + 3, y2 + 3
            window = pixels[lo_y:hi_y, lo_x:hi_x]
            ys, xs = np.nonzero((window == COLORS[obj["color"]]).all(axis=-1))
            drawn = (xs.min() + lo_x, ys.min() + lo_y, xs.max() + lo_x + 1, ys.max() + lo_y + 1)
            assert np.abs(np.subtract(drawn, obj["box"])).max() <= 1, (sample.id, obj, drawn)
        colored = ~(pixels == 255).all(axis=-1)
        inside = np.zeros_like(colored)
        for x1, y1, x2, y2 in (o["box"] for o in sample.meta["objects"]):
            inside[y1:y2, x1:x2] = True
        assert not (colored & ~inside).any(), "a drawn pixel lies outside every box"


def test_qwen3_vl_relative_boxes_map_back_to_the_pixel_boxes():
    absolute, relative = scenes(limit=40), scenes(limit=40, family="qwen3_vl")
    for a, r in zip(absolute, relative):
        assert (a.question, a.answer, a.meta) == (r.question, r.answer, r.meta)
        size = r.meta["image_size"]
        for line, obj in zip(r.privileged.splitlines(), r.meta["objects"]):
            label, coords = re.fullmatch(r"(\w+ \w+) \[([\d,]+)\]", line).groups()
            values = [int(v) for v in coords.split(",")]
            assert label == f"{obj['color']} {obj['shape']}"
            assert all(0 <= v <= 1000 for v in values)
            back = [round(v * size / 1000) for v in values]
            assert np.abs(np.subtract(back, obj["box"])).max() <= 1


def _expected_answer(question_type, question, objects):
    """An independent reading of the scene: what the answer must be."""
    labels = [f"{o['color']} {o['shape']}" for o in objects]
    center = {label: (o["box"][0] + o["box"][2]) / 2 for label, o in zip(labels, objects)}
    side = {label: o["box"][2] - o["box"][0] for label, o in zip(labels, objects)}
    words = question.rstrip("?").split()
    if question_type == "count":
        return str(len(objects))
    if question_type == "count_color":
        return str(sum(o["color"] == words[2] for o in objects))
    if question_type == "count_shape":
        return str(sum(o["shape"] + "s" == words[2] for o in objects))
    if question_type == "color_of_shape":
        (match,) = [o for o in objects if o["shape"] == words[-1]]
        return match["color"]
    if question_type == "shape_of_color":
        (match,) = [o for o in objects if o["color"] == words[-2]]
        return match["shape"]
    if question_type == "leftmost":
        return min(labels, key=center.get)
    if question_type == "rightmost":
        return max(labels, key=center.get)
    if question_type == "largest":
        return max(labels, key=side.get)
    first, second = " ".join(words[2:4]), " ".join(words[-2:])
    return "yes" if center[first] < center[second] else "no"


def test_answers_agree_with_the_scene():
    for sample in scenes(limit=200):
        question_type = sample.meta["question_type"]
        expected = _expected_answer(question_type, sample.question, sample.meta["objects"])
        assert sample.answer == expected, (sample.question, sample.meta)


def test_caption_variant_lists_objects_left_to_right():
    for sample in load_recipe("synthetic_scenes_caption", "train", limit=30):
        objects = sorted(sample.meta["objects"], key=lambda o: o["box"][0] + o["box"][2])
        caption = sample.privileged
        assert caption.startswith("Left to right: ") and caption.endswith(".")
        positions = [caption.index(f"{o['color']} {o['shape']}") for o in objects]
        assert positions == sorted(positions)
        assert "[" not in caption


def test_text_variant_has_no_image_and_only_a_partial_description():
    boxes = scenes(limit=60)
    text = load_recipe("synthetic_text", "train", family="qwen3", limit=60)
    described = 0
    for plain, sample in zip(boxes, text):
        assert sample.images == ()
        assert sample.meta == plain.meta and sample.answer == plain.answer
        assert sample.question.endswith(plain.question)
        prefix = sample.question[: -len(plain.question)].strip()
        if prefix:
            described += 1
            items = prefix.removeprefix("Partly seen: ").rstrip(".").split(", ")
            assert len(items) < len(sample.meta["objects"])
            assert all(re.fullmatch(r"a (\w+ shape|circle|square|triangle)", i) for i in items)
        assert re.fullmatch(r"(\w+ \w+ \[\d+,\d+,\d+,\d+\]\n?)+", sample.privileged)
    assert described > 10


def test_recipe_key_errors_name_the_key(tmp_path):
    cases = [
        ({"kind": "synthetic_scenes", "sead": 1}, "unknown key 'sead'"),
        ({"kind": "synthetic_scenes", "seed": "one"}, "key 'seed': must be an integer"),
        ({"kind": "synthetic_scenes", "splits": {"train": "many"}}, "key 'splits.train'"),
        ({"kind": "synthetic_scenes", "splits": {"val": 3}}, "key 'splits.val': not allowed"),
        ({"kind": "synthetic_scenes", "privileged": "answer"}, "key 'privileged': 'answer' is not one of"),
        ({"kind": "synthetic_scenes", "objects": {"train": [4, 1]}}, "key 'objects.train'"),
        ({"kind": "scenes"}, "unknown kind 'scenes'"),
        ({"seed": 0}, "missing key 'kind'"),
        ({"kind": "local_files", "files": {"train": "a.csv"}}, "key 'files.train'"),
    ]
    for data, expected in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(RecipeError) as error:
            load_recipe(path, "train")
        assert expected in str(error.value) and "bad.yaml" in str(error.value)
        assert "\n" not in str(error.value)
    impossible = [
        ({"objects": {"train": [1, 1]}, "question_types": ["left_of"]}, "'left_of' found no"),
        ({"objects": {"train": [8, 8]}, "object_size": [40, 50]}, "cannot place 8 objects"),
        ({"objects": {"ood": [5, 6]}}, "key 'objects': has no range for split 'test'"),
    ]
    for keys, expected in impossible:
        recipe = {"kind": "synthetic_scenes", "splits": {"test": 2}, **keys}
        with pytest.raises(RecipeError, match=expected):
            load_recipe(recipe, "test")
    with pytest.raises(RecipeError, match="has no split 'val'"):
        load_recipe("synthetic_scenes", "val")
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope", "train")
    with pytest.raises(ValueError, match="unknown model family"):
        load_recipe("synthetic_scenes", "train", family="llava")


# -- local files ----------------------------------------------------------------------------


def png(color=(200, 30, 30), size=(20, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


MAPPING = {
    "id": "uid", "question": "prompt", "answer": "label", "privileged": "hint", "images": "pics"
}


def write_local(tmp_path, rows, *, suffix=".jsonl", extra=None):
    """Recipe in tmp/recipes/, data and images in tmp/data/ (paths relative to each file)."""
    (tmp_path / "recipes").mkdir(exist_ok=True)
    data_dir = tmp_path / "data"
    (data_dir / "img").mkdir(parents=True, exist_ok=True)
    (data_dir / "img" / "a.png").write_bytes(png((200, 30, 30)))
    (data_dir / "img" / "b.png").write_bytes(png((30, 30, 200), size=(8, 8)))
    data_file = data_dir / f"train{suffix}"
    if suffix == ".jsonl":
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(data_file))
    files = {"train": f"../data/train{suffix}"}
    recipe = {"kind": "local_files", "files": files, "fields": MAPPING}
    recipe.update(extra or {})
    path = tmp_path / "recipes" / "local.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def row(i, pics, **changes):
    base = {"uid": f"u{i}", "prompt": f"Question {i}?", "label": "three", "hint": "p", "pics": pics}
    return {**base, **changes}


def test_local_jsonl_with_field_mapping_and_0_1_2_images(tmp_path, monkeypatch):
    data_uri = "data:image/png;base64," + base64.b64encode(png((0, 255, 0))).decode()
    rows = [row(0, []), row(1, ["img/a.png"]), row(2, ["img/a.png", data_uri]), row(3, "img/b.png")]
    path = write_local(tmp_path, rows)
    monkeypatch.chdir(tmp_path / "data" / "img")  # paths must not depend on the working dir
    ds = load_recipe(path, "train")
    assert [len(s.images) for s in ds] == [0, 1, 2, 1]
    assert [s.id for s in ds] == ["u0", "u1", "u2", "u3"]
    assert (ds[1].question, ds[1].answer, ds[1].privileged) == ("Question 1?", "three", "p")
    assert ds[2].images[0].getpixel((0, 0)) == (200, 30, 30)
    assert ds[2].images[1].getpixel((0, 0)) == (0, 255, 0)
    assert ds[3].images[0].size == (8, 8)
    assert ds[-1].id == "u3" and len(load_recipe(path, "train", limit=2)) == 2
    assert ds.hf.column_names == ["id", "question", "answer", "privileged", "images", "meta", "reference"]


def test_local_parquet_with_image_bytes(tmp_path):
    pics = [[], [png((1, 2, 3))], [png((4, 5, 6)), png((7, 8, 9))]]
    rows = [row(i, images, label=i + 5) for i, images in enumerate(pics)]  # numeric answers
    ds = load_recipe(write_local(tmp_path, rows, suffix=".parquet"), "train")
    assert [len(s.images) for s in ds] == [0, 1, 2]
    assert [im.getpixel((0, 0)) for im in ds[2].images] == [(4, 5, 6), (7, 8, 9)]
    assert ds[2].answer == "7"


def test_parquet_written_by_datasets_round_trips(tmp_path):
    """A synthetic split exported with `datasets` (Image features) loads as local files."""
    original = scenes(limit=8)
    original.hf.to_parquet(str(tmp_path / "scenes.parquet"))
    recipe = {"kind": "local_files", "files": {"train": str(tmp_path / "scenes.parquet")}}
    loaded = load_recipe(recipe, "train")
    assert texts(loaded) == texts(original)
    assert image_bytes(loaded) == image_bytes(original)


def test_images_become_rgb(tmp_path):
    gray16 = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    palette = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    gray = Image.new("L", (4, 4), 100)
    images = {
        "g16.png": gray16, "rgba.png": transparent, "p.png": palette, "c.jpg": cmyk, "l.png": gray
    }
    (tmp_path / "data").mkdir()
    for name, image in images.items():
        image.save(tmp_path / "data" / name)
    rows = [{"question": "q?", "answer": "a", "privileged": "p", "images": list(images)}]
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    recipe = {"kind": "local_files", "files": {"train": str(tmp_path / "data" / "train.jsonl")}}
    loaded = load_recipe(recipe, "train")[0].images
    assert all(image.mode == "RGB" for image in loaded)
    assert [image.getpixel((0, 0)) for image in loaded] == [
        (127, 127, 127), (255, 255, 255), (0, 0, 255), (255, 255, 255), (100, 100, 100)
    ]
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([row(0, []), {k: v for k, v in row(1, []).items() if k != "prompt"}],
         "line 2 field 'prompt' (question): missing"),
        ([row(0, []), row(1, []), row(2, [], label="  ")], "line 3 field 'label' (answer): empty"),
        ([row(0, ["img/missing.png"])],
         "line 1 field 'pics' (images): image 0 (img/missing.png): file not found"),
        ([row(0, []), row(1, ["img/a.png", "img/corrupt.png"])],
         "line 2 field 'pics' (images): image 1 (img/corrupt.png): cannot decode"),
        ([row(0, ["img/truncated.png"])],
         "line 1 field 'pics' (images): image 0 (img/truncated.png): cannot decode"),
        ([row(0, [], hint="")], "line 1 field 'hint' (privileged): empty"),
        ([row(0, []), row(1, [], uid="u0")], "line 2 field 'uid' (id): duplicate id 'u0' (also line 1)"),
        ([row(0, [], prompt=5)], "line 1 field 'prompt' (question): expected a string, got int"),
        ([row(0, ["img/a.png"] * 9)], "line 1 field 'pics' (images): 9 images, expected 0 to 8"),
    ],
)
def test_bad_rows_raise_one_line_naming_file_row_and_field(tmp_path, rows, expected):
    path = write_local(tmp_path, rows)
    (tmp_path / "data" / "img" / "corrupt.png").write_bytes(b"not an image at all")
    (tmp_path / "data" / "img" / "truncated.png").write_bytes(png(size=(64, 64))[:60])
    with pytest.raises(RecipeError) as error:
        load_recipe(path, "train")
    message = str(error.value)
    assert "\n" not in message
    assert re.match(r"\S*data/train\.jsonl line \d+ field '", message), message
    assert expected in message, message


def test_wrong_field_mapping_and_bad_json_are_named(tmp_path):
    wrong = write_local(tmp_path, [row(0, [])], extra={"fields": {**MAPPING, "answer": "answer"}})
    with pytest.raises(RecipeError) as error:
        load_recipe(wrong, "train")
    message = str(error.value)
    assert "train.jsonl field 'answer': missing (no such column" in message
    assert "uid, prompt, label, hint, pics" in message and "\n" not in message
    path = write_local(tmp_path, [row(0, [])])
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(row(0, [])) + "\n\n{oops\n")
    with pytest.raises(RecipeError, match=r"train.jsonl line 3: invalid JSON"):  # the editor's line: blanks count
        load_recipe(path, "train")
    (tmp_path / "data" / "train.jsonl").write_text("\n")
    with pytest.raises(RecipeError, match=r"train.jsonl: no rows"):
        load_recipe(path, "train")


def test_rows_are_named_by_the_editor_line_for_jsonl_and_the_0_based_row_for_parquet(tmp_path):
    path = write_local(tmp_path, [row(0, [])], extra={"fields": {k: v for k, v in MAPPING.items() if k != "id"}})
    lines = [json.dumps(row(0, [])), "", "  ", json.dumps(row(1, [])), json.dumps(row(2, [], label=""))]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=r"train\.jsonl line 5 field 'label' \(answer\): empty$"):
        load_recipe(path, "train")
    lines[-1] = json.dumps(row(2, []))
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_recipe(path, "train")  # default ids and the location name the line too
    assert [s.id for s in ds] == ["train-1", "train-4", "train-5"]
    assert ds[1].meta["location"].endswith("data/train.jsonl line 4") and ds[1].meta["row"] == 1
    parquet = write_local(tmp_path, [row(0, []), row(1, []), row(2, [], hint="")], suffix=".parquet")
    with pytest.raises(RecipeError) as error:
        load_recipe(parquet, "train")
    assert str(error.value).endswith("train.parquet row 2 (0-based) field 'hint' (privileged): empty")


def test_missing_privileged_allowed_only_when_the_recipe_says_so(tmp_path):
    rows = [row(0, [], hint=None), row(1, [], hint="")]
    with pytest.raises(RecipeError, match="line 1 field 'hint' \\(privileged\\): missing"):
        load_recipe(write_local(tmp_path, rows), "train")
    ds = load_recipe(write_local(tmp_path, rows, extra={"allow_empty_privileged": True}), "train")
    assert [s.privileged for s in ds] == ["", ""]


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    rows = [row(0, []), row(1, [], label=""), row(2, ["img/nope.png"]), row(3, ["img/b.png"])]
    path = write_local(tmp_path, rows, extra={"skip_bad_rows": True})
    with caplog.at_level(logging.WARNING, logger="dopd_vlm.data"):
        ds = load_recipe(path, "train")
    assert [s.id for s in ds] == ["u0", "u3"]
    assert len(ds.skipped) == 2
    assert "line 2 field 'label' (answer): empty" in ds.skipped[0]
    assert "line 3 field 'pics' (images)" in ds.skipped[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("skipping bad row" in w for w in warnings) == 2
    assert any("skipped 2 bad rows of 4" in w for w in warnings)
    strict = write_local(tmp_path, rows)
    assert len(load_recipe(strict, "train", skip_bad_rows=True).skipped) == 2


def test_example_recipe_loads():
    recipe = read_recipe("local_files_example")
    assert recipe.fields["question"] == "prompt" and recipe.path("train").is_file()
    ds = load_recipe(recipe, "train")
    assert [len(s.images) for s in ds] == [0, 1, 2]
    assert all(s.question and s.answer and s.privileged for s in ds)


# -- answer matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, answer, match",
    [
        ("3", "3", True),
        ("three", "3", True),
        ("Three.", "3", True),
        (" 3 ", "three", True),
        ("Red", "red", True),
        ("red.", "red", True),
        ("The red circle", "red circle", True),
        ("red  circle!", "Red Circle", True),
        ("Yes", "yes", True),
        ("3.50", "3.5", True),
        ("-2", "2", False),
        ("3 shapes", "3", False),
        ("red circle", "red", False),
        ("4", "3", False),
        ("", "3", False),
        ("no", "yes", False),
        ("A", "a", True),
        ("twenty", "20", True),
    ],
)
def test_answers_match(prediction, answer, match):
    assert answers_match(prediction, answer) is match


def test_normalize_answer():
    assert normalize_answer("  The Blue   SQUARE. ") == "blue square"
    assert normalize_answer("Two!") == "2"
    assert normalize_answer("1.0") == "1"
