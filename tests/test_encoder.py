"""retrodb.encoder: the one text -> key path (tokenize, ONNX Runtime, mean pooling), and
the device it runs on (CPU here; the CUDA tests are marked ``gpu`` and skipped without one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrodb.encoder as encoder_mod
import retrodb.encoder_device as device_mod
import retrodb.encoder_files as files_mod
import retrodb.export
from retrodb.config import EncoderConfig
from retrodb.encoder import Encoder
from retrodb.encoder_device import cuda_problem, fp16_model, parse_device, resolve_device
from retrodb.encoder_files import ENCODER_FILES
from retrodb.encoder_prepare import default_checkpoint, prepare_encoder
from retrodb.errors import (
    BadInputError,
    CorruptError,
    DeviceUnavailableError,
    MismatchError,
    NotFoundError,
    RetroDBError,
)
from retrodb.threads import THREADS_ENV, available_cores, cgroup_quota, encoder_threads

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
        "import sys, retrodb, retrodb.encoder, retrodb.encoder_prepare; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_fingerprints_are_compared_without_the_run_time() -> None:
    """same_fingerprint (neighbour sets, checkpoints, the database) loads no ONNX Runtime."""
    code = (
        "import sys, retrodb.encoder_files; "
        "bad = [m for m in ('onnxruntime', 'tokenizers', 'retrodb.encoder') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
    assert again.fingerprint.startswith("sha256:") and len(again.fingerprint) == 7 + 64
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


# ---------------------------------------------------------------- devices

CUDA_HERE = cuda_problem(0) is None
needs_cuda = pytest.mark.skipif(not CUDA_HERE, reason="no CUDA GPU with ONNX Runtime's provider")
no_cuda_here = pytest.mark.skipif(CUDA_HERE, reason="a CUDA GPU is present")


@pytest.fixture
def fresh_cuda_check():
    """cuda_problem() caches its answer per process: clear it around tests that fake one."""
    cuda_problem.cache_clear()
    yield
    cuda_problem.cache_clear()


def test_parse_device() -> None:
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("CUDA") == ("cuda", 0)
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("auto") == ("auto", 0)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", ""):
        with pytest.raises(BadInputError, match="device must be"):
            parse_device(bad)


def test_open_rejects_a_bad_device_before_reading(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="'tpu'"):
        Encoder.open(tmp_path / "nowhere", device="tpu")
    with pytest.raises(BadInputError, match="batch_size"):
        Encoder.open(tmp_path / "nowhere", batch_size=0)


@no_cuda_here
def test_cuda_absent_is_one_clear_error(tiny_encoder_dir: Path) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        Encoder.open(tiny_encoder_dir, device="cuda")
    message = str(info.value)
    assert isinstance(info.value, RetroDBError) and "\n" not in message
    assert message.startswith("device 'cuda' is not available: ")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # The CPU build of ONNX Runtime (CI's): the message says how to get the GPU one.
        assert "pip install 'retrodb[gpu]'" in message and "onnxruntime" in message
    else:  # the GPU build without a GPU, a driver or the CUDA libraries
        assert "NVIDIA driver" in message or "CUDA provider" in message


@no_cuda_here
def test_auto_picks_cpu_here_and_says_why(tiny_encoder_dir: Path, tiny_encoder: Encoder) -> None:
    enc = Encoder.open(tiny_encoder_dir, threads=1, device="auto")
    assert enc.device == "cpu" and enc.precision == "fp32"
    assert enc.device_note.startswith("auto: ") and enc.providers == ["CPUExecutionProvider"]
    assert enc.batch_size == encoder_mod.DEFAULT_BATCH["cpu"]
    np.testing.assert_array_equal(enc.encode(TEXTS), tiny_encoder.encode(TEXTS))
    assert resolve_device("cpu") == ("cpu", "asked for")


def test_cuda_messages(monkeypatch: pytest.MonkeyPatch, fresh_cuda_check: None) -> None:
    """Each way CUDA can be missing gets its own reason and fix (faked: no GPU here)."""
    import onnxruntime as ort

    versions = {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}

    def version(dist: str) -> str:
        if dist not in versions:
            raise device_mod.importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(device_mod.importlib.metadata, "version", version)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "both installed" in (cuda_problem(0) or "")
    cuda_problem.cache_clear()
    del versions["onnxruntime-gpu"]
    assert "CPU build without CUDA" in (cuda_problem(0) or "")
    cuda_problem.cache_clear()
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(device_mod, "_driver_present", lambda: False)
    assert "no NVIDIA driver" in (cuda_problem(0) or "")
    cuda_problem.cache_clear()
    monkeypatch.setattr(device_mod, "_driver_present", lambda: True)
    monkeypatch.setattr(device_mod, "_cuda_probe", lambda index: False)
    monkeypatch.setattr(device_mod, "_missing_cuda_libraries", lambda: ["libcudnn.so.9"])
    assert "cannot load libcudnn.so.9" in (cuda_problem(0) or "")
    cuda_problem.cache_clear()
    monkeypatch.setattr(device_mod, "_missing_cuda_libraries", lambda: [])
    assert "did not start on GPU 3" in (cuda_problem(3) or "")
    with pytest.raises(DeviceUnavailableError, match="'cuda:3'"):
        resolve_device("cuda:3")
    device, note = resolve_device("auto")
    assert device == "cpu" and note.startswith("auto: ONNX Runtime's CUDA provider")
    cuda_problem.cache_clear()
    monkeypatch.setattr(device_mod, "_cuda_probe", lambda index: True)
    assert resolve_device("auto") == ("cuda:0", "auto: a CUDA GPU is present")
    assert resolve_device("cuda:2") == ("cuda:2", "asked for")


def test_threads_come_from_the_argument_then_the_environment_then_the_cores(
    tiny_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert Encoder.open(tiny_encoder_dir).threads == available_cores()
    monkeypatch.setenv(THREADS_ENV, "3")
    assert Encoder.open(tiny_encoder_dir).threads == 3
    assert Encoder.open(tiny_encoder_dir, threads=1).threads == 1
    for bad in ("0", "-2", "many", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(BadInputError, match=f"{THREADS_ENV}='{bad}'"):
            Encoder.open(tiny_encoder_dir)
    monkeypatch.setenv(THREADS_ENV, " ")
    assert encoder_threads() == available_cores()


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000", None), ("150000 100000", 1), ("400000 100000", 4), ("50000 100000", 1)],
)
def test_a_cgroup_quota_caps_the_cores(tmp_path: Path, text: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert cgroup_quota(tmp_path / "cpu.max") == cpus
    assert cgroup_quota(tmp_path / "absent") is None


def test_batch_size_default_and_override(tiny_encoder_dir: Path) -> None:
    enc = Encoder.open(tiny_encoder_dir, threads=1, batch_size=4)
    assert enc.batch_size == 4
    calls: list[tuple[str, int, int]] = []
    enc.encode(TEXTS, progress=lambda *a: calls.append(a))
    assert calls == [("encode", 0, 6), ("encode", 4, 6), ("encode", 6, 6)]
    calls.clear()
    enc.encode(TEXTS, batch_size=6, progress=lambda *a: calls.append(a))
    assert calls == [("encode", 0, 6), ("encode", 6, 6)]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_prefetched_tokenization_gives_the_same_keys(
    tiny_encoder_dir: Path, batch_size: int
) -> None:
    """The GPU path tokenizes one batch ahead on a thread; forced on here, on the CPU."""
    plain = Encoder.open(tiny_encoder_dir, threads=1)
    ahead = Encoder.open(tiny_encoder_dir, threads=1)
    ahead._prefetch = True
    texts = TEXTS * 3
    np.testing.assert_array_equal(
        ahead.encode(texts, batch_size=batch_size), plain.encode(texts, batch_size=batch_size)
    )


def test_fp16_model_is_cached_outside_the_encoder_directory(
    tiny_encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.read_bytes() for p in tiny_encoder_dir.iterdir()}
    cached = fp16_model(tiny_encoder_dir, cache=tmp_path / "cache")
    assert isinstance(cached, Path) and cached.parent == tmp_path / "cache" / "fp16"
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp file left
    assert {p.name: p.read_bytes() for p in tiny_encoder_dir.iterdir()} == before

    def no_conversion(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("converted again")

    monkeypatch.setattr(retrodb.export, "convert_fp16", no_conversion)
    assert fp16_model(tiny_encoder_dir, cache=tmp_path / "cache") == cached
    # Another model (one changed byte in a copy) is another cache entry.
    other = tmp_path / "other"
    shutil.copytree(tiny_encoder_dir, other)
    monkeypatch.undo()
    data = bytearray((other / "model.onnx").read_bytes())
    data[-1] ^= 1
    (other / "model.onnx").write_bytes(bytes(data))
    assert fp16_model(other, cache=tmp_path / "cache") != cached


def test_fp16_model_without_a_writable_cache_stays_in_memory(
    tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    model = fp16_model(tiny_encoder_dir, cache=blocked)
    assert isinstance(model, bytes) and len(model) > 1000


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRODB_CACHE_DIR", str(tmp_path / "r"))
    assert files_mod.cache_dir() == tmp_path / "r"
    monkeypatch.delenv("RETRODB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert files_mod.cache_dir() == tmp_path / "x" / "retrodb"


@pytest.mark.gpu
@needs_cuda
def test_cuda_keys_agree_with_cpu_keys(minilm_encoder_dir: Path, minilm_encoder: Encoder) -> None:
    gpu = Encoder.open(minilm_encoder_dir, device="cuda")
    assert gpu.device == "cuda:0" and gpu.precision == "fp16"
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert gpu.fingerprint == minilm_encoder.fingerprint
    texts = [*TEXTS, *(f"{t} ({i})" for i, t in enumerate(TEXTS * 20))]
    a, b = gpu.encode(texts), minilm_encoder.encode(texts)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.999, cos.min()
    np.testing.assert_allclose(gpu.encode(texts, batch_size=7), a, atol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_cuda_where_there_is_one(tiny_encoder_dir: Path) -> None:
    enc = Encoder.open(tiny_encoder_dir, device="auto")
    assert enc.device == "cuda:0" and enc.device_note == "auto: a CUDA GPU is present"
    assert enc.batch_size == encoder_mod.DEFAULT_BATCH["cuda"]
