"""`dopd-vlm demo`: distil a tiny warmed-up teacher into a tiny student and compare methods.

Steps (each cached, so a second run goes straight to step 2):

1. **Testbed, models and data** (`--testbed`, `DEMO_TESTBEDS`).
   - `arithmetic` (the default) and `cells`, the reasoning testbeds of `dopd_vlm.lab.testbeds`: the
     config `configs/testbed_<name>.yaml` names the recipe (mod-10 chains written in steps; p =
     the first step's value, or the digits of the image's cells) and the warmed-up pair it
     ships in demo_assets/ (their manifests say how they were built and what they score), so
     nothing is trained before distillation.
   - `scenes`: `make_tiny_pair` builds a random-init Qwen2-VL teacher (hidden 96, 3 layers,
     ~0.5 M parameters) and student (hidden 64, 2 layers, ~0.22 M), sharing one tokenizer; the
     `synthetic_scenes` recipe gives 112x112 scenes of coloured shapes, one question each, with
     the labelled bounding boxes as p. The teacher was trained for long with p shown half of
     the time (`dopd_vlm.lab.warmup`; test accuracy 0.43 from the image alone, 0.51 with p); that
     takes ~30 CPU-minutes, so it ships (`demo_assets/qwen2_vl_teacher`, 2 MB) and
     `--rebuild-teacher` reruns the same deterministic warm-up. The student gets 80 steps
     (~30 s, cached): it knows the answer format but not yet the answers (0.175).
2. **Distillation.** Every method runs `dopd-vlm train --config <the testbed's config>` (the
   real trainer, DeepSpeed, one process each) from the same student with the same seed, steps
   and batches; `--jobs` runs go side by side.
3. **Report.** Accuracy (greedy; the answer taken out of the response by the recipe's
   extractor) on the test and out-of-distribution splits for the teacher, the initial student
   and every method; the share of the teacher-student gap each method recovered; wall time.
   Written as `results.md` / `results.json`, and two plots: `accuracy.png` (accuracy over
   steps) and `regimes.png` (DOPD's router shares over steps).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from dopd_vlm.errors import InputError
from dopd_vlm.lab.testbeds import TESTBEDS

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
ASSETS_DIR = REPO / "demo_assets"
SHIPPED_TEACHER = ASSETS_DIR / "qwen2_vl_teacher"
MANIFEST = "warmup_manifest.json"

# Warm-ups run on one CPU thread: the result is then bit-identical on a given machine and torch
# build whatever its core count, and tiny models gain little from more threads (and lose a lot
# when the cores are shared).
WARMUP_THREADS = 1

FAMILY = "qwen2_vl"
RECIPE = "synthetic_scenes"
PAIR_SEED = 0

# --testbed: the synthetic scenes, whose pair this module warms up, or a reasoning testbed of
# dopd_vlm.lab.testbeds, whose config names the pair it ships.
SCENES = "scenes"
DEMO_TESTBEDS = (SCENES, *TESTBEDS)
DEFAULT_TESTBED = "arithmetic"

# What each demo method runs: `dopd-vlm train --config <the testbed's config>` plus these overrides.
DEMO_METHODS: dict[str, list[str]] = {
    "dopd": ["method.name=dopd"],
    "vanilla_opd": ["method.name=vanilla_opd", "method.opd_divergence=topk"],
    "opsd": ["method.name=opsd"],
    "sft": ["method.name=sft"],
}
DEFAULT_METHODS = ("dopd", "vanilla_opd", "opsd", "sft")
LABELS = {
    "dopd": "DOPD",
    "vanilla_opd": "vanilla OPD",
    "opsd": "OPSD",
    "sft": "SFT (reference answers)",
    "gkd": "GKD",
}


def warmup_configs():
    from dopd_vlm.lab.warmup import WarmupConfig

    teacher = WarmupConfig(steps=4000, batch_size=32, lr=1e-3, privileged_prob=0.5, warmup_steps=20, seed=0)
    student = WarmupConfig(steps=80, batch_size=32, lr=1e-3, privileged_prob=0.5, warmup_steps=20, seed=2)
    return teacher, student


@dataclass
class DemoOptions:
    """Everything `run_demo` needs; the CLI maps its flags onto these fields.

    Attributes:
        out: Output folder (runs, results, plots).
        testbed: One of DEMO_TESTBEDS: `scenes` (configs/demo.yaml, its pair warmed up here) or a
            reasoning testbed (configs/testbed_<name>.yaml and the pair it ships).
        cache: Cache of the tiny pair and the warmed-up checkpoints (scenes).
        steps: Distillation steps per method (None: the testbed config's train.steps).
        seed: Trainer seed (data order, rollouts) shared by all methods.
        methods: Names from DEMO_METHODS.
        jobs: Training runs side by side (each uses `threads_per_job` threads).
        eval_every: Evaluate the student every N steps (0 = start and end only).
        eval_samples: Samples per eval split (0 = whole split).
        rebuild_teacher: Rerun the teacher warm-up and rewrite the shipped checkpoint (scenes).
        teacher_warmup_steps / student_warmup_steps: Override the warm-up lengths (scenes, tests);
            a changed teacher warm-up is cached, never shipped.
        student_privileged_prob: Override how often the student's warm-up shows it p (1.0: a
            student that reads p but was never taught to answer without it).
        overrides: Extra `dotted.key=value` config overrides for every method.
        plots: Write the PNG plots.
        progress: Show progress bars.
    """

    out: Path = Path("runs/demo")
    testbed: str = DEFAULT_TESTBED
    cache: Path = Path(".cache/demo")
    steps: int | None = None
    seed: int = 0
    methods: Sequence[str] = DEFAULT_METHODS
    jobs: int = 0
    eval_every: int = 40
    eval_samples: int = 0
    rebuild_teacher: bool = False
    teacher_warmup_steps: int | None = None
    student_warmup_steps: int | None = None
    student_privileged_prob: float | None = None
    overrides: Sequence[str] = ()
    plots: bool = True
    progress: bool = True


@dataclass(frozen=True)
class DemoTestbed:
    """How the demo runs and reports one testbed."""

    config: Path
    title: str  # plot titles
    views: tuple[str, str]  # the teacher's two table rows: plain view, privileged view
    section: str  # the BENCHMARKS.md section with its multi-seed numbers


def demo_testbed(name: str) -> DemoTestbed:
    if name == SCENES:
        return DemoTestbed(DEMO_CONFIG, "synthetic scenes, tiny Qwen2-VL", ("image only", "image + boxes p"),
                           "Learning: DOPD vs baselines on synthetic scenes")
    testbed = TESTBEDS[name]
    return DemoTestbed(testbed.config, f"{testbed.title}, tiny {testbed.family}",
                       (testbed.plain_view, testbed.privileged_view), testbed.section)


def configured_steps(name: str) -> int:
    """The testbed config's train.steps: the demo's default length."""
    from dopd_vlm.config import load_config

    return load_config(demo_testbed(name).config).train.steps


# --------------------------------------------------------------------------------------------
# Warmed-up checkpoints
# --------------------------------------------------------------------------------------------


def pair_sizes():
    """(teacher, student) TinySize of the demo's pair, pinned here rather than taken from the
    package defaults: the shipped teacher was warmed up from exactly these (text head_dim 24 and
    16, the defaults before they became vLLM-compatible), so it keeps matching its spec."""
    from dopd_vlm.lab.tiny import TinySize

    teacher = TinySize(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=192,
                       vision_hidden_size=48, vision_depth=2, vision_num_heads=2, vision_intermediate_size=96,
                       vocab_multiple=64)
    student = TinySize(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       vision_hidden_size=32, vision_depth=2, vision_num_heads=2, vision_intermediate_size=64)
    return teacher, student


def warmup_spec(role: str, cfg) -> dict[str, Any]:
    """Everything a warmed-up checkpoint depends on; the cache key."""
    from dopd_vlm.config import DataConfig
    from dopd_vlm.lab.tiny import BUILDER_VERSION, TINY_TOKENIZER_SEED

    teacher_size, student_size = pair_sizes()
    size = teacher_size if role == "teacher" else student_size
    return {
        "role": role,
        "family": FAMILY,
        "pair_seed": PAIR_SEED,
        "builder_version": BUILDER_VERSION,
        "tokenizer_seed": TINY_TOKENIZER_SEED,
        "size": asdict(size),
        "recipe": RECIPE,
        "privileged_template": DataConfig().privileged_template,
        "warmup": asdict(cfg),
    }


def spec_key(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_matches(path: Path, spec: Mapping[str, Any]) -> bool:
    """Whether `path` holds a complete warm-up of `spec` whose weights are unchanged."""
    manifest = _read_manifest(path)
    weights = path / "model.safetensors"
    return (
        manifest is not None
        and manifest.get("spec") == spec
        and weights.is_file()
        and manifest.get("sha256") == _file_sha256(weights)
    )


def build_warmed(role: str, cfg, base: Path, target: Path, *, eval_samples: int = 200, progress: bool = True) -> dict:
    """Warm up the random-init checkpoint `base` with `cfg`; save it to `target` with a manifest.

    The manifest holds the spec, the weights' sha256, the wall time and the accuracies of the
    result (test split, plain and with p). Written to a temporary folder, then moved into place.
    """
    import torch

    from dopd_vlm.collate import DualViewCollator
    from dopd_vlm.config import DataConfig
    from dopd_vlm.data.recipes import load_recipe
    from dopd_vlm.models import load_model, load_processor
    from dopd_vlm.lab.warmup import warm_up

    spec = warmup_spec(role, cfg)
    processor = load_processor(base)
    model = load_model(base, dtype=torch.float32)
    collator = DualViewCollator.from_config(processor, data=DataConfig())
    train_split = list(load_recipe(RECIPE, "train", family=FAMILY))
    threads = torch.get_num_threads()
    torch.set_num_threads(WARMUP_THREADS)  # float reductions depend on the thread count
    try:
        started = time.perf_counter()
        losses = warm_up(model, collator, train_split, cfg, desc=f"warm-up {role}", progress=progress)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    test = load_recipe(RECIPE, "test", family=FAMILY, limit=eval_samples or None)
    accuracy = {
        "test": _accuracy(model, collator, test, privileged=False),
        "test_privileged": _accuracy(model, collator, test, privileged=True),
    }
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    manifest = {
        "spec": spec,
        "sha256": _file_sha256(tmp / "model.safetensors"),
        "warmup_seconds": round(seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "accuracy": accuracy,
        "torch": torch.__version__,
        "threads": WARMUP_THREADS,
        "rebuild": "dopd-vlm demo --rebuild-teacher" if role == "teacher" else "automatic (dopd-vlm demo)",
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return manifest


def _accuracy(model, collator, samples, *, privileged: bool, max_new_tokens: int = 4) -> float:
    from dopd_vlm.evaluate import evaluate_accuracy
    from dopd_vlm.models import vision_special_token_ids

    return evaluate_accuracy(
        model, collator, samples, max_new_tokens=max_new_tokens, batch_size=32, privileged=privileged,
        suppress_token_ids=vision_special_token_ids(collator.tokenizer), extractor=samples.answer_extractor,
    ).accuracy


def prepare_models(options: DemoOptions, log=print) -> dict[str, Path]:
    """The warmed-up teacher and student: a reasoning testbed's shipped pair; for the scenes,
    shipped, cached, or built now (in that order)."""
    from dopd_vlm.lab.tiny import make_tiny_pair

    if options.testbed != SCENES:
        return shipped_testbed_pair(options, log)

    teacher_cfg, student_cfg = warmup_configs()
    if options.teacher_warmup_steps is not None:
        teacher_cfg = replace(teacher_cfg, steps=options.teacher_warmup_steps)
    if options.student_warmup_steps is not None:
        student_cfg = replace(student_cfg, steps=options.student_warmup_steps)
    if options.student_privileged_prob is not None:
        student_cfg = replace(student_cfg, privileged_prob=options.student_privileged_prob)
    shipped_cfg, _ = warmup_configs()
    cache = Path(options.cache)
    teacher_size, student_size = pair_sizes()
    pair = make_tiny_pair(FAMILY, cache / "tiny" / FAMILY, seed=PAIR_SEED, teacher=teacher_size, student=student_size)

    paths = {}
    for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        spec = warmup_spec(role, cfg)
        cached = cache / f"{role}-{spec_key(spec)}"
        is_shipped = role == "teacher" and cfg == shipped_cfg
        if is_shipped and not options.rebuild_teacher and checkpoint_matches(SHIPPED_TEACHER, spec):
            log(f"teacher: shipped warm-up {_display(SHIPPED_TEACHER)}")
            paths[role] = SHIPPED_TEACHER
            continue
        if not (is_shipped and options.rebuild_teacher) and checkpoint_matches(cached, spec):
            log(f"{role}: cached warm-up {_display(cached)}")
            paths[role] = cached
            continue
        log(f"{role}: warming up ({cfg.steps} steps of {cfg.batch_size} samples, p shown "
            f"{cfg.privileged_prob:.0%} of the time) -> {_display(cached)}")
        manifest = build_warmed(role, cfg, pair[role], cached, progress=options.progress)
        log(f"{role}: warmed up in {manifest['warmup_seconds']:.0f} s, test accuracy "
            f"{manifest['accuracy']['test']:.2f} plain / {manifest['accuracy']['test_privileged']:.2f} with p")
        if is_shipped and options.rebuild_teacher:
            shutil.rmtree(SHIPPED_TEACHER, ignore_errors=True)
            shutil.copytree(cached, SHIPPED_TEACHER)
            log(f"teacher: rewrote the shipped checkpoint {_display(SHIPPED_TEACHER)}")
        paths[role] = cached
    return paths


def shipped_testbed_pair(options: DemoOptions, log=print) -> dict[str, Path]:
    warmup_options = (options.rebuild_teacher, options.teacher_warmup_steps, options.student_warmup_steps,
                      options.student_privileged_prob)
    if any(value not in (None, False) for value in warmup_options):
        raise InputError(f"the warm-up options are for --testbed {SCENES}; testbed {options.testbed!r} ships its "
                         "pair (benchmarks/testbed_learning.py --rebuild warms one up)")
    pair = TESTBEDS[options.testbed].shipped_pair()
    for role, path in pair.items():
        if not (path / "model.safetensors").is_file():
            raise InputError(f"{_display(path)}: the {role} testbed {options.testbed!r} ships is missing")
        log(f"{role}: shipped warm-up {_display(path)}")
    return pair


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Distillation runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    out: Path
    command: list[str]
    wall_seconds: float = math.nan
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def baseline(self) -> dict[str, Any]:
        return self.rows[0] if self.rows else {}

    @property
    def final(self) -> dict[str, Any]:
        evaluated = [r for r in self.rows if r["step"] > 0 and "student/test" in r]
        return evaluated[-1] if evaluated else {}


def train_command(method: str, models: Mapping[str, Path], out: Path, options: DemoOptions) -> list[str]:
    """The `dopd-vlm train` command line of one demo run."""
    if method not in DEMO_METHODS:
        raise ValueError(f"unknown demo method {method!r} (known: {', '.join(DEMO_METHODS)})")
    overrides = [
        f"model.teacher={Path(models['teacher']).resolve()}",
        f"model.student={Path(models['student']).resolve()}",
        *DEMO_METHODS[method],
        f"train.steps={options.steps}",
        f"train.seed={options.seed}",
        f"train.eval_every={options.eval_every}",
        f"data.max_eval_samples={options.eval_samples}",
        "data.eval_splits=[test, ood]",
        "train.teacher_eval=gathered",  # the table's teacher rows (a testbed config may skip them)
        f"train.output_dir={Path(out).resolve()}",
        *options.overrides,
    ]
    config = demo_testbed(options.testbed).config
    return [sys.executable, "-m", "dopd_vlm", "train", "--config", str(config), *overrides]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup CPU quota (a container's
    `--cpus`, a pod's limit), which `os.cpu_count()` does not see."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cpus
    return cpus if quota == "max" else max(1, min(cpus, int(quota) // int(period)))


def _jobs(options: DemoOptions) -> int:
    return max(1, options.jobs or min(len(options.methods), available_cpus()))


def threads_per_job(jobs: int) -> int:
    """OMP threads of each training run: OMP_NUM_THREADS when the user set it, else the CPUs
    shared out (more threads than cores makes tiny models many times slower, not faster)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, available_cpus() // jobs))


def run_methods(models: Mapping[str, Path], options: DemoOptions) -> dict[str, RunResult]:
    """Run every method's training, `jobs` at a time, with one progress bar per method."""
    from tqdm.auto import tqdm

    jobs = _jobs(options)
    threads = threads_per_job(jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    results = {m: RunResult(m, Path(options.out) / m, []) for m in options.methods}
    bars = {
        m: tqdm(total=options.steps, desc=f"{m:<12}", unit="step", position=i, leave=True, disable=not options.progress)
        for i, m in enumerate(options.methods)
    }
    pending = list(options.methods)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    failed: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                method = pending.pop(0)
                result = results[method]
                shutil.rmtree(result.out, ignore_errors=True)
                result.out.mkdir(parents=True)
                result.command = train_command(method, models, result.out, options)
                log_file = open(result.out / "train.log", "w")
                process = subprocess.Popen(result.command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                bars[method].reset(total=options.steps)  # the bar's clock starts with its run
                running[method] = (process, time.perf_counter(), log_file)
            time.sleep(0.5)
            for method, (process, started, log_file) in list(running.items()):
                rows = _read_rows(results[method].out / "metrics.jsonl")
                done = max((r["step"] for r in rows), default=0)
                bar = bars[method]
                bar.update(done - bar.n)
                if rows and "student/test" in rows[-1]:
                    bar.set_postfix(test=f"{rows[-1]['student/test']:.2f}", ood=f"{rows[-1].get('student/ood', math.nan):.2f}")
                if process.poll() is not None:
                    log_file.close()
                    bar.refresh()
                    bar.disable = True  # freeze the bar (and its rate) at the run's end
                    results[method].wall_seconds = time.perf_counter() - started
                    results[method].rows = rows
                    del running[method]
                    if process.returncode != 0:
                        failed.append(method)
    finally:
        for process, _, log_file in running.values():
            process.kill()
            log_file.close()
        for bar in bars.values():
            bar.close()
    if failed:
        tails = "\n".join(f"--- {m}: {results[m].out / 'train.log'}\n{_tail(results[m].out / 'train.log')}" for m in failed)
        raise RuntimeError(f"training failed for {', '.join(failed)}\n{tails}")
    return results


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# Results: table, JSON, plots
# --------------------------------------------------------------------------------------------


def gap_recovered(method: float, student: float, teacher: float) -> float:
    """(method - initial student) / (teacher - initial student); NaN when there is no gap."""
    gap = teacher - student
    return (method - student) / gap if gap > 1e-9 else math.nan


def summarize_runs(results: Mapping[str, RunResult], splits: Sequence[str] = ("test", "ood"),
                   views: tuple[str, str] = ("image only", "image + boxes p")) -> dict[str, Any]:
    """Rows of the results table: teacher (plain and with p: `views`), initial student, every method."""
    first = next(iter(results.values())).baseline
    teacher = {s: first.get(f"teacher/{s}", math.nan) for s in splits}
    teacher_p = {s: first.get(f"teacher_privileged/{s}", math.nan) for s in splits}
    student = {s: first.get(f"student/{s}", math.nan) for s in splits}
    rows = [
        {"name": f"teacher ({views[0]})", "accuracy": teacher},
        {"name": f"teacher ({views[1]})", "accuracy": teacher_p},
        {"name": "student, initial", "accuracy": student, "gap": {s: 0.0 for s in splits}},
    ]
    for method, result in results.items():
        final = result.final
        accuracy = {s: final.get(f"student/{s}", math.nan) for s in splits}
        rows.append({
            "name": LABELS.get(method, method),
            "method": method,
            "accuracy": accuracy,
            "gap": {s: gap_recovered(accuracy[s], student[s], teacher[s]) for s in splits},
            "wall_seconds": result.wall_seconds,
        })
    return {"splits": list(splits), "rows": rows}


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (also readable as plain text)."""
    splits = summary["splits"]
    head = ["model"] + [f"{s} acc" for s in splits] + [f"{s} gap recovered" for s in splits] + ["wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in summary["rows"]:
        cells = [row["name"]]
        cells += [_fmt(row["accuracy"].get(s), "{:.3f}") for s in splits]
        cells += [_fmt(row.get("gap", {}).get(s), "{:.0%}") for s in splits]
        cells.append(_fmt(row.get("wall_seconds"), "{:.0f} s"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return pattern.format(value)


def write_plots(results: Mapping[str, RunResult], out: Path, testbed: DemoTestbed,
                splits: Sequence[str] = ("test", "ood")) -> list[Path]:
    """accuracy.png (student accuracy over steps per method) and regimes.png (DOPD's shares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    baseline = next(iter(results.values())).baseline
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for method, result in results.items():
            points = [(r["step"], r[f"student/{split}"]) for r in result.rows if f"student/{split}" in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=LABELS.get(method, method))
        if f"teacher/{split}" in baseline:
            ax.axhline(baseline[f"teacher/{split}"], color="black", linestyle="--", linewidth=1, label=f"teacher ({testbed.views[0]})")
        if f"student/{split}" in baseline:
            ax.axhline(baseline[f"student/{split}"], color="gray", linestyle=":", linewidth=1, label="initial student")
        ax.set_title(f"{split} split")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("exact-match accuracy (greedy)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Student accuracy during distillation ({testbed.title})")
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    dopd = results.get("dopd")
    if dopd is not None:
        from dopd_vlm.router import REGIME_NAMES

        rows = [r for r in dopd.rows if r["step"] > 0 and "share/LH" in r]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        if rows:
            steps = [r["step"] for r in rows]
            window = max(1, len(rows) // 25)
            for name in REGIME_NAMES:
                ax.plot(steps, _smooth([r[f"share/{name}"] for r in rows], window), label=name)
        ax.set_ylabel("share of response tokens")
        ax.set_xlabel(f"optimizer step (moving mean over {window if rows else 1} steps)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(title="DOPD regime")
        ax.set_title("DOPD router: LH/HT distil from the teacher, LL/HS from the privileged student", fontsize=9)
        fig.tight_layout()
        path = out / "regimes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


# --------------------------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------------------------


def run_demo(options: DemoOptions, log=print) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; returns the summary also written to results.json."""
    unknown = [m for m in options.methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {', '.join(unknown)} (known: {', '.join(DEMO_METHODS)})")
    if options.testbed not in DEMO_TESTBEDS:
        raise ValueError(f"unknown demo testbed {options.testbed!r} (known: {', '.join(DEMO_TESTBEDS)})")
    testbed = demo_testbed(options.testbed)
    options = replace(options, steps=options.steps or configured_steps(options.testbed))
    started = time.perf_counter()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    models = prepare_models(options, log=log)
    prepared = time.perf_counter() - started
    log(f"{testbed.title}: distilling with {', '.join(options.methods)}: {options.steps} steps each, seed {options.seed}, "
        f"{_jobs(options)} run(s) at a time")
    results = run_methods(models, options)
    summary = summarize_runs(results, views=testbed.views)
    summary.update(
        testbed=options.testbed, steps=options.steps, seed=options.seed, methods=list(options.methods),
        models={k: str(v) for k, v in models.items()},
        commands={m: r.command[1:] for m, r in results.items()},
        prepare_seconds=round(prepared, 1), total_seconds=round(time.perf_counter() - started, 1),
    )
    table = format_table(summary)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    plots = write_plots(results, out, testbed) if options.plots else []
    summary["plots"] = [str(p) for p in plots]
    log("")
    log(table)
    log("")
    log(f"gap recovered = (method - initial student) / (teacher {testbed.views[0]} - initial student), same split")
    log(f"multi-seed numbers, and what they say of DOPD on this testbed: BENCHMARKS.md, section '{testbed.section}'")
    log(f"results: {_display(out / 'results.md')}, {_display(out / 'results.json')}"
        + (f"; plots: {', '.join(_display(p) for p in plots)}" if plots else ""))
    log(f"total wall time {summary['total_seconds']:.0f} s (models ready after {prepared:.0f} s)")
    return summary


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
