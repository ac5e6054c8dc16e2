"""The run folder (`train.output_dir`): one run owns it, an earlier run in it is never lost, and
every write of the run that fails says which file and why, in one line.

    lock = claim(out, resume=..., overwrite=...)    rank 0 takes out/run.lock; every rank learns the outcome
    remove_earlier_run(out)                         --overwrite, once set-up has succeeded
    lock.release()                                  at the end of the run, whatever the end
    write_failure(err, path)                        "writing PATH failed: No space left on device (ENOSPC)"
    after_write(kind, path)                         every writer, once a file is written (`hooks`' point)

**The lock** `run.lock` is created with O_CREAT|O_EXCL, which is atomic on local filesystems and
on NFS (v3 and later) alike; no flock/fcntl lock, which NFS does not guarantee. It holds who took it
(host, pid, start time, command). A second launch into the folder is refused with that holder
named (`InputError`, exit 2). A lock whose run ended without releasing it (kill -9, a lost node) is
taken over, as `distributed.wait_for_build_locks` does for the op-build lock: on the same machine
(host name, boot and pid namespace) once its process is gone; from another machine once its
heartbeat (rank 0 touches the file every `HEARTBEAT_S`) is older than `STALE_LOCK_S`, measured on
the filesystem's own clock (the time stamp of a file written now), so the nodes' clocks need not
agree.

**An earlier run** (a checkpoint, metrics, an export) is refused unless the launch says `--resume`
(continue it) or `--overwrite` (delete it and start over); nothing of it is deleted otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError

from dopd_vlm import hooks
from dopd_vlm.distributed import first_failure, rank
from dopd_vlm.errors import InputError

log = logging.getLogger("dopd_vlm.run_folder")

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_LOCK_S = 300.0  # ten missed heartbeats: a run holding the lock is not that late on a loaded node
CHECKPOINT_POINTER = "latest_complete"  # checkpoints/<this> names the latest complete checkpoint
# What a run writes into its folder; `remove_earlier_run` deletes exactly these, nothing else there.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json",
             "final", "final.tmp", "final_merged", "final_merged.tmp")


# -- writes: one line naming the file and the cause ----------------------------------------------


class RunWriteError(RuntimeError):
    """A file of the run could not be written (disk full, read-only, quota, permission): the run
    stopped (exit 1). The message is one line naming the file, the cause and what is left."""


# What a failed write raises: the OS (OSError), torch's zip writer (RuntimeError, without an
# errno), safetensors (SafetensorError, the errno in its text).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # Rust's io::Error, as safetensors words it
PROBE_BYTES = 64 * 1024


def write_failure(err: BaseException, path: Path) -> str:
    """`writing PATH failed: CAUSE`, the cause in words with its errno name where one is known.

    The errno comes from the exception chain: an OSError, or "(os error N)" in a safetensors
    message. torch's zip writer raises a RuntimeError without one ("[enforce fail at
    inline_container.cc:...] . unexpected pos ...", after "basic_ios::clear: iostream error"), so
    then a small write next to PATH, made now (before anything is cleaned up), says what the
    filesystem refuses. When that write succeeds the cause is unknown, and the line says so
    rather than guess "no space left".
    """
    code = chained_errno(err) or probe_errno(path)
    if code:
        cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        cause = f"{first_line} (cause unknown: a test write next to it succeeds)"
    return f"writing {path} failed: {cause}"


def chained_errno(err: BaseException | None) -> int | None:
    """The first errno in `err`, its `__cause__` and `__context__` chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        if match := OS_ERROR_IN_TEXT.search(str(err)):
            return int(match.group(1))
        err = err.__cause__ or err.__context__
    return None


def probe_errno(path: Path) -> int | None:
    """The errno of writing (and syncing) PROBE_BYTES next to `path` now; None if that works."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(PROBE_BYTES))
            while data:  # a nearly full disk takes part of a write before it refuses the rest
                data = data[os.write(fd, data):]
            os.fsync(fd)  # NFS reports a full disk at the latest here
        finally:
            os.close(fd)
    except OSError as err:
        return err.errno
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


WRITE_KINDS = ("checkpoint", "pointer", "export", "metrics", "tensorboard", "config")


def after_write(kind: str, path: Path) -> None:
    """Called by every writer of the run once `path` is written: the `after_write` hook point
    (`dopd_vlm.hooks`; kind one of WRITE_KINDS, "checkpoint" once per file DeepSpeed saves)."""
    hooks.run("after_write", kind, path)


# -- the lock ------------------------------------------------------------------------------------


@dataclass
class Holder:
    """Who holds a run folder's lock (the content of run.lock)."""

    host: str
    pid: int
    started: str  # local time, to the second
    command: str
    machine: str  # boot id and pid namespace: the same host name in another boot or container is another machine
    process_start: str  # /proc/<pid>/stat start time: a pid reused by another process is not the holder
    token: str  # tells this lock from a later one at the same path

    @classmethod
    def this_process(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=shlex.join(sys.argv), machine=this_machine(), process_start=process_start(os.getpid()),
                   token=uuid.uuid4().hex)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}, command: {self.command}"

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.machine == this_machine()


def this_machine() -> str:
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("")
    return "/".join(parts)


def process_start(pid: int) -> str:
    """The process's start time (clock ticks after boot), or "" where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, started: str) -> bool:
    """Whether process `pid` of this machine runs and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z" and process_start(pid) in ("", started)  # a zombie has ended


class RunLock:
    """`out/run.lock`, held by rank 0 of a launch for the whole run (see the module docstring).
    Other ranks hold an unheld one (`RunLock(None)`); `release` is safe to call more than once."""

    def __init__(self, path: Path | None, holder: Holder | None = None):
        self.path, self.holder = path, holder
        self.heartbeat: Heartbeat | None = None
        if path is not None and holder is not None:
            self.heartbeat = Heartbeat(path, holder.token)
            self.heartbeat.start()
            HELD_LOCKS.append(self)

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Take `out`'s lock, taking over a stale one; InputError naming the holder of a live one."""
        path, me = out / LOCK_FILE, Holder.this_process()
        for _ in range(3):  # a stale lock taken over by a third launch in between: look again
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                take_over_if_stale(path, out)
                continue
            except OSError as err:
                raise InputError(f"train.output_dir {out}: cannot create {LOCK_FILE} ({err.strerror})") from None
            try:
                os.write(fd, json.dumps(asdict(me)).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(path, me)
        raise InputError(f"train.output_dir {out}: other launches keep taking {LOCK_FILE}; start one at a time")

    def release(self) -> None:
        if self.path is None:
            return
        path, self.path = self.path, None
        HELD_LOCKS.remove(self)
        if self.heartbeat is not None:
            self.heartbeat.stop.set()
        try:
            if read_token(path) == self.holder.token:  # not a lock another launch took over meanwhile
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not remove %s (%s); the next run takes it over as stale", path, err.strerror)


# The locks this process holds, for `release_held_locks`.
HELD_LOCKS: list[RunLock] = []


def release_held_locks() -> None:
    """Release every run lock this process holds: a process about to end at once (a second
    preemption signal) leaves no lock for the next launch to wait out."""
    for lock in list(HELD_LOCKS):
        lock.release()


class Heartbeat(threading.Thread):
    """Touches the lock file every HEARTBEAT_S, so that other machines see the run is alive."""

    def __init__(self, path: Path, token: str):
        super().__init__(name="run-lock-heartbeat", daemon=True)
        self.path, self.token, self.stop = path, token, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                ours = read_token(self.path) == self.token
                if ours:
                    os.utime(self.path)
            except FileNotFoundError:
                ours = False
            except OSError as err:  # e.g. a filesystem gone read-only: the next write of the run fails anyway
                log.warning("cannot refresh %s (%s)", self.path, err.strerror)
                continue
            if not ours:
                log.error("%s was removed or taken over by another launch; this run no longer owns its folder",
                          self.path)
                return


def read_holder(path: Path) -> tuple[bytes, Holder | None]:
    """The lock file's bytes and the holder they describe (None: unreadable, e.g. just created)."""
    raw = path.read_bytes()
    try:
        return raw, Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return raw, None


def read_token(path: Path) -> str | None:
    holder = read_holder(path)[1]
    return holder.token if holder else None


def heartbeat_age(path: Path, out: Path) -> float:
    """Seconds since the lock's last heartbeat, on the filesystem's clock: an empty file created
    now gets the server's time, as the holder's touch did (opening first makes NFS fetch fresh
    attributes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        beat = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    clock = out / f".clock_{uuid.uuid4().hex}"
    clock.touch()
    try:
        return clock.stat().st_mtime - beat
    finally:
        clock.unlink()


def stale_reason(holder: Holder | None, age: float) -> str | None:
    """Why a lock is stale, or None while its run may be alive."""
    if holder is not None and holder.on_this_machine():
        return None if process_alive(holder.pid, holder.process_start) else f"its process {holder.pid} has ended"
    return f"no heartbeat for {age:.0f} s" if age > STALE_LOCK_S else None


def take_over_if_stale(path: Path, out: Path) -> None:
    """Remove `path` if its run ended without releasing it; InputError naming a live holder."""
    try:
        raw, holder = read_holder(path)
        age = heartbeat_age(path, out)
    except FileNotFoundError:  # released meanwhile
        return
    reason = stale_reason(holder, age)
    if reason is None:
        who = holder.describe() if holder else f"holder not readable from {path}"
        raise InputError(f"train.output_dir {out} is in use by another run ({who}; heartbeat {max(age, 0):.0f} s "
                         f"ago): wait for it to end, or use another train.output_dir")
    grave = path.with_name(f".{LOCK_FILE}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)  # atomic: of two launches taking it over, one moves it
    except FileNotFoundError:
        return
    if grave.read_bytes() != raw:  # another launch replaced it between our read and our move: put it back
        with contextlib.suppress(OSError):
            os.link(grave, path)
    else:
        who = holder.describe() if holder else "holder not readable"
        log.warning("taking over %s, left by a run that did not release it (%s; %s)", path, reason, who)
    grave.unlink()


# -- an earlier run in the folder ------------------------------------------------------------------


def earlier_run(out: Path) -> str | None:
    """What an earlier run left in `out` (checkpoints, metrics, an export), in words; None if nothing."""
    found = []
    checkpoints = out / "checkpoints"
    pointer = checkpoints / CHECKPOINT_POINTER
    steps = sorted(p.name for p in checkpoints.glob("step_*")) if checkpoints.is_dir() else []
    if pointer.is_file():
        found.append(f"checkpoints up to {pointer.read_text().strip()}")
    elif steps:
        found.append(f"incomplete checkpoint {', '.join(steps)}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"metrics.jsonl{last_logged_step(metrics)}")
    found += [f"{name}/" for name in ("final", "final_merged") if (out / name).is_dir()]
    return ", ".join(found) or None


def last_logged_step(metrics: Path) -> str:
    for line in reversed(metrics.read_text(errors="replace").splitlines()):
        try:
            return f" through step {json.loads(line)['step']}"
        except (ValueError, KeyError, TypeError):
            continue
    return ""


def refuse_earlier_run(out: Path, *, resume: bool, overwrite: bool) -> None:
    found = earlier_run(out)
    if found and not (resume or overwrite):
        raise InputError(f"train.output_dir {out} holds an earlier run ({found}): continue it with --resume, "
                         f"or delete it and start over with --overwrite")


def claim(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Rank 0 takes `out`'s lock and refuses an earlier run there (unless `resume` or `overwrite`);
    every rank gets the outcome: the lock (held on rank 0), or the same InputError on every rank."""
    lock, failure = RunLock(None), None
    if rank() == 0:
        try:
            lock = RunLock.acquire(out)
            refuse_earlier_run(out, resume=resume, overwrite=overwrite)
        except InputError as err:
            lock.release()
            failure = str(err)
    failure = first_failure(failure)
    if failure is not None:
        raise InputError(failure)
    return lock


def remove_earlier_run(out: Path) -> None:
    """--overwrite: delete what an earlier run wrote into `out` (RUN_FILES; other files stay), on
    rank 0; an InputError on every rank if that fails."""
    failure = None
    if rank() == 0:
        found = earlier_run(out)
        try:
            for name in RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        except OSError as err:
            failure = f"--overwrite: cannot delete {err.filename} ({err.strerror})"
        else:
            if found:
                log.warning("--overwrite: deleted the earlier run in %s (%s)", out, found)
    failure = first_failure(failure)
    if failure is not None:
        raise InputError(failure)
