"""Where a text encoder's files are: a local folder, or a snapshot in the Hugging Face cache.

Nothing is ever downloaded: a model that is not on disk is an error that prints the command
which fetches it where internet exists. The original's short names resolve through `ALIASES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from dermjax.errors import DataError

ALIASES = {
    "pubmedbert": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext",
    "biosyn": "dmis-lab/biosyn-sapbert-bc5cdr-disease",
    "sapbert": "cambridgeltl/SapBERT-from-PubMedBERT-fulltext",
    "qwen": "Qwen/Qwen3-Embedding-8B",
}
# The hub renamed PubMedBERT; a cache may hold it under either id.
_RENAMED = {
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext": (
        "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"
    ),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hub_id(model_name: str) -> str:
    """The Hugging Face id of an alias (case-insensitive); any other name unchanged."""
    return ALIASES.get(model_name.lower(), model_name)


def hf_cache_dirs() -> list[Path]:
    """Hub cache folders to search, in the order huggingface_hub and the original use them."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    candidates = [
        os.environ.get("HF_HUB_CACHE"),
        os.environ.get("HUGGINGFACE_HUB_CACHE"),
        os.path.join(home, "hub"),
        os.environ.get("TRANSFORMERS_CACHE"),
    ]
    dirs: list[Path] = []
    for candidate in candidates:
        if candidate and Path(candidate).expanduser() not in dirs:
            dirs.append(Path(candidate).expanduser())
    return dirs


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the newest snapshot with a config.json."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        pinned = repo_dir / "snapshots" / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    snapshots = [p for p in (repo_dir / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def resolve_model_dir(model_name: str) -> Path:
    """The folder holding `model_name`'s config.json, weights and tokenizer files.

    `model_name` is a local folder, an alias of `ALIASES`, or a hub id found in the Hugging Face
    cache (`models--org--name/snapshots/<revision>/`). Raises `DataError` naming what was searched
    and the download command otherwise.
    """
    local = Path(model_name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise DataError(f"text encoder folder {local} has no config.json (not a model folder)")
        return local
    model_id = hub_id(model_name)
    searched = []
    if _HUB_ID.match(model_id):
        for cache in hf_cache_dirs():
            for candidate_id in (model_id, _RENAMED.get(model_id)):
                if candidate_id is None:
                    continue
                repo_dir = cache / ("models--" + candidate_id.replace("/", "--"))
                searched.append(str(repo_dir))
                snapshot = _snapshot(repo_dir) if repo_dir.is_dir() else None
                if snapshot is not None:
                    return snapshot
    where = f"; searched {', '.join(searched)}" if searched else ""
    fetch = (
        f"fetch it where internet exists with `hf download {model_id}` (set HF_HOME to use "
        f"another cache)"
        if _HUB_ID.match(model_id)
        else "pass a folder with config.json, *.safetensors and tokenizer files"
    )
    raise DataError(
        f"text encoder {model_name!r} not found: not a local folder nor in the Hugging Face "
        f"cache{where}; {fetch}, or pass a local model folder"
    )


def revision(model_dir: Path) -> str | None:
    """The hub commit of a cache snapshot folder, None for other folders."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.name
    return None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: the index's shards, else model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise DataError(
            f"{model_dir} has no model.safetensors nor model.safetensors.index.json (only "
            f"safetensors weights are read; convert .bin weights with transformers' save_pretrained)"
        )
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DataError(f"{model_dir}: weight shards listed in the index are missing: {absent}")
    return files


def _file_sha256(path: Path) -> str:
    """A file's sha256; free for cache snapshots, whose blobs are named by it."""
    target = path.resolve()
    if _SHA256.match(target.name):
        return target.name
    with open(target, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One sha256 over config.json and every weight file (name and content)."""
    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *weight_files(model_dir)]:
        digest.update(f"{path.name}:{_file_sha256(path)}\n".encode())
    return digest.hexdigest()
