"""Text -> keys: BERT WordPiece (``tokenizers``) and an ONNX Runtime session, mean pooled.

:meth:`Encoder.open` opens an encoder directory (its files: :mod:`retrodb.encoder_files`;
making one: :mod:`retrodb.encoder_prepare`) on a device (:mod:`retrodb.encoder_device`:
``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; on CUDA an fp16 version of the model runs
with IO binding and large batches). :meth:`Encoder.encode` is the one function that turns
text into keys, for building a database and for querying it alike. This module imports
neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .encoder_device import fp16_model, parse_device, resolve_device
from .encoder_files import MODEL_FILE, TOKENIZER_FILE, read_settings
from .errors import BadInputError, CorruptError, DeviceUnavailableError
from .progress import ProgressFn, no_progress
from .threads import encoder_threads

#: Texts per ONNX Runtime run when ``encode`` is given no ``batch_size``, by device. On CUDA
#: a batch of 64-token chunks must be large to keep the GPU busy (benchmarks/gpu_check.sh
#: measures 256..4096).
DEFAULT_BATCH = {"cpu": 32, "cuda": 1024}


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
        :func:`~retrodb.threads.encoder_threads`: ``$RETRODB_THREADS``, else all cores).
        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (see
        :func:`~retrodb.encoder_device.resolve_device`; the choice is in ``.device`` and
        ``.device_note``). On CUDA the model runs in fp16
        (:func:`~retrodb.encoder_device.fp16_model`, cached under ``cache``, default
        :func:`~retrodb.encoder_files.cache_dir`); an int8 model runs as it is.
        ``batch_size``: texts per run when :meth:`encode` is given none (default
        :data:`DEFAULT_BATCH` of the device). NotFoundError names a missing file;
        CorruptError a file that does not load or whose size differs from the one recorded
        in encoder.json; DeviceUnavailableError a device that is not there;
        BadInputError a bad ``device`` or ``batch_size``.
        """
        from tokenizers import Tokenizer

        if batch_size is not None and batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
        directory = Path(directory)
        parse_device(device)  # reject a bad value before touching any file
        settings = read_settings(directory)
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises plain Exception
            raise CorruptError(
                f"{directory / TOKENIZER_FILE}: cannot load the tokenizer: {e}"
            ) from e
        tokenizer.enable_truncation(max_length=int(settings["max_length"]))
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(pad_id=pad_id or 0, pad_token="[PAD]")
        where, note = resolve_device(device)
        quantized = settings.get("quantize", "none") == "int8"
        if where == "cpu":
            session = ort_session(directory / MODEL_FILE, threads=threads)
            precision = "int8" if quantized else "fp32"
        else:
            index = int(where.partition(":")[2])
            model = directory / MODEL_FILE if quantized else fp16_model(directory, cache=cache)
            session = ort_session(model, threads=threads, device_id=index)
            if "CUDAExecutionProvider" not in session.get_providers():
                raise DeviceUnavailableError(
                    f"{directory / MODEL_FILE}: ONNX Runtime did not place the model on {where}"
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


def ort_session(model: Path | bytes, *, threads: int | None, device_id: int | None = None) -> Any:
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


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise BadInputError("texts must be a sequence of strings, not one string")
    batch = list(texts)
    for t in batch:
        if not isinstance(t, str):
            raise BadInputError(f"texts must be strings, got {type(t).__name__}")
    return batch
