"""Your own data from local JSONL or Parquet files (recipe kind `local_files`).

Every row is validated once at load (data/rows.py, data/tables.py), so a bad row stops the load
with one line naming the file, the row and the field instead of failing mid-training; with
`skip_bad_rows` it is skipped, logged and counted instead. The expected format is documented in
data_recipes/README.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import datasets

from dopd_vlm.data.rows import RowReader, RowRules, display_path
from dopd_vlm.data.schema import RecipeError
from dopd_vlm.data.tables import FORMATS, read_file, read_split
from dopd_vlm.validation import INTERNAL, NonEmpty

Field = Literal["id", "question", "answer", "privileged", "images", "reference"]


@dataclass(frozen=True)
class LocalFilesRecipe(RowRules):
    """Keys of a `kind: local_files` recipe (see data_recipes/README.md); more in `RowRules`."""

    description: str = ""
    files: Annotated[dict[str, str], NonEmpty()] = field(default_factory=dict)
    fields: dict[Field, str] = field(default_factory=dict)
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


def build_split(
    recipe: LocalFilesRecipe, split: str, *, limit: int | None = None, skip_bad_rows: bool = False
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The split's first `limit` valid rows as canonical rows, and one line per skipped row."""
    path = recipe.path(split)
    shown = display_path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {recipe.source}: file of split '{split}' not found: {shown}")
    source = read_file(path, shown, image_dir=path.parent, cache_dir=None)
    return read_split([source], RowReader(recipe), limit=limit, skip_bad_rows=skip_bad_rows, what=shown,
                      empty=f"{shown}: no usable rows (split '{split}' of recipe {recipe.source})")
