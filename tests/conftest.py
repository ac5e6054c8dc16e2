"""Shared test setup: no Hub access, and tiny teacher/student pairs of every family.

Everything the tests load is built locally (dopd_vlm.lab.tiny.make_tiny_pair), so the suite runs
on a machine without internet; HF_HUB_OFFLINE makes any accidental Hub lookup fail fast instead
of hanging on the network.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is first imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on 2 shared cores contention makes them
# 10-100x slower; subprocesses (torchrun ranks, notebook kernels) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-builds a CPU op at its first init; a build cache shared by several checkouts (or
# virtualenvs) rebuilds it for each and can leave a lock behind that stalls every later start.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import pytest  # noqa: E402

import dopd_vlm  # noqa: E402,F401  (before transformers: makes torchvision importable on CPU torch)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """family -> {"teacher": dir, "student": dir} for every family in dopd_vlm.families.FAMILIES.

    Built once per test session with seed 0 and the default sizes (about a second in all).
    Treat the directories as read-only: other tests share them.
    """
    from dopd_vlm.families import FAMILIES
    from dopd_vlm.lab.tiny import make_tiny_pair

    root = tmp_path_factory.mktemp("tiny_pairs")
    return {family: make_tiny_pair(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tied_pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Like `tiny_pairs`, but the students tie their LM head to the input embedding, as the small
    real checkpoints of every family do (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3-1.7B)."""
    import dataclasses

    from dopd_vlm.families import FAMILIES
    from dopd_vlm.lab.tiny import STUDENT_SIZE, make_tiny_pair

    root = tmp_path_factory.mktemp("tied_pairs")
    student = dataclasses.replace(STUDENT_SIZE, tie_word_embeddings=True)
    return {family: make_tiny_pair(family, root / family, seed=0, student=student) for family in FAMILIES}


@pytest.fixture(scope="session")
def template_pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Tiny pairs whose chat templates behave like the published ones (`dopd_vlm.lab.tiny`):
    `qwen3_thinking` (Qwen3's: string content, `enable_thinking`, `<think>` tokens),
    `qwen2_vl_system` (Qwen2-VL's: a default system turn, `add_vision_id`) and `qwen3_vl_thinking`
    (Qwen3-VL-Thinking's: the generation prompt opens `<think>`). Each has a "family" entry too."""
    from dopd_vlm.lab.tiny import QWEN2_VL_CHAT, QWEN3_CHAT, QWEN3_VL_THINKING_CHAT, make_tiny_pair

    root = tmp_path_factory.mktemp("template_pairs")
    chats = {"qwen3_thinking": ("qwen3", QWEN3_CHAT), "qwen2_vl_system": ("qwen2_vl", QWEN2_VL_CHAT),
             "qwen3_vl_thinking": ("qwen3_vl", QWEN3_VL_THINKING_CHAT)}
    return {name: {**make_tiny_pair(family, root / name, seed=0, chat=chat), "family": family}
            for name, (family, chat) in chats.items()}


def pytest_collection_modifyitems(config, items):
    """Modules with slow (multi-process) tests first, each module's tests kept together and in order:
    `make test` hands whole modules to its pytest-xdist workers in this order, and a long module
    started last would run alone at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable
