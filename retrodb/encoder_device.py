"""Where an encoder runs: the device choice, why CUDA is missing, the fp16 model cache.

``device`` (of :meth:`retrodb.encoder.Encoder.open`): ``"cpu"`` runs ``model.onnx`` as it
is (fp32, or int8 when quantized). ``"cuda"`` (or ``"cuda:N"``) runs an fp16 version of it
made by :func:`retrodb.export.convert_fp16` through ONNX Runtime's CUDA provider (CPU
provider as fallback for nodes CUDA lacks). The fp16 model is never written into the
encoder directory, whose files the manifest and the fingerprint cover: :func:`fp16_model`
caches it in :func:`~retrodb.encoder_files.cache_dir` under the sha256 of ``model.onnx``
(or keeps it in memory when that cannot be written). The keys it makes are stored under the
fp32 model's fingerprint; they agree with the CPU keys to cosine >= 0.999 per text.
``"auto"`` picks cuda where a GPU and ONNX Runtime's CUDA provider work, else cpu, and
:func:`resolve_device` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import io
import os
import secrets
import sys
import warnings
from pathlib import Path

from .encoder_files import MODEL_FILE, SETTINGS_FILE, cache_dir, read_json
from .errors import BadInputError, DeviceUnavailableError

#: The values of ``device``: ``"cuda:N"`` names the N-th GPU, ``"cuda"`` is ``"cuda:0"``.
DEVICES = ("cpu", "cuda", "auto")

#: Puts the GPU build's files over the CPU build's: both builds install the module
#: ``onnxruntime``, and pip lays whichever comes last on top (docs/scale.md).
GPU_FIX = "pip install --force-reinstall --no-deps onnxruntime-gpu"

#: The install lines for the GPU build of ONNX Runtime.
GPU_INSTALL = f"pip install 'retrodb[gpu]' && {GPU_FIX} (docs/scale.md)"


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
    with open(directory / MODEL_FILE, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    name = f"{h.hexdigest()}-r{export.FP16_RECIPE}-ort{ort.__version__}.onnx"
    path = Path(cache if cache is not None else cache_dir()) / "fp16" / name
    if path.is_file():
        return path
    settings = read_json(directory / SETTINGS_FILE, what="encoder settings")
    data = export.convert_fp16(directory / MODEL_FILE, hidden_size=int(settings["dim"]))
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
