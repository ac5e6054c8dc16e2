"""Preemption: SIGTERM (what Slurm, Kubernetes and torchrun send before they kill) or SIGUSR1
(Slurm's `--signal=USR1@SECONDS`, sent that long before the end) during `train`.

The first signal asks the run to stop: the step under way finishes, the ranks agree at its end
(one all-reduce per step: a signal may reach one rank only, or the ranks at different times),
every rank writes the checkpoint, and `dopd-vlm train` exits with EXIT_PREEMPTED; `--resume`
then ends with the weights of an uninterrupted run. A second signal, DUPLICATE_SIGNAL_S or more
after the first, ends the process at once by the signal's default action (no checkpoint: the
pointer still names the last complete one); a repeat sooner is the same request delivered twice
(Slurm signals every process of a job step, and torchrun passes its own SIGTERM on to the workers).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

log = logging.getLogger("dopd_vlm.preemption")

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped before the end, try again (with --resume)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_SIGNAL_S = 2.0


class Preempted(RuntimeError):
    """The run stopped on a signal after writing its checkpoint (or before any step, with nothing
    to write); the message is one line naming the checkpoint to resume from."""


class PreemptionSignals:
    """Within the block, SIGTERM and SIGUSR1 ask the run to stop (see the module docstring);
    `received` names the first one. The handlers from before are back after the block. Outside
    the main thread (where Python cannot take signals) it does nothing.

    `before_exit`, if given, runs before a second signal ends the process (`train` releases the
    run folder's lock there).
    """

    def __init__(self, before_exit: Callable[[], None] | None = None) -> None:
        self.received: str | None = None
        self.before_exit = before_exit
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._first_at = name, time.monotonic()
            log.warning("%s received: stopping after this step with a checkpoint (a second signal stops at once)", name)
        elif time.monotonic() - self._first_at >= DUPLICATE_SIGNAL_S:
            log.warning("%s received again: stopping at once, without a checkpoint", name)
            if self.before_exit is not None:
                self.before_exit()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
