"""The one class of expected failures: what a user gave cannot be used.

Bad config, data, recipe, checkpoint, tokenizer pairing, DeepSpeed JSON or output folder: each is
raised as an `InputError` (or a subclass: `config.ConfigError`, `data.RecipeError`) whose message
is one line naming the file, row and field or the config key. `dopd-vlm train` prints that line
and exits with `EXIT_INPUT_ERROR`, on every rank, without a traceback. Anything else that escapes
is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """An expected failure caused by the user's input; the message is one line saying where and why."""

MAX_QUOTED = 400  # characters of another library's message quoted in one of ours


def one_line(error: BaseException) -> str:
    """`error`'s message for quoting inside a one-line error: whitespace runs (newlines included)
    collapsed to one space, the exception's type name when the message is empty, and at most
    MAX_QUOTED characters (a library's message can be a page long: vLLM's start-up errors)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."
