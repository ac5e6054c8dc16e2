"""dopd_vlm: Dual On-policy Distillation for vision-language models.

Pipeline, one module per stage: data -> collate -> rollout -> scoring -> router -> losses/methods
-> train. Importing the package makes Qwen-VL processors importable on CPU-only machines.
"""

from dopd_vlm import _compat  # noqa: F401  (must run before the first transformers import)
from dopd_vlm._compat import torchvision_shimmed  # noqa: F401,E402  (vllm_rollout asks it)

__version__ = "0.1.0"
