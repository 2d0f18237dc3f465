"""The files of an encoder directory: layout, settings, fingerprint, the shared store.

An *encoder directory* holds three files (:data:`ENCODER_FILES`):

``model.onnx``
    A BERT graph taking int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids``
    when the model has them). Graphs exported by :mod:`retrodb.export` return the vector
    mean-pooled over the attention mask (``pooling_in_graph``); a plain BertModel export
    whose first output is ``last_hidden_state [n, T, d]`` is pooled at run time.
``tokenizer.json``
    The WordPiece tokenizer, with BERT's ``[CLS] ... [SEP]`` post-processing.
``encoder.json``
    Settings (format, dim, max_length, pooling, normalize, quantize, input names,
    do_lower_case, where it came from), the files' sizes and the fingerprint.

This module reads and writes those files and names an encoder by its fingerprint; it
imports neither ONNX Runtime nor the tokenizers library, so comparing fingerprints costs
nothing. :mod:`retrodb.encoder_prepare` makes a directory, :mod:`retrodb.encoder` runs one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import EncoderConfig
from .errors import CorruptError, NotFoundError
from .fsutil import FileInfo, share_file

#: The files of an encoder directory.
ENCODER_FILES = ("model.onnx", "tokenizer.json", "encoder.json")

#: Version of ``encoder.json`` written here; newer ones are refused.
ENCODER_FORMAT = 1

#: The ONNX graph, the WordPiece tokenizer and the settings, by name.
MODEL_FILE, TOKENIZER_FILE, SETTINGS_FILE = ENCODER_FILES

_REQUIRED = ("dim", "max_length", "normalize", "pooling_in_graph", "fingerprint", "files")


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; NotFoundError or CorruptError name ``what`` it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: {what} not found") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptError(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise CorruptError(f"{path}: {what} is not a JSON object")
    return data


def read_settings(directory: Path) -> dict[str, Any]:
    """The checked ``encoder.json`` of the encoder directory ``directory``.

    NotFoundError names a missing directory or file; CorruptError settings that do not
    parse, an unknown format, missing fields, or a file whose size differs from the one
    recorded.
    """
    if not directory.is_dir():
        raise NotFoundError(f"{directory}: encoder directory not found")
    for name in ENCODER_FILES:
        if not (directory / name).is_file():
            raise NotFoundError(f"{directory / name}: missing from the encoder directory")
    settings = read_json(directory / SETTINGS_FILE, what="encoder settings")
    fmt = settings.get("format")
    if fmt != ENCODER_FORMAT:
        raise CorruptError(f"{directory / SETTINGS_FILE}: unknown encoder format {fmt!r}")
    missing = [k for k in _REQUIRED if k not in settings]
    if missing:
        raise CorruptError(f"{directory / SETTINGS_FILE}: missing fields {missing}")
    for name, size in dict(settings["files"]).items():
        actual = (directory / name).stat().st_size
        if actual != size:
            raise CorruptError(f"{directory / name}: {actual} bytes, encoder.json records {size}")
    return settings


def write_settings(
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
        "files": {name: (out / name).stat().st_size for name in (MODEL_FILE, TOKENIZER_FILE)},
    }
    meta["fingerprint"] = fingerprint(out, meta)
    (out / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def fingerprint(directory: Path, meta: dict[str, Any]) -> str:
    """``sha256:`` and the hex digest over model.onnx, tokenizer.json and the settings that
    change the vectors (the form of the tokenizer's fingerprint)."""
    h = hashlib.sha256(b"retrodb-encoder-1\0")
    for name in (MODEL_FILE, TOKENIZER_FILE):
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


def cache_dir() -> Path:
    """Where the shared encoder store and converted models are kept: ``$RETRODB_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/retrodb``, else ``~/.cache/retrodb``."""
    if os.environ.get("RETRODB_CACHE_DIR"):
        return Path(os.environ["RETRODB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrodb"


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
