"""Data as `datasets` holds it (recipe kind `hf_dataset`): a hub dataset, a `save_to_disk` folder,
or data files (globs, several shards per split), in columns or in the conversational `messages`
format of TRL and ms-swift. The keys, the `messages` mapping and the row names are documented in
data_recipes/README.md ("Datasets").

Rows are validated like local files (data/rows.py) and named by their shard file and row
(`data/train-00001-of-00004.parquet row 17 (0-based)`, JSONL by line), or by dataset split and
row (`dataset org/name split 'train' row 17 (0-based)`); rows without an id column get
`<shard file stem>-<row number>` or `<dataset split>-<row>`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets

from dopd_vlm.data.rows import BadRow, Part, RowNumbers, RowReader, RowRules, display_path, required_text
from dopd_vlm.data.schema import IMAGE_PLACEHOLDER, RecipeError
from dopd_vlm.data.tables import FORMATS, LOAD_ERRORS, ArrowSource, Source, read_file, read_split
from dopd_vlm.errors import one_line
from dopd_vlm.validation import INTERNAL

logger = logging.getLogger(__name__)

Field = Literal["id", "question", "answer", "privileged", "images", "reference", "messages"]
SOURCE_KEYS = ("hub_id", "from_disk", "data_files")
SINGLE_DATASET_SPLIT = "train"  # the split name of a folder holding one Dataset, not a DatasetDict


@dataclass(frozen=True)
class HFDatasetRecipe(RowRules):
    """Keys of a `kind: hf_dataset` recipe (see data_recipes/README.md); more in `RowRules`.

    Exactly one source: `hub_id` (with `config_name`, `revision`), `from_disk` (a `save_to_disk`
    folder) or `data_files` (split -> file, glob or list of them; .parquet or .jsonl).
    """

    description: str = ""
    hub_id: str = ""
    config_name: str = ""
    revision: str = ""
    cache_dir: str = ""  # datasets' cache (hub datasets, Parquet converted to Arrow); "" = HF_DATASETS_CACHE
    from_disk: str = ""
    data_files: dict[str, str | list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)  # our split -> the dataset's split spec
    fields: dict[Field, str] = field(default_factory=dict)
    image_root: str = ""
    answer_from: Literal["column", "reference"] = "column"
    system_turn: Literal["reject", "drop"] = "reject"
    source: str = field(default="<recipe>", metadata=INTERNAL)
    base_dir: Path = field(default=Path("."), metadata=INTERNAL)

    def __post_init__(self) -> None:
        given = [key for key in SOURCE_KEYS if getattr(self, key)]
        if len(given) != 1:
            problem = "has none" if not given else f"has {' and '.join(given)}"
            raise RecipeError(f"recipe {self.source}: needs exactly one of {', '.join(SOURCE_KEYS)} (it {problem})")
        for key in ("config_name", "revision"):
            if getattr(self, key) and not self.hub_id:
                raise RecipeError(f"recipe {self.source}: key '{key}' is for hub_id only")
        if not self.splits and not self.data_files:
            raise RecipeError(f"recipe {self.source}: key 'splits' is needed with {given[0]}: our split -> the "
                              "dataset's split, e.g. {train: train, test: validation}")
        if not self.splits:  # data files: each split under its own name
            object.__setattr__(self, "splits", {split: split for split in self.data_files})
        for split, spec in self.splits.items():
            try:
                datasets.ReadInstruction.from_spec(spec)
            except ValueError as error:
                raise RecipeError(f"recipe {self.source}: key 'splits.{split}': {one_line(error)}") from None
        self._check_fields()

    def _check_fields(self) -> None:
        if self.conversational:
            for name in ("question", "reference"):
                if name in self.fields:
                    raise RecipeError(f"recipe {self.source}: key 'fields.{name}': not with fields.messages (the "
                                      f"{name} comes from the conversation)")
        if self.answer_from == "reference" and "answer" in self.fields:
            raise RecipeError(f"recipe {self.source}: key 'fields.answer': not with answer_from: reference (the "
                              "answer is taken out of the reference response)")

    @property
    def conversational(self) -> bool:
        """Questions and references come from a `messages` column (TRL / ms-swift format)."""
        return "messages" in self.fields

    def column(self, name: str) -> str:
        """With `messages`, the question and reference are read from the conversation, and with
        `answer_from: reference` the answer from the reference: messages name that column."""
        if name == "answer" and self.answer_from == "reference":
            name = "reference"
        if name in ("question", "reference") and self.conversational:
            name = "messages"
        return self.fields.get(name, name)

    def path(self, text: str) -> Path:
        """A path of the recipe: relative paths are relative to the recipe's directory."""
        return Path(os.path.abspath(self.base_dir / os.path.expanduser(text)))

    def patterns(self, name: str) -> list[str]:
        """The file patterns of `data_files.<name>` (one, or a list)."""
        patterns = self.data_files[name]
        return [patterns] if isinstance(patterns, str) else patterns

    @property
    def image_dir(self) -> Path | None:
        """`image_root` as a path; None when unset."""
        return self.path(self.image_root) if self.image_root else None

    @property
    def cache(self) -> str | None:
        """`cache_dir` as a path for datasets; None: datasets' default (HF_DATASETS_CACHE)."""
        return str(self.path(self.cache_dir)) if self.cache_dir else None


def build_split(
    recipe: HFDatasetRecipe, split: str, *, limit: int | None = None, skip_bad_rows: bool = False
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The split's first `limit` valid rows as canonical rows, and one line per skipped row."""
    sources, what = split_sources(recipe, split)
    reader = DatasetRowReader(recipe)
    empty = f"{what}: no usable rows (split '{split}' of recipe {recipe.source})"
    hf, skipped = read_split(sources, reader, limit=limit, skip_bad_rows=skip_bad_rows, what=what, empty=empty)
    if reader.dropped_system_turns:
        logger.warning("%s: dropped the system turn of %d rows (system_turn: drop); the prompts get the model's "
                       "chat template and its own default system turn", what, reader.dropped_system_turns)
    return hf, skipped


# -- where the rows are -------------------------------------------------------------------


def split_sources(recipe: HFDatasetRecipe, split: str) -> tuple[list[Source], str]:
    """The sources of our split (the dataset's splits and slices its spec names, in order), and
    how messages name them."""
    spec = recipe.splits[split]
    names = [re.split(r"\[", sub, maxsplit=1)[0].strip() for sub in re.split(r"\+", spec)]
    if recipe.data_files:
        tables = {name: file_sources(recipe, split, name) for name in dict.fromkeys(names)}
        files = sum(len(sources) for sources in tables.values())
        what = f"{', '.join(_patterns(recipe, name) for name in tables)} ({files} file{'s' * (files != 1)})"
    else:
        loaded = hub_dataset(recipe) if recipe.hub_id else disk_dataset(recipe)
        tables = {name: [loaded.source(recipe, split, name)] for name in dict.fromkeys(names)}
        what = f"{loaded.shown} split {spec!r}"
    lengths = {name: sum(source.size for source in sources) for name, sources in tables.items()}
    sources: list[Source] = []
    for instruction in datasets.ReadInstruction.from_spec(spec).to_absolute(lengths):
        sources += _rows_between(tables[instruction.splitname], instruction.from_, instruction.to)
    return sources, what


def file_sources(recipe: HFDatasetRecipe, split: str, name: str) -> list[Source]:
    """The files of `data_files.<name>` in order (each pattern's matches sorted, as shards are
    numbered), each a source of its own so that rows are named by their shard."""
    key = f"data_files.{name}"
    if name not in recipe.data_files:
        raise RecipeError(f"recipe {recipe.source}: key 'splits.{split}': data_files has no split {name!r} "
                          f"(it has {', '.join(recipe.data_files)})")
    files: list[str] = []
    for pattern in recipe.patterns(name):
        matches = [path for path in sorted(glob.glob(str(recipe.path(pattern)), recursive=True)) if os.path.isfile(path)]
        if not matches:
            raise RecipeError(f"recipe {recipe.source}: key '{key}': no file matches {pattern!r} (relative to "
                              f"{display_path(recipe.base_dir)})")
        files += [path for path in matches if path not in files]
    for path in files:
        if Path(path).suffix.lower() not in FORMATS:
            raise RecipeError(f"recipe {recipe.source}: key '{key}': {display_path(Path(path))} is not "
                              f"{' or '.join(FORMATS)}")
    return [read_file(Path(path), display_path(Path(path)), image_dir=recipe.image_dir or Path(path).parent,
                      cache_dir=recipe.cache) for path in files]


@dataclass(frozen=True)
class LoadedDataset:
    """The splits of a hub dataset or a saved folder; `shown` names it in messages, `note` explains
    its split names where they are not the user's own."""

    splits: dict[str, datasets.Dataset]
    shown: str
    note: str = ""

    def source(self, recipe: HFDatasetRecipe, split: str, name: str) -> ArrowSource:
        """The dataset's split `name`, read for our split `split`."""
        if name not in self.splits:
            raise RecipeError(f"recipe {recipe.source}: key 'splits.{split}': {self.shown} has no split {name!r} "
                              f"(splits: {', '.join(self.splits)}){self.note}")
        part = Part(f"{self.shown} split '{name}'", "dataset", RowNumbers(), name, recipe.image_dir)
        return ArrowSource(part, self.splits[name])


def hub_dataset(recipe: HFDatasetRecipe) -> LoadedDataset:
    """Every split of the hub dataset (`datasets.load_dataset`: from its cache when it has it)."""
    shown = f"dataset {recipe.hub_id}" + (f" config {recipe.config_name}" if recipe.config_name else "")
    try:
        loaded = datasets.load_dataset(recipe.hub_id, recipe.config_name or None, revision=recipe.revision or None,
                                       cache_dir=recipe.cache)
    except ConnectionError as error:  # datasets' answer when offline (HF_HUB_OFFLINE) or the Hub is unreachable
        raise RecipeError(
            f"recipe {recipe.source}: hub_id {recipe.hub_id!r}: not in the datasets cache "
            f"({recipe.cache or datasets.config.HF_DATASETS_CACHE}) and the Hub cannot be reached ({one_line(error)}); "
            "load it once where the Hub is reachable, or use a local copy (from_disk or data_files)"
        ) from None
    except LOAD_ERRORS as error:  # not found, gated, an unknown config or revision
        raise RecipeError(f"recipe {recipe.source}: {shown}: cannot load: {one_line(error)}") from None
    return LoadedDataset(dict(loaded), shown)


def disk_dataset(recipe: HFDatasetRecipe) -> LoadedDataset:
    """Every split of a `save_to_disk` folder; a folder holding one Dataset is the split 'train'."""
    folder = recipe.path(recipe.from_disk)
    shown = display_path(folder)
    if not folder.is_dir():
        raise RecipeError(f"recipe {recipe.source}: from_disk folder not found: {shown}")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except LOAD_ERRORS as error:  # not a saved dataset, a damaged file
        raise RecipeError(f"{shown}: cannot load (from_disk of recipe {recipe.source}): {one_line(error)}") from None
    if isinstance(loaded, datasets.Dataset):
        note = f" (a folder holding one Dataset, not a DatasetDict, has the one split '{SINGLE_DATASET_SPLIT}')"
        return LoadedDataset({SINGLE_DATASET_SPLIT: loaded}, shown, note)
    return LoadedDataset(dict(loaded), shown)


def _patterns(recipe: HFDatasetRecipe, name: str) -> str:
    """`data_files.<name>` as messages show it: relative to the working directory, like the files."""
    return ", ".join(display_path(recipe.path(pattern)) for pattern in recipe.patterns(name))


def _rows_between(sources: list[Source], start: int, stop: int) -> list[Source]:
    """Rows start..stop-1 of the sources taken one after the other, as sources restricted to them."""
    kept, offset = [], 0
    for source in sources:
        length = source.size
        begin, end = max(start - offset, 0), min(stop - offset, length)
        if begin < end:
            kept.append(replace(source, start=begin, stop=end))
        offset += length
    return kept


# -- the conversational format ----------------------------------------------------------------


INLINE_IMAGE_KEYS = ("image", "url", "path", "image_url")


@dataclass(frozen=True)
class Conversation:
    """What a `messages` conversation gives: the user turn's text with an `<image>` placeholder
    where each image part stands, the assistant turn's text (None without one), and whether a
    leading system turn was dropped."""

    question: str
    reference: str | None
    dropped_system: bool


def read_conversation(value: Any, system_turn: str) -> Conversation:
    """A conversation [system,] user[, assistant] of {role, content} turns, content a string or a
    list of {type: text, text} / {type: image} parts; anything else is a `BadRow`."""
    if not isinstance(value, list) or not value:
        raise BadRow("messages", f"expected a non-empty list of turns ({{role, content}}), got {_shape(value)}")
    turns = list(enumerate(value))
    for index, turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise BadRow("messages", f"turn {index}: expected a mapping with 'role' and 'content', got {_shape(turn)}")
    dropped = turns[0][1]["role"] == "system"
    if dropped and system_turn == "reject":
        raise BadRow("messages", "turn 0 is a system turn; prompts get the model's chat template and its own default "
                                 "system turn: set system_turn: drop in the recipe to drop such turns (counted, logged)")
    roles = [turn["role"] for _, turn in turns[dropped:]]
    if roles not in (["user"], ["user", "assistant"]):
        raise BadRow("messages", f"roles {', '.join(turn['role'] for turn in value)}: expected [system,] user[, "
                                 "assistant] (one question, at most one reference response)")
    user, *assistant = turns[dropped:]
    question = _turn_text(*user, images=True)
    return Conversation(question, _turn_text(*assistant[0], images=False) if assistant else None, dropped)


def _turn_text(index: int, turn: dict[str, Any], *, images: bool) -> str:
    """A turn's text; with `images`, each image part becomes an `<image>` placeholder where it stands
    (text parts are joined as chat templates join them, without a separator)."""
    content, where = turn["content"], f"turn {index} ({turn['role']})"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow("messages", f"{where}: content must be a string or a list of parts, got {_shape(content)}")
    pieces = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image" and images and not any(part.get(key) is not None for key in INLINE_IMAGE_KEYS):
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRow("messages", f"{where} part {number}: {_part_problem(part, kind, images)}")
    return "".join(pieces)


def _part_problem(part: Any, kind: Any, images: bool) -> str:
    if kind == "image" and not images:
        return "an image outside the user turn"
    if kind == "image":
        inline = next(key for key in INLINE_IMAGE_KEYS if part.get(key) is not None)
        return f"an image given inline ({inline!r}); put the images in the images column, in order, and mark " \
               "each place with {type: image}"
    if kind == "text":
        return "a text part without a string 'text'"
    return f"expected {{type: text, text: ...}}{' or {type: image}' if images else ''}, got {_shape(part)}"


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        hint = " (ShareGPT's from/value: rename them role/content)" if {"from", "value"} <= set(value) else ""
        return f"a mapping with keys {', '.join(map(str, value)) or 'none'}{hint}"
    return type(value).__name__ if value is not None else "null"


class DatasetRowReader(RowReader):
    """Reads the question and the reference from a `messages` conversation (when the recipe maps
    one), and the answer out of the reference response (`answer_from: reference`)."""

    def __init__(self, recipe: HFDatasetRecipe):
        super().__init__(recipe)
        self.dropped_system_turns = 0

    def prompt(self, raw: dict[str, Any]) -> tuple[str, str]:
        if not self.recipe.conversational:
            return super().prompt(raw)
        conversation = read_conversation(self.value(raw, "messages"), self.recipe.system_turn)
        self.dropped_system_turns += conversation.dropped_system
        question = required_text("question", conversation.question)
        if conversation.reference is None:
            return question, ""
        return question, required_text("reference", conversation.reference)

    def answer(self, raw: dict[str, Any], reference: str) -> str:
        if self.recipe.answer_from == "column":
            return super().answer(raw, reference)
        if not reference:
            raise BadRow("answer", "no reference response to take the answer from (answer_from: reference)")
        found = self.recipe.answer_extractor.extract(reference)
        if found is None:
            raise BadRow("answer", f"answer_extractor {self.recipe.answer_extractor.kind} finds no answer in the "
                                   "reference response (answer_from: reference)")
        return required_text("answer", found)
