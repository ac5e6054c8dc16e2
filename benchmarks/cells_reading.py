"""Reading or computing: which part of a cell chain a student gets wrong (cell-chains testbed).

    python benchmarks/cells_reading.py                       # the shipped pair and the setting's seed-0 runs
    python benchmarks/cells_reading.py --models name=path ...

A cell chain's response writes the operands it read from the image before computing with them
(`1*7+7=4 4*8=2 answer 2`: operands 1 7 7 8). Per model, on the test split, greedy, plain view:
the share of responses whose operands are exactly the image's (`meta.operands`) -- the reading
skill the plain view needs and the privileged view is given by p -- next to the answer accuracy.
Results go to benchmarks/results/cells_reading.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, machine  # noqa: E402
from testbed_learning import load_checkpoint  # noqa: E402

from dopd_vlm.lab.testbeds import TESTBEDS  # noqa: E402

SETTING_RUNS = ROOT / "runs" / "testbed_cells" / "p32_s200_lr1e-3" / "seed0"


def read_operands(response: str) -> list[int]:
    """The operands a chain response wrote: every digit left of each step's `=`, except the
    previous step's value that each later step starts from."""
    operands: list[int] = []
    for index, step in enumerate(part for part in response.split() if "=" in part):
        digits = [int(d) for d in re.findall(r"\d", step.split("=", 1)[0])]
        operands += digits if index == 0 else digits[1:]
    return operands


def reading_and_accuracy(path: Path, samples: int) -> dict[str, float]:
    import torch

    from dopd_vlm.config import RolloutConfig
    from dopd_vlm.data import load_recipe
    from dopd_vlm.rollout import sample_responses

    testbed = TESTBEDS["cells"]
    split = load_recipe(testbed.recipe, "test", family=testbed.family, limit=samples)
    test = list(split)
    model, collator = load_checkpoint(testbed, path)
    with torch.no_grad():
        ids, mask = sample_responses(model, collator, test, RolloutConfig(num_rollouts=1, max_new_tokens=testbed.max_new_tokens),
                                     greedy=True)
    texts = collator.tokenizer.batch_decode([row[keep.bool()] for row, keep in zip(ids, mask)], skip_special_tokens=True)
    read = [read_operands(text) == sample.meta["operands"] for text, sample in zip(texts, test)]
    correct = [split.answer_extractor.is_correct(text, sample.answer) for text, sample in zip(texts, test)]
    return {"operands_read": sum(read) / len(test), "accuracy": sum(correct) / len(test), "example": texts[0]}


def main(argv=None) -> int:
    pair = TESTBEDS["cells"].shipped_pair()
    defaults = [f"{role}={path}" for role, path in pair.items()]
    defaults += [f"{m}_seed0={SETTING_RUNS / m / 'final'}" for m in ("vanilla_opd", "dopd_initial", "sft")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=defaults, metavar="NAME=PATH")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    rows = {}
    for item in args.models:
        name, path = item.split("=", 1)
        rows[name] = {"path": str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path,
                      **reading_and_accuracy(Path(path), args.samples)}
        print(name, rows[name], flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "samples": args.samples, "models": rows}
    (RESULTS / "cells_reading.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
