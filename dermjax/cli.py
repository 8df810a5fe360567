"""Command-line runner shared by the entry points: one-line errors, every config problem at once.

`run_main(main)` wraps absl's `app.run`:
* a `UserError` raised anywhere prints `error: <message>` and exits with its `exit_code`, without
  a traceback unless `--verbose` is given; in a multi-process run every other process then stops
  within seconds with the same message and status (`dermjax.failfast`), as it does on a bug;
* `--config.a.b=V` overrides are applied here rather than by ml_collections, so that every
  unknown field and every value of the wrong type is named in one ConfigError (exit status 2),
  together with the problems `dermjax.config.validate` finds in the rest of the config; `None`
  sets a field to None (e.g. `--config.data.val_size=None`);
* Ctrl-C, or SIGTERM outside the training loop (which saves a checkpoint on it instead), prints
  one line and exits with 130 or 143: files written before stay, so the same command continues;
* `--config=configs/NAME.py` falls back to the packaged config NAME when no such file exists
  under the current folder, so the documented commands work from any folder after an install.
The config flag must be named `config`.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import tuple_parser

from dermjax import failfast
from dermjax.config import packaged_config_path, validate
from dermjax.errors import ConfigError, UserError

CONFIG_FLAG = "config"

_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the traceback as well.")

_OVERRIDE = re.compile(rf"^--?(no)?{CONFIG_FLAG}\.([^=]+)(=.*)?$", re.S)
_CONFIG_ARG = re.compile(rf"^--?{CONFIG_FLAG}(=.*)?$", re.S)
_FLAG_LIKE = re.compile(r"^--?[A-Za-z]")
_PARSERS = {
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    bool: flags.BooleanParser(),
    tuple: tuple_parser.TupleParser(),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM outside `PreemptionGuard`: the process unwinds (closing files, waiting for
    checkpoint writes) as on Ctrl-C instead of dying mid-write."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


_typed: list[str] = []


def typed_arguments() -> list[str]:
    """The command-line arguments as the user typed them, `--config.*` overrides included
    (`run_main` takes those out of `sys.argv`)."""
    return list(_typed or sys.argv)[1:]


def run_main(main: Callable[[list[str]], None]) -> None:
    """Runs `main` like `absl.app.run`, turning user errors into `error: ...` and an exit code."""
    argv = list(sys.argv)
    _typed[:] = argv
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
        argv = resolve_config_arg(argv)
        argv, overrides = split_overrides(argv)
        # ml_collections reads overrides from sys.argv itself; none must be left for it.
        sys.argv = argv

        def parse(args: list[str]) -> list[str]:
            rest = app.parse_flags_with_usage(args)
            if overrides:
                apply_overrides(flags.FLAGS[CONFIG_FLAG].value, overrides)
            return rest

        app.run(main, argv=argv, flags_parser=parse)
    except UserError as e:
        if _verbose_requested(argv):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        failfast.stop(str(e), e.exit_code)  # returns only in a single-process run
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        if _verbose_requested(argv):
            traceback.print_exc()
        name, status = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        detail = f" ({e})" if str(e) else ""
        message = (
            f"stopped by {name}{detail}: what was written before stays (checkpoints, caches, "
            "embeddings); run the same command again to continue"
        )
        print(f"error: {message}", file=sys.stderr)
        failfast.stop(message, status)  # returns only in a single-process run
        sys.exit(status)
    except Exception as e:  # a bug: in a multi-process run the others stop too
        failfast.stop_on_bug(e)  # returns only in a single-process run
        raise


def _verbose_requested(argv: Sequence[str]) -> bool:
    if flags.FLAGS.is_parsed():
        return _VERBOSE.value
    wanted = False  # errors while parsing flags: read the raw arguments, the last one wins
    for arg in argv[1:]:
        if arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=1"):
            wanted = True
        elif arg in ("--noverbose", "-noverbose", "--verbose=false", "--verbose=0"):
            wanted = False
    return wanted


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Points `--config=configs/NAME.py[:ARG]` at the packaged NAME.py when the file is absent.

    Raises ConfigError when the config file exists neither there nor in the package.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        match = _CONFIG_ARG.match(arg)
        inline = bool(match and match.group(1))
        if not match or (not inline and i + 1 >= len(out)):
            continue
        value = match.group(1)[1:] if inline else out[i + 1]
        file, sep, rest = value.partition(":")
        if os.path.isfile(file):
            continue
        head, name = os.path.split(os.path.normpath(file))
        packaged = packaged_config_path(name.removesuffix(".py"))
        if head != "configs" or not name.endswith(".py") or not packaged.is_file():
            raise ConfigError(f"--{CONFIG_FLAG}={value}: config file {file!r} not found")
        if inline:
            out[i] = f"--{CONFIG_FLAG}={packaged}{sep}{rest}"
        else:
            out[i + 1] = f"{packaged}{sep}{rest}"
    return out


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.PATH=V`, `--config.PATH V` and `--[no]config.PATH` from the rest.

    Returns (remaining argv, [(PATH, V text), ...]); a bare flag means "true", --no "false".
    """
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        match = _OVERRIDE.match(argv[i]) if i else None
        if not match:
            rest.append(argv[i])
            i += 1
            continue
        negated, path, value = match.groups()
        if value is not None:
            text = value[1:]
        elif negated:
            text = "false"
        elif i + 1 < len(argv) and not _FLAG_LIKE.match(argv[i + 1]):
            i += 1
            text = argv[i]
        else:
            text = "true"
        overrides.append((path, text))
        i += 1
    return rest, overrides


def apply_overrides(cfg: config_dict.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """Sets each (PATH, text) on `cfg`, parsed as the field's type.

    Raises one ConfigError naming every unknown field and every value that does not parse, plus
    whatever `validate` finds in the config with the good overrides applied. A repeated override
    of a tuple of names appends to it (`--config.data.datasets=ddi --config.data.datasets=isic`);
    otherwise the last one wins (`--config.data.img_size` given twice is the second size).
    """
    texts: dict[str, list[str]] = {}
    for path, text in overrides:
        texts.setdefault(path, []).append(text)
    problems: list[str] = []
    for path, values in texts.items():
        flag = f"--{CONFIG_FLAG}.{path}"
        node, key, problem = _locate(cfg, path)
        if problem:
            problems.append(f"{flag}: {problem}")
            continue
        field_type = node.get_type(key)
        try:
            node[key] = _parse(field_type, values)
        except (TypeError, ValueError):
            name = getattr(field_type, "__name__", str(field_type))
            problems.append(f"{flag}={values[-1]!r}: expected a value of type {name} or None")
    if problems:
        try:
            validate(cfg)
        except ConfigError as e:
            problems.extend(e.problems)
        raise ConfigError(problems)


def _locate(cfg: config_dict.ConfigDict, path: str):
    """(section, key, None) for an existing field, else (None, None, what is wrong)."""
    *sections, key = path.split(".")
    node = cfg
    for depth, part in enumerate([*sections, key]):
        if not isinstance(node, config_dict.ConfigDict):
            return None, None, f"{'.'.join(sections[:depth])} is a field, not a section"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {'.'.join([*sections[:depth], *close])}?)" if close else ""
            return None, None, f"no such config field{hint}"
        if depth < len(sections):
            node = node[part]
    if isinstance(node[key], config_dict.ConfigDict):
        return None, None, "is a section: set its fields (--config.SECTION.FIELD=V)"
    return node, key, None


def _parse(field_type: type, values: list[str]):
    """The override value for a field of `field_type` (last one wins, names concatenate)."""
    if values[-1] == "None":
        return None
    if field_type is tuple:  # a list of names grows; numbers (a size, weights) are replaced
        parsed = [tuple(_PARSERS[tuple].parse(v)) for v in values]
        names = [p for p in parsed if p and all(isinstance(x, str) for x in p)]
        return sum(names, ()) if names and names[-1] is parsed[-1] else parsed[-1]
    if field_type in _PARSERS:
        return _PARSERS[field_type].parse(values[-1])
    if field_type is str:
        return values[-1]
    return _literal(values[-1])


def _literal(text: str):
    """A Python literal (`0.5`, `[1, 2]`, `true`), or the text itself when it is none."""
    try:
        return ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
    except (SyntaxError, ValueError):
        return text
