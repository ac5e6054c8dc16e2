"""Benchmark 8: a LoRA student's adapter into the colocated vLLM engine, merged weights vs vLLM's own LoRA.

    python benchmarks/vllm_lora_sync.py                      # tiny and 75m Qwen3 students (CPU only)
    python benchmarks/vllm_lora_sync.py --family qwen3_vl --scales tiny --steps 3   # a VL family, image prompts

After every optimizer step the rollout engine must sample from the current adapter. Two ways:

- merged: the project's path (`rollout.engine: vllm`): `VllmRollout.sync_weights` pushes every
  weight of base + adapter (`lora.merged_weights`) into a plain engine (`reload_weights`);
- native: vLLM's LoRA support (`LLM(enable_lora=True)`): the adapter is saved as a PEFT folder
  (in /dev/shm) and loaded with `add_lora`, then every request carries its `LoRARequest`. Two
  ways to name the new version: a new `lora_int_id` per step (the old one evicted by the LRU
  cache), or the same id with `load_inplace=True` on the `add_lora` call only (in a generate
  request, load_inplace reloads from disk at every scheduler step).

One process per scale holds both engines on the same student (Qwen3 unless --family; random
weights, dopd_vlm.lab.tiny.make_tiny_pair) with a PEFT LoRA on its language model (rank 8, alpha 16,
the default target modules). Each "step" perturbs the adapters (A and B drawn afresh, seeded: B
nonzero, so the adapter changes the outputs), then each path syncs and generates the same
prompts (synthetic_text, or synthetic_scenes with their images for a VL family; greedy, exactly
as `VllmRollout.sampling_params(greedy=True)`). Times: the sync alone and sync + generate,
median over the steps after one warm-up step; the variants alternate within a step. Correctness:
every step, each path's greedy tokens must equal HF `generate` on the PEFT student with that
step's adapter (and the check has power only when the tokens moved since the last step, reported
as `changed_steps`). A third native variant re-requests the same id without load_inplace: it
shows whether vLLM serves the stale cached adapter (the trap to avoid). A timing control
generates on the LoRA-enabled engine without any LoRARequest (checked against HF with the
adapters off): what enabling LoRA costs the engine by itself.

Every run rewrites the section "8. ..." of BENCHMARKS.md from all stored results
(benchmarks/results/vllm_lora_sync*.json, the default run first), with the decision rule of
`native_wins` and the notes of benchmarks/vllm_lora_sync_findings.md.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCALES = {
    # the learning testbed's size (benchmarks/testbed_learning.py testbed_sizes): head size 32
    "tiny": dict(prompts=16, new_tokens=16,
                 size=dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256)),
    "75m": dict(prompts=16, new_tokens=16,
                size=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)),
}
RECIPES = {"qwen3": "synthetic_text", "qwen2_vl": "synthetic_scenes", "qwen2_5_vl": "synthetic_scenes",
           "qwen3_vl": "synthetic_scenes"}
RANK, ALPHA = 8, 16.0
NATIVE_VARIANTS = ("native_new_id", "native_inplace")
STALE_VARIANT = "native_same_id_cached"
NO_REQUEST_VARIANT = "native_engine_no_adapter"  # timing control: the LoRA engine without a LoRARequest


def student_path(family: str, scale: str) -> Path:
    import dataclasses

    from dopd_vlm.lab.tiny import STUDENT_SIZE, TEACHER_SIZE, make_tiny_pair

    size = dataclasses.replace(STUDENT_SIZE, **SCALES[scale]["size"])
    out = C.ROOT / ".cache" / "bench" / f"vllm_lora_sync_{family}_{scale}"
    return make_tiny_pair(family, out, seed=0, teacher=TEACHER_SIZE, student=size)["student"]


def perturb_adapters(model, generator) -> None:
    """A new adapter version, as an optimizer step makes one: every lora_A / lora_B weight redrawn."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def native_engine(cfg, dtype):
    """A vLLM engine with its LoRA support on, started with the options `start_engine` uses on CPU."""
    from vllm import LLM

    from dopd_vlm.distributed import world_size
    from dopd_vlm.vllm_rollout import automatic_kv_cache_bytes

    v = cfg.rollout.vllm
    llm = LLM(model=cfg.model.student, dtype=str(dtype).removeprefix("torch."), seed=cfg.train.seed,
              max_model_len=v.max_model_len, kv_cache_memory_bytes=automatic_kv_cache_bytes(cfg, dtype, world_size()),
              distributed_executor_backend="uni", enforce_eager=True, generation_config="vllm",
              enable_lora=True, max_lora_rank=RANK, max_loras=1, max_cpu_loras=4)
    llm.llm_engine.engine_core._finalizer.detach()
    return llm


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import GenerationConfig
    from vllm.lora.request import LoRARequest

    import dopd_vlm  # noqa: F401
    from dopd_vlm import lora
    from dopd_vlm.collate import DualViewCollator, extract_responses
    from dopd_vlm.config import load_config
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.models import count_parameters, load_model, load_processor, vision_special_token_ids
    from dopd_vlm.rollout import eos_token_ids
    from dopd_vlm.scoring import ResponseHiddenStates
    from dopd_vlm.vllm_rollout import row_seed, start_engine

    spec = SCALES[args.scale]
    prompts, new_tokens = spec["prompts"], spec["new_tokens"]
    path = student_path(args.family, args.scale)
    recipe = RECIPES[args.family]
    dtype = torch.float32
    cfg = load_config(None, [f"model.student={path}", f"model.teacher={path}", "model.dtype=float32",
                             "model.lora.enabled=true", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
                             "rollout.engine=vllm", "rollout.num_rollouts=1", f"rollout.max_new_tokens={new_tokens}",
                             f"rollout.vllm.max_model_len={512 + new_tokens}", f"data.recipe={recipe}",
                             f"train.prompts_per_step={prompts}", f"train.prompts_per_micro_batch={prompts}"])
    processor = load_processor(path)
    collator = DualViewCollator.from_config(processor, data=cfg.data)
    model = load_model(path, dtype=dtype).eval()
    base_params = count_parameters(model)
    peft_student = lora.adapt(model, cfg.model, seed=0)
    wrapper = ResponseHiddenStates(model)  # what `sync_weights` reads (the DeepSpeed engine's .module)
    student_engine = type("StudentEngine", (), {"module": wrapper})()
    samples = list(load_recipe(recipe, "train", family=args.family, limit=prompts))
    eos, banned = eos_token_ids(model, collator.tokenizer), vision_special_token_ids(collator.tokenizer)

    merged = start_engine(cfg, collator, dtype, eos, banned)
    native = native_engine(cfg, dtype)
    requests = [merged.request(s) for s in samples]
    params = [merged.sampling_params(row_seed(0, row), greedy=True) for row in range(len(samples))]
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=collator.tokenizer.pad_token_id, suppress_tokens=banned)
    batch = collator.rollout_batch(samples)

    @torch.no_grad()
    def hf_tokens() -> list[list[int]]:
        out = model.generate(**batch, generation_config=generation)
        ids, mask = extract_responses(out, batch["input_ids"].shape[1], eos, collator.tokenizer.pad_token_id)
        return [row[m].tolist() for row, m in zip(ids, mask)]

    def tokens_of(outputs) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in outputs]

    def generate(llm, lora_request=None):
        llm.reset_prefix_cache()
        return tokens_of(llm.generate(requests, params, use_tqdm=False, lora_request=lora_request))

    shm = Path(tempfile.mkdtemp(prefix="dopd_lora_sync_", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

    def save(folder: Path) -> None:
        peft_student.save_pretrained(folder, save_embedding_layers=False)

    def merged_step() -> tuple[float, list]:
        begin = time.perf_counter()
        merged.sync_weights(student_engine)
        return time.perf_counter() - begin, generate(merged.llm)

    def native_step(variant: str, step: int) -> tuple[float, list]:
        if variant == NO_REQUEST_VARIANT:  # the LoRA-enabled engine serving the base model
            return 0.0, generate(native)
        begin = time.perf_counter()
        if variant == "native_new_id":
            folder, lora_id, inplace = shm / f"new_id_{step}", 10 + step, False
        elif variant == "native_inplace":
            folder, lora_id, inplace = shm / "inplace", 1, True
        else:  # the trap: the same id again, no load_inplace
            folder, lora_id, inplace = shm / "same_id", 2, False
        save(folder)
        native.llm_engine.add_lora(LoRARequest(variant, lora_id, str(folder), load_inplace=inplace))
        seconds = time.perf_counter() - begin
        request = LoRARequest(variant, lora_id, str(folder))
        return seconds, generate(native, request)

    with lora.adapters_off(model):
        base_reference = hf_tokens()
    generator = torch.Generator().manual_seed(1)
    variants = ("merged", *NATIVE_VARIANTS, STALE_VARIANT, NO_REQUEST_VARIANT)
    times = {v: {"sync": [], "generate": [], "total": []} for v in variants}
    correct = {v: 0 for v in variants}
    changed_steps, previous = 0, None
    for step in range(args.steps + 1):  # step 0 is the warm-up
        perturb_adapters(model, generator)
        reference = hf_tokens()
        changed_steps += step > 0 and reference != previous
        previous = reference
        for variant in variants:
            begin = time.perf_counter()
            seconds, tokens = merged_step() if variant == "merged" else native_step(variant, step)
            total = time.perf_counter() - begin
            if step == 0:
                continue
            for key, value in (("sync", seconds), ("generate", total - seconds), ("total", total)):
                times[variant][key].append(value)
            correct[variant] += tokens == (base_reference if variant == NO_REQUEST_VARIANT else reference)
    rows = []
    for variant in variants:
        medians = {f"{key}_s": statistics.median(values) for key, values in times[variant].items()}
        rows.append(dict(family=args.family, scale=args.scale, variant=variant, params_m=base_params / 1e6, prompts=prompts,
                         new_tokens=new_tokens, steps=args.steps, **medians, correct_steps=correct[variant],
                         reference="HF, adapters off" if variant == NO_REQUEST_VARIANT else "HF, current adapter",
                         changed_steps=changed_steps))
    shutil.rmtree(shm)  # every step's saved adapter
    C.emit(dict(rows=rows))


def main() -> None:
    p = C.parser_with_child(__doc__)
    p.add_argument("--scales", default="tiny,75m")
    p.add_argument("--family", default="qwen3", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, default=5, help="timed steps per scale (after one warm-up step)")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if torch.cuda.is_available():  # native_engine and the float32 models are CPU settings
        p.error("CPU only: its engines are started with vLLM's CPU options; a GPU variant is not written yet")
    rows, load_average = [], os.getloadavg()[0]
    for scale in args.scales.split(","):
        student_path(args.family, scale)  # build before the timed child
        cmd = [C.python(), __file__, "--child", "1", "--family", args.family, "--scale", scale, "--steps", str(args.steps)]
        result = C.run_json(cmd, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, timeout=3600)
        by_variant = {row["variant"]: row for row in result["rows"]}
        for row in result["rows"]:
            row["sync_vs_merged"] = row["sync_s"] / by_variant["merged"]["sync_s"]
            row["total_vs_merged"] = row["total_s"] / by_variant["merged"]["total_s"]
        rows += result["rows"]
        print(f"  {scale}: " + ", ".join(f"{r['variant']} {r['total_s']:.3f}s ({r['correct_steps']}/{r['steps']} "
                                         "correct)" for r in result["rows"]), file=sys.stderr, flush=True)
    payload = dict(benchmark="vllm_lora_sync", command=" ".join(["python benchmarks/vllm_lora_sync.py", *sys.argv[1:]]),
                   machine=C.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   load_average=load_average, rows=rows)
    default = args.family == "qwen3" and args.scales == "tiny,75m"
    C.save("vllm_lora_sync" + ("" if default else f"_{args.family}_" + args.scales.replace(",", "_")), payload)
    print(f"machine: {payload['machine']}")
    print(C.table(rows, COLUMNS))
    C.write_section(C.ROOT / "BENCHMARKS.md", SECTION, section_body(stored_runs()))


def stored_runs() -> list[dict]:
    """Every stored run of this benchmark, the default one (Qwen3, tiny and 75m) first."""
    files = sorted(C.RESULTS.glob("vllm_lora_sync*.json"), key=lambda f: (f.stem != "vllm_lora_sync", f.stem))
    return [json.loads(f.read_text()) | {"file": f.name} for f in files]


SECTION = "8. vLLM rollouts of a LoRA student: merged weights vs vLLM's LoRA (issue #16)"
FINDINGS = C.ROOT / "benchmarks" / "vllm_lora_sync_findings.md"


def native_wins(rows: list[dict]) -> bool:
    """Native LoRA is chosen only if, at every family and scale, a native variant was correct at
    every step and its sync + generate was faster than the merged push."""
    settings = {(row["family"], row["scale"]) for row in rows}
    return all(any((row["family"], row["scale"]) == setting and row["variant"] in NATIVE_VARIANTS
                   and row["correct_steps"] == row["steps"] and row["total_vs_merged"] < 1 for row in rows)
               for setting in settings)


def scale_summary(rows: list[dict], scale: str) -> str:
    by_variant = {row["variant"]: row for row in rows if row["scale"] == scale}
    merged, stale = by_variant["merged"], by_variant[STALE_VARIANT]
    natives = [by_variant[v] for v in NATIVE_VARIANTS]
    best = min(natives, key=lambda row: row["total_s"])
    control = by_variant[NO_REQUEST_VARIANT]
    return (f"- {scale} ({merged['params_m']:.3g}M parameters, {merged['prompts']} prompts x {merged['new_tokens']} "
            f"greedy tokens): merged sync {merged['sync_s']:.3g} s + generate {merged['generate_s']:.3g} s; best native "
            f"({best['variant']}) sync {best['sync_s']:.3g} s (**{best['sync_vs_merged']:.2f}x** merged) + generate "
            f"{best['generate_s']:.3g} s ({best['generate_s'] / merged['generate_s']:.2f}x): sync + generate "
            f"**{best['total_vs_merged']:.2f}x** merged. The LoRA-enabled engine without an adapter generates in "
            f"{control['generate_s']:.3g} s ({control['generate_s'] / merged['generate_s']:.2f}x merged). Greedy tokens "
            f"equal to HF with the current adapter: merged {merged['correct_steps']}/{merged['steps']}, "
            + ", ".join(f"{row['variant']} {row['correct_steps']}/{row['steps']}" for row in natives)
            + f"; the same id re-requested without load_inplace: {stale['correct_steps']}/{stale['steps']} "
            f"(stale adapter served); tokens moved between steps in {merged['changed_steps']}/{merged['steps']} steps."
            + break_even(merged, best))


def break_even(merged: dict, native: dict) -> str:
    """Below how many generated tokens per step native would win, taking generate time as
    proportional to the tokens generated (prefill included: an estimate)."""
    saved, extra = merged["sync_s"] - native["sync_s"], native["generate_s"] - merged["generate_s"]
    if saved <= 0 or extra <= 0:
        return ""
    tokens = merged["prompts"] * merged["new_tokens"]
    return (f" Estimated break-even: native would win below ≈ {tokens * saved / extra:.0f} generated tokens per "
            f"sync (here {tokens}).")


def section_body(runs: list[dict]) -> list[str]:
    rows = [row for run in runs for row in run["rows"]]
    decision = (f"**native is faster and correct in every setting measured** ({runs[0]['machine']})" if native_wins(rows)
                else "**merged is kept** (`VllmRollout.sync_weights`): in no setting measured "
                f"({runs[0]['machine']}) was a native variant both correct at every step and faster in sync + generate")
    body = []
    for run in runs:
        family = run["rows"][0]["family"]
        body += [f"### {family}: `OMP_NUM_THREADS=1 {run['command']}`", "",
                 f"Run of {run['date']} on {run['machine']} (CPU, 2 cores shared with other jobs; load average "
                 f"{run['load_average']:.1f} at the start; raw: `benchmarks/results/{run['file']}`). Median over the "
                 "timed steps, after one warm-up step.", "", C.table(run["rows"], COLUMNS), ""]
        body += [scale_summary(run["rows"], scale) for scale in dict.fromkeys(row["scale"] for row in run["rows"])]
        body += [""]
    body += [f"Decision: {decision}.", ""]
    if FINDINGS.is_file():
        body += [FINDINGS.read_text().strip(), ""]
    return body


COLUMNS = [("scale", "scale"), ("params_m", "params (M)"), ("variant", "variant"), ("sync_s", "sync s (median)"),
           ("generate_s", "generate s (median)"),
           ("total_s", "sync + generate s (median)"), ("sync_vs_merged", "sync vs merged"),
           ("total_vs_merged", "total vs merged"), ("correct_steps", "steps equal to"), ("reference", "reference"),
           ("changed_steps", "steps whose tokens moved")]


if __name__ == "__main__":
    main()
