"""Two real JAX processes on 127.0.0.1 (CPU, gloo collectives) running the tiny pretraining through
launch/two_process.sh, the same code path as the hosts of a TPU pod:
  - the loss curve equals a 1-process run on 2 local devices;
  - only process 0 writes metrics, summary and JSON files;
  - Orbax checkpoints are written cooperatively and a 2-process restart resumes to the same curve
    (from a checkpoint verified by its digests);
  - when one process is killed the other exits non-zero, naming the lost task, in bounded time."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chmr_jax import cli, metric_writers

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")
STEPS = ["--config.train.steps=6", "--config.train.checkpoint_every=3", "--config.train.log_every=1"]


def launch(workdir, cache_dir, *flags, wait=True):
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "launch" / "two_process.sh"), str(workdir), "--config", TEST_CONFIG,
           f"--config.cache_dir={cache_dir}", "--config.train.progress=log", *flags]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join((Path(workdir) / f"process_{i}.log").read_text() for i in (0, 1)
                     if (Path(workdir) / f"process_{i}.log").exists())
    assert out.returncode == 0, out.stderr + logs[-4000:]
    return logs


def losses(workdir):
    return {r["step"]: r["loss"] for r in metric_writers.read_jsonl(Path(workdir) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """1 process, 2 local devices (of the 8 fake ones): the same global batch and mesh size."""
    workdir = tmp_path_factory.mktemp("one_process")
    assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                     "--config.train.devices=2", *STEPS]) == 0
    return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir, reference):
    workdir = tmp_path_factory.mktemp("two_process")
    launch(workdir, cache_dir, *STEPS)
    return workdir


def test_two_processes_follow_the_one_process_curve(two_process_run, reference):
    one, two = losses(reference), losses(two_process_run)
    assert sorted(two) == list(range(1, 7))
    for step in one:
        # float32 collectives over gloo vs in-process: same sums in another order
        assert two[step] == pytest.approx(one[step], rel=2e-5), step
    summary = json.loads((two_process_run / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["steps"] == 6


def test_only_process_zero_writes(two_process_run):
    # One metrics row per step (two writers would append twice), one event file, one summary; the
    # second process logs nothing of the run's progress.
    assert len(metric_writers.read_jsonl(two_process_run / "metrics.jsonl")) == 6
    assert len(list((two_process_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    p0, p1 = ((two_process_run / f"process_{i}.log").read_text() for i in (0, 1))
    assert "done: step 6/6" in p0 and "done:" not in p1 and "checkpoints:" not in p1


def test_two_process_restart_resumes_to_the_same_curve(two_process_run, cache_dir, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(two_process_run, workdir)
    before = losses(workdir)
    # Back to the state after step 3: drop the final checkpoint, the summary and later metrics rows.
    shutil.rmtree(workdir / "checkpoints" / "6")
    (workdir / "summary.json").unlink()
    logs = launch(workdir, cache_dir, *STEPS)
    assert "resumed from" in logs and "(step 3 of 6)" in logs
    after = losses(workdir)
    for step in (4, 5, 6):
        assert after[step] == before[step], step     # same program, same data, same keys: bit-identical


def test_a_killed_peer_ends_the_other_process_with_an_error(tmp_path, cache_dir, reference):
    workdir = tmp_path / "killed"
    proc = launch(workdir, cache_dir, "--config.train.steps=400", "--config.train.log_every=1",
                  "--config.train.heartbeat_timeout_s=10", wait=False)
    try:
        deadline = time.time() + 600
        while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip():
            assert time.time() < deadline and proc.poll() is None, "the 2-process run did not start"
            time.sleep(1)
        os.kill(int((workdir / "process_1.pid").read_text()), signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=120)              # bounded: the heartbeat timeout (10 s) plus error polling
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and waited < 120
    log0 = (workdir / "process_0.log").read_text()
    assert "stopped sending heartbeats" in log0 and "process 1 failed" in proc.stdout.read().decode()
