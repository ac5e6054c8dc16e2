"""Your own data from local JSONL or Parquet files (recipe kind `local_files`).

Every row is validated once, here, so a bad row stops the load with one line naming the file,
the row and the field instead of failing mid-training; with `skip_bad_rows` it is skipped,
logged and counted instead. The expected format is documented in data_recipes/README.md.

Rows are named as a user finds them: a JSONL row by its line as an editor numbers it (from 1,
blank lines counted: `data/train.jsonl line 5`), a Parquet row by its position from 0
(`data/train.parquet row 3 (0-based)`), which is what pandas and datasets show.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import datasets

from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor
from dopd_vlm.data.dataset import rows_to_hf, sample_features
from dopd_vlm.data.images import ImageProblem, check_image
from dopd_vlm.data.schema import IMAGE_PLACEHOLDER, RecipeError
from dopd_vlm.validation import INTERNAL, IntRange, NonEmpty

logger = logging.getLogger(__name__)

Field = Literal["id", "question", "answer", "privileged", "images", "reference"]
FORMATS = {".jsonl": "json", ".parquet": "parquet"}
FEATURES = sample_features(
    {"source": datasets.Value("string"), "row": datasets.Value("int64"), "location": datasets.Value("string")}
)


@dataclass(frozen=True)
class LocalFilesRecipe:
    """Keys of a `kind: local_files` recipe (see data_recipes/README.md)."""

    description: str = ""
    files: Annotated[dict[str, str], NonEmpty()] = field(default_factory=dict)
    fields: dict[Field, str] = field(default_factory=dict)
    allow_empty_privileged: bool = False
    skip_bad_rows: bool = False
    images_per_row: Annotated[tuple[int, int], IntRange(0)] = (0, 8)
    answer_extractor: AnswerExtractor = WHOLE_RESPONSE
    answer_instruction: str = ""  # appended to every question on a new line (e.g. the answer format)
    source: str = field(default="<recipe>", metadata=INTERNAL)
    base_dir: Path = field(default=Path("."), metadata=INTERNAL)

    def __post_init__(self) -> None:
        if not self.files:
            raise RecipeError(f"recipe {self.source}: missing key 'files'")
        for split, name in self.files.items():
            if Path(name).suffix.lower() not in FORMATS:
                raise RecipeError(
                    f"recipe {self.source}: key 'files.{split}': must end in "
                    f"{' or '.join(FORMATS)}, got {name!r}"
                )

    @property
    def splits(self) -> dict[str, str]:
        return self.files

    def path(self, split: str) -> Path:
        """The split's data file; relative paths are relative to the recipe's directory."""
        return Path(os.path.abspath(self.base_dir / self.files[split]))

    def column(self, name: str) -> str:
        """The file's column for canonical field `name` (the same name unless mapped)."""
        return self.fields.get(name, name)

    def field_label(self, name: str) -> str:
        """A canonical field as messages name it: its column, and the field when they differ."""
        column = self.column(name)
        return f"'{name}'" if column == name else f"'{column}' ({name})"


class BadRow(Exception):
    """A row that cannot be used; `field` is None when the whole line is unreadable (JSONL)."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


def build_split(
    recipe: LocalFilesRecipe, split: str, *, limit: int | None = None, skip_bad_rows: bool = False
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The split's first `limit` valid rows as `FEATURES` rows, and one line per skipped row."""
    path = recipe.path(split)
    shown = display_path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {recipe.source}: file of split '{split}' not found: {shown}")
    columns, table, numbers = _read(path, shown)
    if columns:  # else every JSONL line is unreadable: each is reported (or skipped) below
        _check_columns(recipe, columns, shown)
    reader = _RowReader(recipe, path, shown, numbers)
    rows: list[dict] = []
    skipped: list[str] = []
    for index, raw in enumerate(table):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if isinstance(raw, BadRow):
                raise raw
            rows.append(reader.read(index, raw))
        except BadRow as bad:
            where = "" if bad.field is None else f" field {recipe.field_label(bad.field)}"
            message = f"{shown} {numbers.label(index)}{where}: {bad.problem}"
            if not skip_bad_rows:
                raise RecipeError(message) from None
            logger.warning("skipping bad row: %s", message)
            skipped.append(message)
    if skipped:
        logger.warning(
            "skipped %d bad rows of %d read from %s (skip_bad_rows)",
            len(skipped), len(rows) + len(skipped), shown,
        )
    if not rows and limit != 0:
        raise RecipeError(f"{shown}: no usable rows (split '{split}' of recipe {recipe.source})")
    return rows_to_hf(rows, FEATURES), tuple(skipped)


def display_path(path: Path) -> str:
    """Relative to the working directory when inside it (shorter), else absolute."""
    path = Path(os.path.abspath(path))  # also folds "dir/../"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class RowNumbers:
    """How a file's rows are named in messages (see the module docstring)."""

    lines: tuple[int, ...] | None = None  # JSONL: each row's 1-based line; None: Parquet

    def number(self, index: int) -> int:
        """The number a user looks row `index` up by: its line (JSONL) or its position (Parquet)."""
        return index if self.lines is None else self.lines[index]

    def label(self, index: int) -> str:
        if self.lines is None:
            return f"row {index} (0-based)"
        return f"line {self.lines[index]}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# -- reading --------------------------------------------------------------------------------


def _read(path: Path, shown: str) -> tuple[list[str], Any, RowNumbers]:
    """The file's column names, its rows (dicts, or for JSONL a `BadRow` per unreadable line, so
    that one broken line is reported with its line number, or skipped, like any bad row) and how
    its rows are numbered."""
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, shown)
    try:
        table = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors of any kind; report the cause
        raise RecipeError(f"{shown}: cannot read: {_one_line(error.__cause__ or error)}") from None
    table = _without_image_decoding(table)
    return table.column_names, table, RowNumbers()


def _read_jsonl(path: Path, shown: str) -> tuple[list[str], list[dict | BadRow], RowNumbers]:
    """Rows are the non-blank lines. Each is decoded as UTF-8 (a BOM on the first line is
    ignored) and parsed on its own; columns are the keys of the readable rows, in order of
    first appearance."""
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
        raise RecipeError(f"{shown}: cannot read: {error.strerror or _one_line(error)}") from None
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


def _without_image_decoding(table: datasets.Dataset) -> datasets.Dataset:
    """Parquet written by `datasets` may carry Image features; read them as bytes/path dicts."""
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            table = table.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            table = table.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return table


def _check_columns(recipe: LocalFilesRecipe, columns: list[str], shown: str) -> None:
    """A column the recipe relies on but the file lacks is a mapping error, not a row error."""
    needed = ["question", "answer"] + ([] if recipe.allow_empty_privileged else ["privileged"])
    needed += [name for name in ("id", "images", "reference") if name in recipe.fields]
    for name in needed:
        if recipe.column(name) not in columns:
            raise RecipeError(
                f"{shown} field {recipe.field_label(name)}: missing (no such column; "
                f"the file has {', '.join(columns)}; see 'fields' in recipe {recipe.source})"
            )


class _RowReader:
    """Turns a raw row into a canonical row, or raises `BadRow`."""

    def __init__(self, recipe: LocalFilesRecipe, path: Path, shown: str, numbers: RowNumbers):
        self.recipe, self.path, self.shown, self.numbers = recipe, path, shown, numbers
        self.seen_ids: dict[str, int] = {}

    def read(self, index: int, raw: dict[str, Any]) -> dict[str, Any]:
        row = {
            "id": self._id(index, raw),
            "question": _required_text("question", self._value(raw, "question")),
            "answer": _required_text("answer", self._value(raw, "answer"), numbers=True),
            "privileged": self._privileged(raw),
            "images": self._images(raw),
            "meta": {"source": self.shown, "row": index, "location": f"{self.shown} {self.numbers.label(index)}"},
            "reference": self._reference(raw),
        }
        _check_placeholders(row["question"], row["privileged"], len(row["images"]))
        self.seen_ids[row["id"]] = index
        return row

    def _value(self, raw: dict[str, Any], name: str) -> Any:
        return raw.get(self.recipe.column(name))

    def _id(self, index: int, raw: dict[str, Any]) -> str:
        value = self._value(raw, "id")
        if value is None:
            sample_id = f"{self.path.stem}-{self.numbers.number(index)}"
        else:
            sample_id = _required_text("id", value, numbers=True)
        if sample_id in self.seen_ids:
            first = self.numbers.label(self.seen_ids[sample_id])
            raise BadRow("id", f"duplicate id {sample_id!r} (also {first})")
        return sample_id

    def _privileged(self, raw: dict[str, Any]) -> str:
        value = self._value(raw, "privileged")
        if self.recipe.allow_empty_privileged and (value is None or value == ""):
            return ""
        return _required_text("privileged", value)

    def _reference(self, raw: dict[str, Any]) -> str:
        """Optional: a missing, null or "" reference response means the answer is the reference."""
        value = self._value(raw, "reference")
        return "" if value is None or value == "" else _required_text("reference", value)

    def _images(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        value = self._value(raw, "images")
        items = [] if value is None else value if isinstance(value, list) else [value]
        low, high = self.recipe.images_per_row
        if not low <= len(items) <= high:
            raise BadRow("images", f"{len(items)} images, expected {low} to {high}")
        return [self._image(position, item) for position, item in enumerate(items)]

    def _image(self, position: int, item: Any) -> dict[str, Any]:
        """An item is a path (relative to the data file), bytes, a `data:` URI with base64
        content, or a {bytes, path} struct as `datasets` writes it; it must decode."""
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
            source = self.path.parent / item
            entry = {"bytes": None, "path": os.path.abspath(source)}
            what = f"image {position} ({item})"
            if not source.is_file():
                raise BadRow("images", f"{what}: file not found: {display_path(source)}")
        else:
            expected = "expected a path, bytes or a data: URI"
            raise BadRow("images", f"image {position}: {expected}, got {type(item).__name__}")
        try:
            check_image(source)
        except ImageProblem as problem:
            raise BadRow("images", f"{what}: {problem}") from None
        except OSError as error:  # an unreadable file (permissions, I/O error)
            raise BadRow("images", f"{what}: cannot read: {error.strerror or _one_line(error)}") from None
        return entry


def _base64_payload(position: int, uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise BadRow("images", f"image {position}: data: URI must be base64 (data:...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise BadRow("images", f"image {position}: invalid base64: {_one_line(error)}") from None


def _check_placeholders(question: str, privileged: str, images: int) -> None:
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


def _required_text(name: str, value: Any, *, numbers: bool = False) -> str:
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
