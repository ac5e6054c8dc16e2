"""`dopd-vlm eval`: a saved model's greedy accuracy on recipe splits, measured as training does.

    request = eval_request(load_config("run.yaml", overrides, training=False), model="runs/x/final")
    report = evaluate_checkpoint(request)          # on every rank; the same report on each
    print(report.table()); json.dumps(report.to_json())

The model is a checkpoint (a run's `final/`, the teacher, the initial student; a folder or a hub
id) or a PEFT adapter on its base (a LoRA run's `final/`). Everything else comes from the run
config, so the numbers are training evaluation's: the collator of `data.*` (pixel bounds,
chat-template arguments, privileged template, special tokens), the recipe and its answer
extractor, `data.max_eval_samples`, the length cap (`train.eval_max_new_tokens`, else
`rollout.max_new_tokens`), one micro-batch of sequences per `generate` call, the load-time prompt
checks. The accuracy itself is `evaluate.evaluate_accuracy`, sharded over the ranks of a
torchrun launch (each rank holds the whole model).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dopd_vlm import lora, prompt_checks
from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import RunConfig
from dopd_vlm.data.recipes import load_recipe
from dopd_vlm.distributed import init_distributed, world_size
from dopd_vlm.errors import InputError
from dopd_vlm.evaluate import evaluate_accuracy
from dopd_vlm.models import (
    check_weight_files,
    context_length,
    load_model,
    load_processor,
    model_family,
    vision_special_token_ids,
)
from dopd_vlm.train import check_first_samples, eval_batch_size, eval_max_new_tokens, resolve_dtype


@dataclass(frozen=True)
class EvalRequest:
    """What `evaluate_checkpoint` evaluates, every setting resolved (see `eval_request`).

    Attributes:
        cfg: The run config: `data.*` (recipe, `eval_splits` = the splits evaluated,
            `max_eval_samples` = the cap per split), the length cap, `model.dtype`.
        model: The base checkpoint (a folder or a hub id).
        adapter: A PEFT adapter folder put on `model`, or "".
        privileged: Score the privileged view (x + p) instead of the plain one.
        batch_size: Sequences per `generate` call.
        config_path: The YAML the config came from ("" = defaults), for the report.
        base_from_adapter: `model` is the base the adapter names (not given by the user).
    """

    cfg: RunConfig
    model: str
    adapter: str = ""
    privileged: bool = False
    batch_size: int = 0
    config_path: str = ""
    base_from_adapter: bool = False

    @property
    def max_new_tokens(self) -> int:
        return eval_max_new_tokens(self.cfg)


def eval_request(cfg: RunConfig, *, model: str | None = None, adapter: str | None = None, recipe: str | None = None,
                 splits: list[str] | None = None, limit: int | None = None, max_new_tokens: int | None = None,
                 batch_size: int | None = None, privileged: bool = False, config_path: str = "") -> EvalRequest:
    """The command line's request: each flag given overrides the config's setting. Without a config
    file (`config_path` ""), the recipe and the splits must be given. InputError (one line) for a
    missing or impossible setting.

    The base model is `model`, else the base an adapter names (`adapter`, or `model` itself when it
    is an adapter folder), else the config's `model.student`.
    """
    for flag, value, least in (("--limit", limit, 0), ("--max-new-tokens", max_new_tokens, 1),
                               ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    if not config_path and (recipe is None or not splits):
        raise InputError("--recipe and --split are required without --config (a run config gives data.recipe and "
                         "data.eval_splits)")
    if not adapter and model and lora.is_adapter_folder(model):
        model, adapter = None, model
    named = lora.adapter_base(adapter) if adapter else ""  # also: an adapter folder at all, before anything loads
    base = model or named or cfg.model.student
    if not base:
        raise InputError("--model is required (or --adapter, or a --config naming model.student)")
    data = dataclasses.replace(cfg.data, recipe=recipe if recipe is not None else cfg.data.recipe,
                               eval_splits=list(splits) if splits else cfg.data.eval_splits,
                               max_eval_samples=limit if limit is not None else cfg.data.max_eval_samples)
    train = dataclasses.replace(cfg.train, eval_max_new_tokens=max_new_tokens or eval_max_new_tokens(cfg))
    if not data.eval_splits:
        raise InputError("no split to evaluate: give --split (the config's data.eval_splits is empty)")
    cfg = dataclasses.replace(cfg, data=data, train=train)
    return EvalRequest(cfg, base, adapter or "", privileged, batch_size or eval_batch_size(cfg), config_path,
                       base_from_adapter=bool(named) and not model)


@dataclass
class SplitScore:
    """One split's result: `correct` of `total`, of which `unclosed_think` were left inside an open
    think block; `skipped_rows` bad rows were left out (`data.skip_bad_rows`)."""

    split: str
    correct: int
    total: int
    unclosed_think: int
    skipped_rows: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalReport:
    """What `dopd-vlm eval` prints: one `SplitScore` per split and the settings they were measured with."""

    model: str
    adapter: str
    recipe: str
    view: str  # "plain" (x) or "privileged" (x + p)
    settings: dict[str, Any]
    scores: list[SplitScore]

    def to_json(self) -> dict[str, Any]:
        results = [{"split": s.split, "accuracy": s.accuracy, "correct": s.correct, "total": s.total,
                    "unclosed_think": s.unclosed_think, "skipped_rows": s.skipped_rows} for s in self.scores]
        return {"model": self.model, "adapter": self.adapter or None, "recipe": self.recipe, "view": self.view,
                "settings": self.settings, "results": results}

    def table(self) -> str:
        model = f"{self.model} + adapter {self.adapter}" if self.adapter else self.model
        header = ("split", "accuracy", "correct", "total", "unclosed_think")
        rows = [(s.split, f"{s.accuracy:.4f}", str(s.correct), str(s.total), str(s.unclosed_think)) for s in self.scores]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = [f"model: {model}", f"recipe: {self.recipe}   view: {self.view}   greedy, "
                 f"max_new_tokens={self.settings['max_new_tokens']}"]
        lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in (header, *rows)]
        lines.append("settings: " + ", ".join(f"{key}={json.dumps(value)}" for key, value in self.settings.items()
                                              if key != "max_new_tokens"))
        return "\n".join(lines)


def evaluate_checkpoint(request: EvalRequest) -> EvalReport:
    """Load the model and the splits, check every prompt, and score each split (see the module
    docstring). Under a launcher (WORLD_SIZE > 1) the ranks share the samples and every rank
    returns the same report. InputError (one line) for anything unusable, before the model loads."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(request.cfg.train.collective_timeout_s)
    cfg, d = request.cfg, request.cfg.data
    family = base_family(request)
    check_weight_files(request.model)
    processor = load_processor(request.model)
    collator = DualViewCollator.from_config(processor, data=d)
    prompt_checks.check_template(d.privileged_template, collator.specials)
    splits = {split: load_recipe(d.recipe, split, family=family, skip_bad_rows=d.skip_bad_rows,
                                 limit=d.max_eval_samples or None) for split in d.eval_splits}
    view = prompt_checks.View(f"evaluated view ({'x + p' if request.privileged else 'x'})", request.privileged,
                              processor, "--model", context_length(request.model), prompt_checks.counting_key(processor))
    limits = prompt_checks.Limits((view,), request.max_new_tokens, False, d.max_prompt_tokens)
    splits = prompt_checks.check_splits(splits, collator, limits, skip_bad_rows=d.skip_bad_rows)
    check_first_samples(collator, cfg, splits)
    dtype = resolve_dtype(cfg.model.dtype, torch.cuda.is_available())
    model = evaluated_model(request, dtype)
    scores = []
    for split, samples in splits.items():
        result = evaluate_accuracy(model, collator, samples, max_new_tokens=request.max_new_tokens,
                                   batch_size=request.batch_size, privileged=request.privileged,
                                   suppress_token_ids=vision_special_token_ids(collator.tokenizer),
                                   extractor=samples.answer_extractor)
        scores.append(SplitScore(split, result.correct, result.total, result.unclosed_think, len(samples.skipped)))
    return EvalReport(request.model, request.adapter, d.recipe, "privileged" if request.privileged else "plain",
                      settings(request, dtype, collator), scores)


def base_family(request: EvalRequest) -> str:
    """The model family of the base checkpoint; for an adapter's named base, a one-line error that
    says where the name came from."""
    try:
        return model_family(request.model)
    except InputError as err:
        if request.base_from_adapter:
            raise InputError(f"adapter {request.adapter}: its base model {request.model} (base_model_name_or_path "
                             f"in {lora.ADAPTER_CONFIG}) cannot be loaded: {err}; pass --model BASE") from None
        raise


def evaluated_model(request: EvalRequest, dtype: torch.dtype) -> nn.Module:
    """The base model (with the adapter in place, if any) on this rank's device, in eval mode."""
    model = load_model(request.model, dtype=dtype)
    if request.adapter:
        model = lora.load_adapter(model, request.adapter)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def settings(request: EvalRequest, dtype: torch.dtype, collator: DualViewCollator) -> dict[str, Any]:
    """The settings a report was measured with (what makes two numbers comparable)."""
    d = request.cfg.data
    return {
        "max_new_tokens": request.max_new_tokens,
        "batch_size": request.batch_size,
        "limit": d.max_eval_samples,
        "chat_template_kwargs": d.chat_template_kwargs,
        "generation_opens_think": collator.generation_opens_think(),
        "min_pixels": d.min_pixels,
        "max_pixels": d.max_pixels,
        "privileged_template": d.privileged_template,
        "max_privileged_tokens": d.max_privileged_tokens,
        "special_tokens": d.special_tokens,
        "skip_bad_rows": d.skip_bad_rows,
        "max_prompt_tokens": d.max_prompt_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size(),
        "config": request.config_path or None,
    }

