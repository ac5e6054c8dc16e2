"""The supported model families: one table, read by loading, the tiny-model factory and the data.

A family is a checkpoint's `config.model_type`. Adding one is one row here (plus whatever its
architecture needs in `tiny.py` to build small offline copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dopd_vlm.errors import InputError


@dataclass(frozen=True)
class FamilyInfo:
    """What the code needs to know about one family.

    Class names are resolved through `transformers` when used, so importing this module imports
    no modeling file. `box_coordinates` is the box convention the family was pretrained on:
    absolute pixels, or integers relative to the image on a 0..1000 scale (privileged boxes are
    written that way). `patch_size` is the vision patch in pixels (merged 2x2 into one token).
    """

    config: str
    model: str
    box_coordinates: Literal["absolute", "relative"]
    processor: str | None = None  # None: text-only, the tokenizer is the processor
    video_processor: str | None = None
    patch_size: int | None = None

    @property
    def vision(self) -> bool:
        return self.processor is not None


FAMILY_INFO: dict[str, FamilyInfo] = {
    "qwen2_vl": FamilyInfo("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "absolute",
                           "Qwen2VLProcessor", "Qwen2VLVideoProcessor", patch_size=14),
    "qwen2_5_vl": FamilyInfo("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "absolute",
                             "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", patch_size=14),
    "qwen3_vl": FamilyInfo("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "relative",
                           "Qwen3VLProcessor", "Qwen3VLVideoProcessor", patch_size=16),
    "qwen3": FamilyInfo("Qwen3Config", "Qwen3ForCausalLM", "relative"),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_INFO)
VISION_FAMILIES: tuple[str, ...] = tuple(name for name, info in FAMILY_INFO.items() if info.vision)


def unsupported(model_type: object, checkpoint: object = None) -> InputError:
    """The one error for a family outside the table (optionally naming the checkpoint)."""
    where = "" if checkpoint is None else f"checkpoint {checkpoint}: "
    return InputError(
        f"{where}Unsupported model family {model_type!r}: dopd_vlm supports {', '.join(FAMILIES)} "
        "(config.model_type of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and text-only Qwen3 checkpoints)."
    )


def family_info(family: str) -> FamilyInfo:
    """The table row of `family`; a family outside the table is the `unsupported` error."""
    if family not in FAMILY_INFO:
        raise unsupported(family)
    return FAMILY_INFO[family]


def is_vision_family(family: str) -> bool:
    return family_info(family).vision
