"""Faults during real 2-rank ZeRO-3 runs: NaNs, kill -9 (training and checkpoint write), disk
full, a dying rank. Every recovery must end with exactly the weights of an uninterrupted run.

Faults are injected by tests/helpers/train_driver.py through the run's hook points
(`dopd_vlm.hooks`); a fault that ends the processes is the last run of its launch.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import DRIVER, REPO, metrics_lines, write_config

pytestmark = pytest.mark.slow


def launch_expecting_failure(tmp_path, config, runs, timeout=900):
    """`runs` in one 2-rank launch that a fault must end; the launch, its seconds and rank 0's
    results of the runs before the fault (tests/helpers/train_driver.py writes them after each run)."""
    tmp_path.mkdir(exist_ok=True)
    spec, result = tmp_path / "spec_fail.json", tmp_path / "result_fail.json"
    spec.write_text(json.dumps({"config": str(config), "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(DRIVER), str(spec), str(result)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, "the faulty run should have failed"
    return proc, time.monotonic() - started, json.loads(result.read_text()) if result.is_file() else {}


def final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def pointer(run):
    marker = run / "checkpoints" / "latest_complete"
    return marker.read_text() if marker.is_file() else None


# A fault that ends the process (kill -9, a rank exiting) ends its launch: each such run is the last
# of a launch, after runs whose faults leave the process alive (one start-up for several runs).
FAULTY_RUNS = {
    "nan_loss": (["train.steps=2"], {"nan_loss_steps": [2]}),
    "nan_grad": (["train.steps=2"], {"nan_grad_steps": [2]}),
    "bad": (["train.max_bad_steps=2"], {"nan_loss_steps": [2, 3, 4]}),
    "full": ([], {"disk_full_saving_step": 3}),
}
KILLS = {"kill-9-while-training": {"kill_at_step": 3, "rank": 1}, "kill-9-while-saving": {"kill_saving_step": 3}}
DIES = {"exit_rank_at_step": 2, "rank": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pairs):
    """One launch: the reference, a 1-step run, the runs of FAULTY_RUNS, then kill -9 while training
    (which ends the launch)."""
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root / "c.yaml", tiny_pairs, train={"steps": 4, "save_every": 1, "collective_timeout_s": 300})
    killed = "kill-9-while-training"
    proc, _, results = launch_expecting_failure(root / "launch", config, [
        {"name": "reference", "overrides": [f"train.output_dir={root / 'reference'}"]},
        {"name": "one_step", "overrides": [f"train.output_dir={root / 'one_step'}", "train.steps=1"]},
        *({"name": name, "overrides": [f"train.output_dir={root / name}", *overrides], "fault": fault}
          for name, (overrides, fault) in FAULTY_RUNS.items()),
        {"name": killed, "overrides": [f"train.output_dir={root / killed}"], "fault": KILLS[killed]},
    ])
    assert set(results) == {"reference", "one_step", *FAULTY_RUNS}, proc.stderr[-6000:]  # all but the killed run
    return root, config, results, proc


@pytest.fixture(scope="module")
def recovered(setup):
    """kill -9 while saving (a launch of its own), then one launch resuming every stopped run
    ("bad", "full" and the kills) and ending with a rank that dies. Records what each run left
    before resuming, and the last launch's seconds."""
    root, config, _, setup_launch = setup
    stopped = {name: root / name for name in ("bad", "full", *KILLS)}
    killed = {"kill-9-while-training": setup_launch}
    run = stopped["kill-9-while-saving"]
    killed["kill-9-while-saving"], _, _ = launch_expecting_failure(
        root / "launch_kill_saving", config,
        [{"name": "k", "overrides": [f"train.output_dir={run}"], "fault": KILLS["kill-9-while-saving"]}])
    before = {case: {"pointer": pointer(run), "step_3": (run / "checkpoints" / "step_3").exists()}
              for case, run in stopped.items()}
    dies, seconds, resumed = launch_expecting_failure(root / "launch_resume", config, [
        *({"name": case, "overrides": [f"train.output_dir={run}"], "resume": True} for case, run in stopped.items()),
        {"name": "dies", "overrides": [f"train.output_dir={root / 'dies'}"], "fault": DIES}])
    assert set(resumed) == set(stopped), dies.stderr[-6000:]
    return stopped, before, killed, resumed, (dies, seconds)


def test_nan_loss_or_gradients_skip_the_step_and_training_goes_on(setup):
    root, _, results, _ = setup
    for name in ("nan_loss", "nan_grad"):
        assert results[name]["finished"], results[name]
        lines = metrics_lines(root / name)
        assert [line["skipped_step"] for line in lines[1:]] == [0.0, 1.0]
        assert lines[-1]["skipped_steps_total"] == 1
        # step 2 was not applied: the weights are those after step 1 (the lr of step 1 does not
        # depend on the run length: cosine starts at its peak)
        assert_same_weights(final_weights(root / name), final_weights(root / "one_step"))


def test_consecutive_bad_steps_stop_the_run_and_the_last_checkpoint_resumes(setup, recovered):
    _, _, results, _ = setup
    stopped, before, _, resumed, _ = recovered
    assert "2 consecutive steps had non-finite" in results["bad"]["error"]
    assert before["bad"]["pointer"] == "step_2"
    # resuming from the last good checkpoint works; step 2 was skipped there, so the run now
    # differs from the reference only by that skipped step: it must finish and export
    assert resumed["bad"]["finished"]
    assert (stopped["bad"] / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", KILLS)
def test_kill_9_then_resume_ends_with_uninterrupted_weights(setup, recovered, case):
    root, _, _, _ = setup
    stopped, before, killed, resumed, _ = recovered
    assert before[case]["pointer"] == "step_2", killed[case].stderr[-6000:]
    assert resumed[case]["finished"]
    assert_same_weights(final_weights(stopped[case]), final_weights(root / "reference"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(setup, recovered):
    root, _, results, _ = setup
    stopped, before, _, resumed, _ = recovered
    assert "No space left on device" in results["full"]["error"] and "step_2" in results["full"]["error"]
    assert before["full"]["pointer"] == "step_2"
    assert not before["full"]["step_3"]
    assert resumed["full"]["finished"]
    assert_same_weights(final_weights(stopped["full"]), final_weights(root / "reference"))


def test_a_dying_rank_ends_the_whole_run_instead_of_hanging(recovered):
    # the launch's runs before it take seconds; a rank left waiting for the dead one would hang
    # until the collective timeout (300 s) instead
    *_, (proc, seconds) = recovered
    assert seconds < 240
    assert "exitcode" in proc.stderr and "17" in proc.stderr
