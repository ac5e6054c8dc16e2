"""Look inside DOPD: one batch routed token by token, and the metrics of finished runs.

The notebooks in ``notebooks/`` are built on these helpers. They compose the public pieces the
trainer uses (collate -> scoring -> router -> methods) rather than re-implementing any of them:

* :func:`score_and_route` scores sampled responses under the three views (student x,
  privileged student x+p, teacher x+p) and routes every response token, as one optimizer step
  with a single micro-batch on a single rank does (``step.dopd_step`` computes the thresholds
  over all micro-batches of a step and all ranks instead).
* :class:`RoutedBatch` keeps the per-token log-probs, regimes and hidden states, and answers
  the explorer's questions: a per-token table, the models' top alternatives at a token, and
  the :class:`~dopd_vlm.methods.LossInputs` to evaluate any method's per-token loss.
* :func:`regime_html` and :func:`draw_boxes` are presentation: the response coloured by
  regime, and the privileged boxes drawn on the image.
* :func:`read_run` / :func:`find_runs` read runs' ``metrics.jsonl`` (and ``config.json``) into
  :class:`RunMetrics`.

Nothing here trains or changes a model; everything runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torch import nn

from dopd_vlm.collate import DualViewCollator, ModelView, ScoringViews, check_shared_vocab
from dopd_vlm.data.schema import Sample
from dopd_vlm.methods import LossInputs
from dopd_vlm.models import device_of, head_rows
from dopd_vlm.router import REGIME_NAMES, Routing, route
from dopd_vlm.scoring import Head, ResponseTokens, output_head, response_hidden_states, token_logprobs

# Background colours of the four regimes in `regime_html` (and the notebooks' plots).
REGIME_COLOURS = {
    "LH": "#b7e4c7",  # low gap, confident: teacher, top-K reverse KL, beta_l
    "LL": "#dee2e6",  # low gap, unsure: privileged student, top-K reverse KL, beta_w
    "HT": "#ffb4a2",  # high gap, teacher ahead: teacher, full-vocabulary JS, weight 1
    "HS": "#a9d6f5",  # high gap, privileged student ahead: privileged student, top-K rKL, beta_l
}
REGIME_MEANINGS = {
    "LH": "low gap, both confident: learn from the teacher (top-K rKL, beta_l)",
    "LL": "low gap, both unsure: learn from the privileged self (top-K rKL, beta_w)",
    "HT": "high gap, teacher ahead: learn from the teacher (full JS, weight 1)",
    "HS": "high gap, privileged self ahead: learn from the privileged self (top-K rKL, beta_l)",
}
VIEWS = ("student", "privileged_student", "teacher")


# --------------------------------------------------------------------------------------------
# One batch, scored under the three views and routed
# --------------------------------------------------------------------------------------------


@dataclass
class RoutedBatch:
    """Sampled responses scored under the three views, one row per valid response token.

    Rows are the N valid response tokens in row-major order (sequence, then position), as in
    :class:`~dopd_vlm.scoring.ResponseTokens`. Log-probs are float32 on the CPU; hidden states
    stay on the student's device. ``routing.regimes`` holds one code per row (0..3, the index
    into ``REGIME_NAMES``); ``routing.thresholds`` the batch thresholds Ā, q̄T, q̄P.
    """

    samples: list[Sample]
    views: ScoringViews
    tokens: ResponseTokens
    positions: torch.Tensor  # [N] index n of the token within its response
    student_logprobs: torch.Tensor  # [N] log π_S(y_n | x, y<n)
    privileged_logprobs: torch.Tensor  # [N] log π_S(y_n | x, p, y<n)
    teacher_logprobs: torch.Tensor  # [N] log π_T(y_n | x, p, y<n) (x only if teacher_privileged=False)
    student_hidden: torch.Tensor  # [N, H_S]
    privileged_hidden: torch.Tensor  # [N, H_S]
    teacher_hidden: torch.Tensor  # [N, H_T]
    student_head: Head
    teacher_head: Head
    routing: Routing
    vocab_size: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.token_ids.shape[0])

    @property
    def gap(self) -> torch.Tensor:
        """A = |lT − lP| per token (float64), the router's privileged advantage gap."""
        return (self.teacher_logprobs.double() - self.privileged_logprobs.double()).abs()

    @property
    def regime_names(self) -> list[str]:
        return [REGIME_NAMES[code] for code in self.routing.regimes.tolist()]

    @property
    def shares(self) -> dict[str, float]:
        """Share of this batch's tokens in each regime, by name."""
        return self.routing.shares

    def sequence(self, b: int) -> torch.Tensor:
        """Row indices of sequence b's tokens, in response order."""
        return (self.tokens.seq_index.cpu() == b).nonzero(as_tuple=True)[0]

    def highest_gap(self, n: int) -> torch.Tensor:
        """Row indices of the n tokens with the largest A, largest first (ties: earlier first)."""
        order = torch.sort(self.gap, descending=True, stable=True).indices
        return order[:n]

    def table(self, tokenizer: Any) -> list[dict[str, Any]]:
        """One dict per token: seq, pos, token (decoded), regime, A, lT, lP, lS, qT, qP."""
        text = token_texts(tokenizer, self.tokens.token_ids)
        gap = self.gap.tolist()
        names = self.regime_names
        seq, pos = self.tokens.seq_index.tolist(), self.positions.tolist()
        lt, lp, ls = (x.tolist() for x in (self.teacher_logprobs, self.privileged_logprobs, self.student_logprobs))
        return [
            {
                "seq": seq[i], "pos": pos[i], "token": text[i], "regime": names[i], "A": gap[i],
                "lT": lt[i], "lP": lp[i], "lS": ls[i], "qT": math.exp(lt[i]), "qP": math.exp(lp[i]),
            }
            for i in range(self.num_tokens)
        ]

    @torch.no_grad()
    def top_alternatives(self, view: str, rows: torch.Tensor | Sequence[int], k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [n, k], token ids [n, k]) of the k likeliest next tokens under one view.

        ``view`` is "student", "privileged_student" or "teacher"; ``rows`` indexes tokens
        (e.g. ``highest_gap(5)``). Probabilities are over the common vocabulary, temperature 1.
        """
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        hidden = {"student": self.student_hidden, "privileged_student": self.privileged_hidden,
                  "teacher": self.teacher_hidden}[view]
        head = self.teacher_head if view == "teacher" else self.student_head
        rows = torch.as_tensor(rows, dtype=torch.long, device=hidden.device)
        probs = head(hidden[rows]).float().softmax(dim=-1)
        top = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return top.values.cpu(), top.indices.cpu()

    def loss_inputs(self) -> LossInputs:
        """The batch as `methods.compute_loss` takes it, so any method's per-token loss can be
        evaluated on exactly these tokens (under ``torch.no_grad()``; nothing is trained)."""
        return LossInputs(
            tokens=self.tokens.to(self.student_hidden.device),
            student_hidden=self.student_hidden,
            student_head=self.student_head,
            privileged_hidden=self.privileged_hidden,
            teacher_hidden=self.teacher_hidden,
            teacher_head=self.teacher_head,
            regimes=self.routing.regimes.to(self.student_hidden.device),
        )


def _hidden(model: nn.Module, view: ModelView, response_mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    on = device_of(model)
    return response_hidden_states(model, view.to(on), response_mask.to(on)).to(device)


@torch.no_grad()
def score_and_route(
    student: nn.Module,
    teacher: nn.Module,
    collator: DualViewCollator,
    samples: Sequence[Sample],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    trim: float = 0.05,
    normalize: str = "none",
    teacher_privileged: bool = True,
    chunk_size: int = 1024,
) -> RoutedBatch:
    """Score `samples[b]` + response row b under the three views and route every token.

    ``response_ids``/``response_mask`` are what `rollout.sample_responses` returns for
    ``samples`` (or any responses, e.g. reference answers). The passes are the trainer's:
    `DualViewCollator.scoring_views` -> `scoring.response_hidden_states` -> `scoring.output_head`
    -> `scoring.token_logprobs`, then `router.route` with ``trim``/``normalize`` (the
    ``method.trim`` / ``method.normalize`` config keys) over this batch's tokens. The tokenizers
    are checked as at training start (`collate.check_shared_vocab`).
    """
    samples = list(samples)
    vocab_size = check_shared_vocab(collator.teacher_processor, collator.processor, head_rows(teacher), head_rows(student))
    views = collator.scoring_views(samples, response_ids, response_mask, teacher_privileged=teacher_privileged)
    tokens = ResponseTokens.from_mask(views.response_ids, views.response_mask)
    positions = views.response_mask.nonzero(as_tuple=True)[1]
    device = device_of(student)
    ids = tokens.token_ids.to(device)
    student_head, teacher_head = output_head(student, vocab_size), output_head(teacher, vocab_size)

    hidden = {
        "student": _hidden(student, views.student, views.response_mask, device),
        "privileged_student": _hidden(student, views.privileged_student, views.response_mask, device),
        "teacher": _hidden(teacher, views.teacher, views.response_mask, device),
    }
    logprobs = {
        name: token_logprobs(h, teacher_head if name == "teacher" else student_head, ids, chunk_size).cpu()
        for name, h in hidden.items()
    }
    every_token = torch.ones_like(tokens.token_ids, dtype=torch.bool)
    routing = route(logprobs["teacher"], logprobs["privileged_student"], every_token, trim=trim, normalize=normalize)
    return RoutedBatch(
        samples=samples,
        views=views,
        tokens=tokens,
        positions=positions,
        student_logprobs=logprobs["student"],
        privileged_logprobs=logprobs["privileged_student"],
        teacher_logprobs=logprobs["teacher"],
        student_hidden=hidden["student"],
        privileged_hidden=hidden["privileged_student"],
        teacher_hidden=hidden["teacher"],
        student_head=student_head,
        teacher_head=teacher_head,
        routing=routing,
        vocab_size=vocab_size,
    )


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def token_texts(tokenizer: Any, token_ids: Iterable[int] | torch.Tensor) -> list[str]:
    """Each token id decoded on its own (special tokens kept), for display."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def _visible(text: str) -> str:
    """Whitespace and control characters made visible (a random model samples plenty)."""
    marks = {"\n": "⏎", "\t": "⇥"}
    shown = "".join(marks.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return shown or "∅"


def regime_legend_html() -> str:
    """The four regime colours with their meaning, as one HTML line."""
    items = "".join(
        f'<span style="background:{REGIME_COLOURS[name]};padding:1px 6px;margin-right:8px;'
        f'border-radius:3px" title="{html.escape(REGIME_MEANINGS[name])}"><b>{name}</b></span>'
        for name in REGIME_NAMES
    )
    return f'<div style="margin:4px 0">{items}</div>'


def regime_html(batch: RoutedBatch, tokenizer: Any, sequences: Sequence[int] | None = None) -> str:
    """HTML: each response printed token by token on the background colour of its regime.

    Hovering a token shows its regime, A, qT and qP. ``sequences`` picks rows (default all).
    """
    text = token_texts(tokenizer, batch.tokens.token_ids)
    gap, names = batch.gap.tolist(), batch.regime_names
    qt, qp = batch.teacher_logprobs.exp().tolist(), batch.privileged_logprobs.exp().tolist()
    lines = [regime_legend_html()]
    for b in range(batch.tokens.num_sequences) if sequences is None else sequences:
        spans = []
        for i in batch.sequence(b).tolist():
            tip = f"{names[i]}  A={gap[i]:.3g}  qT={qt[i]:.3g}  qP={qp[i]:.3g}"
            spans.append(
                f'<span style="background:{REGIME_COLOURS[names[i]]};padding:1px 0;border-right:1px solid #fff" '
                f'title="{html.escape(tip)}">{html.escape(_visible(text[i]))}</span>'
            )
        sample_id = html.escape(batch.samples[b].id)
        lines.append(
            f'<div style="font-family:monospace;white-space:pre-wrap;margin:2px 0">'
            f'<span style="color:#888">[{b}] {sample_id}: </span>{"".join(spans)}</div>'
        )
    return "\n".join(lines)


def draw_boxes(image: Image.Image, objects: Sequence[Mapping[str, Any]], *, scale: int = 3) -> Image.Image:
    """A copy of ``image``, enlarged ``scale`` times, with each object's box and label drawn.

    ``objects`` are mappings with a pixel ``box`` [x1, y1, x2, y2] (x2/y2 exclusive) and a
    ``label`` or ``color`` + ``shape`` (the synthetic scenes' ``sample.meta["objects"]``).
    """
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for obj in objects:
        x1, y1, x2, y2 = (int(v) * scale for v in obj["box"])
        label = obj.get("label") or " ".join(str(obj[k]) for k in ("color", "shape") if obj.get(k))
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=(0, 0, 0), width=2)
        if label:
            left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 1), label)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(255, 255, 255))
            draw.text((x1 + 2, y1 + 1), label, fill=(0, 0, 0))
    return out


# --------------------------------------------------------------------------------------------
# Runs: metrics.jsonl
# --------------------------------------------------------------------------------------------

METRICS_FILENAME = "metrics.jsonl"


@dataclass
class RunMetrics:
    """One run's metrics.jsonl, one dict per line, plus its config.json ({} if absent).

    The step-0 line holds the baseline accuracies (``student/<split>``, ``teacher/<split>``,
    ``teacher_privileged/<split>``); later lines the per-step training metrics and, at eval
    steps, ``student/<split>``. A resumed run rewrites steps: the last line written for a step wins.
    """

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        method = self.config.get("method", {})
        name = method.get("name", "")
        ablation = method.get("ablation", "none")
        return f"{name} ({ablation})" if ablation not in ("none", "") else name

    @property
    def baseline(self) -> dict[str, Any]:
        """The step-0 line (initial student, teacher and privileged-teacher accuracies)."""
        return next((r for r in self.records if r.get("step") == 0), {})

    def keys(self) -> list[str]:
        return sorted({k for r in self.records for k in r} - {"step"})

    def splits(self) -> list[str]:
        """Evaluation splits, from the ``student/<split>`` keys."""
        return sorted(k.split("/", 1)[1] for k in self.keys() if k.startswith("student/"))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every line that has ``key``, by step."""
        by_step: dict[int, float] = {}
        for record in self.records:
            if key in record and record[key] is not None:
                by_step[int(record["step"])] = float(record[key])
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def last(self, key: str, default: float | None = None) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else default


def read_run(path: str | os.PathLike, name: str | None = None) -> RunMetrics:
    """A run directory (or its metrics.jsonl). Unparsable lines (a run still writing its last
    line) are skipped."""
    path = Path(path)
    run_dir = path.parent if path.name == METRICS_FILENAME else path
    metrics = run_dir / METRICS_FILENAME
    if not metrics.is_file():
        raise FileNotFoundError(f"no {METRICS_FILENAME} in {run_dir}")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError:
        config = {}
    return RunMetrics(name=name or run_dir.name, path=run_dir, records=records, config=config)


def find_runs(*paths: str | os.PathLike) -> list[RunMetrics]:
    """Every run under ``paths``: a run directory, its metrics.jsonl, or a folder searched
    recursively for metrics.jsonl files. Runs are named by their path below the folder given."""
    runs: list[RunMetrics] = []
    for given in map(Path, paths):
        if given.is_file() or (given / METRICS_FILENAME).is_file():
            runs.append(read_run(given))
            continue
        found = sorted(given.rglob(METRICS_FILENAME)) if given.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no {METRICS_FILENAME} under {given}")
        runs.extend(read_run(f, name=f.parent.relative_to(given).as_posix()) for f in found)
    return runs


__all__ = [
    "REGIME_COLOURS",
    "REGIME_MEANINGS",
    "RoutedBatch",
    "RunMetrics",
    "draw_boxes",
    "find_runs",
    "read_run",
    "regime_html",
    "regime_legend_html",
    "score_and_route",
    "token_texts",
]
