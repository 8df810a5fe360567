"""Two JAX processes (2 CPU devices each, gloo collectives) train like one process on 4 devices.

Each process runs the real command line, `python -m dermjax.main` with --coordinator_address,
--num_processes and --process_id; the two-process run is killed after its first checkpoint,
relaunched with the same command and resumes; SIGTERM to one of its processes then stops both at
the same step with a checkpoint; a notice before a resumed run starts stops both before training;
a last launch resumes and finishes. And when one process fails
alone, both stop within seconds, each printing the error.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 64 training rows of the 160-row demo at batch 16
MAIN = ("-m", "dermjax.main")


def _command(data_root: Path, workdir: Path, main: tuple[str, ...] = MAIN) -> list[str]:
    overrides = {
        "data.local_root": data_root,
        "data.demo_size": 160,
        "data.img_size": "32,32",
        "training.batch_size": 16,
        "training.eval_batch_size": 32,
        "training.num_workers": 0,
        "training.num_epochs": EPOCHS,
        "training.n_warmup_epochs": 1,
        "checkpoint.keep_last": 1,
    }
    return [
        sys.executable,
        *main,
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    data_root: Path,
    workdir: Path,
    log: Path,
    extra: tuple[list[str], ...] = ([], []),
    main: tuple[str, ...] = MAIN,
) -> list[subprocess.Popen]:
    """Starts both processes of the two-process run (process i with the arguments `extra[i]`
    added, `main` the Python arguments before them); their output goes to `log`.<id>."""
    port = _free_port()
    procs = []
    for i in range(2):
        dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        dist += extra[i]
        out = open(f"{log}.{i}", "a")  # noqa: SIM115 (closed with the process below)
        procs.append(
            subprocess.Popen(
                _command(data_root, workdir, main) + dist,
                cwd=REPO,
                env=_env(2),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        out.close()
    return procs


def _wait(procs: list[subprocess.Popen], log: Path, timeout: float = 900) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"process {i} exited with {rc}:\n{Path(f'{log}.{i}').read_text()[-3000:]}"


def _epochs(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


def test_two_processes_agree_with_one_process_on_4_devices_and_resume_after_a_kill_and_a_sigterm(
    tmp_path,
):
    data_root = tmp_path / "data"
    single = tmp_path / "single"
    subprocess.run(
        _command(data_root, single), cwd=REPO, env=_env(4), check=True, capture_output=True
    )

    workdir, log = tmp_path / "two", tmp_path / "two.log"
    procs = _launch(data_root, workdir, log)
    first = workdir / "checkpoints" / "periodic" / str(STEPS_PER_EPOCH) / "meta" / "metadata"
    deadline = time.monotonic() + 600
    while not first.exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before its first checkpoint"
        time.sleep(0.2)
    assert first.exists(), "no checkpoint after the first epoch"
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (workdir / "summary.json").exists()

    # The same command again resumes; then SIGTERM reaches process 1 alone, as when one host of
    # a pod is preempted: both processes save the same step and exit 0.
    procs = _launch(data_root, workdir, log)
    train_log = workdir / "train.log"
    deadline = time.monotonic() + 600
    while "resumed from" not in train_log.read_text() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before resuming"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    _wait(procs, log)
    assert not (workdir / "summary.json").exists()
    saved = {
        re.search(r"Preempted: saved step (\d+)", Path(f"{log}.{i}").read_text())[1]
        for i in range(2)
    }
    assert len(saved) == 1 and STEPS_PER_EPOCH <= int(saved.pop()) < EPOCHS * STEPS_PER_EPOCH

    # A notice before the resumed run reports its start step to JAX (the sync point is then 1,
    # which a resumed run never meets): both processes stop before training, nothing saved.
    saved_steps = sorted((workdir / "checkpoints").glob("*/*"))
    _wait(_launch(data_root, workdir, log, main=("tests/preempt_at_start.py",)), log)
    for i in range(2):
        assert "Preempted: stopped before training" in Path(f"{log}.{i}").read_text()
    assert sorted((workdir / "checkpoints").glob("*/*")) == saved_steps
    assert not (workdir / "summary.json").exists()

    _wait(_launch(data_root, workdir, log), log)  # and once more: resumes, finishes
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["trained_steps"] == EPOCHS * STEPS_PER_EPOCH
    assert "resumed from" in (workdir / "train.log").read_text()

    one, two = _epochs(single), _epochs(workdir)
    assert [r["epoch"] for r in two] == list(range(EPOCHS))  # no epoch lost or repeated
    for a, b in zip(one, two, strict=True):
        for key in ("train/loss", "val/loss"):
            assert b[key] == pytest.approx(a[key], rel=5e-3), (a["epoch"], key)
        for key in ("train/accuracy", "val/accuracy"):
            assert abs(b[key] - a[key]) <= 2 / 64 + 1e-9, (a["epoch"], key)


def test_a_process_failing_alone_stops_the_other_within_seconds_with_its_error(tmp_path):
    """Before `dermjax.failfast`, process 0 died 30 s later with a gloo timeout naming no cause."""
    log = tmp_path / "fail.log"
    (tmp_path / "afile").write_text("")
    bad = f"--workdir={tmp_path / 'afile'}"  # only process 1 cannot write its run folder
    start = time.monotonic()
    procs = _launch(tmp_path / "data", tmp_path / "run", log, extra=([], [bad]))
    codes = [p.wait(timeout=240) for p in procs]
    took = time.monotonic() - start
    out = [Path(f"{log}.{i}").read_text() for i in range(2)]
    assert codes == [1, 1], out
    assert took < 120, took
    problem = f"run folder {tmp_path / 'afile'}: cannot write there"
    assert f"error: {problem}" in out[1]
    assert "error: process 1 of 2 stopped the run: " in out[0] and problem in out[0]
    assert not any("Terminating process" in text for text in out)  # JAX's abort


def test_processes_launched_with_different_configs_both_stop_naming_the_fields(tmp_path):
    # Another batch size deadlocked both processes; another label smoothing trained silently.
    log = tmp_path / "differ.log"
    other = ["--config.training.batch_size=32", "--config.data.seed=3"]
    start = time.monotonic()
    procs = _launch(tmp_path / "data", tmp_path / "run", log, extra=([], other))
    codes = [p.wait(timeout=240) for p in procs]
    out = [Path(f"{log}.{i}").read_text() for i in range(2)]
    assert codes == [1, 1] and time.monotonic() - start < 120, out
    for text in out:
        [line] = [x for x in text.splitlines() if x.startswith("error:")]
        assert line == (
            "error: the processes were launched with different settings: config.data.seed "
            "(process 0: 42, process 1: 3); config.training.batch_size (process 0: 16, process "
            "1: 32): launch every process with the same config file and --config overrides"
        )
    assert not (tmp_path / "data").exists()  # stopped before any data was made
