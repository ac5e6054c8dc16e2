"""Recipe kind `hf_dataset`: hub datasets, `save_to_disk` folders and shards, in columns or in the
conversational `messages` format. Every dataset here is written by `datasets` itself in the test
(`save_to_disk`, `to_parquet` / `to_json` per shard, a hub dataset put in a cache); no network."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from dopd_vlm.config import load_config
from dopd_vlm.data import RecipeError, load_recipe, read_recipe
from dopd_vlm.data.recipes import RECIPES_DIR

from test_data import png
from test_train import REPO, launch, metrics_lines, write_config

TEXT = datasets.Value("string")
PART = {"type": TEXT, "text": TEXT}
MESSAGES = datasets.List({"role": TEXT, "content": datasets.List(PART)})  # TRL's typed parts
COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image", "text": None}  # how datasets stores an image part next to text parts


def image_bytes(index: int) -> dict:
    return {"bytes": png(COLORS[index % len(COLORS)], size=(8 + index, 6)), "path": None}


def columns_rows(n: int, start: int = 0) -> dict:
    """ViRL39K-style columns: qid, question (one <image>), answer, image (a list), caption."""
    return {"qid": [f"q{i}" for i in range(start, start + n)],
            "question": [f"<image>How many shapes in picture {i}?" for i in range(start, start + n)],
            "answer": [str(i) for i in range(start, start + n)],
            "image": [[image_bytes(i)] for i in range(start, start + n)],
            "caption": [f"caption {i}" for i in range(start, start + n)]}


COLUMNS = datasets.Features({"qid": TEXT, "question": TEXT, "answer": TEXT, "image": datasets.List(datasets.Image()),
                             "caption": TEXT})
COLUMN_FIELDS = {"id": "qid", "images": "image", "privileged": "caption"}


def write_recipe(tmp_path: Path, name: str = "hf", /, **keys) -> Path:
    path = tmp_path / "recipes" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"kind": "hf_dataset", "cache_dir": "../cache", **keys}))
    return path


def pixels(sample) -> list[tuple[int, int, int]]:
    return [image.getpixel((0, 0)) for image in sample.images]


# -- sources ----------------------------------------------------------------------------------


def test_columns_of_a_saved_datasetdict_with_split_slices(tmp_path):
    splits = {"train": datasets.Dataset.from_dict(columns_rows(5), features=COLUMNS),
              "validation": datasets.Dataset.from_dict(columns_rows(3, start=5), features=COLUMNS)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    recipe = write_recipe(tmp_path, from_disk="../saved", fields=COLUMN_FIELDS,
                          splits={"train": "train[:4]", "test": "validation", "all": "train[3:]+validation[:1]"})
    train = load_recipe(recipe, "train")
    assert [s.id for s in train] == ["q0", "q1", "q2", "q3"]
    first = train[1]
    assert (first.question, first.answer, first.privileged, first.reference) == (
        "<image>How many shapes in picture 1?", "1", "caption 1", "")
    assert pixels(first) == [COLORS[1]] and first.images[0].size == (9, 6)
    assert first.meta["location"].endswith("saved split 'train' row 1 (0-based)")
    assert [s.id for s in load_recipe(recipe, "test")] == ["q5", "q6", "q7"]
    everything = load_recipe(recipe, "all")
    assert [s.id for s in everything] == ["q3", "q4", "q5"]
    assert everything[2].meta["location"].endswith("saved split 'validation' row 0 (0-based)")
    assert [h.image_sizes for h in everything.headers(0, 3)] == [((11, 6),), ((12, 6),), ((13, 6),)]
    assert len(load_recipe(recipe, "train", limit=2)) == 2


def test_saved_images_stay_in_the_memory_mapped_dataset(tmp_path):
    # 40 incompressible 64x64 images (~12 KB each): copying them would allocate ~0.5 MB of Arrow memory
    rng = np.random.default_rng(0)
    noise = []
    for _ in range(40):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        noise.append([{"bytes": buffer.getvalue(), "path": None}])
    rows = {**columns_rows(40), "image": noise}
    datasets.Dataset.from_dict(rows, features=COLUMNS).save_to_disk(str(tmp_path / "saved"))
    stored = sum(len(item[0]["bytes"]) for item in noise)
    before = pa.total_allocated_bytes()
    loaded = load_recipe(write_recipe(tmp_path, from_disk="../saved", fields=COLUMN_FIELDS,
                                      splits={"train": "train"}), "train")
    assert pa.total_allocated_bytes() - before < stored / 10, "the image bytes were copied"
    assert np.array_equal(np.asarray(loaded[7].images[0]), np.asarray(Image.open(io.BytesIO(noise[7][0]["bytes"]))))


def test_shards_by_glob_are_read_in_order_and_rows_named_by_shard(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = datasets.Dataset.from_dict({k: v for k, v in columns_rows(5).items() if k != "qid"},
                                      features=datasets.Features({k: v for k, v in COLUMNS.items() if k != "qid"}))
    rows.shard(2, 0, contiguous=True).to_parquet(str(data / "train-00000-of-00002.parquet"))
    rows.shard(2, 1, contiguous=True).to_parquet(str(data / "train-00001-of-00002.parquet"))
    paths = rows.remove_columns("image").add_column("image", [["img/a.png"], ["img/b.png"]] * 2 + [[]])
    paths = paths.map(lambda row: {"question": row["question"] if row["image"] else "Any shapes?"})
    (data / "img").mkdir()
    (data / "img" / "a.png").write_bytes(png((1, 2, 3)))
    (data / "img" / "b.png").write_bytes(png((4, 5, 6)))
    paths.shard(2, 0, contiguous=True).to_json(str(data / "more-00000-of-00002.jsonl"))
    paths.shard(2, 1, contiguous=True).to_json(str(data / "more-00001-of-00002.jsonl"))
    fields = {"images": "image", "privileged": "caption"}
    recipe = write_recipe(tmp_path, data_files={"train": "../data/train-*.parquet",
                                                "test": ["../data/more-00001-*.jsonl", "../data/more-0000*.jsonl"]},
                          fields=fields)
    train = load_recipe(recipe, "train")
    assert [s.answer for s in train] == ["0", "1", "2", "3", "4"]
    assert [s.id for s in train] == ["train-00000-of-00002-0", "train-00000-of-00002-1", "train-00000-of-00002-2",
                                     "train-00001-of-00002-0", "train-00001-of-00002-1"]
    assert train[4].meta["location"].endswith("data/train-00001-of-00002.parquet row 1 (0-based)")
    assert pixels(train[3]) == [COLORS[3]]
    test = load_recipe(recipe, "test")  # the listed order; a file two patterns match is read once
    assert [s.answer for s in test] == ["3", "4", "0", "1", "2"]
    assert [pixels(s) for s in test] == [[(4, 5, 6)], [], [(1, 2, 3)], [(4, 5, 6)], [(1, 2, 3)]]
    assert test[1].meta["location"].endswith("data/more-00001-of-00002.jsonl line 2")
    assert test[1].id == "more-00001-of-00002-2"
    # an Image column holding paths, as to_parquet leaves them (not embedded): relative to the shard's folder
    with contextlib.chdir(data):  # datasets reads the files' sizes as it writes
        paths.cast_column("image", datasets.List(datasets.Image())).to_parquet("paths.parquet")
    stored = load_recipe(write_recipe(tmp_path, "paths", data_files={"train": "../data/paths.parquet"}, fields=fields),
                         "train")
    assert [pixels(s) for s in stored] == [[(1, 2, 3)], [(4, 5, 6)], [(1, 2, 3)], [(4, 5, 6)], []]
    bad = paths.map(lambda row: {"caption": "" if row["answer"] == "4" else row["caption"]})
    bad.shard(2, 1, contiguous=True).to_json(str(data / "more-00001-of-00002.jsonl"))
    with pytest.raises(RecipeError, match=r"data/more-00001-of-00002\.jsonl line 2 field 'caption' \(privileged\): "
                                          r"empty$"):
        load_recipe(recipe, "test")
    skipping = load_recipe(write_recipe(tmp_path, data_files={"test": "../data/more-*.jsonl"}, fields=fields,
                                        skip_bad_rows=True), "test")
    assert [s.answer for s in skipping] == ["0", "1", "2", "3"] and len(skipping.skipped) == 1


# -- the conversational format --------------------------------------------------------------


def conversation(user, assistant=None, system=None) -> list[dict]:
    turns = [] if system is None else [{"role": "system", "content": [text(system)]}]
    turns.append({"role": "user", "content": user})
    return turns + ([] if assistant is None else [{"role": "assistant", "content": [text(assistant)]}])


def save_conversations(tmp_path: Path, messages: list, images: list, **columns) -> Path:
    features = datasets.Features({"messages": MESSAGES, "images": datasets.List(datasets.Image()),
                                  **{name: TEXT for name in columns}})
    data = datasets.Dataset.from_dict({"messages": messages, "images": images, **columns}, features=features)
    shutil.rmtree(tmp_path / "chat", ignore_errors=True)
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "chat"))
    return tmp_path / "chat"


def test_messages_put_each_image_where_its_part_stands(tmp_path):
    (tmp_path / "c.png").write_bytes(png(COLORS[2]))
    messages = [
        conversation([text("How many?")], "3"),
        conversation([IMAGE, text("What colour?")], "red"),
        conversation([text("Left "), IMAGE, text(" and right "), IMAGE, text(". Same?")], "no"),
    ]
    images = [[], [image_bytes(0)], [image_bytes(1), {"bytes": None, "path": str(tmp_path / "c.png")}]]
    save_conversations(tmp_path, messages, images, hint=["p0", "p1", "p2"], label=["3", "red", "no"])
    recipe = write_recipe(tmp_path, from_disk="../chat", splits={"train": "train"},
                          fields={"messages": "messages", "privileged": "hint", "answer": "label"})
    samples = list(load_recipe(recipe, "train"))
    assert [s.question for s in samples] == ["How many?", "<image>What colour?", "Left <image> and right <image>. Same?"]
    assert [pixels(s) for s in samples] == [[], [COLORS[0]], [COLORS[1], COLORS[2]]]
    assert [(s.answer, s.reference, s.privileged, s.id) for s in samples] == [
        ("3", "3", "p0", "train-0"), ("red", "red", "p1", "train-1"), ("no", "no", "p2", "train-2")]


def test_the_answer_from_the_assistant_turn_and_system_turns(tmp_path, caplog):
    messages = [conversation([IMAGE, text("Sum?")], "1+2 gives \\boxed{3}", system="Be brief."),
                conversation([IMAGE, text("Product?")], "2*3 = \\boxed{6}")]
    save_conversations(tmp_path, messages, [[image_bytes(0)], [image_bytes(1)]], hint=["p0", "p1"])
    keys = dict(from_disk="../chat", splits={"train": "train"}, fields={"messages": "messages", "privileged": "hint"},
                answer_from="reference", answer_extractor={"kind": "boxed"})
    with pytest.raises(RecipeError, match=r"chat split 'train' row 0 \(0-based\) field 'messages': turn 0 "
                                          r"is a system turn; .* set system_turn: drop in the recipe"):
        load_recipe(write_recipe(tmp_path, **keys), "train")
    with caplog.at_level(logging.WARNING, logger="dopd_vlm.data"):
        samples = list(load_recipe(write_recipe(tmp_path, **keys, system_turn="drop"), "train"))
    assert [(s.question, s.answer, s.reference) for s in samples] == [
        ("<image>Sum?", "3", "1+2 gives \\boxed{3}"), ("<image>Product?", "6", "2*3 = \\boxed{6}")]
    assert any("dropped the system turn of 1 rows" in r.getMessage() for r in caplog.records)
    save_conversations(tmp_path, [conversation([IMAGE, text("Sum?")], "three")], [[image_bytes(0)]], hint=["p"])
    with pytest.raises(RecipeError, match=r"row 0 \(0-based\) field 'messages' \(answer\): answer_extractor boxed "
                                          r"finds no answer in the reference response"):
        load_recipe(write_recipe(tmp_path, **keys), "train")
    whole = load_recipe(write_recipe(tmp_path, **{**keys, "answer_extractor": {"kind": "whole"}}), "train")
    assert (whole[0].answer, whole[0].reference) == ("three", "three")


def test_jsonl_conversations_with_string_content_and_image_tags(tmp_path):
    # ms-swift writes `<image>` tags in string content; TRL typed parts; JSON lines may mix both
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.png").write_bytes(png(COLORS[4]))
    rows = [
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "<image>What is shown?"},
                      {"role": "assistant", "content": "a square"}],
         "images": ["img/a.png"], "answer": "square", "privileged": "a cyan square"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Count: "}, {"type": "image"}]}],
         "images": ["img/a.png"], "answer": 1, "privileged": "one square"},
    ]
    (tmp_path / "data" / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path, data_files={"train": "../data/chat.jsonl"}, fields={"messages": "messages"},
                          system_turn="drop")
    samples = list(load_recipe(recipe, "train"))
    assert [(s.question, s.reference, s.answer) for s in samples] == [
        ("<image>What is shown?", "a square", "square"), ("Count: <image>", "", "1")]
    assert [pixels(s) for s in samples] == [[COLORS[4]], [COLORS[4]]]


@pytest.mark.parametrize("messages, images, expected", [
    (conversation([IMAGE, IMAGE, text("Which?")]), [image_bytes(0)],
     "field 'messages' (question): 2 <image> placeholder(s) but 1 image(s)"),
    (conversation([text("Which?")], "a") + [{"role": "user", "content": [text("And?")]}], [],
     "field 'messages': roles user, assistant, user: expected [system,] user[, assistant]"),
    ([{"role": "assistant", "content": [text("a")]}], [], "field 'messages': roles assistant: expected"),
    ([{"role": "user", "content": [text("Draw")]}, {"role": "assistant", "content": [IMAGE]}], [],
     "field 'messages': turn 1 (assistant) part 0: an image outside the user turn"),
    (conversation([{"type": "video", "text": None}, text("What?")]), [],
     "field 'messages': turn 0 (user) part 0: expected {type: text, text: ...} or {type: image}, got a mapping with "
     "keys type, text"),
    (conversation([text("  ")]), [], "field 'messages' (question): empty"),
    (conversation([text("Why?")], " "), [], "field 'messages' (reference): empty"),
    ([], [], "field 'messages': expected a non-empty list of turns ({role, content}), got list"),
])
def test_bad_conversations_are_one_line_naming_the_row_and_the_problem(tmp_path, messages, images, expected):
    good = conversation([text("Fine?")], "yes")
    save_conversations(tmp_path, [good, messages], [[], images], answer=["yes", "a"], privileged=["p", "p"])
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, from_disk="../chat", splits={"train": "train"},
                                 fields={"messages": "messages"}), "train")
    assert f"chat split 'train' row 1 (0-based) {expected}" in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_jsonl_turn_shapes_that_datasets_cannot_store_are_named(tmp_path):
    cases = {
        "sharegpt": ([{"from": "human", "value": "Hi"}], "turn 0: expected a mapping with 'role' and 'content', got "
                     "a mapping with keys from, value (ShareGPT's from/value: rename them role/content)"),
        "inline": ([{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi"}]}],
                   "turn 0 (user) part 0: an image given inline ('image'); put the images in the images column"),
        "content": ([{"role": "user", "content": 5}], "turn 0 (user): content must be a string or a list of parts"),
    }
    (tmp_path / "data").mkdir()
    for name, (messages, expected) in cases.items():
        row = {"messages": messages, "answer": "a", "privileged": "p"}
        (tmp_path / "data" / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
        recipe = write_recipe(tmp_path, data_files={"train": f"../data/{name}.jsonl"}, fields={"messages": "messages"})
        with pytest.raises(RecipeError) as error:
            load_recipe(recipe, "train")
        assert f"data/{name}.jsonl line 1 field 'messages': {expected}" in str(error.value), error.value


# -- errors naming the dataset, the file or the key ------------------------------------------


def damaged_sources(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_dict(columns_rows(2), features=COLUMNS).to_parquet(str(data / "good-00000-of-00002.parquet"))
    (data / "good-00001-of-00002.parquet").write_bytes(b"PAR1 not really parquet")
    (data / "notes.txt").write_text("not data")
    saved = datasets.Dataset.from_dict(columns_rows(2), features=COLUMNS)
    saved.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "broken"))
    arrow = next((tmp_path / "broken" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])


SOURCE_ERRORS = {
    "hub_not_cached": (dict(hub_id="nobody/no-such-set", splits={"train": "train"}),
                       "recipe recipes/hf.yaml: hub_id 'nobody/no-such-set': not in the datasets cache ("),
    "missing_folder": (dict(from_disk="../nowhere", splits={"train": "train"}),
                       "recipe recipes/hf.yaml: from_disk folder not found: nowhere"),
    "not_a_saved_dataset": (dict(from_disk="../data", splits={"train": "train"}),
                            "data: cannot load (from_disk of recipe recipes/hf.yaml): Directory"),
    "damaged_arrow_file": (dict(from_disk="../broken", splits={"train": "train"}),
                           "broken: cannot load (from_disk of recipe recipes/hf.yaml): "),
    "missing_split": (dict(from_disk="../saved", splits={"train": "validation"}),
                      "recipe recipes/hf.yaml: key 'splits.train': saved has no split 'validation' (splits: train)"),
    "single_dataset_split": (dict(from_disk="../single", splits={"train": "test"}),
                             "single has no split 'test' (splits: train) (a folder holding one Dataset, not a "
                             "DatasetDict, has the one split 'train')"),
    "missing_files_split": (dict(data_files={"train": "../data/good-*.parquet"}, splits={"train": "validation"}),
                            "key 'splits.train': data_files has no split 'validation' (it has train)"),
    "glob_matches_nothing": (dict(data_files={"train": "../data/train-*.parquet"}),
                             "recipe recipes/hf.yaml: key 'data_files.train': no file matches '../data/train-*.parquet' "
                             "(relative to recipes)"),
    "not_parquet_or_jsonl": (dict(data_files={"train": "../data/*"}),
                             "key 'data_files.train': data/notes.txt is not .jsonl or .parquet"),
    "corrupt_shard": (dict(data_files={"train": "../data/good-*.parquet"}),
                      "data/good-00001-of-00002.parquet: cannot read: "),
    "missing_column": (dict(data_files={"train": "../data/good-00000-of-00002.parquet"},
                            fields={**COLUMN_FIELDS, "privileged": "boxes"}),
                       "data/good-00000-of-00002.parquet field 'boxes' (privileged): missing (no such column; the file "
                       "has qid, question, answer, image, caption; see 'fields' in recipe recipes/hf.yaml)"),
    "relative_image_without_root": (dict(from_disk="../paths", splits={"train": "train"}, fields=COLUMN_FIELDS),
                                    "paths split 'train' row 0 (0-based) field 'image' (images): image 0 (a.png): a "
                                    "relative path, and the recipe sets no image_root"),
    "two_sources": (dict(from_disk="../single", data_files={"train": "x.parquet"}),
                    "recipe recipes/hf.yaml: needs exactly one of hub_id, from_disk, data_files (it has from_disk and "
                    "data_files)"),
    "config_without_hub": (dict(from_disk="../single", splits={"train": "train"}, config_name="x"),
                           "recipe recipes/hf.yaml: key 'config_name' is for hub_id only"),
    "splits_needed": (dict(from_disk="../single"), "key 'splits' is needed with from_disk"),
    "bad_split_spec": (dict(from_disk="../single", splits={"train": "train[:ten]"}),
                       "key 'splits.train': Unrecognized instruction format: train[:ten]"),
    "question_with_messages": (dict(from_disk="../single", splits={"train": "train"},
                                    fields={"messages": "m", "question": "q"}),
                               "key 'fields.question': not with fields.messages"),
    "data_files_entry": (dict(data_files={"train": ["a.parquet", {"b": 1}]}),
                         "key 'data_files.train[1]': must be a string, got dict"),
    "data_files_value": (dict(data_files={"train": {"x": 1}}), "key 'data_files.train': must be a string or a list, got"),
    "unknown_key": (dict(from_disk="../single", dataset_name="x"), "unknown key 'dataset_name' for kind 'hf_dataset'"),
}


@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_source_errors_are_one_line_naming_the_dataset_file_or_key(tmp_path, monkeypatch, case):
    damaged_sources(tmp_path)
    datasets.Dataset.from_dict({**columns_rows(1), "image": [["a.png"]]}).save_to_disk(str(tmp_path / "paths"))
    monkeypatch.chdir(tmp_path)
    keys, expected = SOURCE_ERRORS[case]
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, **keys), "train")
    message = str(error.value)
    assert "\n" not in message and expected in message, message


def cache_as_hub_dataset(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Put Parquet files in a datasets cache the way `load_dataset(repo_id)` leaves a hub dataset
    (config 'default'), so that `load_dataset(repo_id)` finds it offline."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo_id.split("/")[1]
    builder = Parquet(cache_dir=str(cache / "build"), dataset_name=name, config_name="default", hash="0",
                      data_files={split: str(path) for split, path in files.items()})
    builder.download_and_prepare()
    version_dir = Path(builder.cache_dir).parents[1]  # <name>/<config id>/<version>/<hash>
    (cache / repo_id.replace("/", "___")).mkdir(parents=True)
    shutil.move(str(version_dir), str(cache / repo_id.replace("/", "___") / "default"))


def test_a_hub_dataset_in_the_cache_loads_offline(tmp_path):
    files = {"train": tmp_path / "train.parquet", "test": tmp_path / "test.parquet"}
    datasets.Dataset.from_dict(columns_rows(3), features=COLUMNS).to_parquet(str(files["train"]))
    datasets.Dataset.from_dict(columns_rows(2, start=3), features=COLUMNS).to_parquet(str(files["test"]))
    cache_as_hub_dataset(tmp_path / "cache", "some-org/shapes", files)
    keys = dict(hub_id="some-org/shapes", splits={"train": "train", "test": "test[-1:]"}, fields=COLUMN_FIELDS)
    train = load_recipe(write_recipe(tmp_path, **keys), "train")
    assert [s.id for s in train] == ["q0", "q1", "q2"] and pixels(train[2]) == [COLORS[2]]
    assert train[0].meta["location"] == "dataset some-org/shapes split 'train' row 0 (0-based)"
    test = load_recipe(write_recipe(tmp_path, **{**keys, "fields": {"images": "image", "privileged": "caption"}}), "test")
    assert [s.id for s in test] == ["test-1"]  # no id column: <dataset split>-<row>
    with pytest.raises(RecipeError, match=r"^recipe \S*hf.yaml: dataset some-org/shapes config other: cannot load: "
                                          r"Couldn't find cache for some-org/shapes for config 'other' Available "
                                          r"configs in the cache: \['default'\]$"):
        load_recipe(write_recipe(tmp_path, **keys, config_name="other"), "train")


# -- shipped recipes and config ---------------------------------------------------------------


def test_the_virl39k_example_and_the_paper_config_that_reads_virl39k():
    example = load_recipe("virl39k_example", "train")
    assert len(example) == 6 and all(len(s.images) == 1 and s.question.startswith("<image>") for s in example)
    assert example[3].meta["location"].endswith("examples/virl39k_style/train-00001-of-00002.parquet row 0 (0-based)")
    assert all(s.privileged.startswith("Left to right:") for s in example)
    assert len(load_recipe("virl39k_example", "test")) == 2
    cfg = load_config(REPO / "configs" / "qwen3vl_8b_to_2b.yaml")
    recipe = read_recipe(REPO / cfg.data.recipe)
    assert recipe == read_recipe("virl39k") and recipe.fields == read_recipe("virl39k_example").fields
    assert set(cfg.data.eval_splits) | {cfg.data.train_split} <= set(recipe.splits)
    with pytest.raises(RecipeError, match=r"^recipe \S*virl39k.yaml: from_disk folder not found: "
                                          r"/path/to/virl39k_with_captions$"):  # the path the user edits
        load_recipe(recipe, "train")
    assert (RECIPES_DIR / "virl39k.yaml").read_text().count("# EDIT") == 2


@pytest.mark.slow
def test_one_dopd_step_on_a_saved_conversational_dataset(tmp_path, tiny_pairs):
    messages = [conversation([IMAGE, text(f"How many shapes? ({i})")], str(i % 3)) for i in range(6)]
    save_conversations(tmp_path, messages, [[image_bytes(i)] for i in range(6)],
                       privileged=[f"{i % 3} shapes" for i in range(6)])
    datasets.load_from_disk(str(tmp_path / "chat"))  # written as a user would
    recipe = write_recipe(tmp_path, from_disk="../chat", splits={"train": "train[:4]", "test": "train[4:]"},
                          fields={"messages": "messages"}, answer_from="reference")
    config = write_config(tmp_path / "c.yaml", tiny_pairs, recipe=str(recipe), train={"steps": 1})
    result = launch(tmp_path, config, [{"name": "hf", "overrides": [f"train.output_dir={tmp_path / 'run'}"]}], nproc=1)
    assert result["hf"]["finished"], result["hf"]["error"]
    lines = metrics_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 1] and "student/test" in lines[0]
    assert math.isfinite(lines[-1]["loss"])
