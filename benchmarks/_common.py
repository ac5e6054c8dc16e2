"""Helpers shared by the benchmarks: device/dtype choice, peak memory, subprocess runs, tables.

Every benchmark measures the variants it compares in ONE invocation (side by side on the same
machine state) and reports ratios, because absolute times on a shared CPU drift between runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def device_and_dtype(dtype: str = "auto"):
    """cuda + bfloat16 when a GPU is visible, else cpu + float32 (bf16 math on CPU is emulated)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock timer measures it (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a region above what was allocated when it began.

    CUDA: torch's allocator statistics. CPU: the process's peak resident set size; the kernel's
    high-water mark is reset at the start (``/proc/self/clear_refs``), falling back to
    ``getrusage`` (then the peak since process start) where that is not allowed.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = current_rss()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.hwm = True
            except OSError:
                self.hwm = False
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
        if self.hwm:
            status = Path("/proc/self/status").read_text()
            hwm = next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:"))
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = hwm - self.base


def parser_with_child(doc: str):
    """An argument parser for a benchmark that runs each setting in a child process of itself:
    the hidden --child / --scale flags the parent passes to the child."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scale", help=argparse.SUPPRESS)
    return p


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run a benchmark child process; its last stdout line is a JSON object."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """A child's result: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table: columns are (key, header)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds, NaNs left out (0 spread for one value)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def repo_relative(path: Path) -> str:
    """A model's path as results record it: relative to the repository when inside it, so a
    stored setting extends, and reads the same, from any checkout."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def python() -> str:
    return sys.executable


def write_section(path: Path, section: str, body: list[str]) -> None:
    """Rewrite (or append) the section `## {section}` of a markdown file with `body`; other
    sections are left untouched."""
    import re

    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    content = "\n".join([f"## {section}", "", *body]) + "\n"
    text = pattern.sub(lambda _: content, text) if pattern.search(text) else text.rstrip() + "\n\n" + content
    path.write_text(text)


# The trainer's phases as the benchmarks group them, from its timers (`time/<timer>` in
# metrics.jsonl): rollout (sampling and building the views), score (the no-grad passes and the
# router's log-probs), update (student pass, loss, backward, optimizer step), weight sync (vLLM).
PHASES = {"rollout": ("rollout",), "score": ("score/",), "update": ("student_pass", "loss", "backward", "optimizer"),
          "weight_sync": ("weight_sync",)}


def phase_time(metrics: dict, phase: str) -> float:
    """Seconds of one phase of a step (`PHASES`): the sum of its timers."""
    return sum(v for k, v in metrics.items() if k.startswith(tuple(f"time/{t}" for t in PHASES[phase])))
