"""Arithmetic chains whose operands are in the image (recipe kind `cell_chains`, vision).

The vision counterpart of `arithmetic_chains`: the image is a row of square cells, one per
operand, each filled with the colour of its digit (`PALETTE`); the question gives only the
operators; the reference response writes the same left-to-right evaluation in steps:

    image:      [green][red][black][blue][white]     (3 2 0 4 1)
    question:   Join the cells with *+-* and compute left to right mod 10.
    reference:  3*2+0=6 6-4*1=2 answer 2

The privileged text p names what the image shows and nothing computed from it, like the
paper's labelled boxes: `cells 3 2 0 4 1`. So the privileged views only compute, while the plain
view must also read every operand from the image; the final answer is never in p.

A cell is `cell_size` pixels square; 28 puts each cell on exactly one image token of Qwen2-VL /
Qwen2.5-VL (14-pixel patches merged 2x2), 32 on one of Qwen3-VL. Samples are pure functions of
(seed, split, index); train and test are disjoint by expression, `ood` has more operations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated

import datasets
from PIL import Image, ImageDraw

from dopd_vlm.data.arithmetic_chains import Chain, ChainKeys, chain_for_split
from dopd_vlm.data.dataset import sample_features
from dopd_vlm.data.images import png_bytes
from dopd_vlm.validation import AtLeast

# Digit -> fill colour: ten colours far apart in RGB, so a flat cell is told apart at a glance.
PALETTE = (
    (0, 0, 0),  # 0 black
    (255, 255, 255),  # 1 white
    (230, 25, 75),  # 2 red
    (60, 180, 75),  # 3 green
    (0, 130, 200),  # 4 blue
    (255, 225, 25),  # 5 yellow
    (245, 130, 48),  # 6 orange
    (145, 30, 180),  # 7 purple
    (70, 240, 240),  # 8 cyan
    (128, 128, 128),  # 9 grey
)


@dataclass(frozen=True)
class CellChainsRecipe(ChainKeys):
    """Keys of a `kind: cell_chains` recipe (see data_recipes/README.md); `modulus` <= 10, the
    colours of `PALETTE`."""

    cell_size: Annotated[int, AtLeast(8)] = 28


def render_cells(operands: tuple[int, ...], cell_size: int) -> Image.Image:
    """One flat `PALETTE` cell per operand, left to right, no gaps."""
    image = Image.new("RGB", (cell_size * len(operands), cell_size))
    draw = ImageDraw.Draw(image)
    for index, digit in enumerate(operands):
        x = index * cell_size
        draw.rectangle((x, 0, x + cell_size - 1, cell_size - 1), fill=PALETTE[digit])
    return image


def question_text(chain: Chain) -> str:
    return f"Join the cells with {''.join(chain.operators)} and compute left to right mod {chain.modulus}."


def cells_text(chain: Chain) -> str:
    """The privileged text: the digits the image shows, nothing computed from them."""
    return "cells " + " ".join(map(str, chain.operands))


FEATURES = sample_features(
    {
        "operands": datasets.List(datasets.Value("int32")),
        "step_values": datasets.List(datasets.Value("int32")),
    }
)


def make_row(recipe: CellChainsRecipe, split: str, index: int) -> dict:
    """Sample `index` of `split` as a `FEATURES` row (a pure function of its arguments)."""
    rng = random.Random(f"cell_chains:{recipe.seed}:{split}:{index}")
    chain = chain_for_split(rng, recipe, split)
    image = render_cells(chain.operands, recipe.cell_size)
    return {
        "id": f"{split}-{index:05d}",
        "question": question_text(chain),
        "answer": str(chain.answer),
        "privileged": cells_text(chain),
        "images": [{"bytes": png_bytes(image), "path": None}],
        "meta": {"operands": list(chain.operands), "step_values": [v for _, v in chain.steps()]},
        "reference": chain.reference(),
    }
