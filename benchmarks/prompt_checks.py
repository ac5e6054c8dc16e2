"""Benchmark 7: the load-time prompt checks on a 25,000-row split, and what they replace.

    OMP_NUM_THREADS=1 python benchmarks/prompt_checks.py [--rows 25000] [--reference-rows 1000]

A local-files split of `--rows` rows (questions of 5..400 words, boxes as p, 60 % of the rows with
one or two photos of 8 sizes up to 4032x3024) is loaded once (the existing row validation, which
decodes every image), then checked by `prompt_checks.check_split` with the tiny Qwen2-VL pair
(the real Qwen2-VL processor classes, a 500-token BPE: about one token per 2-3 characters; DOPD:
four views, the teacher's counted with the student's as they share tokenizer and processor). Side by side, on the first
`--reference-rows` rows: the exact count by running the processor on every prompt (what the check
would cost if it tokenised with the images, as a step does). Reports seconds, rows/s and the ratio;
raw numbers go to benchmarks/results/prompt_checks.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, machine, save  # noqa: E402

sys.path.insert(0, str(ROOT))
import dopd_vlm  # noqa: E402,F401

SIZES = [(640, 480), (1024, 768), (1920, 1080), (4032, 3024), (300, 300), (800, 200), (64, 64), (1280, 1280)]
WORDS = "the red circle left of a blue square above green triangle how many shapes are there".split()


def write_split(root: Path, rows: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"photo{i}.jpg", quality=85)
    lines = []
    for i in range(rows):
        images = [f"photo{rng.randrange(len(SIZES))}.jpg" for _ in range(rng.choice((0, 0, 1, 1, 1, 2)))]
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400))) + "?"
        boxes = "\n".join(f"red circle [{rng.randrange(500)},{rng.randrange(500)},600,600]" for _ in range(rng.randint(1, 6)))
        lines.append(json.dumps({"id": f"r{i}", "question": question, "answer": "3", "privileged": boxes, "images": images}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--reference-rows", type=int, default=1000)
    args = parser.parse_args()

    from dopd_vlm import prompt_checks
    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import load_config
    from dopd_vlm.data import SampleDataset, load_recipe
    from dopd_vlm.models import load_processor
    from dopd_vlm.lab.tiny import make_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = make_tiny_pair("qwen2_vl", root / "tiny", seed=0)
        data_file = write_split(root, args.rows)
        started = time.perf_counter()
        data = load_recipe({"kind": "local_files", "files": {"train": str(data_file)}}, "train")
        load_s = time.perf_counter() - started
        cfg = load_config(None, [f"model.student={pair['student']}", f"model.teacher={pair['teacher']}"])
        collator = DualViewCollator.from_config(load_processor(pair["student"]), load_processor(pair["teacher"]),
                                                data=cfg.data)
        limits = prompt_checks.run_limits(cfg, collator, 4096, 4096)

        started = time.perf_counter()
        prompt_checks.check_split(data, collator, limits, skip_bad_rows=True)
        check_s = time.perf_counter() - started

        reference = data.hf.select(range(min(args.reference_rows, len(data))))
        subset = SampleDataset(hf=reference, recipe=data.recipe, split="train", family="qwen2_vl")
        started = time.perf_counter()
        checked = prompt_checks.check_split(subset, collator, limits, skip_bad_rows=True)
        subset_check_s = time.perf_counter() - started
        student_view = limits.views[0]
        mean_tokens = sum(prompt_checks.prompt_lengths(collator, subset.headers(0, len(subset)), student_view)) / len(subset)
        started = time.perf_counter()
        for i in range(0, len(subset), 16):  # the processor on every view, images decoded and preprocessed
            samples = [subset[j] for j in range(i, min(i + 16, len(subset)))]
            for view in limits.views:
                collator.for_processor(view.processor).rollout_batch(samples, privileged=view.privileged)
        processor_s = time.perf_counter() - started

    result = {
        "machine": machine(), "rows": len(data), "views": [v.name for v in limits.views],
        "load_recipe_s": load_s, "check_s": check_s, "check_rows_per_s": len(data) / check_s,
        "reference_rows": len(subset), "reference_kept": len(checked), "mean_student_prompt_tokens": mean_tokens,
        "subset_check_s": subset_check_s, "subset_processor_s": processor_s,
        "processor_over_check": processor_s / subset_check_s,
        "processor_25k_estimate_s": processor_s * len(data) / len(subset),
    }
    save("prompt_checks", result)
    emit(result)


if __name__ == "__main__":
    main()
