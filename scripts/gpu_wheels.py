"""Wheels for the lent GPU machine, which reaches no package index (issue 16).

Its image (Python 3.12) has jax, torch, flax, optax, orbax and most of dermjax's needs, but not
grain, array_record, ml_collections, fairlearn or portpicker. Here, where PyPI is reachable:

    python scripts/gpu_wheels.py download            # -> .whl/ (git-ignored, ~6 MB)

fetches, for CPython 3.12 on manylinux x86_64, the versions installed in this environment (the
ones the tests ran with) of `CARRIED`. There, `scripts/gpu_session.sh` runs

    python3 scripts/gpu_wheels.py install --target /tmp/site

which installs a carried wheel only where its distribution is missing or older than the carried
version (so the image's newer flax stays), and prints what it did; the caller puts the target on
PYTHONPATH. The device call names `.whl` in `carry`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

from packaging.version import Version

# The image lacks the first five; the last three it has, perhaps older than dermjax needs.
CARRIED = (
    "grain",
    "array_record",
    "ml_collections",
    "fairlearn",
    "portpicker",
    "flax",
    "optax",
    "orbax-checkpoint",
)
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "any")
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.+\.whl$")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> Version | None:
    """The installed version of distribution `name`, None if it is not installed."""
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def select(wheel_dir: str) -> tuple[list[str], list[str]]:
    """(wheels to install, lines saying what was kept): a wheel is installed where its
    distribution is missing or older than the wheel."""
    install, kept = [], []
    for file in sorted(os.listdir(wheel_dir)):
        match = _WHEEL.match(file)
        if not match:
            continue
        name, version = _normal(match["name"]), Version(match["version"])
        have = installed_version(name)
        if have is not None and have >= version:
            kept.append(f"{name} {have} (installed) over carried {version}")
        else:
            install.append(os.path.join(wheel_dir, file))
    return install, kept


def pins() -> list[str]:
    """`CARRIED` as name==version at this environment's versions."""
    out = []
    for name in CARRIED:
        version = installed_version(name)
        if version is None:
            sys.exit(f"{name} is not installed here; run `pip install -e '.[all]'` first")
        out.append(f"{name}=={version}")
    return out


def download(dest: str) -> None:
    """Fetches `pins()` as CPython 3.12 manylinux wheels into `dest`, first removing carried
    distributions' wheels already there (two versions of one would stop the install)."""
    wanted = pins()
    carried = {_normal(name) for name in CARRIED}
    if os.path.isdir(dest):
        for file in os.listdir(dest):
            match = _WHEEL.match(file)
            if match and _normal(match["name"]) in carried:
                os.remove(os.path.join(dest, file))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", dest, *wanted,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    print(f"{dest}: {', '.join(sorted(os.listdir(dest)))}")


def install(wheel_dir: str, target: str) -> None:
    """Installs the selected wheels into `target` without any index."""
    wheels, kept = select(wheel_dir)
    for line in kept:
        print(f"kept {line}")
    if not wheels:
        print("nothing to install")
        return
    command = [
        sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
        "--no-cache-dir", "--upgrade", "--target", target, *wheels,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    print(f"installed into {target}: {', '.join(os.path.basename(w) for w in wheels)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("download", "install"))
    parser.add_argument("--wheels", default=".whl", help="the wheel folder (default .whl)")
    parser.add_argument("--target", default="/tmp/site", help="install: where the wheels go")
    args = parser.parse_args()
    if args.command == "download":
        download(args.wheels)
    elif not os.path.isdir(args.wheels):
        sys.exit(
            f"no wheel folder {args.wheels}: run `python scripts/gpu_wheels.py download` "
            "here and name .whl in the device call's carry"
        )
    else:
        install(args.wheels, args.target)


if __name__ == "__main__":
    main()
