"""Recipes: one small YAML file says where samples come from.

`load_recipe` reads and validates the recipe, builds one split (generating synthetic data, or
reading and validating your rows: local files, `datasets` datasets), and returns a
`SampleDataset` of canonical `Sample`s.
Built-in recipes live in `<repo>/data_recipes/NAME.yaml` and are loaded by NAME.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

import datasets
import yaml

import dopd_vlm.data.arithmetic_chains as arithmetic_chains
import dopd_vlm.data.cell_chains as cell_chains
import dopd_vlm.data.hf_datasets as hf_datasets
import dopd_vlm.data.local_files as local_files
import dopd_vlm.data.synthetic_scenes as synthetic_scenes
from dopd_vlm.data.arithmetic_chains import ArithmeticChainsRecipe
from dopd_vlm.data.cell_chains import CellChainsRecipe
from dopd_vlm.data.dataset import SampleDataset, rows_to_hf
from dopd_vlm.data.hf_datasets import HFDatasetRecipe
from dopd_vlm.data.local_files import LocalFilesRecipe
from dopd_vlm.data.rows import display_path
from dopd_vlm.data.schema import RecipeError
from dopd_vlm.data.synthetic_scenes import SyntheticScenesRecipe
from dopd_vlm.errors import one_line
from dopd_vlm.families import FAMILIES
from dopd_vlm.validation import Invalid, build, keys

RECIPES_DIR = Path(__file__).resolve().parents[2] / "data_recipes"
KINDS = {
    "synthetic_scenes": SyntheticScenesRecipe,
    "arithmetic_chains": ArithmeticChainsRecipe,
    "cell_chains": CellChainsRecipe,
    "local_files": LocalFilesRecipe,
    "hf_dataset": HFDatasetRecipe,
}
Recipe = Union[SyntheticScenesRecipe, ArithmeticChainsRecipe, CellChainsRecipe, LocalFilesRecipe, HFDatasetRecipe]
OWN_ROWS = (LocalFilesRecipe, HFDatasetRecipe)  # kinds that read your rows (base_dir, skip_bad_rows)
GENERATED = {SyntheticScenesRecipe: synthetic_scenes, ArithmeticChainsRecipe: arithmetic_chains,
             CellChainsRecipe: cell_chains}  # kinds whose rows are made: each module's `make_row` and `FEATURES`


def load_recipe(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
    split: str,
    *,
    family: str = "qwen2_vl",
    limit: int | None = None,
    skip_bad_rows: bool = False,
) -> SampleDataset:
    """One validated split of a recipe.

    Args:
        recipe: A built-in name ("synthetic_scenes"), a path to a recipe YAML, the recipe as a
            mapping (relative paths then resolve against the working directory), or a parsed
            recipe from `read_recipe`.
        split: A split the recipe defines ("train", "test", "ood", ...).
        family: Model family the privileged text is formatted for (box coordinates differ):
            qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3.
        limit: Keep only the first `limit` samples (valid rows, for local files).
        skip_bad_rows: Skip, log and count bad rows even if the recipe does not say so.

    Raises:
        RecipeError: One line naming the recipe key, or the file, row and field at fault.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    parsed = recipe if isinstance(recipe, tuple(KINDS.values())) else read_recipe(recipe)
    if split not in parsed.splits:
        raise RecipeError(
            f"recipe {parsed.source} has no split {split!r} (splits: {', '.join(parsed.splits)})"
        )
    skipped: tuple[str, ...] = ()
    skip = skip_bad_rows or (isinstance(parsed, OWN_ROWS) and parsed.skip_bad_rows)
    if isinstance(parsed, LocalFilesRecipe):
        hf, skipped = local_files.build_split(parsed, split, limit=limit, skip_bad_rows=skip)
    elif isinstance(parsed, HFDatasetRecipe):
        hf, skipped = hf_datasets.build_split(parsed, split, limit=limit, skip_bad_rows=skip)
    else:
        hf = generated_split(parsed, split, family=family, limit=limit)
    return SampleDataset(hf=hf, recipe=parsed, split=split, family=family, skipped=skipped, skip_bad_rows=skip)


def generated_split(recipe: Recipe, split: str, *, family: str, limit: int | None) -> datasets.Dataset:
    """The first `limit` (default all) rows of a generated kind's split: row i is its module's
    `make_row(recipe, split, i)`, a pure function (synthetic scenes also take the family: box
    coordinates differ)."""
    module = GENERATED[type(recipe)]
    count = recipe.splits[split] if limit is None else min(limit, recipe.splits[split])
    options = {"family": family} if isinstance(recipe, SyntheticScenesRecipe) else {}
    return rows_to_hf([module.make_row(recipe, split, index, **options) for index in range(count)], module.FEATURES)


def read_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """Parse and validate a recipe (name, YAML path or mapping) without loading any data."""
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, source="<mapping>", base_dir=Path.cwd())
    path = _resolve(recipe)
    shown = display_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {shown}: invalid YAML: {one_line(error)}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe {shown}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start})") from None
    except OSError as error:
        raise RecipeError(f"recipe {shown}: cannot read: {error.strerror or error}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe {shown}: expected a mapping of keys, got {type(data).__name__}")
    return parse_recipe(data, source=shown, base_dir=path.parent.absolute())


def parse_recipe(data: Mapping[str, Any], *, source: str, base_dir: Path) -> Recipe:
    """Validate a recipe mapping; `base_dir` anchors the relative data paths of your own rows."""
    kind = data.get("kind")
    if kind is None:
        raise RecipeError(f"recipe {source}: missing key 'kind' (one of {', '.join(KINDS)})")
    if kind not in KINDS:
        raise RecipeError(f"recipe {source}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    cls = KINDS[kind]
    internal = {"source": source, **({"base_dir": base_dir} if cls in OWN_ROWS else {})}
    try:
        return build(cls, {name: value for name, value in data.items() if name != "kind"}, **internal)
    except Invalid as err:
        if err.known is not None:
            nested = "." in err.path  # a key inside a mapping key (answer_extractor.pattern) lists its siblings
            allowed = ", ".join(sorted(err.known) if nested else ["kind", *sorted(keys(cls))])
            raise RecipeError(f"recipe {source}: unknown key '{err.path}' for kind '{kind}' (allowed: {allowed})") from None
        raise RecipeError(f"recipe {source}: {err}") from None


def builtin_recipes() -> list[str]:
    """Names accepted by `load_recipe` besides paths."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def _resolve(recipe: str | os.PathLike) -> Path:
    """A path if it looks like one (YAML suffix, a separator, or an existing file), else a
    built-in name."""
    text = os.fspath(recipe)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {text}")
        return path
    builtin = RECIPES_DIR / f"{text}.yaml"
    if not builtin.is_file():
        raise RecipeError(
            f"unknown recipe {text!r}: no such file and no built-in of that name "
            f"(built-ins: {', '.join(builtin_recipes())})"
        )
    return builtin
