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

These two give a *capability* gap: p is computable from the question. Two more kinds of p move
one knob each (issue 24: when does DOPD help?), on the same expressions, tokenizer and extractor:

- `hint: hidden_operand` -- an *information* gap: in a share `hidden_fraction` of the problems
  the first operand is written `?` in the question and p = `? is 6` gives it; the other
  problems show every operand and p = `nothing hidden`. Without p the answer of a hidden
  problem is a guess: `p_free_ceiling` computes exactly the best accuracy any p-free answerer
  can expect (the most frequent answer over the ten values of `?`). The first operand, because
  reading p is then one copy (the response's first token), which the tiny pair learns in its
  warm-up; an operand at a random place took the tiny teacher far longer to read from p
  (0.685 test accuracy with p after 500 warm-up steps, benchmarks/testbed_map_findings.md).
- `hint: shared_rule` -- a *rule*: every problem of the split evaluates `a-b` as `b-a` (mod
  `modulus`), and p = `rule: a-b means b-a` is the same text for every problem, so a model can
  internalise it (the p-free ceiling is 1).

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
from collections import Counter
from dataclasses import dataclass, field, replace
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
HIDDEN = "?"  # the hidden (first) operand's place in the question (hint: hidden_operand)
NOTHING_HIDDEN = "nothing hidden"
RULE_TEXT = "rule: a-b means b-a"  # hint: shared_rule, the same p for every problem
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

    hint: Literal["first_step", "all_but_last", "hidden_operand", "shared_rule"] = "first_step"
    hidden_fraction: Annotated[float, Between(0, 1)] = 0.5  # hint: hidden_operand only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hint == "shared_rule" and "-" not in self.operators:
            raise RecipeError(f"recipe {self.source}: key 'hint': shared_rule redefines '-', which 'operators' lacks")
        if self.hint != "hidden_operand" and self.hidden_fraction != ArithmeticChainsRecipe.hidden_fraction:
            raise RecipeError(f"recipe {self.source}: key 'hidden_fraction': only hint 'hidden_operand' hides operands, "
                              f"hint is '{self.hint}'")


@dataclass(frozen=True)
class Chain:
    """One expression and its left-to-right evaluation."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]
    modulus: int
    ops_per_step: int
    swap_minus: bool = False  # the shared rule: a-b means b-a

    @property
    def expression(self) -> str:
        return self.written(None)

    def written(self, hidden: int | None) -> str:
        """The expression with the operand at position `hidden` (if any) written `?`."""
        digits = [HIDDEN if i == hidden else str(n) for i, n in enumerate(self.operands)]
        return digits[0] + "".join(f"{op}{n}" for op, n in zip(self.operators, digits[1:]))

    def steps(self) -> list[tuple[str, int]]:
        """(written step without its result, result) per step: `("2+7*2", 8)`."""
        out, value = [], self.operands[0]
        for start in range(0, len(self.operators), self.ops_per_step):
            pairs = list(zip(self.operators[start : start + self.ops_per_step], self.operands[start + 1 :]))
            text = str(value) + "".join(f"{op}{n}" for op, n in pairs)
            for op, n in pairs:
                value = apply(value, op, n, self.modulus, self.swap_minus)
            out.append((text, value))
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][1]

    def reference(self) -> str:
        """`1*2*6=2 2+7*2=8 8+8+3=9 answer 9`."""
        return " ".join(f"{text}={value}" for text, value in self.steps()) + f" answer {self.answer}"


def apply(left: int, operator: str, right: int, modulus: int, swap_minus: bool = False) -> int:
    if operator == "+":
        return (left + right) % modulus
    if operator == "-":
        return (right - left if swap_minus else left - right) % modulus
    return (left * right) % modulus


def question_text(chain: Chain, hidden: int | None = None) -> str:
    return f"Compute {chain.written(hidden)} left to right mod {chain.modulus}."


def hint_text(chain: Chain, hint: str, hidden: int | None = None) -> str:
    """The privileged text; never the final answer (every chain has two steps or more, and the
    hidden operand and the rule are inputs, not results)."""
    values = [value for _, value in chain.steps()]
    if hint == "first_step":
        return f"step 1 gives {values[0]}"
    if hint == "all_but_last":
        return "steps give " + " ".join(map(str, values[:-1]))
    if hint == "hidden_operand":
        return NOTHING_HIDDEN if hidden is None else f"{HIDDEN} is {chain.operands[hidden]}"
    return RULE_TEXT


def p_free_ceiling(chain: Chain, hidden: int | None) -> float:
    """The best accuracy a p-free answerer can expect on this problem: the share of the values
    of the hidden operand (uniform, as drawn) that give the most frequent answer; 1 when nothing
    is hidden."""
    if hidden is None:
        return 1.0
    answers = Counter(replace(chain, operands=chain.operands[:hidden] + (digit,) + chain.operands[hidden + 1 :]).answer
                      for digit in range(chain.modulus))
    return max(answers.values()) / chain.modulus


FEATURES = sample_features(
    {
        "num_operations": datasets.Value("int32"),
        "step_values": datasets.List(datasets.Value("int32")),
        "hidden_position": datasets.Value("int32"),  # -1: every operand is in the question
        "p_free_ceiling": datasets.Value("float32"),
    }
)


def make_row(recipe: ArithmeticChainsRecipe, split: str, index: int) -> dict:
    """Sample `index` of `split` as a `FEATURES` row (a pure function of its arguments)."""
    rng = random.Random(f"arithmetic_chains:{recipe.seed}:{split}:{index}")
    chain = chain_for_split(rng, recipe, split)  # the same expression whatever the hint
    if recipe.hint == "shared_rule":
        chain = replace(chain, swap_minus=True)
    hidden = 0 if recipe.hint == "hidden_operand" and rng.random() < recipe.hidden_fraction else None
    return {
        "id": f"{split}-{index:05d}",
        "question": question_text(chain, hidden),
        "answer": str(chain.answer),
        "privileged": hint_text(chain, recipe.hint, hidden),
        "images": [],
        "meta": {"num_operations": len(chain.operators), "step_values": [v for _, v in chain.steps()],
                 "hidden_position": -1 if hidden is None else hidden, "p_free_ceiling": p_free_ceiling(chain, hidden)},
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
