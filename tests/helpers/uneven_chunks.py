"""Ranks score different numbers of tokens with a ZeRO-3 partitioned head, in small chunks.

Usage: torchrun --nproc_per_node 2 tests/helpers/uneven_chunks.py TEACHER_DIR
A per-chunk gather of the head (the frozen teacher's, or the trainable student's in the no-grad
privileged pass) would issue a different number of collectives on each rank and hang or crash;
scoring must gather it once. Prints "ok <rank> <checksum>" on success.
"""

import sys

import dopd_vlm  # noqa: F401  (before transformers)
import deepspeed
import torch
import torch.distributed as dist

from dopd_vlm.distributed import exit_process, init_distributed
from dopd_vlm.engine import zero3_loading
from dopd_vlm.models import load_model
from dopd_vlm.scoring import output_head, token_logprobs_and_lse


def main(path: str) -> None:
    init_distributed(timeout_s=60)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with zero3_loading(config):
        model = load_model(path).requires_grad_(False)  # a frozen teacher, as train() sets it up
    engine, *_ = deepspeed.initialize(model=model, config=config)
    head = output_head(engine.module, 500)
    assert head.partitioned and head.is_linear
    rank = dist.get_rank()
    n = 11 if rank == 0 else 3  # 6 chunks of 2 on rank 0, 2 on rank 1
    hidden = torch.randn(n, engine.module.config.text_config.hidden_size, generator=torch.Generator().manual_seed(rank))
    logprobs, lse = token_logprobs_and_lse(hidden, head, torch.arange(n), chunk_size=2)
    head.module.weight.requires_grad_(True)  # the student's head in the privileged scoring pass (no grad)
    again, _ = token_logprobs_and_lse(hidden, head, torch.arange(n), chunk_size=2)
    assert torch.equal(again, logprobs)
    total = torch.tensor([float(logprobs.sum())])
    dist.all_reduce(total)  # would mismatch a leftover per-chunk all-gather on the other rank
    print(f"ok {rank} {total.item():.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)
