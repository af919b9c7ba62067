"""launch/tpu_pod.sh against a `gcloud` stub on PATH that records its arguments (no cloud needed):
the TPU is created with autocheckpoint (once: a re-run finds it), every worker provisions Python 3.11 with
uv and installs with constraints/pod.txt (which pins what the tests ran with, jax[tpu] at setup.py's
JAX_PIN), stale processes are killed before the start, the job starts detached with the compilation and
feature caches in the workdir's bucket, its log is copied there, `resume` starts it again as recorded, and
the commands it sends really work when run here in a shell (the install with stub uv / python3; start,
stop and status find, and only find, the job)."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_pod.sh"
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
# `describe` of a TPU that does not exist fails, as gcloud's does (GCLOUD_TPU_EXISTS=1: it exists; its
# --format='value(state)' is GCLOUD_TPU_STATE, default READY).
if "describe" in sys.argv:
    if not os.environ.get("GCLOUD_TPU_EXISTS"):
        sys.exit(1)
    if any(a.startswith("--format") for a in sys.argv):
        print(os.environ.get("GCLOUD_TPU_STATE", "READY"))
sys.exit(0)
"""


def run_launcher(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(STUB)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log),
                "TPU_NAME": "chmr-pod", "ZONE": "us-central2-b", "STATE_DIR": str(tmp_path / "state"), **env}
    out = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def commands(calls):
    """The --command strings of the `ssh` calls, in order."""
    return [c[c.index("--command") + 1] for c in calls if "ssh" in c]


def jax_pin():
    return re.search(r'^JAX_PIN = "(.+)"', (ROOT / "setup.py").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def start_calls(tmp_path_factory):
    return run_launcher(tmp_path_factory.mktemp("pod"), "start", "gs://bucket/runs/paper",
                        "--config.train.steps=10", CREATE="1", ACCELERATOR="v5litepod-16")


def test_create_asks_for_autocheckpoint_and_the_accelerator(start_calls):
    create = [c for c in start_calls if "create" in c]
    assert len(create) == 1
    c = create[0]
    assert c[:5] == ["alpha", "compute", "tpus", "tpu-vm", "create"] and "chmr-pod" in c
    assert "--autocheckpoint-enabled" in c
    assert c[c.index("--version") + 1] == "tpu-ubuntu2204-base"   # (its Python is 3.10: the install brings 3.11)
    assert c[c.index("--accelerator-type") + 1] == "v5litepod-16"
    assert c[c.index("--zone") + 1] == "us-central2-b"


def test_every_remote_command_is_valid_shell_and_targets_all_workers(start_calls):
    ssh = [c for c in start_calls if "ssh" in c]
    assert len(ssh) == 3   # install, cleanup, start
    for c in ssh:
        assert "--worker=all" in c
    for cmd in commands(start_calls):
        check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, (cmd, check.stderr)


def test_install_pins_jax_to_setup_py(start_calls):
    install = commands(start_calls)[0]
    pinned = re.findall(r"jax\[tpu\]==([0-9.]+)", install)
    assert pinned == [jax_pin()]


def test_stale_processes_are_killed_before_the_start(start_calls):
    install, cleanup, start = commands(start_calls)
    assert "pkill -KILL" in cleanup and "libtpu_lockfile" in cleanup and "fuser -k" in cleanup
    assert "pkill" not in start


def test_the_job_starts_detached_with_the_compilation_cache(start_calls):
    start = commands(start_calls)[-1]
    assert "setsid nohup" in start and "< /dev/null" in start and "&" in start
    assert "--config.train.compilation_cache_dir='gs://bucket/runs/paper/compilation_cache'" in start
    assert "--config.train.distributed=True" in start and "--config.train.steps=10" in start
    assert "--workdir 'gs://bucket/runs/paper'" in start


def test_start_stop_status_really_work_in_a_shell(tmp_path):
    """The commands the launcher sends, run here in a fake worker home with a stub `chmr-jax`: the job
    survives the end (SIGHUP) of the session that started it, `status` sees it, `stop` SIGTERMs it (and
    not the shell running pkill), and then `status` reports it gone."""
    home = tmp_path / "home"
    venv_bin = home / "chmr_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    stub = venv_bin / "chmr-jax"
    stub.write_text("#!/usr/bin/env bash\ntrap 'echo TERM >> \"$HOME/job.log\"; echo stopped; exit 0' TERM\n"
                    "echo \"$@\" > \"$HOME/job.args\"\necho training\nwhile true; do sleep 0.1; done\n")
    stub.chmod(0o755)
    (home / "chmr_jax" / "launch").mkdir()
    shutil.copy(ROOT / "launch" / "_copy_log.sh", home / "chmr_jax" / "launch")
    (venv_bin / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")   # (the log copier's fsspec)
    (venv_bin / "python").chmod(0o755)
    calls = commands(run_launcher(tmp_path, "start", str(tmp_path / "run"), LOG_COPY_EVERY_S="1"))
    running_check, start = calls[0], calls[-1]
    assert len(calls) == 4   # the running-job check, install, cleanup, start
    env = {**os.environ, "HOME": str(home)}
    # The start command in its own session, which we then hang up on, as a dropped ssh would.
    session = subprocess.Popen(["bash", "-c", start], cwd=home, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    assert "started" in session.communicate(timeout=120)[0]
    pid = int((home / "chmr_jax" / "logs" / "pretrain.pid").read_text())
    deadline = time.time() + 120   # hang guards, not timings (issue 35: a loaded machine is slow)
    while not (home / "job.args").exists() and time.time() < deadline:
        time.sleep(0.1)
    args = (home / "job.args").read_text().split()
    assert args[0] == "pretrain" and args[-1].startswith("--config.train.compilation_cache_dir=")
    try:   # the job is running: hang up on the session that started it
        os.killpg(session.pid, signal.SIGHUP)
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    os.kill(pid, 0)   # still alive after the hang-up

    status = commands(run_launcher(tmp_path, "status"))[-1]
    out = subprocess.run(["bash", "-c", status], cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert "running" in out.stdout and "not running" not in out.stdout
    # a second `start` now would SIGKILL the job in its cleanup: its first command refuses instead
    out = subprocess.run(["bash", "-c", running_check], cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "still running" in out.stderr and "stop" in out.stderr

    # Another checkout's (or user's) pretraining on the same machine: `stop` and `status` must leave it alone
    # (the pattern is anchored on this install's path; a bare 'chmr-jax pretrain' stopped every one here).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              str(tmp_path / "elsewhere" / ".venv" / "bin" / "chmr-jax"), "pretrain"])
    try:
        stop = commands(run_launcher(tmp_path, "stop"))[-1]
        out = subprocess.run(["bash", "-c", stop], cwd=home, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (home / "job.log").read_text().strip() == "TERM"
        assert other.poll() is None                       # still running
    finally:
        other.kill()
    with pytest.raises(ProcessLookupError):
        for _ in range(600):
            os.kill(pid, 0)
            time.sleep(0.1)
    out = subprocess.run(["bash", "-c", status], cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert "not running" in out.stdout
    # The worker's log reached the workdir (here a local folder; gs:// on a pod), its end included.
    # One log per start (pretrain-<host>-<start time>.log; pretrain-<host>.log links to the newest).
    newest = home / "chmr_jax" / "logs" / f"pretrain-{socket.gethostname()}.log"
    assert newest.is_symlink() and re.fullmatch(rf"pretrain-{re.escape(socket.gethostname())}-\d{{8}}T\d{{6}}Z\.log",
                                                  newest.resolve().name)
    copied = tmp_path / "run" / "logs" / newest.resolve().name
    deadline = time.time() + 300   # (the copier's last copy follows the job's end; a hang guard, not a timing)
    while not (copied.exists() and "stopped" in copied.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert copied.read_text() == newest.read_text()
    assert copied.read_text().split() == ["training", "stopped"]
    copier = int((home / "chmr_jax" / "logs" / "copy_log.pid").read_text())
    try:   # (it ends by itself once this install's job has ended; stopped here in case it has not yet)
        os.kill(copier, signal.SIGTERM)
    except ProcessLookupError:
        pass
    assert subprocess.run(["bash", "-c", running_check], cwd=home, env=env, timeout=120).returncode == 0


def test_logs_reads_the_worker_log(tmp_path):
    calls = run_launcher(tmp_path, "logs", "20", WORKER="3")
    assert "--worker=3" in calls[-1]
    assert re.search(r"tail -n 20 .*pretrain-\$\(hostname\)\.log", commands(calls)[-1])


def test_no_subcommand_and_no_arguments_is_a_usage_error(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "TPU_NAME": "x", "ZONE": "z"},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_two_process_with_a_gs_workdir_keeps_its_logs_out_of_a_local_gs_folder(tmp_path):
    """launch/two_process.sh with a gs:// workdir (the processes write it directly): the logs and pids go to a
    local runs/logs/<bucket>/<path>, never a `gs:` folder that `tpu_pod.sh start` would then ship. A stub
    Python stands in for the processes and records their arguments."""
    tree = tmp_path / "repo"
    (tree / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "two_process.sh", tree / "launch")
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\necho \"$@\"\n")
    stub.chmod(0o755)
    out = subprocess.run(["bash", str(tree / "launch" / "two_process.sh"), "gs://bucket/runs/mp", "--config", "c.py"],
                         env={**os.environ, "PYTHON": str(stub), "PORT": "1234"}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    logs = tree / "runs" / "logs" / "bucket" / "runs" / "mp"
    assert sorted(p.name for p in logs.iterdir()) == ["process_0.log", "process_0.pid", "process_1.log",
                                                       "process_1.pid"]
    assert "pretrain --workdir gs://bucket/runs/mp --config c.py" in (logs / "process_1.log").read_text()
    assert "--config.train.process_id=1" in (logs / "process_1.log").read_text()
    assert not [p for p in tree.rglob("*") if p.name.startswith("gs:")]


# Packages whose version decides the numerics or the checkpoint format: the pod must run the tested ones.
DECIDING = ("jax", "jaxlib", "libtpu", "flax", "optax", "chex", "numpy", "ml_dtypes", "orbax-checkpoint", "tensorstore",
            "etils", "gcsfs", "fsspec", "protobuf", "msgpack", "rdkit", "scipy", "scikit-learn")


def test_constraints_pin_what_the_tests_run_with():
    from importlib import metadata
    pins = dict(line.split("==") for line in (ROOT / "constraints" / "pod.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): v for name, v in pins.items()}
    assert pins["jax"] == jax_pin()
    for name in DECIDING:
        key = name.lower().replace("_", "-")
        assert key in pins, f"constraints/pod.txt does not pin {name}"
        assert pins[key] == metadata.version(name), (name, pins[key], metadata.version(name))


def test_the_install_provisions_python_311_with_uv_and_the_constraints_and_can_run_again(start_calls, tmp_path):
    """The install command, run here in a fake worker home with stub `python3` (the image's 3.10, which can
    pip-install uv) and stub `uv` (records its arguments; `uv venv` makes a .venv with python3.11)."""
    install = commands(start_calls)[0]
    assert f"jax[tpu]=={jax_pin()}" in install and "-c constraints/pod.txt" in install
    home, stubs = tmp_path / "home", tmp_path / "stubs"
    home.mkdir()
    stubs.mkdir()
    uv = ("#!/usr/bin/env bash\necho \"$@\" >> \"$HOME/uv.log\"\n"
          "if [ \"$1\" = venv ]; then mkdir -p \"${@: -1}/bin\"; touch \"${@: -1}/bin/python3.11\"; "
          "chmod +x \"${@: -1}/bin/python3.11\"; fi\n")
    (stubs / "python3").write_text(
        "#!/usr/bin/env bash\necho \"$@\" >> \"$HOME/python3.log\"\nmkdir -p \"$HOME/.local/bin\"\n"
        f"cat > \"$HOME/.local/bin/uv\" <<'UV'\n{uv}UV\nchmod +x \"$HOME/.local/bin/uv\"\n")
    (stubs / "python3").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{stubs}:/usr/bin:/bin"}
    for _ in range(2):   # a second run (after a maintenance event) keeps uv and the venv
        out = subprocess.run(["bash", "-c", install], cwd=home, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert (home / "python3.log").read_text().splitlines() == ["-m pip install -q --user uv==0.13.9"]
    uv_calls = (home / "uv.log").read_text().splitlines()
    assert uv_calls[0] == "venv -q --python 3.11 .venv"
    install_call = f"pip install -q --python .venv/bin/python -c constraints/pod.txt -e . jax[tpu]=={jax_pin()}"
    assert uv_calls[1:] == [install_call, install_call]
    assert (home / "chmr_jax" / "constraints" / "pod.txt").exists() and (home / "chmr_jax" / "setup.py").exists()
    # A venv of another Python (made by the earlier launcher with the image's 3.10) is made again.
    shutil.rmtree(home / "chmr_jax" / ".venv")
    (home / "chmr_jax" / ".venv" / "bin").mkdir(parents=True)
    (home / "chmr_jax" / ".venv" / "bin" / "python3.10").touch()
    assert subprocess.run(["bash", "-c", install], cwd=home, env=env, timeout=120).returncode == 0
    assert (home / "uv.log").read_text().splitlines()[3] == "venv -q --python 3.11 .venv"
    assert not (home / "chmr_jax" / ".venv" / "bin" / "python3.10").exists()


def test_caches_and_logs_are_shared_through_the_workdirs_bucket(start_calls):
    start = commands(start_calls)[-1]
    assert "CHMR_CACHE_DIR='gs://bucket/chmr_jax_cache'" in start
    assert re.search(r"bash launch/_copy_log\.sh \$log 'gs://bucket/runs/paper/logs/'pretrain-\$\(hostname\)-\d{8}T\d{6}Z\.log 60 "
                     r'"\$HOME/chmr_jax/\[\.\]venv/bin/chmr-jax pretrain"', start)


def test_resume_starts_the_recorded_job_again_without_creating_the_tpu(tmp_path):
    first = run_launcher(tmp_path, "start", "gs://bucket/runs/paper", "--config.train.steps=10", "--note=a b",
                         CREATE="1", CONFIG="configs/paper.py:tpu_pod,big", CHMR_DATA_DIR="gs://bucket/data")
    assert [c for c in first if "create" in c]
    again = run_launcher(tmp_path, "resume", CREATE="1", GCLOUD_TPU_EXISTS="1")   # (it exists now)
    assert not [c for c in again if "create" in c] and ["compute", "tpus", "tpu-vm", "describe"] == again[0][:4]
    # the same install and start as the first time, after the running-job check that a re-run needs
    assert commands(again)[0].startswith('if pgrep -f "$HOME/chmr_jax/[.]venv/bin/chmr-jax pretrain"')
    # (each start logs to its own file: the one a maintenance event interrupted is never overwritten)
    stamp = lambda cmds: [re.sub(r"-\d{8}T\d{6}Z\.log", "-STAMP.log", c) for c in cmds]
    assert stamp(commands(again)[1:]) == stamp(commands(first))
    assert re.findall(r"\d{8}T\d{6}Z", commands(first)[-1])[0] <= re.findall(r"\d{8}T\d{6}Z", commands(again)[-1])[0]
    assert "--note=a\\ b" in commands(again)[-1] and "CHMR_DATA_DIR='gs://bucket/data'" in commands(again)[-1]
    out = subprocess.run(["bash", str(SCRIPT), "resume"], capture_output=True, text=True,
                         env={**os.environ, "TPU_NAME": "other-pod", "ZONE": "z", "STATE_DIR": str(tmp_path / "s")})
    assert out.returncode == 2 and "no recorded start for TPU other-pod" in out.stderr
    # A preempted TPU still exists (describe succeeds) but must be created again: with the recorded
    # CREATE=1 it is deleted and created with the recorded accelerator; without it, resume stops and says so.
    preempted = run_launcher(tmp_path, "resume", GCLOUD_TPU_EXISTS="1", GCLOUD_TPU_STATE="PREEMPTED")
    verbs = [c[3] if c[:3] == ["compute", "tpus", "tpu-vm"] else c[4] for c in preempted if "ssh" not in c]
    assert verbs[:2] == ["describe", "delete"] and "create" in verbs
    create = [c for c in preempted if "create" in c][0]
    assert create[create.index("--accelerator-type") + 1] == "v4-32"     # the recorded default of the first start
    (tmp_path / "state" / "chmr-pod.sh").write_text((tmp_path / "state" / "chmr-pod.sh").read_text()
                                                    .replace("CREATE=1", "CREATE=0"))
    bin_env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "g.jsonl"),
               "TPU_NAME": "chmr-pod", "ZONE": "z", "STATE_DIR": str(tmp_path / "state"), "GCLOUD_TPU_EXISTS": "1",
               "GCLOUD_TPU_STATE": "PREEMPTED"}
    out = subprocess.run(["bash", str(SCRIPT), "resume"], capture_output=True, text=True, env=bin_env, timeout=60)
    assert out.returncode == 2 and "is PREEMPTED: create it again" in out.stderr
