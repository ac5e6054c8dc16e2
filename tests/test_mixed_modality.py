"""Mixed data on several ranks: micro-batches that differ in modality and image count across 2
ZeRO-3 ranks train and evaluate like 1 rank on the same global batch, for every vision family.

Under ZeRO-3 every call of a partitioned module is a collective, so a rank whose micro-batch has
no image must still run the vision tower (forward and backward): the collator gives such a batch
a masked-out padding row carrying a tiny image (`collate.DualViewCollator`).
"""

import json

import pytest
import torch
import yaml

from dopd_vlm.config import load_config
from dopd_vlm.data import load_recipe
from dopd_vlm.families import VISION_FAMILIES
from dopd_vlm.step import epoch_order, step_batches
from test_data import png
from test_train import launch, metrics_lines, write_config

# The image count of the prompt each micro-batch of step 1 gets (4 prompts, 1 per micro-batch):
# rank 0 runs g0, g1 while rank 1 runs g2, g3, so the concurrent pairs are (text, 1 image) and
# (2 images, 1 image).
TRAIN_IMAGES = [0, 2, 1, 1]
# Evaluation shards sample i to rank i % 2: rank 0 sees only text, rank 1 only images.
EVAL_IMAGES = [0, 1, 0, 2]


def mixed_rows(image_counts: list[int], prefix: str) -> list[dict]:
    rows = []
    for i, count in enumerate(image_counts):
        pictures = [f"img/{size}.png" for size in ("40x30", "64x64")[:count]]
        question = "What is shown?" if count else "Name a colour."
        rows.append({"id": f"{prefix}{i}", "question": question, "answer": "red", "privileged": f"red box {i}",
                     "images": pictures})
    return rows


def write_mixed_recipe(tmp_path, seed: int) -> str:
    """A local-files recipe whose step-1 micro-batches hold TRAIN_IMAGES images, in that order."""
    data = tmp_path / "mixed"
    (data / "img").mkdir(parents=True)
    for size in ("40x30", "64x64"):
        width, height = map(int, size.split("x"))
        (data / "img" / f"{size}.png").write_bytes(png((200, 30, 30), size=(width, height)))
    order = epoch_order(len(TRAIN_IMAGES), seed, 0)  # step 1 draws data[order[0]], data[order[1]], ...
    train = [None] * len(TRAIN_IMAGES)
    for position, row in zip(order, mixed_rows(TRAIN_IMAGES, "train")):
        train[position] = row
    for name, rows in (("train", train), ("test", mixed_rows(EVAL_IMAGES, "test"))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = data / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "local_files", "files": {"train": "train.jsonl", "test": "test.jsonl"}}))
    return str(recipe)


@pytest.mark.slow
def test_micro_batches_differing_in_modality_across_zero3_ranks_match_one_rank(tmp_path, tiny_pairs):
    recipe = write_mixed_recipe(tmp_path, seed=0)
    config = write_config(tmp_path / "c.yaml", tiny_pairs, recipe=recipe,
                          train={"steps": 1, "seed": 0}, rollout={"num_rollouts": 2, "max_new_tokens": 4, "batch_size": 2})  # one micro-batch per generate call on 1 and 2 ranks
    cfg = load_config(config)
    data = load_recipe(recipe, "train")
    per_rank = [[[len(s.images) for s in mb] for mb in step_batches(data, cfg, 0, r, 2)[0]] for r in (0, 1)]
    assert per_rank == [[[0], [2]], [[1], [1]]]  # the pattern the test is about
    runs = [{"name": family, "overrides": [
        f"model.teacher={tiny_pairs[family]['teacher']}", f"model.student={tiny_pairs[family]['student']}",
        f"train.output_dir={tmp_path / family / 'OUT'}"]} for family in VISION_FAMILIES]
    results = {}
    for nproc in (1, 2):
        nproc_runs = [{**run, "overrides": [o.replace("OUT", str(nproc)) for o in run["overrides"]]} for run in runs]
        results[nproc] = launch(tmp_path, config, nproc_runs, nproc=nproc)
    for family in VISION_FAMILIES:
        one, two = results[1][family]["metrics"], results[2][family]["metrics"]
        assert results[2][family]["finished"], family
        assert one["response_tokens"] == two["response_tokens"], family
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-5), family
        assert two["threshold_gap"] == pytest.approx(one["threshold_gap"], abs=1e-6), family
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), family
        for share in ("LH", "LL", "HT", "HS"):
            assert two[f"share/{share}"] == pytest.approx(one[f"share/{share}"], abs=1e-9), family
        # evaluation (rank 0 text only, rank 1 images) and its baseline agree too
        baseline = [metrics_lines(tmp_path / family / str(n))[0] for n in (1, 2)]
        for key in ("student/test", "teacher/test", "teacher_privileged/test"):
            assert baseline[0][key] == baseline[1][key], (family, key)
        assert torch.isfinite(torch.tensor(two["loss"]))
