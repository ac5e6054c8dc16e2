"""Benchmark 5: rollout tokens/s, the colocated vLLM engine vs Hugging Face `generate`.

    python benchmarks/rollout_vllm.py                        # tiny and 75M students (CPU)
    python benchmarks/rollout_vllm.py --scales 2b            # 2B-shaped Qwen3-VL student (GPU)

One process per scale holds both engines on the same student checkpoint (random weights, built
by dopd_vlm.models.make_tiny_pair) and samples the same prompts (synthetic scenes with their
images, the collator's chat template) with the same settings as training: temperature 1, top-p
1, no top-k cut, vision special tokens banned. Every response is forced to exactly
`--new-tokens` tokens (HF: min_new_tokens; vLLM: min_tokens), so both engines produce the same
number of tokens. vLLM runs as dopd_vlm runs it (`vllm_rollout.start_engine`: in-process,
automatic KV cache on CPU, CUDA graphs on GPU). Calls alternate between the engines after one
warm-up call each; tokens/s = prompts x new tokens / wall time of one call (median of
`--repeats`). On CUDA the models are bf16 (float32 on CPU).

Scales (text widths; the vision tower is the tiny one except at 2b):
- tiny: dopd_vlm's tiny student (hidden 64, 2 layers, head size 32), Qwen2-VL;
- 75m:  hidden 768, 12 layers, 12 heads (4 KV), MLP 2048: 75 M parameters, Qwen2-VL;
- 2b:   Qwen3-VL-2B text and vision widths and its 151,936 vocabulary rows (GPU only).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCALES = {
    "tiny": dict(family="qwen2_vl", size={}, prompts=32, new_tokens=32),
    "75m": dict(family="qwen2_vl", prompts=32, new_tokens=32,
                size=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)),
    "2b": dict(family="qwen3_vl", prompts=64, new_tokens=1024,
               size=dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                         vision_hidden_size=1024, vision_depth=24, vision_num_heads=16, vision_intermediate_size=4096,
                         vision_num_position_embeddings=2304, vocab_multiple=151_936)),
}


def student_path(scale: str) -> Path:
    import dataclasses

    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, make_tiny_pair

    spec = SCALES[scale]
    size = dataclasses.replace(STUDENT_SIZE, **spec["size"])
    out = C.ROOT / ".cache" / "bench" / f"rollout_vllm_{scale}"
    return make_tiny_pair(spec["family"], out, seed=0, teacher=TEACHER_SIZE, student=size)["student"]


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import GenerationConfig

    import dopd_vlm  # noqa: F401
    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import load_config
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.models import count_parameters, load_model, load_processor, model_family, vision_special_token_ids
    from dopd_vlm.rollout import eos_token_ids
    from dopd_vlm.vllm_rollout import row_seed, start_engine

    spec = SCALES[args.scale]
    prompts, new_tokens = args.prompts or spec["prompts"], args.new_tokens or spec["new_tokens"]
    path = student_path(args.scale)
    device, dtype = C.device_and_dtype()
    model = load_model(path, dtype=dtype).to(device).eval()
    processor = load_processor(path)
    samples = list(load_recipe("synthetic_scenes", "train", family=model_family(path), limit=prompts))
    cfg = load_config(None, [f"model.student={path}", f"model.teacher={path}", f"model.dtype={str(dtype)[6:]}",
                             "rollout.engine=vllm", "rollout.num_rollouts=1", f"rollout.max_new_tokens={new_tokens}",
                             f"rollout.vllm.max_model_len={min(4096, 512 + new_tokens)}",
                             f"train.prompts_per_step={prompts}", f"train.prompts_per_micro_batch={prompts}",
                             f"rollout.vllm.memory_fraction={args.memory_fraction}"])
    collator = DualViewCollator.from_config(processor, data=cfg.data)
    eos, banned = eos_token_ids(model, collator.tokenizer), vision_special_token_ids(collator.tokenizer)
    started = time.perf_counter()
    engine = start_engine(cfg, collator, dtype, eos, banned)
    engine_start_s = time.perf_counter() - started

    def run_vllm(seed: int) -> float:
        requests = [engine.request(s) for s in samples]
        params = [engine.sampling_params(row_seed(seed, row), greedy=False) for row in range(len(samples))]
        for p in params:
            p.min_tokens = new_tokens  # every response exactly new_tokens long, as on the HF side
        begin = time.perf_counter()
        outputs = engine.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
        return seconds

    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=collator.tokenizer.pad_token_id,
                                  suppress_tokens=banned)

    @torch.no_grad()
    def run_hf(seed: int) -> float:
        torch.manual_seed(seed)
        begin = time.perf_counter()
        batch = {k: v.to(device) for k, v in collator.rollout_batch(samples).items()}
        out = model.generate(**batch, generation_config=generation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return seconds

    times = {"vllm": [], "hf": []}
    run_vllm(0), run_hf(0)  # warm-up
    for repeat in range(args.repeats):
        times["vllm"].append(run_vllm(repeat + 1))
        times["hf"].append(run_hf(repeat + 1))
    tokens = prompts * new_tokens
    rows = [dict(scale=args.scale, engine=name, params_m=count_parameters(model) / 1e6, prompts=prompts,
                 new_tokens=new_tokens, median_s=statistics.median(t), tokens_per_s=tokens / statistics.median(t),
                 best_tokens_per_s=tokens / min(t)) for name, t in times.items()]
    rows[0]["engine_start_s"] = engine_start_s
    C.emit(dict(rows=rows))


def main() -> None:
    p = C.parser_with_child(__doc__)
    p.add_argument("--scales", default="tiny,75m")
    p.add_argument("--prompts", type=int, default=0, help="0 = the scale's default")
    p.add_argument("--new-tokens", type=int, default=0, help="0 = the scale's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-fraction", type=float, default=0.3, help="GPU: rollout.vllm.memory_fraction")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for scale in args.scales.split(","):
        student_path(scale)  # build before the timed child
        cmd = [C.python(), __file__, "--child", "1", "--scale", scale, "--repeats", str(args.repeats),
               "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
               "--memory-fraction", str(args.memory_fraction)]
        result = C.run_json(cmd, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, timeout=3600)
        vllm, hf = result["rows"]
        vllm["vs_hf"] = vllm["tokens_per_s"] / hf["tokens_per_s"]
        rows += [vllm, hf]
        print(f"  {scale}: vLLM {vllm['tokens_per_s']:.0f} tok/s, HF {hf['tokens_per_s']:.0f} tok/s "
              f"({vllm['vs_hf']:.2f}x)", file=sys.stderr, flush=True)
    payload = dict(benchmark="rollout_vllm", command=" ".join(["python benchmarks/rollout_vllm.py", *sys.argv[1:]]),
                   machine=C.machine(), rows=rows)
    C.save("rollout_vllm" + ("" if args.scales == "tiny,75m" else "_" + args.scales.replace(",", "_")), payload)
    print(f"machine: {payload['machine']}")
    print(C.table(rows, [("scale", "scale"), ("params_m", "params (M)"), ("engine", "engine"), ("prompts", "prompts"),
                         ("new_tokens", "new tokens"), ("tokens_per_s", "tokens/s (median)"),
                         ("best_tokens_per_s", "tokens/s (best)"), ("vs_hf", "vs HF"), ("engine_start_s", "engine start s")]))


if __name__ == "__main__":
    main()
