"""End to end: interrupted demo runs end exactly like an uninterrupted one; NaN losses stop or skip.

Every test runs `python -m dermjax.main` on a tiny demo config in subprocesses (CPU, no grain
workers, one JAX compilation cache shared by the module, so only the first run compiles). XLA on
CPU runs a fixed program on fixed inputs deterministically and every random draw is keyed by the
global step, so a resumed run must match the uninterrupted run bit for bit.
"""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.test_checkpoint import damage_largest_file

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 3, 4  # 96 demo rows: 68 train rows in batches of 16 (remainder dropped)
EXPLODING_HEAD = "--config.optimizer.multimodal_classifier.learning_rate=1e30"


@dataclasses.dataclass
class Demo:
    data_root: pathlib.Path
    env: dict

    def start(self, workdir: pathlib.Path, *overrides: str) -> subprocess.Popen:
        """Starts a tiny demo run in `workdir`; stdout+stderr go to a numbered .out file."""
        n = len(list(workdir.parent.glob(f"{workdir.name}.*.out")))
        out = open(workdir.parent / f"{workdir.name}.{n}.out", "w+")  # noqa: SIM115
        args = [
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            f"--config.data.local_root={self.data_root}",
            "--config.data.demo_size=96",
            "--config.data.min_samples_per_label=5",
            "--config.data.img_size=(32, 32)",
            "--config.training.batch_size=16",
            "--config.training.num_workers=0",
            f"--config.training.num_epochs={EPOCHS}",
            "--config.training.n_warmup_epochs=1",
            *overrides,
        ]
        cmd = [sys.executable, "-m", "dermjax.main", *args]
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        p.log = out
        return p

    @staticmethod
    def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
        rc = p.wait(timeout=timeout)
        p.log.seek(0)
        text = p.log.read()
        p.log.close()
        return rc, text


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    cache = tmp_path_factory.mktemp("jax_cache")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        WANDB_MODE="disabled",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    return Demo(data_root=tmp_path_factory.mktemp("data"), env=env)


@pytest.fixture(scope="module")
def baseline(demo, tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("baseline") / "wd"
    rc, out = demo.finish(demo.start(workdir))
    assert rc == 0, out[-3000:]
    return workdir


def wait_for(path: pathlib.Path, p: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            rc, out = Demo.finish(p)
            pytest.fail(f"{path} never appeared (rc={rc}):\n{out[-3000:]}")
        time.sleep(0.05)


def assert_same_records(got: dict[int, dict], want: dict[int, dict]) -> None:
    """Equal epoch records; on failure the message names each differing field."""
    assert got.keys() == want.keys()
    differ = {
        (epoch, key): (got[epoch].get(key), want[epoch].get(key))
        for epoch in want
        for key in got[epoch].keys() | want[epoch].keys()
        if got[epoch].get(key) != want[epoch].get(key)
    }
    assert not differ, f"(epoch, field): (got, uninterrupted) {differ}"


def epoch_records(workdir: pathlib.Path) -> dict[int, dict]:
    """The last logged record of each epoch, without wall-clock fields."""
    records = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == "epoch":
            records[r["epoch"]] = {k: v for k, v in r.items() if k not in ("time", "elapsed_s")}
    return records


def final_state(workdir: pathlib.Path) -> dict:
    step_dir = workdir / "checkpoints" / "periodic" / str(EPOCHS * STEPS)
    return ocp.StandardCheckpointer().restore(step_dir / "state")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    differ = [i for i, (x, y) in enumerate(zip(flat_a, flat_b, strict=True))
              if not np.array_equal(np.asarray(x), np.asarray(y))]  # fmt: skip
    assert not differ, f"{len(differ)} of {len(flat_a)} arrays differ"


def test_run_preempted_then_killed_then_rerun_ends_bitwise_like_uninterrupted(
    demo, baseline, tmp_path
):
    workdir = tmp_path / "wd"
    ckpts = workdir / "checkpoints"
    # 1. SIGTERM once the warm-up epoch is saved: the run saves mid-epoch and exits 0.
    p = demo.start(workdir)
    wait_for(ckpts / "periodic" / str(STEPS), p)
    p.send_signal(signal.SIGTERM)
    rc, out = demo.finish(p)
    assert rc == 0, out[-3000:]
    assert "Preempted: saved step" in out and "Resume with the same command: python -m" in out
    printed = out.split("Resume with the same command: ")[1].splitlines()[0]
    assert f"--workdir={workdir}" in printed
    assert f"Resume with the same command: {printed}" in (workdir / "train.log").read_text()
    assert "--config.data.img_size=(32, 32)" in shlex.split(printed)  # overrides kept
    (preempt_step,) = (int(d.name) for d in (ckpts / "last").iterdir())
    assert STEPS < preempt_step <= 2 * STEPS
    # 2. Re-run, with input workers now (they hold no state to restore): it continues from the
    # preemption point; SIGKILL it after the next epoch's save.
    p = demo.start(workdir, "--config.training.num_workers=1")
    wait_for(ckpts / "periodic" / str(2 * STEPS), p)
    p.kill()
    rc, out = demo.finish(p)
    assert f"at epoch 1, step {preempt_step - STEPS} of {STEPS} in the epoch" in out
    # 3. Re-run to the end: it continues from the last periodic checkpoint.
    rc, out = demo.finish(demo.start(workdir))
    assert rc == 0, out[-3000:]
    assert re.search(rf"resumed from .* at epoch [23], step 0 of {STEPS}", out), out[-3000:]

    assert_same_records(epoch_records(workdir), epoch_records(baseline))
    got, want = (json.loads((w / "summary.json").read_text()) for w in (workdir, baseline))
    for key in ("val", "test", "best_epoch", "best_step"):
        assert got[key] == want[key], key
    assert_bitwise_equal(final_state(workdir), final_state(baseline))


def test_a_damaged_last_epoch_falls_back_an_epoch_and_records_each_epoch_once(
    demo, baseline, tmp_path
):
    # The newest copies' metadata is readable, their arrays are not: the run restores the epoch
    # before, and its metrics.jsonl must drop the records after that one (it kept them).
    workdir = tmp_path / "wd"
    shutil.copytree(baseline, workdir)
    (workdir / "summary.json").unlink()  # as if killed before the final evaluation
    last = EPOCHS * STEPS
    copies = list((workdir / "checkpoints").glob(f"*/{last}"))
    assert copies
    for step_dir in copies:
        damage_largest_file(step_dir)
    rc, out = demo.finish(demo.start(workdir))
    assert rc == 0, out[-3000:]
    assert re.search(rf"Restored step {last - STEPS} from \S+; newer copies were unreadable", out)
    events = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in events if r["event"] == "epoch"] == list(range(EPOCHS))
    assert_same_records(epoch_records(workdir), epoch_records(baseline))
    assert_bitwise_equal(final_state(workdir), final_state(baseline))


def test_nonfinite_loss_with_on_nonfinite_error_stops_naming_the_step(demo, tmp_path):
    p = demo.start(tmp_path / "wd", EXPLODING_HEAD, "--config.training.num_epochs=1")
    rc, out = demo.finish(p)
    assert rc == 1
    assert re.search(r"^error: Non-finite training loss \S+ at step 1\b", out, re.M), out
    assert "Traceback" not in out  # a setting to change, not a bug


def test_nonfinite_loss_with_on_nonfinite_skip_skips_the_batches_and_finishes(demo, tmp_path):
    workdir = tmp_path / "wd"
    overrides = (EXPLODING_HEAD, "--config.training.num_epochs=2")
    rc, out = demo.finish(demo.start(workdir, *overrides, "--config.training.on_nonfinite=skip"))
    assert rc == 0, out[-3000:]
    # Step 0 takes the 1e30 step; every later loss overflows and its update is dropped. The
    # second epoch, every step skipped, counts no sample, and that is not unreadable images.
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 2 * STEPS - 1
    assert "none of the training images could be read" not in out
