"""One expected failure on every rank, rank r reaching it r * DELAY_S seconds after rank 0.

Usage: torchrun --nproc_per_node=2 tests/helpers/late_input_error.py {before_group|after_group}
before_group: the failure comes before the process group exists (as a bad config does);
after_group:  after `init_distributed` (as bad data does).
"""

import os
import sys
import time

import dopd_vlm  # noqa: F401  (before transformers)
from dopd_vlm.cli import one_line_input_errors
from dopd_vlm.distributed import exit_process, init_distributed
from dopd_vlm.errors import InputError

DELAY_S = 5.0  # far beyond the launcher's monitoring interval (0.1 s): rank 0 exits long before rank 1 fails


def fail_late(join_group_first: bool) -> int:
    if join_group_first:
        init_distributed(timeout_s=120)
    time.sleep(DELAY_S * int(os.environ["RANK"]))
    raise InputError("data/x.jsonl line 1 field 'id': the same failure on every rank")


if __name__ == "__main__":
    code = one_line_input_errors("train", lambda: fail_late(sys.argv[1] == "after_group"))
    exit_process(code)
