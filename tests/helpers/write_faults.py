"""Write failures injected through the `after_write` hook point (`dopd_vlm.hooks`), raising what the real
libraries raise on a full, read-only or over-quota filesystem (tests/test_run_folder.py checks these
against a real full tmpfs where it may mount one).

A fault: {"kind": "checkpoint" | "pointer" | "export" | "metrics" | "tensorboard" | "config",
          "path_contains": "step_2",        (optional: only writes whose path holds this)
          "rank": 1,                        (optional: only on this rank)
          "skip": 2,                        (optional: let the first 2 matching writes succeed)
          "error": one of ERRORS}
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from dopd_vlm.distributed import rank
from dopd_vlm import hooks


def torch_zip_error(context: BaseException) -> RuntimeError:
    """What torch.save(obj, path) raises when the disk fills: its zip writer's check, raised while
    handling the stream's own error (an OSError where torch wrote through a Python file object)."""
    try:
        raise context
    except BaseException:  # noqa: BLE001  (to chain as torch does)
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1750272 vs 1750160")
        except RuntimeError as err:
            return err


def os_error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


ERRORS = {
    "torch_zip": lambda path: torch_zip_error(RuntimeError("basic_ios::clear: iostream error")),
    "torch_zip_oserror": lambda path: torch_zip_error(os_error(errno.ENOSPC, path)),
    "safetensors_enospc": lambda path: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
    "enospc": lambda path: os_error(errno.ENOSPC, path),
    "edquot": lambda path: os_error(errno.EDQUOT, path),
    "eacces": lambda path: os_error(errno.EACCES, path),
    "erofs": lambda path: os_error(errno.EROFS, path),
}


class Fault:
    """A write hook raising `spec["error"]` for the writes `spec` matches."""

    def __init__(self, spec: dict):
        self.spec, self.matched = spec, 0

    def __call__(self, kind: str, path: Path) -> None:
        spec = self.spec
        if kind == spec["kind"] and spec.get("path_contains", "") in str(path) and spec.get("rank", rank()) == rank():
            self.matched += 1
            if self.matched > spec.get("skip", 0):
                raise ERRORS[spec["error"]](path)


@contextlib.contextmanager
def injected(specs: list[dict]) -> Iterator[None]:
    """The faults' `after_write` hooks for the block (runs sharing a process must not inherit each other's)."""
    with contextlib.ExitStack() as stack:
        for spec in specs:
            stack.enter_context(hooks.registered("after_write", Fault(spec)))
        yield
