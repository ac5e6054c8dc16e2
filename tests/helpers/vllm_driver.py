"""Trains with rollout.engine=vllm, then compares the engine with Hugging Face on the trained student.

Usage: python tests/helpers/vllm_driver.py SPEC.json RESULT.json
SPEC: {"runs": [{"name", "config", "overrides": [...], "eval_split": "test", "num_prompts": n}]}
RESULT: {name: {"metrics": {...}, "greedy_identical": bool, "greedy_rows": int, "max_logprob_diff": float,
                "sampled_tokens": int, "distinct_rollouts": int, "weights_moved": bool,
                "compiled_frames": int (frames torch.compile compiled in this process so far)}}

Each run trains through `dopd_vlm.train.train` (the engine syncs after every optimizer step),
then on the trained student: greedy responses of the engine and of `rollout.sample_responses`
(HF generate) for `num_prompts` prompts of the eval split, and the engine's sampled-token
log-probs against a Hugging Face forward of prompt + response (the student pass). Several runs
share one process: imports dominate on CPU.
"""

import json
import sys

import dopd_vlm  # noqa: F401  (before transformers)
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from dopd_vlm.config import load_config
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.distributed import exit_process
from dopd_vlm.models import model_family, vision_special_token_ids
from dopd_vlm.engine import gathered_for_generation, gathered_weights
from dopd_vlm.rollout import sample_responses
from dopd_vlm.scoring import output_head, response_hidden_states, token_logprobs
from dopd_vlm.train import train
from dopd_vlm.vllm_rollout import row_seed, student_weights


def compare(result, cfg, run) -> dict:
    engine = result.rollout_engine
    student = result.student.module.model
    collator = engine.collator
    samples = list(load_recipe(cfg.data.recipe, run.get("eval_split", "test"), family=collator_family(cfg),
                               limit=run.get("num_prompts", 6)))
    greedy = engine.sample(samples, [row_seed(0, row) for row in range(len(samples))], greedy=True)
    with gathered_for_generation(result.student) as synced_gpus:
        hf_ids, hf_mask = sample_responses(student, collator, samples, cfg.rollout, greedy=True, synced_gpus=synced_gpus,
                                           suppress_token_ids=vision_special_token_ids(collator.tokenizer))
    identical = greedy.ids.shape == hf_ids.shape and torch.equal(greedy.ids, hf_ids) and torch.equal(greedy.mask, hf_mask)
    repeated = [s for s in samples for _ in range(2)]
    sampled = engine.sample(repeated, [row_seed(1234, row) for row in range(len(repeated))])
    views = collator.scoring_views(repeated, sampled.ids, sampled.mask, privileged_student=False, teacher=False)
    with gathered_weights(student):
        hidden = response_hidden_states(student, views.student, views.response_mask)
        head = output_head(student, student.get_output_embeddings().weight.shape[0])
        hf_logprobs = token_logprobs(hidden, head, sampled.ids[sampled.mask], 64)
    diff = (sampled.logprobs[sampled.mask] - hf_logprobs).abs()
    initial = load_file(f"{cfg.model.student}/model.safetensors")
    with gathered_weights(result.student.module):  # what the sync pushes (a LoRA student: merged)
        moved = any(not torch.equal(w.cpu(), initial[hf_name]) for hf_name, w in student_weights(result.student.module)
                    if hf_name in initial)
    distinct = len({tuple(row[mask].tolist()) for row, mask in zip(sampled.ids, sampled.mask)})
    return {"metrics": result.metrics, "greedy_identical": bool(identical), "greedy_rows": len(samples),
            "greedy_lengths": greedy.mask.sum(1).tolist(), "max_logprob_diff": float(diff.max()),
            "sampled_tokens": int(sampled.mask.sum()), "distinct_rollouts": distinct, "weights_moved": moved,
            "compiled_frames": counters["frames"]["total"]}


def collator_family(cfg) -> str:
    return model_family(cfg.model.student)


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    results = {}
    for run in spec["runs"]:
        cfg = load_config(run["config"], run["overrides"])
        result = train(cfg)
        try:
            results[run["name"]] = compare(result, cfg, run)
        finally:
            result.rollout_engine.close()
    json.dump(results, open(result_path, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
