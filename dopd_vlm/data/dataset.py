"""`SampleDataset`: validated rows held in a `datasets.Dataset`, handed out as `Sample`s.

Every recipe kind builds the same columns (`sample_features`), so the wrapper is kind-agnostic.
Images are stored encoded (bytes, or a path to a checked file) and decoded on access, so a large
split costs little memory; RGB conversion also happens on access. `headers` hands out the texts
and image sizes of many rows without decoding a pixel (for load-time checks of whole splits).
"""

from __future__ import annotations

import dataclasses
import io
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

import datasets
from PIL import Image

from dopd_vlm.data.answers import AnswerExtractor
from dopd_vlm.data.images import to_rgb
from dopd_vlm.data.schema import Sample, SampleHeader


def sample_features(meta: dict[str, Any]) -> datasets.Features:
    """The canonical columns; `meta` is the kind's own struct (e.g. scene objects).

    `reference` is "" for rows whose reference response is the answer itself."""
    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "question": text,
            "answer": text,
            "privileged": text,
            "images": datasets.List(datasets.Image()),
            "meta": meta,
            "reference": text,
        }
    )


def rows_to_hf(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    """Rows as a `datasets.Dataset`; column-wise, because `from_list` rejects zero rows."""
    return datasets.Dataset.from_dict(
        {name: [row[name] for row in rows] for name in features}, features=features
    )


@dataclass(frozen=True, eq=False)
class SampleDataset(Sequence):
    """An indexable split of a recipe.

    Attributes:
        hf: The underlying `datasets.Dataset` with `sample_features` columns.
        recipe: The parsed recipe it came from.
        split: Split name.
        family: Model family the privileged text was formatted for.
        skipped: One line per row skipped by `skip_bad_rows` (file, row, field, problem);
            `len(skipped)` is the count.
        skip_bad_rows: Whether this split skips bad rows (the `load_recipe` argument or the
            recipe's key); later checks of its rows (`prompt_checks`) follow it.
    """

    hf: datasets.Dataset
    recipe: Any
    split: str
    family: str
    skipped: tuple[str, ...] = ()
    skip_bad_rows: bool = False

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        index = operator.index(index)  # any integer type (numpy, torch); slices are not supported
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = self.hf[index % len(self)]
        return Sample(
            id=row["id"],
            question=self.question(row["question"]),
            answer=row["answer"],
            privileged=row["privileged"],
            images=tuple(to_rgb(image) for image in row["images"]),
            meta=row["meta"],
            reference=row["reference"],
        )

    @property
    def answer_extractor(self) -> AnswerExtractor:
        """How evaluation takes the final answer out of a response (recipe key `answer_extractor`)."""
        return self.recipe.answer_extractor

    def question(self, text: str) -> str:
        """A row's question as the models get it: with the recipe's `answer_instruction` (e.g.
        "Answer with one word.") on a line of its own after it, where the recipe sets one."""
        instruction = self.recipe.answer_instruction
        return f"{text}\n{instruction}" if instruction else text

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def headers(self, start: int, stop: int) -> list[SampleHeader]:
        """Rows start..stop-1 without their pixels: texts, and image sizes read from the image
        headers only (what the processors resize from; no image is decoded)."""
        table = self.hf.with_format("arrow")[start:stop].to_pylist()  # images stay encoded
        return [
            SampleHeader(
                id=row["id"], question=self.question(row["question"]), answer=row["answer"], privileged=row["privileged"],
                image_sizes=tuple(_image_size(image) for image in row["images"]),
                location=self.location(row["id"], row["meta"]), reference=row["reference"],
            )
            for row in table
        ]

    def location(self, sample_id: str, meta: dict[str, Any]) -> str:
        """Where a row comes from, as messages name it: the file and line (local files), or the
        sample id, split and recipe (generated data)."""
        if isinstance(meta, dict) and meta.get("location"):
            return meta["location"]
        return f"sample {sample_id!r} of split '{self.split}' (recipe {self.recipe.source})"

    def field_label(self, name: str) -> str:
        """A canonical field (question, answer, privileged, images) as messages name it."""
        return self.recipe.field_label(name)

    def without(self, indices: Sequence[int], reasons: Sequence[str]) -> "SampleDataset":
        """This split without the rows at `indices`, which `skipped` then lists by `reasons`."""
        drop = set(indices)
        kept = [i for i in range(len(self)) if i not in drop]
        return dataclasses.replace(self, hf=self.hf.select(kept), skipped=self.skipped + tuple(reasons))


def _image_size(image: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of a stored image ({bytes, path}) from its header."""
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(source) as opened:
        return opened.size
