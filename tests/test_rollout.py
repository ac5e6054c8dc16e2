"""On-policy rollouts: plain sampling whatever the checkpoint's generation config says, and the
rollout batch (`rollout.batch_size`) splitting one generate call into the step's micro-batches."""

import json
import shutil

import pytest
import torch

from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import DataConfig, RolloutConfig, load_config
from dopd_vlm.data import load_recipe
from dopd_vlm.models import load_model, load_processor, vision_special_token_ids
from dopd_vlm.rollout import sample_responses
from dopd_vlm.step import rollout_groups

# Settings real instruct checkpoints ship in generation_config.json; none may reach on-policy sampling.
OPINIONATED = {"repetition_penalty": 1.8, "no_repeat_ngram_size": 2, "top_k": 3, "top_p": 0.5, "temperature": 0.3,
               "min_new_tokens": 4, "epsilon_cutoff": 0.05, "typical_p": 0.2, "do_sample": True}


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_checkpoint_generation_config_does_not_change_rollouts(tmp_path, tiny_pairs, greedy):
    plain = tiny_pairs["qwen2_vl"]["teacher"]
    opinionated = tmp_path / "teacher"
    shutil.copytree(plain, opinionated)
    config_file = opinionated / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **OPINIONATED}))
    processor = load_processor(plain)
    collator = DualViewCollator.from_config(processor, data=DataConfig())
    samples = list(load_recipe("synthetic_scenes", "test", limit=6))
    cfg = RolloutConfig(max_new_tokens=10)
    outputs = []
    for path in (plain, opinionated):
        model = load_model(path).eval()
        assert (model.generation_config.repetition_penalty == 1.8) == (path == opinionated)
        torch.manual_seed(0)
        outputs.append(sample_responses(model, collator, samples, cfg, greedy=greedy,
                                        suppress_token_ids=vision_special_token_ids(processor)))
        assert model.generation_config.repetition_penalty == (1.8 if path == opinionated else None)  # restored
    (ids_a, mask_a), (ids_b, mask_b) = outputs
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)


def test_rollout_groups_cover_the_micro_batches_in_order(tiny_pairs):
    def groups(batch_size, micro_batches=4):
        cfg = load_config(None, ["model.student=s", "model.teacher=t", "train.prompts_per_micro_batch=2",
                                 "rollout.num_rollouts=3", f"rollout.batch_size={batch_size}"])
        return [list(g) for g in rollout_groups(micro_batches, cfg)]

    assert groups(0) == [[0, 1, 2, 3]]  # all of the rank's rollouts in one call
    assert groups(6) == [[0], [1], [2], [3]]  # one micro-batch (2 prompts x 3 rollouts) per call
    assert groups(12) == [[0, 1], [2, 3]]
    assert groups(18) == [[0, 1, 2], [3]]
    with pytest.raises(Exception, match="rollout.batch_size.*not a multiple of prompts_per_micro_batch x num_rollouts = 6"):
        groups(4)
