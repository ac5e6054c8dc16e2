"""Runs the `dopd-vlm` command line (`dopd_vlm.cli.main`) for many command lines in one process.

Usage: python tests/helpers/cli_driver.py CASES.json RESULT.json
CASES: {name: [argv, ...]}      (argv without the program name, e.g. ["train", "--config", ...])
       or {name: {"argv": [...], "write_faults": [...]}}: write failures injected for that case
       (tests/helpers/write_faults.py)
RESULT: {name: {"code": int, "stdout": str, "stderr": str, "traceback": str | null}}; under torchrun
        rank r > 0 writes RESULT.rank<r>

One process serves every case because imports dominate on CPU. `main` is what the console
script's `entry_point` runs; an exception escaping it is what `entry_point` would print as a
traceback, so it is recorded as one (code 1, as `entry_point` exits).
"""

import contextlib
import io
import json
import sys
import traceback

import os

import dopd_vlm  # noqa: F401  (before transformers)
from dopd_vlm.cli import main
from dopd_vlm.distributed import exit_process
from write_faults import injected


def run_case(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    failure = None
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001  (a bug: what entry_point prints)
            failure, code = traceback.format_exc(), 1
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "traceback": failure}


def run_faulty_case(case: list[str] | dict) -> dict:
    if isinstance(case, list):
        return run_case(case)
    with injected(case.get("write_faults", [])):
        return run_case(case["argv"])


if __name__ == "__main__":
    cases_path, result_path = sys.argv[1:]
    cases = json.load(open(cases_path))
    rank = int(os.environ.get("RANK", "0"))
    results = {name: run_faulty_case(case) for name, case in cases.items()}
    json.dump(results, open(result_path if rank == 0 else f"{result_path}.rank{rank}", "w"), indent=1)
    exit_process(0)
