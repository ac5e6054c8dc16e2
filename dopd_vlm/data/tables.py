"""A split read from its sources into the canonical `datasets.Dataset`, every row validated once.

A source is a JSONL file (`JsonlSource`: rows parsed line by line, in memory) or an Arrow table
(`ArrowSource`: a Parquet file or shard, or a split of a `datasets` dataset, memory-mapped by
`datasets`). Sources are read in windows of rows; each row goes through the `RowReader`, and a
bad row is one line naming the source, the row and the field (or skipped, logged and counted).

Images are not decoded into memory: the canonical table stores them encoded ({bytes, path}), and
where an Arrow source stores encoded images (a `datasets` `Image` or `List(Image)` column), the
canonical table points at the source's own (memory-mapped) bytes instead of copying them, so a
large image dataset costs little memory on every rank. Only the paths of images stored as files
are new (resolved to absolute paths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import datasets.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dopd_vlm.data.dataset import sample_features
from dopd_vlm.data.rows import BadRow, Part, RowNumbers, RowReader, read_jsonl
from dopd_vlm.data.schema import RecipeError
from dopd_vlm.errors import one_line

logger = logging.getLogger(__name__)

FEATURES = sample_features(
    {"source": datasets.Value("string"), "row": datasets.Value("int64"), "location": datasets.Value("string")}
)
IMAGES_TYPE = FEATURES.arrow_schema.field("images").type  # list<struct<bytes: binary, path: string>>
FORMATS = {".jsonl": "json", ".parquet": "parquet"}  # data file suffixes and their datasets builders
# What datasets, huggingface_hub and pyarrow raise for data they cannot load (a missing, damaged or
# unknown dataset or file; no network: ConnectionError): an input error, not a bug of ours.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, pa.ArrowException, datasets.exceptions.DatasetsError)
WINDOW = 64  # rows validated at a time: bounds the image bytes held in Python at once
BLANK = {"id": "", "question": "", "answer": "", "privileged": "", "reference": "",
         "meta": {"source": "", "row": -1, "location": ""}}  # stands for a bad row until it is dropped


@dataclass(frozen=True)
class Window:
    """Consecutive rows of a source: `rows[i]` is row `start + i`; `image_chunks` the rows' images
    column as the source stores it (Arrow sources with an images column), else None."""

    start: int
    rows: list[Any]
    image_chunks: list[pa.Array] | None = None

    def images(self, entries: list[list[dict] | None]) -> list[pa.Array]:
        """The canonical images of the first `len(entries)` rows (see `image_lists`)."""
        if self.image_chunks is None:
            return [pa.array([row or [] for row in entries], IMAGES_TYPE)]
        arrays, begin = [], 0
        for chunk in self.image_chunks:
            if begin < len(entries):
                chunk = chunk.slice(0, len(entries) - begin)
                arrays.append(image_lists(chunk, entries[begin:begin + len(chunk)]))
                begin += len(chunk)
        return arrays


@dataclass(frozen=True)
class JsonlSource:
    """A JSONL file's rows (a `BadRow` for each unreadable line), rows `start` to `stop`."""

    part: Part
    columns: list[str]
    rows: list[Any]
    start: int = 0
    stop: int | None = None

    @property
    def size(self) -> int:
        """Rows in the file (whatever `start` and `stop`)."""
        return len(self.rows)

    def windows(self, columns: list[str], images_column: str) -> Iterator[Window]:
        stop = self.size if self.stop is None else self.stop
        for begin in range(self.start, stop, WINDOW):
            yield Window(begin, self.rows[begin:min(begin + WINDOW, stop)])


@dataclass(frozen=True)
class ArrowSource:
    """An Arrow table's rows `start` to `stop` (Parquet, a shard, a `datasets` split)."""

    part: Part
    table: datasets.Dataset
    start: int = 0
    stop: int | None = None

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    @property
    def size(self) -> int:
        """Rows in the table (whatever `start` and `stop`)."""
        return len(self.table)

    def windows(self, columns: list[str], images_column: str) -> Iterator[Window]:
        wanted = [name for name in columns if name in self.table.column_names]
        table = self.table.select_columns(wanted).with_format("arrow")
        stop = self.size if self.stop is None else self.stop
        for begin in range(self.start, stop, WINDOW):
            rows = table[begin:min(begin + WINDOW, stop)]  # a zero-copy slice
            chunks = rows.column(images_column).chunks if images_column in wanted else None
            yield Window(begin, rows.to_pylist(), chunks)


Source = JsonlSource | ArrowSource


def read_file(path: Path, shown: str, *, image_dir: Path | None, cache_dir: str | None) -> Source:
    """A JSONL or Parquet file's rows; relative image paths resolve against `image_dir`."""
    if path.suffix.lower() == ".jsonl":
        columns, rows, numbers = read_jsonl(path, shown)
        return JsonlSource(Part(shown, "file", numbers, path.stem, image_dir), columns, rows)
    try:
        table = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train",
                                      cache_dir=cache_dir)
    except LOAD_ERRORS as error:  # datasets wraps pyarrow's parser errors: report the cause
        raise RecipeError(f"{shown}: cannot read: {one_line(error.__cause__ or error)}") from None
    return ArrowSource(Part(shown, "file", RowNumbers(), path.stem, image_dir), table)


@dataclass
class SplitRows:
    """The canonical rows of a split as they are read; bad rows stay as blanks (their images as
    stored) until `dataset` selects the kept rows, so that images can stay in the source's buffers."""

    reader: RowReader
    limit: int | None
    skip_bad_rows: bool
    texts: list[dict[str, Any]] = field(default_factory=list)  # every row read, without images
    images: list[pa.Array] = field(default_factory=list)  # their images, in chunks
    kept: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.kept) >= self.limit

    def add(self, part: Part, window: Window) -> None:
        entries: list[list[dict] | None] = []
        for offset, raw in enumerate(window.rows):
            if self.full:
                break
            row, images = self.read(part, window.start + offset, raw)
            if images is not None:
                self.kept.append(len(self.texts))
            self.texts.append(row)
            entries.append(images)
        self.images.extend(window.images(entries))

    def read(self, part: Part, index: int, raw: Any) -> tuple[dict[str, Any], list[dict] | None]:
        """The row and its image entries, or (BLANK, None) for a bad row that is skipped."""
        try:
            if isinstance(raw, BadRow):
                raise raw
            return self.reader.read(part, index, raw)
        except BadRow as bad:
            where = "" if bad.field is None else f" field {self.reader.recipe.field_label(bad.field)}"
            message = f"{part.location(index)}{where}: {bad.problem}"
            if not self.skip_bad_rows:
                raise RecipeError(message) from None
            logger.warning("skipping bad row: %s", message)
            self.skipped.append(message)
            return BLANK, None

    def dataset(self) -> datasets.Dataset:
        """The kept rows as a `FEATURES` dataset."""
        schema = FEATURES.arrow_schema
        columns = [
            pa.chunked_array(self.images, IMAGES_TYPE) if name == "images"
            else pa.array([row[name] for row in self.texts], schema.field(name).type)
            for name in schema.names
        ]
        table = pa.Table.from_arrays(columns, schema=schema)
        every = datasets.Dataset(table, info=datasets.DatasetInfo(features=FEATURES),
                                 fingerprint=datasets.fingerprint.generate_random_fingerprint())
        return every if len(self.kept) == len(self.texts) else every.select(self.kept)


def read_split(
    sources: list[Source], reader: RowReader, *, limit: int | None, skip_bad_rows: bool, what: str, empty: str
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The first `limit` valid rows of the sources as a `FEATURES` dataset, and one line per skipped
    row. `what` names the split in the summary of skipped rows, `empty` is the error when no row
    is usable."""
    rows = SplitRows(reader, limit, skip_bad_rows)
    for source in sources:
        if not isinstance(source, JsonlSource) or source.columns:  # else each unreadable line is reported
            reader.check_columns(source.part, source.columns)
        for window in source.windows(reader.columns(), reader.recipe.column("images")):
            if rows.full:
                break
            rows.add(source.part, window)
    if rows.skipped:
        logger.warning("skipped %d bad rows of %d read from %s", len(rows.skipped), len(rows.texts), what)
    if not rows.kept and limit != 0:
        raise RecipeError(empty)
    return rows.dataset(), tuple(rows.skipped)


def image_lists(chunk: pa.Array, entries: list[list[dict] | None]) -> pa.Array:
    """A chunk of rows' canonical images (`IMAGES_TYPE`) from their checked `entries` (None: a row
    that is dropped). Where the chunk stores encoded images whose bytes the entries keep (a
    `datasets` `Image` or `List(Image)` column), the bytes stay the chunk's buffers and only the
    paths are new; otherwise the entries are copied."""
    stored = _stored_images(chunk)
    if stored is not None:
        offsets, stored_bytes = stored
        if _keeps_bytes(entries, np.diff(offsets), stored_bytes):
            paths: list[str | None] = []
            for row, length in zip(entries, np.diff(offsets)):
                paths.extend([None] * int(length) if row is None else [entry["path"] for entry in row])
            values = pa.StructArray.from_arrays([stored_bytes, pa.array(paths, pa.string())], names=["bytes", "path"])
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return pa.array([row or [] for row in entries], IMAGES_TYPE)


def _stored_images(chunk: pa.Array) -> tuple[np.ndarray, pa.Array] | None:
    """(offsets of each row's images, their bytes) of an `Image` (one per row) or `List(Image)`
    column chunk; None for any other column type."""
    if pa.types.is_list(chunk.type):
        lengths = pc.fill_null(pc.list_value_length(chunk), 0).to_numpy()
        values = chunk.flatten()  # a null row holds no values
    else:
        lengths, values = np.ones(len(chunk), dtype=np.int64), chunk
    if not pa.types.is_struct(values.type) or values.type.get_field_index("bytes") < 0:
        return None
    stored_bytes = values.flatten()[values.type.get_field_index("bytes")]  # flatten: the row's nulls apply
    if stored_bytes.type != pa.binary():
        return None
    return np.concatenate([[0], np.cumsum(lengths)]), stored_bytes


def _keeps_bytes(entries: list[list[dict] | None], lengths: np.ndarray, stored_bytes: pa.Array) -> bool:
    """Whether every kept row has its stored images in order, each using the stored bytes exactly
    when it has some (a path or a data: URI instead, or a null image, needs a copy)."""
    has_bytes = pc.fill_null(pc.binary_length(stored_bytes), 0).to_numpy() > 0
    position = 0
    for row, length in zip(entries, lengths):
        if row is not None:
            if len(row) != length:
                return False
            if any((entry["bytes"] is not None) != has_bytes[position + k] for k, entry in enumerate(row)):
                return False
        position += int(length)
    return True
