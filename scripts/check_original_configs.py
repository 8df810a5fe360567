"""Load and validate every original ml_workflow YAML config under a folder; print a table.

    python scripts/check_original_configs.py path/to/ml_workflow/configs   (or one .yaml)

Each *.yaml below the folder is loaded as `--config=configs/from_yaml.py:FILE` would load it and
validated with `dermjax.config.validate`; no data is read. One row per file: name, ok / FAIL /
skip, and the problems (every one, separated by " | "). Files of the original's oldest layout
(a `model` section, no `vision_model`), which dermjax does not read, are listed as skip. Exit status 1 if any file fails, 2 if the folder has no YAML file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets a plain checkout run the script without installing
    sys.path.insert(0, str(REPO_ROOT))

from dermjax.config import validate  # noqa: E402
from dermjax.configs import from_yaml  # noqa: E402
from dermjax.errors import ConfigError  # noqa: E402


def check(path: Path) -> tuple[str, str]:
    """(status, problems) of one file: ok, FAIL or skip."""
    try:
        validate(from_yaml.get_config(str(path)))
    except from_yaml.OldLayoutError:
        return "skip", "the original's oldest layout (no vision_model section)"
    except ConfigError as e:
        return "FAIL", " | ".join(p.removeprefix(f"{path}: ") for p in e.problems)
    return "ok", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "folder", type=Path, help="folder searched recursively for *.yaml, or one YAML file"
    )
    args = parser.parse_args(argv)
    one = args.folder.is_file()
    files = [args.folder] if one else sorted(args.folder.rglob("*.yaml"))
    if not files:
        print(f"error: no *.yaml file under {args.folder}", file=sys.stderr)
        return 2
    logging.getLogger(from_yaml.__name__).setLevel(logging.ERROR)  # the table says enough
    rows = [(f.name if one else str(f.relative_to(args.folder)), *check(f)) for f in files]
    width = max(len(name) for name, _, _ in rows)
    for name, status, problem in rows:
        print(f"{name:<{width}}  {status:<4}  {problem}".rstrip())
    counts = {s: sum(r[1] == s for r in rows) for s in ("ok", "FAIL", "skip")}
    print(
        f"{len(rows)} files: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
