"""Top-K reverse-KL variants: does the student drift towards uniform? (a default-choosing check)

    python benchmarks/topk_drift.py                         # V = 500 (the tiny models) and 151,936 (Qwen)
    python benchmarks/topk_drift.py --vocabs 151936 --steps 400

On the demo's 500-token vocabulary the `unbiased` top-K surrogate drove the student to a near-uniform
distribution (benchmarks/learning_findings.md): its gradient raises every token outside the
student's top-K. This isolates the mechanism from any model: free student logits (N rows x V) are
fitted by Adam to a fixed, peaked teacher distribution with each variant's loss (`divergences.topk_reverse_kl`,
and the full reverse KL as the reference), and we watch, per step, the student's mass outside its
own top-K support, its entropy, and the full KL(P_S || P_T). The teacher puts most of its mass on a
few tokens, as a trained LM does; the student starts near the teacher but flatter (`--start
near`, a warmed-up student) or near uniform (`--start flat`, a random-init one). Same seed and
learning rate for every variant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = ("unbiased", "renormalized", "tail", "full")


def run(vocab: int, variant: str, args) -> list[dict]:
    import torch

    from dopd_vlm import divergences

    g = torch.Generator().manual_seed(args.seed)
    teacher = torch.randn(args.rows, vocab, generator=g) * 2.0
    # a few likely tokens and a long tail; the boost grows with log V so that the likely tokens
    # hold the same share of the mass (about 0.9) at every vocabulary size, as in a trained LM
    teacher[:, :8] += 12.0 + math.log(vocab / 500)
    start = {"near": 0.5 * teacher + torch.randn(args.rows, vocab, generator=g),  # a warmed-up student
             "flat": 0.1 * torch.randn(args.rows, vocab, generator=g)}[args.start]  # a random-init one
    student = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([student], lr=args.lr)
    history = []
    for step in range(args.steps + 1):
        with torch.no_grad():
            log_p = torch.log_softmax(student, -1)
            support = log_p.topk(args.top_k, dim=-1).indices
            outside = 1 - log_p.gather(-1, support).exp().sum(-1)
            if step % max(1, args.steps // 10) == 0:
                history.append(dict(step=step, mass_outside_topk=outside.mean().item(),
                                    entropy=divergences.entropy(student).mean().item(),
                                    kl_to_teacher=divergences.generalized_jsd(student, teacher, 1.0).mean().item()))
        if step == args.steps:
            break
        if variant == "full":
            loss = divergences.generalized_jsd(student, teacher, 1.0).mean()
        else:
            loss = divergences.topk_reverse_kl(student, teacher, args.top_k, variant).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="500,151936")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", choices=("near", "flat"), default="near",
                   help="student start: near the teacher (warmed up) or near uniform (random init)")
    args = p.parse_args()
    import dopd_vlm  # noqa: F401

    rows = []
    for vocab in map(int, args.vocabs.split(",")):
        for variant in VARIANTS:
            history = run(vocab, variant, args)
            first, last = history[0], history[-1]
            rows.append(dict(vocab=vocab, variant=variant, outside_start=first["mass_outside_topk"],
                             outside_end=last["mass_outside_topk"], entropy_start=first["entropy"],
                             entropy_end=last["entropy"], kl_start=first["kl_to_teacher"], kl_end=last["kl_to_teacher"],
                             history=history))
            print(f"V={vocab:>7} {variant:>12}: mass outside top-{args.top_k} {first['mass_outside_topk']:.3f} -> "
                  f"{last['mass_outside_topk']:.3f}, entropy {first['entropy']:.2f} -> {last['entropy']:.2f}, "
                  f"KL(S||T) {first['kl_to_teacher']:.3f} -> {last['kl_to_teacher']:.3f}", flush=True)
    payload = dict(benchmark="topk_drift", command=f"python benchmarks/topk_drift.py --start {args.start}",
                   machine=C.machine(), rows=rows,
                   setup=dict(rows=args.rows, steps=args.steps, top_k=args.top_k, lr=args.lr, seed=args.seed, start=args.start))
    C.save(f"topk_drift_{args.start}", payload)


if __name__ == "__main__":
    main()
