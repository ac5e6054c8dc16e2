"""Data: recipes in, validated canonical `Sample`s out.

Only this package knows file formats. See data_recipes/README.md for the recipe YAML keys and the
expected schema of local JSONL/Parquet files and `datasets` datasets (hub, save_to_disk, shards).
"""

from dopd_vlm.data.dataset import SampleDataset
from dopd_vlm.data.images import to_rgb
from dopd_vlm.data.recipes import (
    builtin_recipes,
    load_recipe,
    parse_recipe,
    read_recipe,
)
from dopd_vlm.data.schema import RecipeError, Sample, answers_match, normalize_answer

__all__ = [
    "RecipeError",
    "Sample",
    "SampleDataset",
    "answers_match",
    "builtin_recipes",
    "load_recipe",
    "normalize_answer",
    "parse_recipe",
    "read_recipe",
    "to_rgb",
]
