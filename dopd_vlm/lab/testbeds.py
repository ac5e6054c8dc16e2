"""The reasoning testbeds: built-in recipes, tiny models and warm-ups where DOPD's preconditions
can be checked (BENCHMARKS.md, "Learning on the ... testbed"; issue 15).

A testbed is a config (`configs/testbed_<name>.yaml`: recipe, prompt template, generation length
and the warmed-up pair shipped in demo_assets/) plus how that pair was made: the model family,
one tiny size for both models and the two supervised warm-ups (`dopd_vlm.lab.warmup`), which alone
make the teacher-student gap: `benchmarks/testbed_learning.py --rebuild` warms both up from the
same initial weights (the shipped cells pair was built so; the arithmetic pair, older, from the
two initialisations of `make_tiny_pair`; each manifest says), or, for a variant with a `base`,
continues the base testbed's shipped teacher and student on the variant's recipe.
`dopd-vlm demo --testbed <name>` and `benchmarks/testbed_learning.py --testbed <name>` run on them.

The arithmetic testbed has three variants that move one knob, the kind of p (issue 24, "when does
DOPD help?"): `arithmetic` (a capability gap: p = the first step's value, computable from the
question), `arithmetic_hidden` (an information gap: half the problems hide one operand, which
only p gives) and `arithmetic_rule` (a shared rule: a-b means b-a in every problem, p states it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Testbed:
    """One reasoning testbed: the config its runs use (recipe, prompt template, generation
    length and the shipped pair are read from it), the model family, the size of both tiny
    models and their warm-ups (`dopd_vlm.lab.warmup.WarmupConfig` fields)."""

    name: str
    title: str
    config: Path
    family: str
    size: dict[str, Any]
    teacher_warmup: dict[str, Any]
    student_warmup: dict[str, Any]
    ood: str  # how the out-of-distribution split differs, for the tables
    plain_view: str  # what each view shows, for the tables: the teacher is scored in both
    privileged_view: str
    base: str = ""  # a testbed whose shipped pair the warm-ups continue ("": fresh tiny weights)
    student_plain_recipe: str = ""  # the recipe whose rows the student's warm-up shows plain ("": its own)
    kind_of_p: str = ""  # what p is to the task, for the summary across testbeds

    @cached_property
    def settings(self):
        """The config, loaded and validated as `dopd-vlm train` loads it (a RunConfig)."""
        from dopd_vlm.config import load_config

        return load_config(self.config)

    @property
    def recipe(self) -> str:
        return self.settings.data.recipe

    @property
    def template(self) -> str:
        return self.settings.data.privileged_template

    @property
    def max_new_tokens(self) -> int:
        return self.settings.rollout.max_new_tokens

    @property
    def section(self) -> str:
        return f"Learning on the {self.title}"

    def shipped_pair(self) -> dict[str, Path]:
        """The warmed-up pair the config names (demo_assets/: the pair every recorded setting used)."""
        model = self.settings.model
        return {"teacher": REPO / model.teacher, "student": REPO / model.student}

    def initial_pair(self) -> dict[str, Path] | None:
        """The checkpoints the warm-ups start from: the base testbed's shipped pair, or None
        (fresh tiny weights, `benchmarks/testbed_learning.py prepare_pair`)."""
        return TESTBEDS[self.base].shipped_pair() if self.base else None

    def warmups(self):
        from dopd_vlm.lab.warmup import WarmupConfig

        return WarmupConfig(**self.teacher_warmup), WarmupConfig(**self.student_warmup)

    def sizes(self):
        from dopd_vlm.lab.tiny import TinySize

        return TinySize(**self.size), TinySize(**self.size)


# head_dim 32 (64 / 2 heads), the size vLLM's CPU backend accepts; one size for both models of a
# testbed: the capability gap comes from the warm-ups alone.
TINY_64 = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256)
WARMUP = dict(batch_size=64, lr=3e-3, warmup_steps=50, min_lr_ratio=1.0, seed=0)
TESTBEDS = {
    "arithmetic": Testbed(
        name="arithmetic", title="arithmetic testbed", config=REPO / "configs" / "testbed_arithmetic.yaml",
        family="qwen3", size=TINY_64, ood="7-8 operations", plain_view="question only",
        privileged_view="question + hint p", kind_of_p="capability gap: p is computable from the question",
        teacher_warmup=dict(WARMUP, steps=3000, privileged_prob=0.5),
        student_warmup=dict(WARMUP, steps=1250, privileged_prob=0.5)),
    "cells": Testbed(
        name="cells", title="cell-chains (vision) testbed", config=REPO / "configs" / "testbed_cells.yaml",
        family="qwen2_vl", size=TINY_64, ood="6 operations", plain_view="image only",
        privileged_view="image + cell digits p", kind_of_p="capability gap: p names what the image shows",
        teacher_warmup=dict(WARMUP, steps=3000, privileged_prob=0.5),
        student_warmup=dict(WARMUP, steps=1500, privileged_prob=0.9)),
    # The variants continue the arithmetic pair on their recipe: the teacher 1000 steps (test
    # accuracy with p >= 0.99 for both), the student the shortest continuation, in steps of 100,
    # at which its pair meets the preconditions (its accuracy with p >= 0.1 above its plain one,
    # the teacher's with p >= 0.2 above it), so each keeps as much of the arithmetic pair's
    # capability gap as it can (benchmarks/testbed_map_findings.md has the measured curves).
    "arithmetic_hidden": Testbed(
        name="arithmetic_hidden", title="arithmetic testbed, information gap (hidden operand)",
        config=REPO / "configs" / "testbed_arithmetic_hidden.yaml", family="qwen3", size=TINY_64,
        ood="7-8 operations", plain_view="question, first operand hidden in half the problems",
        privileged_view="question + hidden operand p", base="arithmetic",
        kind_of_p="information gap: p holds part of what the answer needs",
        teacher_warmup=dict(WARMUP, steps=1000, privileged_prob=0.5),
        student_warmup=dict(WARMUP, steps=400, privileged_prob=0.5)),
    "arithmetic_rule": Testbed(
        name="arithmetic_rule", title="arithmetic testbed, shared rule (a-b means b-a)",
        config=REPO / "configs" / "testbed_arithmetic_rule.yaml", family="qwen3", size=TINY_64,
        ood="7-8 operations", plain_view="question only", privileged_view="question + the rule p", base="arithmetic",
        kind_of_p="shared rule: p is the same for every problem and can be internalised",
        teacher_warmup=dict(WARMUP, steps=1000, privileged_prob=0.5),
        # the student is shown the rule's chains only with p, the usual `-` when plain: a student
        # that follows the rule when told and has not internalised it
        student_warmup=dict(WARMUP, steps=600, privileged_prob=0.5), student_plain_recipe="arithmetic_chains"),
}

