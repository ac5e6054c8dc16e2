"""The run folder through the command line (dopd_vlm/run_folder.py, dopd_vlm/preemption.py): one
run owns it (a lock, taken over from a crashed run), an earlier run in it is never lost (refused
unless --resume or --overwrite), every write failing into one line (a real full or read-only
filesystem: a tmpfs the test mounts, as root; and the errors torch and safetensors really raise,
injected through the `after_write` hook point, `dopd_vlm.hooks`), and SIGTERM/SIGUSR1 preemption, after which
--resume ends with the weights of an uninterrupted run, on 1 and 2 ranks.

Runs that need no concurrency share one process (tests/helpers/cli_driver.py); the lock and
signal flows start real `python -m dopd_vlm train` and `torchrun` processes side by side.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import REPO, write_config

CLI_DRIVER = REPO / "tests" / "helpers" / "cli_driver.py"
ERROR, PREEMPTED = "dopd-vlm train: error: ", "dopd-vlm train: preempted: "
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
STEPS = 5  # room for two preemptions (each stops at the end of the step after the signal) before the last step


def run_config(root: Path, pairs: dict, **train) -> Path:
    return write_config(root / "c.yaml", pairs, data={"eval_splits": []},
                        train={"steps": STEPS, "save_every": 1, "collective_timeout_s": 120, **train})


def train_command(config: Path, out: Path, *args: str, nproc: int = 1) -> list[str]:
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    return [*launcher, "-m", "dopd_vlm", "train", "--config", str(config), f"train.output_dir={out}", *args]


def run_cases(root: Path, cases: dict, nproc: int = 1, name: str = "cases") -> list[dict]:
    """tests/helpers/cli_driver.py over `cases` in one process (per rank); every rank's results."""
    spec, result = root / f"{name}.json", root / f"{name}_result.json"
    spec.write_text(json.dumps(cases))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(CLI_DRIVER), str(spec), str(result)], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(Path(f"{result}{'' if r == 0 else f'.rank{r}'}").read_text()) for r in range(nproc)]


def one_line(stderr: str, prefix: str = ERROR) -> str:
    """The run's one line (with `prefix`); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-4000:]
    return lines[0].removeprefix(prefix)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def pointer(run: Path) -> str | None:
    path = run / "checkpoints" / "latest_complete"
    return path.read_text() if path.is_file() else None


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def fabricate_earlier_run(run: Path) -> None:
    """What a run stopped near step 9 leaves behind, and a file of the user's."""
    (run / "checkpoints" / "step_8").mkdir(parents=True)
    (run / "checkpoints" / "step_8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer state")
    (run / "checkpoints" / "latest_complete").write_text("step_8")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10)))
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"events")
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("the user's own file")


def holder(**changes) -> dict:
    from dopd_vlm.run_folder import Holder

    me = Holder.this_process().__dict__
    return {**me, "command": "dopd-vlm train --config other.yaml", **changes}


def write_lock(run: Path, age_s: float = 0.0, **changes) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / "run.lock"
    lock.write_text(json.dumps(holder(**changes)))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the folder is owned: refused before any model loads ---------------------------------------------


def test_a_folder_in_use_or_holding_an_earlier_run_is_refused_in_one_line(tmp_path, tiny_pairs):
    config = run_config(tmp_path, tiny_pairs)
    runs = tmp_path / "runs"
    bad_deepspeed = f"train.deepspeed={tmp_path / 'missing_ds.json'}"  # fails right after the folder is claimed
    live = holder()
    write_lock(runs / "in_use_here")
    write_lock(runs / "in_use_elsewhere", host="node-b", machine="other", pid=4242)
    stale_here = write_lock(runs / "stale_here", pid=ended_pid())
    stale_elsewhere = write_lock(runs / "stale_elsewhere", host="node-b", machine="other", pid=4242, age_s=3600)
    for case in ("earlier_run", "overwrite_but_set_up_fails", "resume"):
        fabricate_earlier_run(runs / case)
    (runs / "incomplete_checkpoint" / "checkpoints" / "step_3").mkdir(parents=True)
    (runs / "metrics_only").mkdir()
    (runs / "metrics_only" / "metrics.jsonl").write_text('{"step": 0, "student/test": 0.25}\n')
    (runs / "export_only" / "final").mkdir(parents=True)
    (runs / "unrelated_files").mkdir()
    (runs / "unrelated_files" / "train.log").write_text("a launcher's log")
    before = {case: folder_hashes(runs / case) for case in ("earlier_run", "overwrite_but_set_up_fails", "resume")}

    def argv(case, *args):  # options first: argparse takes the overrides as one run of positionals
        flags = [a for a in args if a.startswith("--")]
        return ["train", "--config", str(config), *flags, f"train.output_dir={runs / case}",
                *(a for a in args if a not in flags)]

    cases = {
        "in_use_here": argv("in_use_here"),
        "in_use_elsewhere": argv("in_use_elsewhere"),
        "stale_here": argv("stale_here", bad_deepspeed),
        "stale_elsewhere": argv("stale_elsewhere", bad_deepspeed),
        "earlier_run": argv("earlier_run"),
        "incomplete_checkpoint": argv("incomplete_checkpoint"),
        "metrics_only": argv("metrics_only"),
        "export_only": argv("export_only"),
        "overwrite_but_set_up_fails": argv("overwrite_but_set_up_fails", "--overwrite", bad_deepspeed),
        "resume": argv("resume", "--resume", bad_deepspeed),
        "unrelated_files": argv("unrelated_files", bad_deepspeed),
        "resume_and_overwrite": argv("resume", "--resume", "--overwrite"),
    }
    results = run_cases(tmp_path, cases)[0]
    deepspeed_error = f"config key 'train.deepspeed': file not found: {tmp_path / 'missing_ds.json'}"
    expected = {
        "in_use_here": re.compile(re.escape(
            f"train.output_dir {runs / 'in_use_here'} is in use by another run (host {live['host']}, pid {live['pid']}, "
            f"started {live['started']}, command: dopd-vlm train --config other.yaml; heartbeat ") + r"\d+" + re.escape(
            " s ago): wait for it to end, or use another train.output_dir") + "$"),
        "in_use_elsewhere": re.compile(r"is in use by another run \(host node-b, pid 4242, .*; heartbeat \d+ s ago\)"),
        "stale_here": deepspeed_error,
        "stale_elsewhere": deepspeed_error,
        "earlier_run": f"train.output_dir {runs / 'earlier_run'} holds an earlier run (checkpoints up to step_8, "
                       "metrics.jsonl through step 9): continue it with --resume, or delete it and start over "
                       "with --overwrite",
        "incomplete_checkpoint": "holds an earlier run (incomplete checkpoint step_3)",
        "metrics_only": "holds an earlier run (metrics.jsonl through step 0)",
        "export_only": "holds an earlier run (final/)",
        "overwrite_but_set_up_fails": deepspeed_error,
        "resume": deepspeed_error,
        "unrelated_files": deepspeed_error,
        "resume_and_overwrite": "--resume and --overwrite exclude each other",
    }
    for case, line in expected.items():
        result = results[case]
        assert result["code"] == 2 and result["traceback"] is None, (case, result)
        got = one_line(result["stderr"])
        assert (line.search(got) if isinstance(line, re.Pattern) else line in got), (case, got)
    # a live lock stays; a stale one was taken over, then released when set-up failed
    assert (runs / "in_use_here" / "run.lock").is_file() and (runs / "in_use_elsewhere" / "run.lock").is_file()
    assert not stale_here.exists() and not stale_elsewhere.exists()
    assert not any((runs / case / "run.lock").exists() for case in ("earlier_run", "resume", "unrelated_files"))
    # nothing of an earlier run is deleted, not even by --overwrite when the rest of set-up fails
    assert {case: folder_hashes(runs / case) for case in before} == before
    assert (runs / "unrelated_files" / "train.log").read_text() == "a launcher's log"


def test_train_help_lists_overwrite_and_the_exit_codes(capsys):
    from dopd_vlm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    assert "--overwrite" in train_help and "--resume" in train_help
    for code in ("0   finished", "1   the run stopped", "2   the input cannot be used", "75  preempted"):
        assert code in train_help, code


# -- one process, 1 rank: the reference run, --resume on an empty folder, --overwrite ------------------


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_pairs):
    """An uninterrupted 1-rank run, started with --resume in an empty folder (the reference of
    this module's 1-rank tests), and --overwrite over an earlier run, in one process."""
    root = tmp_path_factory.mktemp("one_rank")
    config = run_config(root, tiny_pairs)
    fabricate_earlier_run(root / "overwritten")
    results = run_cases(root, {
        "reference": ["train", "--config", str(config), "--resume", f"train.output_dir={root / 'reference'}"],
        "overwrite": ["train", "--config", str(config), "--overwrite", f"train.output_dir={root / 'overwritten'}"],
    })[0]
    return root, config, results


@pytest.mark.slow
def test_resume_on_an_empty_folder_starts_at_step_0_and_overwrite_starts_over(one_rank):
    root, _, results = one_rank
    for case in ("reference", "overwrite"):
        assert results[case]["code"] == 0, results[case]
    assert "--resume: no complete checkpoint under" in results["reference"]["stderr"]
    assert logged_steps(root / "reference") == list(range(STEPS + 1))
    run = root / "overwritten"  # the earlier run's files are gone, the user's file stays
    assert logged_steps(run) == list(range(STEPS + 1)) and pointer(run) == f"step_{STEPS}"
    assert not (run / "checkpoints" / "step_8").exists()
    assert [p.name for p in (run / "tensorboard").iterdir()] != ["events.out.tfevents.1.host"]
    assert (run / "notes.txt").read_text() == "the user's own file" and not (run / "run.lock").exists()
    assert_same_weights(run, root / "reference")  # started over: an uninterrupted run


# -- a real full (or read-only) filesystem: a tmpfs, as root ----------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size_bytes) mounts a tmpfs there for the test; every mount is gone after it.
    Skips, with the reason, where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
            pytest.skip(f"mounting a tmpfs is not permitted here ({reason}): "
                        "the real full-filesystem checks did not run")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def fill(mount: Path) -> None:
    """Take every free block of `mount`."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(1 << 16)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class OnFile(threading.Thread):
    """Runs `action()` once `path` exists (a run has got that far)."""

    def __init__(self, path: Path, action):
        super().__init__(daemon=True)
        self.path, self.action, self.done = path, action, threading.Event()

    def run(self):
        while not self.path.exists() and not self.done.is_set():
            time.sleep(0.01)
        if not self.done.is_set():
            self.action()


@pytest.mark.slow
def test_a_full_or_read_only_filesystem_stops_the_run_in_one_line_and_resume_continues(one_rank, tmpfs, tmp_path):
    root, config, _ = one_rank
    reference = root / "reference"
    checkpoint = folder_bytes(reference / "checkpoints")  # the last checkpoint and DeepSpeed's scripts
    export = folder_bytes(reference / "final")
    mnt = tmp_path / "mnt"
    runs = {
        "first_checkpoint": tmpfs(mnt / "first_checkpoint", checkpoint // 2) / "run",
        "second_checkpoint": tmpfs(mnt / "second_checkpoint", checkpoint * 3 // 2) / "run",  # DeepSpeed writes step_2 beside step_1
        "export": tmpfs(mnt / "export", checkpoint + export // 2) / "run",
        "metrics": tmpfs(mnt / "metrics", 16 << 20) / "run",
        "read_only": tmpfs(mnt / "read_only", 64 << 20) / "run",
    }
    # the metrics' disk fills once the run has written its config; the other becomes read-only
    # once the run holds the folder (as ext4 remounts itself read-only on errors)
    watchers = [OnFile(runs["metrics"] / "config.json", lambda: fill(mnt / "metrics")),
                OnFile(runs["read_only"] / "run.lock", lambda: remount(mnt / "read_only", "ro"))]
    for watcher in watchers:
        watcher.start()
    eval_on = ["data.eval_splits=[test]", "data.max_eval_samples=2"]  # the baseline takes a moment: the watcher's
    overrides = {"export": ["train.save_every=0"], "metrics": eval_on}
    try:
        results = run_cases(tmp_path, {case: ["train", "--config", str(config), f"train.output_dir={run}",
                                              *overrides.get(case, [])] for case, run in runs.items()})[0]
    finally:
        for watcher in watchers:
            watcher.done.set()
    full, read_only = "No space left on device (ENOSPC)", "Read-only file system (EROFS)"
    expected = {
        "first_checkpoint": (rf"writing {runs['first_checkpoint']}/checkpoints/step_1/\S+\.pt failed: {re.escape(full)}; "
                             r"the partial checkpoint step_1 was removed; last complete checkpoint: none"),
        "second_checkpoint": (rf"writing {runs['second_checkpoint']}/checkpoints/step_2/\S+\.pt failed: {re.escape(full)}; "
                              r"the partial checkpoint step_2 was removed; last complete checkpoint: step_1 "),
        "export": (rf"writing {runs['export']}/final failed: {re.escape(full)}; checkpoint step_{STEPS} under "
                   rf"{runs['export']}/checkpoints is complete: run again with --resume to export it"),
        "metrics": rf"writing {runs['metrics']}/(metrics.jsonl|tensorboard) failed: {re.escape(full)}; the run stopped "
                   r"after step \d; last complete checkpoint: none",
        "read_only": rf"writing {runs['read_only']}/config.json failed: {re.escape(read_only)}; the run stopped after "
                     r"step 0",
    }
    for case, pattern in expected.items():
        assert results[case]["code"] == 1 and results[case]["traceback"] is None, (case, results[case])
        assert re.match(pattern, one_line(results[case]["stderr"])), (case, results[case]["stderr"][-3000:])
    assert "Exception in thread" not in results["metrics"]["stderr"]  # TensorBoard's writer thread kept quiet
    assert not (runs["first_checkpoint"] / "checkpoints" / "step_1").exists() and pointer(runs["first_checkpoint"]) is None
    assert pointer(runs["second_checkpoint"]) == "step_1"
    assert not (runs["second_checkpoint"] / "checkpoints" / "step_2").exists()
    assert pointer(runs["export"]) == f"step_{STEPS}"
    assert not (runs["export"] / "final").exists() and not (runs["export"] / "final.tmp").exists()
    assert not any((run / "run.lock").exists() for case, run in runs.items() if case != "read_only")
    # room again: --resume continues from the complete checkpoint, to the weights of an uninterrupted run
    for case in ("second_checkpoint", "export"):
        remount(mnt / case, "size=64m")
    resumed = run_cases(tmp_path, {case: ["train", "--config", str(config), "--resume", f"train.output_dir={runs[case]}",
                                          *overrides.get(case, [])] for case in ("second_checkpoint", "export")},
                        name="resume")[0]
    for case in ("second_checkpoint", "export"):
        assert resumed[case]["code"] == 0, resumed[case]
        assert_same_weights(runs[case], reference)


def test_injected_errors_are_what_torch_and_safetensors_raise_on_a_full_disk(tmpfs, tmp_path):
    """The write-fault helper raises what the libraries raise on a real full tmpfs (and the
    one-line cause read from either is the same)."""
    from safetensors.torch import save_file

    from dopd_vlm.run_folder import write_failure

    spec = importlib.util.spec_from_file_location("write_faults", REPO / "tests" / "helpers" / "write_faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    full = tmpfs(tmp_path / "full", 256 << 10)
    tensors = {"w": torch.zeros(512, 512)}  # 1 MiB

    def chain(err):
        links = []
        while err is not None:
            links.append((type(err), re.sub(r"\d+", "N", str(err).split(" at path ")[0])))
            err = err.__cause__ or err.__context__
        return links

    def raised(write):
        try:
            write()
        except Exception as err:  # noqa: BLE001
            link = err
            while link is not None:  # its frames hold torch's writer, and the writer its file open
                link.__traceback__ = None
                link = link.__context__
            return err
        raise AssertionError("the write succeeded")

    real = {"torch_zip": raised(lambda: torch.save(tensors, full / "a.pt")),
            "safetensors_enospc": raised(lambda: save_file(tensors, str(full / "b.safetensors")))}
    for name, err in real.items():
        injected = faults.ERRORS[name](full / "x")
        assert chain(injected) == chain(err), name
        assert write_failure(err, full / "x") == write_failure(injected, full / "x") == (
            f"writing {full / 'x'} failed: No space left on device (ENOSPC)"), name
    gc.collect()
    for partial in full.iterdir():  # room again: the same exception is no longer taken for a full disk
        partial.unlink()
    assert "(cause unknown: a test write next to it succeeds)" in write_failure(real["torch_zip"], full / "x")


# -- exactly what torch and safetensors raise, injected, on 2 ranks ------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_pairs):
    """2 ranks, one launch: the uninterrupted run (the reference of the 2-rank tests), and write
    failures injected through the after_write hook point (tests/helpers/write_faults.py)."""
    root = tmp_path_factory.mktemp("two_ranks")
    config = run_config(root, tiny_pairs)

    def case(name, faults=(), *args):
        return {"argv": ["train", "--config", str(config), f"train.output_dir={root / name}", *args],
                "write_faults": list(faults)}

    results = run_cases(root, {
        "reference": case("reference"),
        # a shard of checkpoint step_3 fails on rank 1 only, as torch's zip writer fails
        "checkpoint": case("checkpoint", [{"kind": "checkpoint", "path_contains": "step_3", "rank": 1,
                                           "error": "torch_zip"}]),
        "checkpoint_resumed": case("checkpoint", [], "--resume"),
        "pointer": case("pointer", [{"kind": "pointer", "skip": 1, "error": "enospc"}], "train.steps=2"),
        "export": case("export", [{"kind": "export", "error": "safetensors_enospc"}], "train.steps=1"),
        # (the writes: the file's opening, then a line per step from step 0)
        "metrics": case("metrics", [{"kind": "metrics", "skip": 3, "error": "edquot", "rank": 0}], "train.steps=3"),
        "tensorboard": case("tensorboard", [{"kind": "tensorboard", "skip": 2, "error": "eacces"}], "train.steps=2"),
    }, nproc=2)
    return root, config, results


@pytest.mark.slow
def test_a_write_failing_on_one_rank_stops_every_rank_in_one_line_and_resume_continues(two_ranks):
    root, _, ranks = two_ranks
    for case in ("reference", "checkpoint_resumed"):
        assert [r[case]["code"] for r in ranks] == [0, 0], ranks[0][case]
    step_3 = root / "checkpoint" / "checkpoints" / "step_3"
    expected = {
        "checkpoint": (rf"writing {step_3}/zero_pp_rank_1_mp_rank_00_(model|optim)_states\.pt failed: \[enforce fail at "
                       r"inline_container\.cc:672\] \. unexpected pos 1750272 vs 1750160 \(cause unknown: a test write "
                       r"next to it succeeds\); the partial checkpoint step_3 was removed; last complete checkpoint: "
                       r"step_2 "),
        "pointer": (rf"writing {root / 'pointer' / 'checkpoints' / 'latest_complete'} failed: No space left on device "
                    r"\(ENOSPC\); the partial checkpoint step_2 was removed; last complete checkpoint: step_1 "),
        "export": (rf"writing {root / 'export' / 'final'} failed: No space left on device \(ENOSPC\); checkpoint step_1 "
                   r"under \S+ is complete: run again with --resume to export it"),
        "metrics": (rf"writing {root / 'metrics' / 'metrics.jsonl'} failed: Disk quota exceeded \(EDQUOT\); the run "
                    r"stopped after step 2; last complete checkpoint: step_1 "),
        "tensorboard": (rf"writing {root / 'tensorboard' / 'tensorboard'} failed: Permission denied \(EACCES\); the run "
                        r"stopped after step 1; last complete checkpoint: none"),
    }
    for case, pattern in expected.items():
        lines = [one_line(r[case]["stderr"]) for r in ranks]
        assert [r[case]["code"] for r in ranks] == [1, 1] and lines[0] == lines[1], (case, lines)
        assert re.match(pattern, lines[0]), (case, lines[0])
    assert not step_3.exists() and pointer(root / "pointer") == "step_1"
    assert not (root / "pointer" / "checkpoints" / "step_2").exists()
    assert not (root / "export" / "final").exists() and not (root / "export" / "final.tmp").exists()
    assert logged_steps(root / "checkpoint")[-1] == STEPS
    assert_same_weights(root / "checkpoint", root / "reference")


# -- preemption and the lock, through real launches -------------------------------------------------


class Launch:
    """A `dopd-vlm train` launch in the background; its stderr collected line by line."""

    def __init__(self, cmd: list[str], cwd: Path):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stderr:
            self.lines.extend(line.replace("\r", "\n").splitlines())

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code, "\n".join(self.lines)

    def workers(self) -> dict[int, int]:
        """rank -> pid of torchrun's workers (the launch is torchrun)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        ranks = {}
        for pid in map(int, children):
            environ = dict(item.split("=", 1) for item in
                           Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
            ranks[int(environ["RANK"])] = pid
        return ranks


def lock_holder_pid(run: Path) -> int:
    return json.loads((run / "run.lock").read_text())["pid"]


def has_lock(run: Path) -> bool:
    try:
        return bool(json.loads((run / "run.lock").read_text()))
    except (OSError, ValueError):
        return False


def logged(run: Path, step: int):
    return lambda: step in logged_steps(run)


def preempted_lines(stderr: str) -> list[str]:
    """Every rank's preemption line (a rank's line may follow rank 0's progress bar on its line)."""
    return [line[line.index(PREEMPTED) + len(PREEMPTED):] for line in stderr.splitlines() if PREEMPTED in line]


def preempted_step(line: str) -> int:
    return int(re.search(r"stopped after step (\d+) with checkpoint", line).group(1))


@pytest.mark.slow
def test_one_rank_lock_preemption_and_a_forgotten_resume(one_rank, tmp_path):
    _, config, _ = one_rank
    run = tmp_path / "run"
    cmd = train_command(config, run, "train.save_every=0")
    first = Launch(cmd, tmp_path)
    wait_for(lambda: has_lock(run), "the first launch holds the folder", first.proc)
    os.kill(first.proc.pid, signal.SIGSTOP)  # it holds the lock, alive: a second launch into the folder is refused
    second = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    holder_line = (re.escape(f"train.output_dir {run} is in use by another run (host {socket.gethostname()}, "
                             f"pid {first.proc.pid}, started ") + r"[\d-]+ [\d:]+, command: \S*dopd_vlm/__main__\.py "
                   + re.escape(f"train --config {config} train.output_dir={run} train.save_every=0; heartbeat ")
                   + r"\d+ s ago\): wait for it to end, or use another train\.output_dir")
    assert re.fullmatch(holder_line, one_line(second.stderr)), second.stderr[-3000:]
    os.kill(first.proc.pid, signal.SIGCONT)
    # SIGTERM: the step under way finishes, a checkpoint is written, exit 75
    wait_for(logged(run, 1), "step 1", first.proc)
    os.kill(first.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.kill(first.proc.pid, signal.SIGTERM)  # the same signal again at once (Slurm and torchrun both send it): one request
    code, stderr = first.finish()
    line = one_line(stderr, PREEMPTED)
    step = preempted_step(line)
    assert code == 75 and line == (f"SIGTERM received: stopped after step {step} with checkpoint "
                                   f"{run / 'checkpoints' / f'step_{step}'} (continue with --resume)"), stderr[-3000:]
    assert step < STEPS and pointer(run) == f"step_{step}" and not (run / "run.lock").exists()
    # the same command again, without --resume: refused, and nothing of the run is touched
    before = folder_hashes(run)
    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and one_line(again.stderr) == (
        f"train.output_dir {run} holds an earlier run (checkpoints up to step_{step}, metrics.jsonl through step "
        f"{step}): continue it with --resume, or delete it and start over with --overwrite"), again.stderr[-3000:]
    assert folder_hashes(run) == before
    # a signal during set-up: the run stops before its first step, with nothing to save
    early = Launch([*cmd, "--resume"], tmp_path)
    wait_for(lambda: has_lock(run), "the resumed launch holds the folder", early.proc)
    os.kill(early.proc.pid, signal.SIGTERM)
    code, stderr = early.finish()
    assert code == 75 and one_line(stderr, PREEMPTED) == (
        f"SIGTERM received before step {step + 1}: nothing trained to save; last complete checkpoint: step_{step} "
        f"under {run / 'checkpoints'} (continue with --resume)"), stderr[-3000:]
    # a second signal (past the duplicate window) ends the run at once, without a checkpoint
    resumed = Launch([*cmd, "--resume"], tmp_path)
    wait_for(lambda: has_lock(run), "the resumed launch holds the folder", resumed.proc)
    os.kill(resumed.proc.pid, signal.SIGTERM)
    wait_for(lambda: any("SIGTERM received: stopping after this step" in ln for ln in resumed.lines),
             "the first signal's warning", resumed.proc)
    os.kill(resumed.proc.pid, signal.SIGSTOP)  # it would otherwise stop on its own, a moment later
    time.sleep(2.5)
    os.kill(resumed.proc.pid, signal.SIGTERM)
    os.kill(resumed.proc.pid, signal.SIGCONT)
    code, stderr = resumed.finish()
    assert code == -signal.SIGTERM and "received again: stopping at once" in stderr, stderr[-3000:]
    assert pointer(run) == f"step_{step}" and not (run / "run.lock").exists()  # released before it ended
    # kill -9 leaves the lock behind; the next launch takes it over (its process is gone) and finishes
    killed = Launch([*cmd, "--resume"], tmp_path)
    wait_for(lambda: has_lock(run), "the third launch holds the folder", killed.proc)
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.finish()
    assert lock_holder_pid(run) == killed.proc.pid
    last = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"its process {killed.proc.pid} has ended" in last.stderr and not (run / "run.lock").exists()
    assert logged_steps(run)[-1] == STEPS
    assert_same_weights(run, one_rank[0] / "reference")


@pytest.mark.slow
def test_two_ranks_lock_and_preemption_through_torchrun(two_ranks, tmp_path):
    root, config, _ = two_ranks
    run = tmp_path / "run"
    cmd = train_command(config, run, "train.save_every=0", nproc=2)
    first = Launch(cmd, tmp_path)
    wait_for(lambda: has_lock(run), "the first launch holds the folder", first.proc)
    workers = first.workers()
    for pid in workers.values():
        os.kill(pid, signal.SIGSTOP)
    second = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    lines = [line for line in second.stderr.splitlines() if line.startswith(ERROR)]
    assert len(set(lines)) == 1 and len(lines) == 2, second.stderr[-4000:]  # every rank, the same line
    assert f"is in use by another run (host {socket.gethostname()}, pid {workers[0]}, " in lines[0]
    # torchrun's own report: the first rank out exits 2; the other, already past its line, may be
    # ended by torchrun (exit -15) before it exits itself when the machine is loaded
    assert second.returncode == 1 and "exitcode  : 2" in second.stderr, second.stderr[-4000:]
    for pid in workers.values():
        os.kill(pid, signal.SIGCONT)
    # SIGUSR1 (Slurm's early warning) to rank 1 only: the ranks agree, both write the checkpoint
    wait_for(logged(run, 1), "step 1", first.proc)
    os.kill(workers[1], signal.SIGUSR1)
    code, stderr = first.finish()
    lines = preempted_lines(stderr)
    assert len(lines) == 2 and len(set(lines)) == 1, stderr[-4000:]
    assert f'File "{REPO / "dopd_vlm"}' not in stderr, stderr[-4000:]  # torchrun prints its own traceback, not ours
    step = preempted_step(lines[0])
    assert lines[0].startswith("SIGUSR1 received") and pointer(run) == f"step_{step}" and step < STEPS - 2
    assert code == 1 and stderr.count("exitcode  : 75") == 2, stderr[-4000:]
    # SIGTERM to torchrun: it passes it on to both workers, which finish the step and checkpoint
    resumed = Launch([*cmd, "--resume"], tmp_path)
    wait_for(logged(run, step + 1), f"step {step + 1}", resumed.proc)
    os.kill(resumed.proc.pid, signal.SIGTERM)
    code, stderr = resumed.finish()
    lines = preempted_lines(stderr)
    assert len(lines) == 2 and len(set(lines)) == 1 and lines[0].startswith("SIGTERM received"), stderr[-4000:]
    assert f'File "{REPO / "dopd_vlm"}' not in stderr, stderr[-4000:]  # torchrun prints its own traceback, not ours
    later = preempted_step(lines[0])
    assert step < later < STEPS and pointer(run) == f"step_{later}" and not (run / "run.lock").exists()
    last = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-4000:]
    assert logged_steps(run)[-1] == STEPS
    assert_same_weights(run, root / "reference")
