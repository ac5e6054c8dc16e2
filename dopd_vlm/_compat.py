"""Make transformers' Qwen-VL processors importable next to a CPU-only torch.

PyPI serves only CUDA builds of torchvision for Linux. Next to the CPU torch wheel its compiled
ops fail to register and ``import torchvision`` raises ``operator torchvision::nms does not
exist``, which breaks every Qwen-VL image processor. Declaring the two op schemas it looks up at
import time is enough for the image transforms we use (they never call nms). Where torchvision
loads normally this does nothing.
"""

import torch


_SHIMMED = False  # set when this process needed the shim


def torchvision_shimmed() -> bool:
    """Whether torchvision only imports here thanks to this shim (CUDA torchvision, CPU torch)."""
    return _SHIMMED


def ensure_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        _declare_missing_torchvision_ops()
        import torchvision  # noqa: F401


def _declare_missing_torchvision_ops() -> None:
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_LIB, _SHIMMED  # the library object must outlive this call or the schemas vanish
    _SHIMMED = True
    _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )


ensure_torchvision_importable()
