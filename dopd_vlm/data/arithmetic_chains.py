"""Modular arithmetic chains with written reasoning (recipe kind `arithmetic_chains`, text only).

A text testbed for DOPD's preconditions: an expression of one-digit operands is evaluated left
to right modulo `modulus` (no precedence), and the reference response writes the evaluation in
steps of `ops_per_step` operations, each step starting from the previous result:

    question:   Compute 1*2*6+7*2+8+3 left to right mod 10.
    reference:  1*2*6=2 2+7*2=8 8+8+3=9 answer 9
    answer:     9

Most response tokens are easy (operands and operators copied from the question, the previous
result copied, spaces); a minority are pivotal (each step's result, computed two operations at
a time without writing the intermediate value, and the answer). Every chain has at least two
steps, so the privileged hint never is the final answer:

- `hint: first_step` -- p = `step 1 gives 2`: the value of the first step, nothing of the rest;
- `hint: all_but_last` -- p = `steps give 2 8`: the value of every step but the last, so the
  privileged views only compute the last step (and the answer is still not in p).

Evaluation takes the final answer out of a response with the `answer_extractor` (default
`{kind: regex, pattern: 'answer (\\S+)'}`), so any chain that ends in the right answer counts.

Everything is a pure function of (seed, split, index), like synthetic scenes: sample i of a split
is the same whatever `limit` is. Train and test are disjoint by construction (a hash of the
expression assigns it to one of them); `ood` differs by its number of operations.
"""

from __future__ import annotations

import hashlib
import random
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import datasets

from dopd_vlm.data.answers import AnswerExtractor
from dopd_vlm.data.dataset import sample_features
from dopd_vlm.data.schema import RecipeError
from dopd_vlm.validation import INTERNAL, AtLeast, Between, IntRange, NonEmpty

Operator = Literal["+", "-", "*"]
OPERATORS = typing.get_args(Operator)
Split = Literal["train", "test", "ood"]
TEST_BUCKETS = 8  # one bucket of the expression hash belongs to test, the rest to train
MAX_TRIES = 10_000
MAX_OPERATIONS = 40
ANSWER_EXTRACTOR = AnswerExtractor("regex", r"answer (\S+)")


@dataclass(frozen=True)
class ChainKeys:
    """The keys every chain kind has (this one and `cell_chains`, data/cell_chains.py)."""

    description: str = ""
    seed: int = 0
    modulus: Annotated[int, Between(2, 10)] = 10
    operators: Annotated[tuple[Operator, ...], NonEmpty()] = OPERATORS
    operations: Annotated[dict[Split, Annotated[tuple[int, int], IntRange(1, MAX_OPERATIONS)]], NonEmpty()] = field(
        default_factory=lambda: {"train": (3, 6), "ood": (7, 8)}
    )
    ops_per_step: Annotated[int, AtLeast(1)] = 2
    splits: Annotated[dict[Split, Annotated[int, AtLeast(0)]], NonEmpty()] = field(
        default_factory=lambda: {"train": 20000, "test": 200, "ood": 200}
    )
    answer_extractor: AnswerExtractor = ANSWER_EXTRACTOR
    answer_instruction: str = ""  # appended to every question on a new line (e.g. the answer format)
    source: str = field(default="<recipe>", metadata=INTERNAL)

    def __post_init__(self) -> None:
        """Every split has an operation range, and every chain two steps or more (so the hint
        is never the final answer)."""
        for split in self.splits:
            if split not in self.operations and not (split == "test" and "train" in self.operations):
                raise RecipeError(f"recipe {self.source}: key 'operations': has no range for split '{split}'")
        for split, (low, _) in self.operations.items():
            if low <= self.ops_per_step:
                raise RecipeError(
                    f"recipe {self.source}: key 'operations.{split}': must be > ops_per_step "
                    f"({self.ops_per_step}) so every chain has two steps or more, got {low}"
                )

    def field_label(self, name: str) -> str:
        """A canonical field as messages name it."""
        return f"'{name}'"

    def operation_range(self, split: str) -> tuple[int, int]:
        """Operations per expression of a split; `test` shares `train`'s unless given."""
        return self.operations.get(split) or self.operations["train"]


@dataclass(frozen=True)
class ArithmeticChainsRecipe(ChainKeys):
    """Keys of a `kind: arithmetic_chains` recipe (see data_recipes/README.md)."""

    hint: Literal["first_step", "all_but_last"] = "first_step"


@dataclass(frozen=True)
class Chain:
    """One expression and its left-to-right evaluation."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]
    modulus: int
    ops_per_step: int

    @property
    def expression(self) -> str:
        return str(self.operands[0]) + "".join(f"{op}{n}" for op, n in zip(self.operators, self.operands[1:]))

    def steps(self) -> list[tuple[str, int]]:
        """(written step without its result, result) per step: `("2+7*2", 8)`."""
        out, value = [], self.operands[0]
        for start in range(0, len(self.operators), self.ops_per_step):
            pairs = list(zip(self.operators[start : start + self.ops_per_step], self.operands[start + 1 :]))
            text = str(value) + "".join(f"{op}{n}" for op, n in pairs)
            for op, n in pairs:
                value = apply(value, op, n, self.modulus)
            out.append((text, value))
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][1]

    def reference(self) -> str:
        """`1*2*6=2 2+7*2=8 8+8+3=9 answer 9`."""
        return " ".join(f"{text}={value}" for text, value in self.steps()) + f" answer {self.answer}"


def apply(left: int, operator: str, right: int, modulus: int) -> int:
    if operator == "+":
        return (left + right) % modulus
    if operator == "-":
        return (left - right) % modulus
    return (left * right) % modulus


def question_text(chain: Chain) -> str:
    return f"Compute {chain.expression} left to right mod {chain.modulus}."


def hint_text(chain: Chain, hint: str) -> str:
    """The privileged text; never the final answer (every chain has two steps or more)."""
    values = [value for _, value in chain.steps()]
    if hint == "first_step":
        return f"step 1 gives {values[0]}"
    return "steps give " + " ".join(map(str, values[:-1]))


FEATURES = sample_features(
    {
        "num_operations": datasets.Value("int32"),
        "step_values": datasets.List(datasets.Value("int32")),
    }
)


def make_row(recipe: ArithmeticChainsRecipe, split: str, index: int) -> dict:
    """Sample `index` of `split` as a `FEATURES` row (a pure function of its arguments)."""
    rng = random.Random(f"arithmetic_chains:{recipe.seed}:{split}:{index}")
    chain = chain_for_split(rng, recipe, split)
    return {
        "id": f"{split}-{index:05d}",
        "question": question_text(chain),
        "answer": str(chain.answer),
        "privileged": hint_text(chain, recipe.hint),
        "images": [],
        "meta": {"num_operations": len(chain.operators), "step_values": [v for _, v in chain.steps()]},
        "reference": chain.reference(),
    }


def chain_for_split(rng: random.Random, recipe: ChainKeys, split: str) -> Chain:
    """Draw chains until one belongs to `split` (train and test split the expressions by hash).

    `recipe` is any recipe with the chain keys (`modulus`, `operators`, `ops_per_step`,
    `operation_range`): this kind's, or the image variant's (data/cell_chains.py).
    """
    low, high = recipe.operation_range(split)
    for _ in range(MAX_TRIES):
        count = rng.randint(low, high)
        operands = tuple(rng.randrange(recipe.modulus) for _ in range(count + 1))
        operators = tuple(rng.choice(recipe.operators) for _ in range(count))
        chain = Chain(operands, operators, recipe.modulus, recipe.ops_per_step)
        if split == "ood" or _in_test(chain.expression) == (split == "test"):
            return chain
    raise RecipeError(f"recipe {recipe.source}: found no expression for split '{split}' in {MAX_TRIES} draws")


def _in_test(expression: str) -> bool:
    return hashlib.sha1(expression.encode()).digest()[0] % TEST_BUCKETS == 0
