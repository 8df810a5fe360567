"""Loads an original ml_workflow YAML experiment file onto the dermjax defaults.

  python -m dermjax.main --config=configs/from_yaml.py:path/to/experiment.yaml

Sections and keys are the original's. Every problem of the file (YAML syntax with its line,
unknown keys, values of the wrong type, values `dermjax.config.validate` rejects) is reported
together in one ConfigError. The legacy key encoder.pre_existing_path is read as
data.embeddings_path.
"""

import pathlib

import yaml
from ml_collections import config_dict

from dermjax.config import validate
from dermjax.configs import default
from dermjax.errors import ConfigError


def _tuples(value):
    """YAML lists become tuples, the type dermjax's sequence fields hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _coerce(field_type, value):
    """YAML 1.1 reads `1e-7` as a string and `0` as an int; float fields take both."""
    numeric = isinstance(value, int) or (isinstance(value, str) and _is_float(value))
    if field_type is float and numeric and not isinstance(value, bool):
        return float(value)
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merge(node: config_dict.ConfigDict, values: dict, prefix: str, problems: list[str]) -> None:
    """Sets every known key; collects unknown keys and wrongly typed values in `problems`."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in node:
            problems.append(f"{path}: unknown key")
        elif isinstance(node[key], config_dict.ConfigDict):
            if isinstance(value, dict):
                _merge(node[key], value, f"{path}.", problems)
            else:
                problems.append(f"{path}={value!r}: expected a section of keys")
        else:
            field_type = node.get_type(key)
            try:
                node[key] = _coerce(field_type, value)
            except TypeError:
                problems.append(f"{path}={value!r}: expected a value of type {field_type.__name__}")


def _read(path: pathlib.Path) -> dict:
    """Parses the file; a missing file, bad syntax or a non-mapping is a ConfigError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the YAML file ({e.strerror})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context_mark", None)
        if context:
            what += f" ({e.context} at line {context.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def get_config(path: str) -> config_dict.ConfigDict:
    """Returns the default config updated with the YAML file at `path`."""
    raw = _tuples(_read(pathlib.Path(path)))
    encoder = raw.get("encoder")
    if isinstance(encoder, dict) and "pre_existing_path" in encoder:
        legacy = encoder.pop("pre_existing_path")
        data = raw.setdefault("data", {})
        if isinstance(data, dict):
            data.setdefault("embeddings_path", legacy)
    cfg = default.get_config()
    problems: list[str] = []
    _merge(cfg, raw, "", problems)
    if problems:
        problems = [f"{path}: {p}" for p in problems]
        try:
            validate(cfg)  # the fields that did load may be wrong too: report them at once
        except ConfigError as e:
            problems.extend(e.problems)
        raise ConfigError(problems)
    return cfg
