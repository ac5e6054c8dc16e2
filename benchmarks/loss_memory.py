"""Benchmark 1: DOPD loss (router + all four regimes, forward + backward) at real vocabulary size.

    python benchmarks/loss_memory.py                 # V=151,936, 2 x 1,024 tokens, H=2,048
    python benchmarks/loss_memory.py --quick         # V=32,768, 2 x 256 tokens (a smoke run)

Starts from the hidden states at the response positions of the three passes (student with
gradient, privileged student, teacher: hidden size 2,048, as in a 2B student) and the two LM heads,
and measures everything after: the router's token log-probs and thresholds, the routed per-token
loss (top-K reverse KL in LH/LL/HS, full-vocabulary JS in HT), and the backward into the student's
hidden states and LM head. Variants, each in a fresh process (peak memory is per process):

- naive:        full-vocabulary logits and log-softmax for all three passes at once (the way
                GKD-style trainers compute the loss), then the same router and objectives.
- checkpointed: dopd_vlm's chunked path with per-chunk checkpointing and full-vocabulary target
                logits recomputed in every chunk (what `compute_loss` does with opaque callable heads,
                e.g. a ZeRO-3 partitioned LM head).
- dopd_vlm:     dopd_vlm's default path: fused per-chunk gradients (no recompute) and top-K target
                log-probs from K head rows + the scoring pass's logsumexp (full teacher rows only for
                HT tokens).

Peak memory is measured above the inputs (hidden states + heads) and includes the LM-head gradient
every variant produces. CPU: peak RSS (kernel high-water mark, reset before the loss); CUDA:
torch.cuda.max_memory_allocated. CPU runs use float32 (bf16 matmuls are not faster on CPUs
without AMX/AVX512-BF16 and bf16 elementwise math is emulated); CUDA runs use bf16 weights and
hidden states with float32 loss math, as in training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = ("naive", "checkpointed", "dopd_vlm")


def make_inputs(args, device, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    n, h, v = args.sequences * args.tokens, args.hidden, args.vocab

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g).mul_(scale).to(device=device, dtype=dtype)

    # Logit scales chosen so the distributions are peaked (entropies of a few nats), as trained models'.
    student_w = randn(v, h, scale=4.0 / h**0.5).requires_grad_(True)
    teacher_w = randn(v, h, scale=5.0 / h**0.5)
    shared = randn(n, h)
    student_h = (shared + randn(n, h)).requires_grad_(True)
    privileged_h = shared + 0.5 * randn(n, h)
    teacher_h = shared + 0.7 * randn(n, h)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    seq_index = torch.arange(args.sequences).repeat_interleave(args.tokens).to(device)
    return student_w, teacher_w, student_h, privileged_h, teacher_h, ids, seq_index


def run_child(args) -> dict:
    import torch

    import dopd_vlm  # noqa: F401  (torchvision shim before transformers)
    from dopd_vlm import divergences
    from dopd_vlm.config import MethodConfig
    from dopd_vlm.methods import LossInputs, compute_loss
    from dopd_vlm.router import HT, compute_thresholds, assign_regimes
    from dopd_vlm.scoring import Head, ResponseTokens, WeightHead

    device, dtype = C.device_and_dtype(args.dtype)
    torch.manual_seed(0)
    student_w, teacher_w, student_h, privileged_h, teacher_h, ids, seq_index = make_inputs(args, device, dtype)
    tokens = ResponseTokens(ids, seq_index, args.sequences)
    cfg = MethodConfig(name="dopd", top_k=args.top_k)
    everything = torch.ones_like(ids, dtype=torch.bool)

    def route(lt, lp):
        return assign_regimes(lt, lp, everything, compute_thresholds(lt, lp, everything))

    def naive():
        # Full log-softmax of all three passes at once, then the same router and objectives.
        log_p_s = torch.log_softmax((student_h @ student_w.T).float(), dim=-1)
        with torch.no_grad():
            log_p_p = torch.log_softmax((privileged_h @ student_w.T).float(), dim=-1)
            log_p_t = torch.log_softmax((teacher_h @ teacher_w.T).float(), dim=-1)
            lt, lp = log_p_t.gather(-1, ids[:, None])[:, 0], log_p_p.gather(-1, ids[:, None])[:, 0]
        regimes = route(lt, lp)
        uses_teacher = (regimes == 0) | (regimes == HT)  # LH, HT -> teacher; LL, HS -> privileged
        weight = torch.tensor([cfg.beta_l, cfg.beta_w, cfg.ht_weight, cfg.beta_l], device=device)[regimes]
        support = log_p_s.detach().topk(cfg.top_k, dim=-1).indices
        support_t = torch.where(uses_teacher[:, None], log_p_t.gather(-1, support), log_p_p.gather(-1, support))
        loss = divergences.topk_reverse_kl_on_support(log_p_s.gather(-1, support), support_t)
        ht = (regimes == HT).nonzero(as_tuple=True)[0]
        loss = loss.index_put((ht,), divergences.generalized_jsd_from_logprobs(log_p_s[ht], log_p_t[ht], 0.5))
        total = tokens.sequence_mean(weight * loss)
        total.backward()
        return total, regimes

    def chunked(fast: bool):
        from dopd_vlm.scoring import token_logprobs

        if fast:
            from dopd_vlm.scoring import token_logprobs_and_lse

            s_head, t_head = WeightHead(student_w), WeightHead(teacher_w)
        else:
            s_head, t_head = _opaque_head(Head, student_w), _opaque_head(Head, teacher_w)
        extra = {}
        with torch.no_grad():
            if fast:
                lp, extra["privileged_lse"] = token_logprobs_and_lse(privileged_h, s_head, ids, args.chunk)
                lt, extra["teacher_lse"] = token_logprobs_and_lse(teacher_h, t_head, ids, args.chunk)
            else:
                lp = token_logprobs(privileged_h, s_head, ids, args.chunk)
                lt = token_logprobs(teacher_h, t_head, ids, args.chunk)
        regimes = route(lt, lp)
        inputs = LossInputs(tokens, student_h, s_head, privileged_h, teacher_h, t_head, regimes, **extra)
        total, _ = compute_loss(cfg, inputs, args.chunk, loss_path="fused" if fast else "chunked")
        total.backward()
        return total, regimes

    fn = {"naive": naive, "checkpointed": lambda: chunked(False), "dopd_vlm": lambda: chunked(True)}[args.variant]
    with C.PeakMemory(device) as mem:
        total, regimes = fn()
    return dict(
        variant=args.variant,
        chunk=args.chunk if args.variant != "naive" else None,
        seconds=mem.seconds,
        cpu_seconds=mem.cpu_seconds,
        peak_bytes=mem.peak,
        peak_gib=C.gib(mem.peak),
        loss=total.item(),
        grad_hidden_norm=student_h.grad.float().norm().item(),
        grad_head_norm=student_w.grad.float().norm().item(),
        ht_share=(regimes == 2).float().mean().item(),
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
    )


def _opaque_head(base: type, weight):
    """A head the loss cannot read weight rows from (any non-linear output layer): the checkpointed
    path with full-vocabulary targets, as before the fast path existed."""

    class OpaqueHead(base):
        vocab_size = weight.shape[0]

        def __call__(self, hidden):
            return hidden @ weight.T

    return OpaqueHead()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="response tokens per sequence")
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--chunks", default="256", help="loss chunk sizes to run dopd_vlm with (comma-separated)")
    p.add_argument("--variants", default="naive,dopd_vlm", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="V=32,768, 2 x 256 tokens")
    p.add_argument("--reference-tree", help="also run the checkpointed variant with the dopd_vlm package found "
                   "in this directory (e.g. an older commit: git archive COMMIT dopd_vlm | tar -x -C DIR)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.vocab, args.tokens = 32_768, 256
    if args.variant:
        C.emit(run_child(args))
        return

    common = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--sequences", str(args.sequences),
              "--tokens", str(args.tokens), "--top-k", str(args.top_k), "--dtype", args.dtype]
    runs = []
    if args.reference_tree:
        started = time.perf_counter()
        result = C.run_json([C.python(), __file__, "--variant", "checkpointed", "--chunk", args.chunks.split(",")[0], *common],
                            env={"PYTHONPATH": str(Path(args.reference_tree).resolve())})
        result["variant"] = f"checkpointed ({Path(args.reference_tree).name})"
        runs.append(result)
        print(f"  {result['variant']}: {result['seconds']:.1f} s, peak +{result['peak_gib']:.2f} GiB "
              f"(wall {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    for variant in args.variants.split(","):
        chunks = [int(c) for c in args.chunks.split(",")] if variant != "naive" else [0]
        if variant == "checkpointed":
            chunks = chunks[:1]
        for chunk in chunks:
            started = time.perf_counter()
            result = C.run_json([C.python(), __file__, "--variant", variant, "--chunk", str(chunk or 1024), *common])
            runs.append(result)
            print(f"  {variant} chunk={chunk or '-'}: {result['seconds']:.1f} s ({result['cpu_seconds']:.0f} CPU s), peak +{result['peak_gib']:.2f} GiB "
                  f"(wall {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    runs.sort(key=lambda r: r["variant"] != "naive")
    naive = next((r for r in runs if r["variant"] == "naive"), None)
    for r in runs:
        if naive:
            r["memory_vs_naive"] = r["peak_bytes"] / naive["peak_bytes"]
            r["time_vs_naive"] = r["seconds"] / naive["seconds"]
            r["cpu_vs_naive"] = r["cpu_seconds"] / naive["cpu_seconds"]
            r["loss_rel_diff"] = abs(r["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-12)
            r["grad_rel_diff"] = abs(r["grad_head_norm"] - naive["grad_head_norm"]) / naive["grad_head_norm"]
    payload = dict(
        benchmark="loss_memory",
        command="python benchmarks/loss_memory.py" + (" --quick" if args.quick else ""),
        machine=C.machine(),
        shape=dict(vocab=args.vocab, hidden=args.hidden, tokens=args.sequences * args.tokens, top_k=args.top_k),
        runs=runs,
    )
    C.save("loss_memory" + ("_quick" if args.quick else ""), payload)
    print(f"machine: {payload['machine']}\nshape: {payload['shape']}, dtype {runs[0]['dtype']}, HT share {runs[0]['ht_share']:.2f}")
    print(C.table(runs, [("variant", "variant"), ("chunk", "chunk"), ("seconds", "fwd+bwd s"), ("peak_gib", "peak GiB"),
                         ("memory_vs_naive", "memory / naive"), ("time_vs_naive", "time / naive"),
                         ("cpu_seconds", "CPU s"), ("cpu_vs_naive", "CPU time / naive"),
                         ("loss_rel_diff", "loss rel. diff"), ("grad_rel_diff", "|grad W| rel. diff")]))


if __name__ == "__main__":
    main()
