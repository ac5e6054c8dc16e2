"""Explicit hook points of a run: where a test injects a fault (or an observer looks) without
patching or reassigning any module's internals. Nothing is registered in a normal run; a point
with nothing registered costs one empty loop.

| point             | called by                                           | with                    | a hook may                       |
|-------------------|-----------------------------------------------------|-------------------------|----------------------------------|
| `before_step`     | `train`, before each optimizer step                 | step (1-based)          | raise, exit, kill the process    |
| `after_loss`      | `step.student_loss`, after each micro-batch's loss  | loss, student_hidden    | return the loss to use instead   |
| `before_generate` | `vllm_rollout.VllmRollout.sample`, before an engine call | (nothing)          | raise (as a failing engine does) |
| `after_write`     | every writer of the run, once a file is written     | kind, path              | raise (as that write's failure)  |

`after_write`'s kinds are `run_folder.WRITE_KINDS`; it runs before the write counts as done (before a
new checkpoint pointer or export folder replaces the old one), so what it raises is handled as that
write's own failure, and a kill there is a kill in the middle of writing.

    with hooks.registered("before_step", lambda step: ...):
        train(cfg)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

POINTS = ("before_step", "after_loss", "before_generate", "after_write")
_registered: dict[str, list[Callable[..., Any]]] = {point: [] for point in POINTS}


@contextlib.contextmanager
def registered(point: str, hook: Callable[..., Any]) -> Iterator[None]:
    """`hook` runs at `point` for the block (registered hooks run in registration order)."""
    if point not in _registered:
        raise ValueError(f"unknown hook point {point!r} (points: {', '.join(POINTS)})")
    _registered[point].append(hook)
    try:
        yield
    finally:
        _registered[point].remove(hook)


def run(point: str, *args: Any) -> None:
    """Call every hook registered at `point` with `args`."""
    for hook in list(_registered[point]):
        hook(*args)


def loss_after_hooks(loss: Any, student_hidden: Any) -> Any:
    """The `after_loss` point: each hook returns the loss the next one (and the step) sees."""
    for hook in list(_registered["after_loss"]):
        loss = hook(loss, student_hidden)
    return loss
