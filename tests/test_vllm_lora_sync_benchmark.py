"""benchmarks/vllm_lora_sync.py: the rule that picks merged weights or vLLM's LoRA, and its summary."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vllm_lora_sync as bench  # noqa: E402


def row(variant: str, total_vs_merged: float, correct: int, family: str = "qwen3", scale: str = "tiny",
        sync_s: float = 0.1, generate_s: float = 1.0) -> dict:
    return dict(family=family, scale=scale, variant=variant, params_m=1.0, prompts=4, new_tokens=8, steps=3,
                sync_s=sync_s, generate_s=generate_s, total_s=sync_s + generate_s, total_vs_merged=total_vs_merged,
                sync_vs_merged=1.0, correct_steps=correct, changed_steps=3)


def test_native_is_chosen_only_when_correct_at_every_step_and_faster_in_every_setting():
    merged = row("merged", 1.0, 3)
    assert bench.native_wins([merged, row("native_inplace", 0.8, 3)])
    # faster but wrong at one step (e.g. a stale adapter served) does not count
    assert not bench.native_wins([merged, row("native_inplace", 0.8, 2)])
    # the stale variant is never a candidate, however fast
    assert not bench.native_wins([merged, row(bench.STALE_VARIANT, 0.5, 3)])
    # correct and faster at one scale only: merged is kept
    other = [row("merged", 1.0, 3, scale="75m"), row("native_new_id", 1.2, 3, scale="75m")]
    assert not bench.native_wins([merged, row("native_new_id", 0.9, 3), *other])


def test_break_even_is_the_token_count_where_the_saved_sync_pays_for_the_slower_generation():
    merged, native = row("merged", 1.0, 3, sync_s=0.5), row("native_inplace", 1.2, 3, sync_s=0.1, generate_s=2.0)
    # 32 tokens generated; 0.4 s saved against 1.0 s extra: native wins below 32 * 0.4 = 12.8 tokens
    assert "below ≈ 13 generated tokens per sync (here 32)" in bench.break_even(merged, native)
    assert bench.break_even(merged, row("native_inplace", 1.2, 3, sync_s=0.6)) == ""  # no sync saved
