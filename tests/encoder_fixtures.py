"""Encoder fixtures, prepared once per test session.

- ``minilm_checkpoint``: the bundled all-MiniLM-L6-v2 checkpoint directory (read only).
- ``minilm_encoder_dir`` / ``minilm_encoder``: it exported to an fp32 encoder directory
  (default EncoderConfig), and that directory opened with 2 threads.
- ``minilm_int8_encoder_dir``: the same with ``quantize="int8"``.
- ``tiny_bert_checkpoint``: a random BertModel (2 layers, hidden 32, 2 heads, intermediate
  64, seed 0) saved with ``save_pretrained``, with MiniLM's WordPiece files beside it.
- ``tiny_encoder_dir`` / ``tiny_encoder``: it exported (default EncoderConfig) and opened.

Encoder directories are shared by the session: copy them before changing anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retrodb.config import EncoderConfig
from retrodb.encoder import Encoder, default_checkpoint, prepare_encoder

__all__ = [
    "TOKENIZER_FILES",
    "make_tiny_bert",
    "minilm_checkpoint",
    "minilm_encoder",
    "minilm_encoder_dir",
    "minilm_int8_encoder_dir",
    "tiny_bert_checkpoint",
    "tiny_encoder",
    "tiny_encoder_dir",
]

#: WordPiece files copied from MiniLM into the tiny checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def make_tiny_bert(
    dest: Path, *, seed: int = 0, tokenizer_files: tuple[str, ...] = TOKENIZER_FILES
) -> Path:
    """Save a tiny random BertModel with MiniLM's vocabulary and tokenizer files at ``dest``."""
    import torch
    from transformers import BertConfig, BertModel

    source = default_checkpoint()
    vocab_size = json.loads((source / "config.json").read_text())["vocab_size"]
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    dest.mkdir(parents=True)
    model.save_pretrained(str(dest))
    for name in tokenizer_files:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def minilm_checkpoint() -> Path:
    return default_checkpoint()


@pytest.fixture(scope="session")
def minilm_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("encoders") / "minilm"
    prepare_encoder(None, dest, config=EncoderConfig())
    return dest


@pytest.fixture(scope="session")
def minilm_encoder(minilm_encoder_dir: Path) -> Encoder:
    return Encoder.open(minilm_encoder_dir, threads=2)


@pytest.fixture(scope="session")
def minilm_int8_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("encoders") / "minilm-int8"
    prepare_encoder(None, dest, config=EncoderConfig(quantize="int8"))
    return dest


@pytest.fixture(scope="session")
def tiny_bert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("checkpoints") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_checkpoint: Path) -> Path:
    dest = tmp_path_factory.mktemp("encoders") / "tiny"
    prepare_encoder(tiny_bert_checkpoint, dest, config=EncoderConfig())
    return dest


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_dir: Path) -> Encoder:
    return Encoder.open(tiny_encoder_dir, threads=2)
