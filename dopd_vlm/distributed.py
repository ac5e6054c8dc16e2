"""The process group: joining it, small collectives every rank must make alike, leaving it.

Launchers (torchrun, deepspeed) describe the group in environment variables; a plain
`python -m dopd_vlm train` gets a 1-process group so the same code path runs everywhere. That
group meets in an in-memory store, not on a TCP port: runs started side by side on one machine
(a learning-rate sweep) cannot race for a port.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.utils import cpp_extension

from dopd_vlm.errors import InputError


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Join the process group the launcher describes (torchrun / deepspeed), or a 1-process one.

    Several processes meet at the launcher's rendezvous (MASTER_ADDR:MASTER_PORT); one process
    alone meets itself in a `HashStore` (see the module docstring). Collectives time out after
    `timeout_s`: a rank that dies mid-run ends the others with an error instead of leaving them
    blocked forever. Processes that join a group should end with :func:`exit_process`.
    """
    import deepspeed

    if dist.is_initialized():
        return
    wait_for_build_locks(Path(cpp_extension.get_default_build_root()))
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if int(os.environ["WORLD_SIZE"]) == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts a group that exists
    _join_exit_group()


# A gloo group only `wait_for_peers_before_exit` uses: its barrier can never be matched with (and
# so never mistaken for) a collective of the run, and gloo's barrier takes a timeout even on NCCL.
_exit_group: dist.ProcessGroup | None = None


def _join_exit_group() -> None:
    global _exit_group
    if _exit_group is None and dist.get_world_size() > 1:
        _exit_group = dist.new_group(backend="gloo")


def wait_for_peers_before_exit(timeout_s: float = 60.0) -> None:
    """Call after printing an expected failure, before exiting: wait (at most `timeout_s`) until
    every rank has got here too.

    Launchers (torchrun, deepspeed) kill the other workers as soon as one exits, so a rank a
    moment behind on its way to the same error would die without printing it. A rank whose peers
    do not fail (a file only it cannot read) exits after the timeout; the launcher ends the rest.
    A failure before the process group exists (a bad config) joins it here, so that ranks wait for
    each other there too.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    timeout = timedelta(seconds=timeout_s)
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
        _join_exit_group()
        dist.monitored_barrier(_exit_group, timeout=timeout)
    except RuntimeError as err:  # a peer that did not fail, or is gone: exit all the same
        logging.getLogger(__name__).warning("not every rank reached the same failure: %s", str(err).splitlines()[0])


STALE_BUILD_S = 10 * 60  # no op build leaves its folder unchanged that long (DeepSpeed's CPU ops: ~1 min)


def wait_for_build_locks(root: Path, stale_after_s: float = STALE_BUILD_S, poll_s: float = 1.0) -> None:
    """Wait while a process builds an op under `root`; fail, naming the file, on a lock no build holds.

    Every process that loads a DeepSpeed op (on CPU, joining the group loads `deepspeed_shm_comm`)
    holds the `lock` file of the op's build folder while ninja checks the build (a second) or
    builds it (a minute). A process killed in that window (torchrun ending the peers of a rank
    that failed, Ctrl-C) leaves the lock behind, and every later process waits on it forever,
    silently. So a lock that a process on this machine holds open is waited for; one that none
    holds is waited for while its folder changes (a build on another node sharing the folder) and
    reported once nothing in the folder has changed for `stale_after_s`.
    """
    for lock in root.glob("*/*/lock"):
        warned = False
        while (unchanged_s := seconds_unchanged(lock.parent, lock)) is not None:
            if not lock_held_here(lock):
                if unchanged_s > stale_after_s:
                    raise InputError(f"{lock}: left by an interrupted build of a compiled op (no process holds it "
                                     f"and its folder has not changed for {unchanged_s / 60:.0f} min); delete it")
                if not warned:
                    logging.getLogger(__name__).warning(
                        "waiting for %s: no process on this machine holds it; if no build runs elsewhere, "
                        "it was left by an interrupted build: delete it", lock)
                    warned = True
            time.sleep(poll_s)


def seconds_unchanged(folder: Path, lock: Path) -> float | None:
    """Seconds since anything in `folder` last changed; None once `lock` is gone."""
    try:
        return time.time() - max(f.stat().st_mtime for f in [lock, *folder.iterdir()])
    except FileNotFoundError:
        return None if not lock.exists() else 0.0  # else a file that a running build just replaced


def lock_held_here(lock: Path) -> bool:
    """Whether a process of this machine whose file descriptors we may read has `lock` open."""
    target = str(lock.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # a process that ended, or another user's
            continue
    return False


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_ranks_true(flag: bool) -> bool:
    """Logical AND of `flag` over all ranks (so every rank takes the same branch)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_ranks_any(flags: list[bool]) -> list[bool]:
    """Logical OR of each flag over all ranks, in one collective."""
    if world_size() == 1:
        return list(flags)
    tensor = torch.tensor([int(flag) for flag in flags], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def first_failure(message: str | None) -> str | None:
    """The lowest failing rank's message, on every rank (None when no rank failed): ranks that
    took different branches (a write that failed on one rank only) agree on one outcome and all
    print the same line."""
    if world_size() == 1:
        return message
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def all_ranks_sum(values: list[float]) -> list[float]:
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_ranks_max(value: float) -> float:
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def collective_device() -> torch.device:
    """Where small collective tensors must live for the backend (NCCL: the rank's GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def exit_process(code: int) -> NoReturn:
    """End a process that joined a process group, skipping the interpreter's finalisation.

    A gloo worker thread may still be releasing the last collective's tensors when Python shuts
    down; that release needs the GIL, which finalisation no longer hands out, and the process
    aborts (SIGABRT, "terminate called without an active exception"; seen in about 1 of 12 exits
    of a 2-rank ZeRO-3 run, pytorch/pytorch#179291). Destroying the group does not join those
    threads while DeepSpeed still holds it, so this flushes what finalisation would, then
    `os._exit`s. Without a process group it is `sys.exit`.
    """
    if not dist.is_initialized():
        sys.exit(code)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

