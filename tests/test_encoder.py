"""retrodb.encoder: the one text -> key path (tokenize, ONNX Runtime, mean pooling)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrodb.config import EncoderConfig
from retrodb.encoder import ENCODER_FILES, Encoder, default_checkpoint, prepare_encoder
from retrodb.errors import BadInputError, CorruptError, MismatchError, NotFoundError

TEXTS = [
    "To open a file in Python, call open() with a path and a mode.",
    "Regular expressions are patterns that match text.",
    "",
    "Sorting is stable.",
    "Threads run concurrently inside one process and share memory; a lock protects shared "
    "state and a queue passes work between threads safely, one item at a time.",
    "x",
]


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, retrodb, retrodb.encoder; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_default_checkpoint_is_the_bundled_minilm() -> None:
    path = default_checkpoint()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_directory_layout(tiny_encoder_dir: Path) -> None:
    assert sorted(p.name for p in tiny_encoder_dir.iterdir()) == sorted(ENCODER_FILES)
    meta = json.loads((tiny_encoder_dir / "encoder.json").read_text())
    assert meta["format"] == 1 and meta["dim"] == 32 and meta["pooling"] == "mean"
    assert meta["pooling_in_graph"] is True and meta["do_lower_case"] is True
    assert meta["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["max_length"] == 256 and meta["normalize"] is True and meta["quantize"] == "none"
    assert "/" not in meta["source"]


def test_shapes_and_dtypes(tiny_encoder: Encoder) -> None:
    enc = tiny_encoder
    inputs = enc.tokenize(TEXTS)
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    longest = int(inputs["attention_mask"].sum(axis=1).max())
    for arr in inputs.values():
        assert arr.dtype == np.int64 and arr.shape == (len(TEXTS), longest)
    assert (inputs["input_ids"][:, 0] == 101).all()  # [CLS]
    assert inputs["attention_mask"][2].sum() == 2  # "" -> [CLS] [SEP]
    vecs = enc.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), enc.dim) and vecs.dtype == np.float32
    assert vecs.flags["C_CONTIGUOUS"] and np.isfinite(vecs).all()
    assert enc.run(inputs).shape == (len(TEXTS), enc.dim)


def test_empty_inputs(tiny_encoder: Encoder) -> None:
    empty = tiny_encoder.encode([])
    assert empty.shape == (0, tiny_encoder.dim) and empty.dtype == np.float32
    one = tiny_encoder.encode([""])
    assert one.shape == (1, tiny_encoder.dim) and np.isfinite(one).all()


def test_rejects_a_bare_string_and_bad_batch_size(tiny_encoder: Encoder) -> None:
    with pytest.raises(BadInputError):
        tiny_encoder.encode("one string")
    with pytest.raises(BadInputError):
        tiny_encoder.encode(["a"], batch_size=0)
    with pytest.raises(BadInputError):
        tiny_encoder.encode(["a", 3])  # type: ignore[list-item]


def test_truncates_to_max_length(tiny_encoder: Encoder) -> None:
    inputs = tiny_encoder.tokenize(["word " * 1000])
    assert inputs["input_ids"].shape == (1, tiny_encoder.max_length)
    assert inputs["input_ids"][0, -1] == 102  # [SEP] kept after truncation


def test_vectors_are_normalised(minilm_encoder: Encoder) -> None:
    norms = np.linalg.norm(minilm_encoder.encode(TEXTS), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_normalize_false_keeps_raw_means(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "m" / "model.onnx"
    onnx.parent.mkdir()
    shutil.copyfile(tiny_encoder_dir / "model.onnx", onnx)
    shutil.copyfile(tiny_encoder_dir / "tokenizer.json", onnx.parent / "tokenizer.json")
    prepare_encoder(onnx, tmp_path / "raw", config=EncoderConfig(normalize=False))
    raw = Encoder.open(tmp_path / "raw", threads=1).encode(TEXTS)
    unit = Encoder.open(tiny_encoder_dir, threads=1).encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_batch_order_invariance(minilm_encoder: Encoder, batch_size: int) -> None:
    together = minilm_encoder.encode(TEXTS, batch_size=batch_size)
    alone = np.stack([minilm_encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    backwards = minilm_encoder.encode(TEXTS[::-1], batch_size=batch_size)
    np.testing.assert_allclose(backwards[::-1], together, atol=1e-5)


def test_similar_texts_are_closer(minilm_encoder: Encoder) -> None:
    a, b, c = minilm_encoder.encode(
        [
            "How do I read a file in Python?",
            "Open the file with open() and call read().",
            "The cat sat on the mat in the sun.",
        ]
    )
    assert a @ b > a @ c + 0.2


def test_progress_reports_every_batch(tiny_encoder: Encoder) -> None:
    calls: list[tuple[str, int, int]] = []
    tiny_encoder.encode(TEXTS, batch_size=4, progress=lambda *a: calls.append(a), stage="keys")
    assert calls == [("keys", 0, 6), ("keys", 4, 6), ("keys", 6, 6)]


def test_fingerprint_stable_and_model_specific(
    tiny_encoder_dir: Path, minilm_encoder_dir: Path, tiny_encoder: Encoder
) -> None:
    again = Encoder.open(tiny_encoder_dir, threads=1)
    assert again.fingerprint == tiny_encoder.fingerprint
    assert len(again.fingerprint) == 64
    assert Encoder.open(minilm_encoder_dir, threads=1).fingerprint != tiny_encoder.fingerprint


def test_fingerprint_ignores_where_the_directory_is(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    prepare_encoder(tiny_encoder_dir, tmp_path / "copy", config=EncoderConfig())
    copy = Encoder.open(tmp_path / "copy", threads=1)
    assert copy.fingerprint == Encoder.open(tiny_encoder_dir, threads=1).fingerprint
    np.testing.assert_allclose(copy.encode(TEXTS), Encoder.open(tiny_encoder_dir).encode(TEXTS))


def test_copying_with_other_settings_is_a_mismatch(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MismatchError, match="max_length"):
        prepare_encoder(tiny_encoder_dir, tmp_path / "e", config=EncoderConfig(max_length=64))
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("missing", ENCODER_FILES)
def test_open_names_a_missing_file(tiny_encoder_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = tmp_path / "enc"
    shutil.copytree(tiny_encoder_dir, broken)
    (broken / missing).unlink()
    with pytest.raises(NotFoundError, match=missing):
        Encoder.open(broken)


def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nowhere"):
        Encoder.open(tmp_path / "nowhere")


def test_open_detects_changed_files(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "enc"
    shutil.copytree(tiny_encoder_dir, broken)
    with open(broken / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptError, match="model.onnx"):
        Encoder.open(broken)
    shutil.copyfile(tiny_encoder_dir / "model.onnx", broken / "model.onnx")
    (broken / "encoder.json").write_text("{not json")
    with pytest.raises(CorruptError, match="encoder.json"):
        Encoder.open(broken)


def test_open_rejects_a_garbage_model(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "enc"
    shutil.copytree(tiny_encoder_dir, broken)
    size = (broken / "model.onnx").stat().st_size
    (broken / "model.onnx").write_bytes(b"\x07" * size)
    with pytest.raises(CorruptError, match="model.onnx"):
        Encoder.open(broken)


def test_prepare_refuses_an_existing_destination(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(BadInputError, match="exists"):
        prepare_encoder(tiny_encoder_dir, tmp_path / "taken", config=EncoderConfig())
