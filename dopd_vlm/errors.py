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
