"""Encoder fixtures, prepared once per test session.

- ``minilm_checkpoint``: the bundled all-MiniLM-L6-v2 checkpoint directory (read only).
- ``minilm_encoder_dir`` / ``minilm_encoder``: it exported to an fp32 encoder directory
  (default EncoderConfig), and that directory opened (default threads).
- ``minilm_int8_encoder_dir``: that directory quantized (``quantize="int8"``).
- ``tiny_bert_checkpoint``: a random BertModel (2 layers, hidden 32, 2 heads, intermediate
  64, seed 0) saved with ``save_pretrained``, with MiniLM's WordPiece files beside it.
- ``tiny_encoder_dir`` / ``tiny_encoder``: it exported (default EncoderConfig) and opened.

Encoder directories are made once per test run (:func:`made_once`; shared by the
pytest-xdist workers) and shared by the tests: copy them before changing anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from retrodb.config import EncoderConfig
from retrodb.encoder import Encoder
from retrodb.encoder_prepare import default_checkpoint, prepare_encoder

__all__ = [
    "TOKENIZER_FILES",
    "made_once",
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


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The directory ``name``, made by ``make(path)`` once per test run.

    Under pytest-xdist every worker asks, and the workers share one copy: the first to ask
    makes it under a file lock beside it (the others wait on the lock, then use it). It is
    made under a temporary name and renamed, so a failed ``make`` leaves nothing that
    looks finished. Without xdist it is made in this session's temporary directory."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _made(factory.getbasetemp() / "made-once", name, make)
    from filelock import FileLock

    root = factory.getbasetemp().parent / "made-once"  # the run's directory, shared
    root.mkdir(exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        return _made(root, name, make)


def _made(root: Path, name: str, make: Callable[[Path], object]) -> Path:
    dest = root / name
    if not dest.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        os.rename(tmp, dest)
    return dest


@pytest.fixture(scope="session")
def minilm_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return made_once(
        tmp_path_factory,
        "minilm",
        lambda dest: prepare_encoder(None, dest, config=EncoderConfig()),
    )


@pytest.fixture(scope="session")
def minilm_encoder(minilm_encoder_dir: Path) -> Encoder:
    return Encoder.open(minilm_encoder_dir)


@pytest.fixture(scope="session")
def minilm_int8_encoder_dir(
    tmp_path_factory: pytest.TempPathFactory, minilm_encoder_dir: Path
) -> Path:
    """Quantized from the fp32 encoder directory (the same model as exporting with int8:
    tests/test_export.py checks that on the tiny model)."""
    return made_once(
        tmp_path_factory,
        "minilm-int8",
        lambda dest: prepare_encoder(
            minilm_encoder_dir, dest, config=EncoderConfig(quantize="int8")
        ),
    )


@pytest.fixture(scope="session")
def tiny_bert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return made_once(tmp_path_factory, "tiny-bert", make_tiny_bert)


@pytest.fixture(scope="session")
def tiny_encoder_dir(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    # The checkpoint is asked for only when this run has not exported it yet.
    return made_once(
        tmp_path_factory,
        "tiny",
        lambda dest: prepare_encoder(
            request.getfixturevalue("tiny_bert_checkpoint"), dest, config=EncoderConfig()
        ),
    )


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_dir: Path) -> Encoder:
    return Encoder.open(tiny_encoder_dir)
