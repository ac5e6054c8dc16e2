"""dopd_vlm: Dual On-policy Distillation for vision-language models.

Pipeline, one module per stage: data -> collate -> rollout -> scoring -> router -> losses/methods
-> train. Importing the package makes Qwen-VL processors importable on CPU-only machines.
"""

from dopd_vlm import _compat  # noqa: F401  (must run before the first transformers import)

__version__ = "0.1.0"
