"""Rows of your own data, validated once (recipe kinds `local_files` and `hf_dataset`).

A split is read from one or more *parts*: a JSONL or Parquet file, a shard of a sharded split, or a
split of a `datasets` dataset (see data/tables.py). `RowReader` turns each raw row into a canonical
row or raises `BadRow`, which the caller reports as one line naming the part, the row and the
field (or, with `skip_bad_rows`, skips, logs and counts).

Rows are named as a user finds them: a JSONL row by its line as an editor numbers it (from 1,
blank lines counted: `data/train.jsonl line 5`), any other row by its position from 0 in its part
(`data/train.parquet row 3 (0-based)`), which is what pandas and datasets show.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor
from dopd_vlm.data.images import ImageProblem, check_image
from dopd_vlm.data.schema import IMAGE_PLACEHOLDER, RecipeError
from dopd_vlm.errors import one_line
from dopd_vlm.validation import IntRange


@dataclass(frozen=True)
class RowRules:
    """Keys shared by the recipe kinds of your own rows (`local_files`, `hf_dataset`), and how
    their `fields` mapping names columns. A subclass declares `fields` (canonical field -> column)."""

    allow_empty_privileged: bool = False
    skip_bad_rows: bool = False
    images_per_row: Annotated[tuple[int, int], IntRange(0)] = (0, 8)
    answer_extractor: AnswerExtractor = WHOLE_RESPONSE
    answer_instruction: str = ""  # appended to every question on a new line (e.g. the answer format)

    def column(self, name: str) -> str:
        """The column for canonical field `name` (the same name unless mapped)."""
        return self.fields.get(name, name)  # type: ignore[attr-defined]

    def field_label(self, name: str) -> str:
        """A canonical field as messages name it: its column, and the field when they differ."""
        column = self.column(name)
        return f"'{name}'" if column == name else f"'{column}' ({name})"


class BadRow(Exception):
    """A row that cannot be used; `field` is None when the whole line is unreadable (JSONL)."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class RowNumbers:
    """How a part's rows are named in messages (see the module docstring)."""

    lines: tuple[int, ...] | None = None  # JSONL: each row's 1-based line; None: rows by position

    def number(self, index: int) -> int:
        """The number a user looks row `index` up by: its line (JSONL) or its position."""
        return index if self.lines is None else self.lines[index]

    def label(self, index: int) -> str:
        if self.lines is None:
            return f"row {index} (0-based)"
        return f"line {self.lines[index]}"


@dataclass(frozen=True)
class Part:
    """Where a split's rows come from, as messages and default ids name them.

    Attributes:
        shown: The part in messages: a path (`data/train-00000-of-00002.parquet`) or a dataset
            split (`dataset org/name split 'train'`).
        noun: What it is, for "the file has columns ...": `file` or `dataset`.
        numbers: How its rows are named.
        id_prefix: Rows without an id column get `<id_prefix>-<row number>`.
        image_dir: Relative image paths resolve against it; None: a relative path is a bad row.
    """

    shown: str
    noun: str
    numbers: RowNumbers
    id_prefix: str
    image_dir: Path | None

    def location(self, index: int) -> str:
        return f"{self.shown} {self.numbers.label(index)}"


def display_path(path: Path) -> str:
    """Relative to the working directory when inside it (shorter), else absolute."""
    path = Path(os.path.abspath(path))  # also folds "dir/../"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class RowReader:
    """Turns a split's raw rows into canonical rows, or raises `BadRow`.

    `recipe` maps canonical fields to columns (`column`, `field_label`) and sets
    `allow_empty_privileged`, `images_per_row` and `fields` (the explicitly mapped fields).
    Subclasses take the question, reference and answer from elsewhere (`prompt`, `answer`).
    """

    def __init__(self, recipe: Any):
        self.recipe = recipe
        self.seen_ids: dict[str, tuple[str, str]] = {}  # id -> (part, row label) where first seen

    def required_fields(self) -> list[str]:
        """Fields whose column every part must have (a missing one is a mapping error)."""
        needed = ["question", "answer"] + ([] if self.recipe.allow_empty_privileged else ["privileged"])
        return needed + [name for name in ("id", "images", "reference") if name in self.recipe.fields]

    def check_columns(self, part: Part, columns: list[str]) -> None:
        """A column the recipe relies on but the part lacks is a mapping error, not a row error."""
        for name in self.required_fields():
            if self.recipe.column(name) not in columns:
                raise RecipeError(
                    f"{part.shown} field {self.recipe.field_label(name)}: missing (no such column; "
                    f"the {part.noun} has {', '.join(columns)}; see 'fields' in recipe {self.recipe.source})"
                )

    def columns(self) -> list[str]:
        """The columns rows are read from (a part may lack the optional ones)."""
        names = ("id", "question", "answer", "privileged", "images", "reference")
        return list(dict.fromkeys(self.recipe.column(name) for name in names))

    def read(self, part: Part, index: int, raw: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The canonical row (without its images) and its images as {bytes, path} entries."""
        sample_id = self.row_id(part, index, raw)
        question, reference = self.prompt(raw)
        row = {
            "id": sample_id,
            "question": question,
            "answer": self.answer(raw, reference),
            "privileged": self.privileged(raw),
            "meta": {"source": part.shown, "row": index, "location": part.location(index)},
            "reference": reference,
        }
        images = self.images(part, raw)
        check_placeholders(question, row["privileged"], len(images))
        self.seen_ids[sample_id] = (part.shown, part.numbers.label(index))
        return row, images

    def value(self, raw: dict[str, Any], name: str) -> Any:
        return raw.get(self.recipe.column(name))

    def row_id(self, part: Part, index: int, raw: dict[str, Any]) -> str:
        value = self.value(raw, "id")
        if value is None:
            sample_id = f"{part.id_prefix}-{part.numbers.number(index)}"
        else:
            sample_id = required_text("id", value, numbers=True)
        if sample_id in self.seen_ids:
            shown, label = self.seen_ids[sample_id]
            raise BadRow("id", f"duplicate id {sample_id!r} (also {label if shown == part.shown else f'{shown} {label}'})")
        return sample_id

    def prompt(self, raw: dict[str, Any]) -> tuple[str, str]:
        """The question and the reference response ("" where the answer is the reference)."""
        return required_text("question", self.value(raw, "question")), self.reference(raw)

    def answer(self, raw: dict[str, Any], reference: str) -> str:
        return required_text("answer", self.value(raw, "answer"), numbers=True)

    def privileged(self, raw: dict[str, Any]) -> str:
        value = self.value(raw, "privileged")
        if self.recipe.allow_empty_privileged and (value is None or value == ""):
            return ""
        return required_text("privileged", value)

    def reference(self, raw: dict[str, Any]) -> str:
        """Optional: a missing, null or "" reference response means the answer is the reference."""
        value = self.value(raw, "reference")
        return "" if value is None or value == "" else required_text("reference", value)

    def images(self, part: Part, raw: dict[str, Any]) -> list[dict[str, Any]]:
        value = self.value(raw, "images")
        items = [] if value is None else value if isinstance(value, list) else [value]
        low, high = self.recipe.images_per_row
        if not low <= len(items) <= high:
            raise BadRow("images", f"{len(items)} images, expected {low} to {high}")
        return [image_entry(position, item, part.image_dir) for position, item in enumerate(items)]


def image_entry(position: int, item: Any, image_dir: Path | None) -> dict[str, Any]:
    """A checked image as {bytes, path} (one of them None). An item is a path (relative to
    `image_dir`, or absolute), bytes, a `data:` URI with base64 content, or a {bytes, path} struct
    as `datasets` writes images; it must decode."""
    if isinstance(item, dict):  # bytes win; empty bytes without a path are reported as empty
        if "bytes" not in item and "path" not in item:
            raise BadRow("images", f"image {position}: expected a path, bytes or a data: URI, got a mapping "
                                   f"without 'bytes' or 'path' (keys: {', '.join(map(str, item)) or 'none'})")
        data, path = item.get("bytes"), item.get("path")
        item = data if data or not path else path
    if isinstance(item, str) and item.startswith("data:"):
        item = _base64_payload(position, item)
    if isinstance(item, (bytes, bytearray)):
        source: Path | bytes = bytes(item)
        entry = {"bytes": source, "path": None}
        what = f"image {position} (bytes)"
    elif isinstance(item, str) and item:
        what = f"image {position} ({item})"
        if image_dir is None and not os.path.isabs(item):
            raise BadRow("images", f"{what}: a relative path, and the recipe sets no image_root (the folder the "
                                   "dataset's image paths are relative to)")
        source = Path(item) if image_dir is None else image_dir / item
        entry = {"bytes": None, "path": os.path.abspath(source)}
        if not source.is_file():
            raise BadRow("images", f"{what}: file not found: {display_path(source)}")
    else:
        raise BadRow("images", f"image {position}: expected a path, bytes or a data: URI, got {type(item).__name__}")
    try:
        check_image(source)
    except ImageProblem as problem:
        raise BadRow("images", f"{what}: {problem}") from None
    except OSError as error:  # an unreadable file (permissions, I/O error)
        raise BadRow("images", f"{what}: cannot read: {error.strerror or one_line(error)}") from None
    return entry


def _base64_payload(position: int, uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise BadRow("images", f"image {position}: data: URI must be base64 (data:...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise BadRow("images", f"image {position}: invalid base64: {one_line(error)}") from None


def check_placeholders(question: str, privileged: str, images: int) -> None:
    """The placeholder rule: a question has no `<image>` or exactly one per image."""
    count = question.count(IMAGE_PLACEHOLDER)
    if count and count != images:
        raise BadRow(
            "question",
            f"{count} {IMAGE_PLACEHOLDER} placeholder(s) but {images} image(s); "
            "use one per image, or none to put the images before the text",
        )
    if IMAGE_PLACEHOLDER in privileged:
        raise BadRow("privileged", f"contains {IMAGE_PLACEHOLDER}; placeholders belong in the question")


def required_text(name: str, value: Any, *, numbers: bool = False) -> str:
    """A non-blank string; with `numbers`, an integer or float is accepted as its text."""
    if value is None:
        raise BadRow(name, "missing")
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRow(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(name, "empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON may escape a lone surrogate (\ud800)
        raise BadRow(name, f"not valid Unicode (unpaired surrogate at character {error.start})") from None
    return value


# -- JSONL ----------------------------------------------------------------------------------


def read_jsonl(path: Path, shown: str) -> tuple[list[str], list[dict | BadRow], RowNumbers]:
    """The file's columns, its rows and how they are numbered. Rows are the non-blank lines,
    each decoded as UTF-8 (a BOM on the first line is ignored) and parsed on its own, so that one
    broken line is reported with its line number (or skipped) like any bad row: it is a `BadRow`
    in the list. Columns are the keys of the readable rows, in order of first appearance."""
    rows: list[dict | BadRow] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    try:
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                row = _parse_line(line, "utf-8-sig" if number == 1 else "utf-8")
                rows.append(row)
                lines.append(number)
                if isinstance(row, dict):
                    columns.update(dict.fromkeys(row))
    except OSError as error:
        raise RecipeError(f"{shown}: cannot read: {error.strerror or one_line(error)}") from None
    if not rows:
        raise RecipeError(f"{shown}: no rows (the file is empty)")
    return list(columns), rows, RowNumbers(tuple(lines))


def _parse_line(line: bytes, encoding: str) -> dict | BadRow:
    try:
        text = line.decode(encoding)
    except UnicodeDecodeError as error:
        return BadRow(
            None, f"not valid UTF-8 (byte 0x{line[error.start]:02x} at offset {error.start} of the line)"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return BadRow(None, f"invalid JSON ({error.msg} at column {error.colno})")
    except RecursionError:
        return BadRow(None, "invalid JSON (nested too deeply)")
    if not isinstance(value, dict):
        return BadRow(None, f"expected a JSON object, got {type(value).__name__}")
    return value
