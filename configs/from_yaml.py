"""Loads an original ml_workflow YAML experiment file onto the dermjax defaults.

  python -m dermjax.main --config=configs/from_yaml.py:path/to/experiment.yaml

Sections and keys are the original's; keys dermjax does not know are rejected with their names.
The legacy key encoder.pre_existing_path is read as data.embeddings_path.
"""

import pathlib
import sys

import yaml
from ml_collections import config_dict

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import default


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


def _merge(node: config_dict.ConfigDict, values: dict, prefix: str, unknown: list[str]) -> None:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in node:
            unknown.append(path)
        elif isinstance(node[key], config_dict.ConfigDict):
            if isinstance(value, dict):
                _merge(node[key], value, f"{path}.", unknown)
            else:
                unknown.append(f"{path} (expected a section)")
        else:
            node[key] = _coerce(node.get_ref(key).get_type(), value)


def get_config(path: str) -> config_dict.ConfigDict:
    """Returns the default config updated with the YAML file at `path`."""
    raw = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    raw = _tuples(raw)
    encoder = raw.get("encoder") or {}
    if "pre_existing_path" in encoder:
        legacy = encoder.pop("pre_existing_path")
        raw.setdefault("data", {}).setdefault("embeddings_path", legacy)
    cfg = default.get_config()
    unknown: list[str] = []
    _merge(cfg, raw, "", unknown)
    if unknown:
        raise ValueError(f"{path}: unknown config keys: {', '.join(unknown)}")
    return cfg
