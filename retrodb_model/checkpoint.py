"""Checkpoints of the RETRO model: one directory, plain files, and the database they fit.

    DIR/
      model.safetensors   the weights (a tied output head is stored once, as wte.weight)
      config.json         {"model": RetroConfig.to_dict(), "train": the training arguments}
      optimizer.pt        AdamW state (torch.save), for resuming
      state.json          step, epoch position, RNG state, metrics history: written last,
                          so a checkpoint without it is incomplete and never loaded
      db.json             the database the model was trained against: tokenizer and encoder
                          fingerprints, chunk size, k, neighbour set, vocabulary, pad id
      log.jsonl           one JSON object per logged training step (appended)
      retrieval.json      optional: how retrieval is judged at inference: the overlap
                          floor ``min_overlap``, the ``null_boost``, the copy floor
                          ``min_run`` and the evaluation they were chosen on

A model only makes sense with the tokenizer it was trained with: :func:`check_db` (called by
:func:`load_model` when given a database) refuses any other with a
:class:`retrodb.errors.MismatchError`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from retrodb.db import RetroDB
from retrodb.encoder_files import same_fingerprint
from retrodb.errors import CorruptError, MismatchError, NotFoundError
from retrodb.fsutil import fsync_path, write_file_atomic
from retrodb_model.config import RetroConfig
from retrodb_model.model import RetrievalParts, RetroModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
DB_INFO = "db.json"
LOG = "log.jsonl"
RETRIEVAL = "retrieval.json"


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory holds besides the weights."""

    path: Path
    config: RetroConfig
    train_args: dict[str, Any]
    state: dict[str, Any]
    db_info: dict[str, Any]
    retrieval_settings: dict[str, Any] = field(default_factory=dict)
    """What ``retrieval.json`` holds (empty without one)."""
    base: dict[str, Any] | None = None
    """A retrofit of a pretrained decoder: its path, sha256, format and tokenizer
    (``retrodb_model.hf.base_info``); None for a model that retrodb trained whole."""

    @property
    def min_overlap(self) -> float:
        """The recorded overlap floor (0: every neighbour is kept)."""
        return float(self.retrieval_settings.get("min_overlap", 0.0))

    @property
    def null_boost(self) -> float:
        """The recorded null boost (0: CCA's null key as trained)."""
        return float(self.retrieval_settings.get("null_boost", 0.0))

    @property
    def min_run(self) -> int:
        """The recorded copy floor (0: off)."""
        return int(self.retrieval_settings.get("min_run", 0))

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def retrieval(self) -> bool:
        """Whether the model was trained with retrieval (False: a plain decoder)."""
        return not self.train_args.get("no_retrieval", False)


def db_info(db: RetroDB, *, neighbours: str | None, k: int) -> dict[str, Any]:
    """The facts about ``db`` that a checkpoint records (see the module docstring)."""
    tok = db.manifest.tokenizer
    return {
        "path": str(db.path),
        "tokenizer_fingerprint": tok["fingerprint"],
        "encoder_fingerprint": db.manifest.encoder["fingerprint"],
        "vocab_size": int(tok["vocab_size"]),
        "pad_id": int(tok["pad_id"]),
        "chunk_size": int(db.chunk_size),
        "k": int(k),
        "neighbour_set": neighbours,
        "generation": int(db.generation),
    }


def check_db(info: dict[str, Any], db: RetroDB, *, where: str | Path = "checkpoint") -> None:
    """Refuse a database whose tokenizer or chunk size differ from the checkpoint's.

    A different encoder only changes which neighbours are found, not what the tokens
    mean, so it is a warning (retrieval quality may suffer), not an error."""
    want = info.get("tokenizer_fingerprint")
    got = db.manifest.tokenizer["fingerprint"]
    if want != got:
        raise MismatchError(
            f"{where}: the model was trained with tokenizer {str(want)[:19]}… but {db.path} "
            f"uses {got[:19]}…; a model only works with the tokenizer it was trained with "
            "(use the database it was trained on, or one built with its --tokenizer)"
        )
    if int(info.get("chunk_size", db.chunk_size)) != db.chunk_size:
        raise MismatchError(
            f"{where}: the model was trained with chunks of {info['chunk_size']} tokens, "
            f"{db.path} has chunks of {db.chunk_size}"
        )
    trained = info.get("encoder_fingerprint")
    if trained is not None and not same_fingerprint(trained, db.manifest.encoder["fingerprint"]):
        warnings.warn(
            f"{db.path} uses another retrieval encoder than the one the model was trained "
            "with; neighbours will differ from those seen in training",
            stacklevel=2,
        )


def _json_writer(obj: Any, **kw: Any) -> Callable[[Path], object]:
    return lambda p: p.write_text(json.dumps(obj, **kw) + "\n")


def save_checkpoint(
    directory: str | Path,
    model: RetrievalParts,
    *,
    train_args: dict[str, Any],
    state: dict[str, Any],
    db_meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed). Each file is replaced
    atomically. ``state.json`` is removed first and written last, so a crash in between
    leaves an incomplete checkpoint that is refused, never weights of one step labelled
    with another."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if state.get("step", 0) > 0 and (out / STATE).exists():
        (out / STATE).unlink()  # from here until the rename below, the checkpoint is incomplete
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in model.checkpoint_tensors().items()
    }
    meta = {"format": "retrodb-retro"}
    write_file_atomic(out / WEIGHTS, lambda p: save_file(tensors, str(p), metadata=meta))
    config: dict[str, Any] = {"model": model.cfg.to_dict(), "train": train_args}
    info = getattr(model, "info", None)
    if info:  # a retrofit of a pretrained decoder: which base it belongs to
        config["base"] = info
    write_file_atomic(out / CONFIG, _json_writer(config, indent=1))
    write_file_atomic(out / DB_INFO, _json_writer(db_meta, indent=1))
    if optimizer is not None:
        write_file_atomic(out / OPTIMIZER, lambda p: torch.save(optimizer.state_dict(), p))
    fsync_path(out)  # every file above is in place before state.json names the step
    write_file_atomic(out / STATE, _json_writer(state))
    fsync_path(out)
    return out


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The metadata of the checkpoint in ``directory`` (no weights loaded)."""
    d = Path(directory)
    if not (d / STATE).is_file():
        if not d.exists():
            raise NotFoundError(f"{d}: no such checkpoint directory")
        raise NotFoundError(f"{d}: no complete checkpoint here ({STATE} missing)")
    try:
        config = json.loads((d / CONFIG).read_text())
        state = json.loads((d / STATE).read_text())
        info = json.loads((d / DB_INFO).read_text())
        settings = json.loads((d / RETRIEVAL).read_text()) if (d / RETRIEVAL).is_file() else {}
    except FileNotFoundError as exc:
        raise CorruptError(f"{exc.filename}: missing from the checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CorruptError(f"{d}: a checkpoint file is not valid JSON ({exc.msg})") from exc
    return Checkpoint(
        path=d,
        config=RetroConfig.from_dict(config["model"]),
        train_args=config.get("train", {}),
        state=state,
        db_info=info,
        retrieval_settings=settings,
        base=config.get("base"),
    )


def write_retrieval_settings(directory: str | Path, settings: dict[str, Any]) -> Path:
    """Record ``settings`` (e.g. ``{"min_overlap": 0.25, ...}``) as the checkpoint's
    ``retrieval.json``, atomically; evaluation and generation use them by default."""
    path = Path(directory) / RETRIEVAL
    write_file_atomic(path, _json_writer(settings, indent=1))
    return path


def load_weights(
    model: RetrievalParts, directory: str | Path, *, decoder_only: bool = False
) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model`` (strict).

    ``decoder_only``: parameters of the retrieval modules (encoder, CCA) that the file
    lacks keep their initial values (a retrofit from a --no-retrieval decoder whose
    retrieval modules, never trained, were saved with an older configuration)."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CorruptError(f"{path}: missing from the checkpoint")
    tensors = load_file(str(path))
    if not isinstance(model, RetroModel):  # a retrofit: the trained modules only
        from retrodb_model.hf import RetrofitModel

        assert isinstance(model, RetrofitModel)
        model.load_checkpoint_tensors(tensors, where=str(path))
        return
    if model.cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if decoder_only:
        params = dict(model.named_parameters())
        retrieval = {id(p) for mod in model.retrieval_modules() for p in mod.parameters()}
        missing = [key for key in missing if id(params.get(key)) not in retrieval]
    if missing or unexpected:
        raise CorruptError(
            f"{path}: weights do not fit the configuration (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


def open_retrofit(ckpt: Checkpoint, *, base: str | Path | None = None) -> RetrievalParts:
    """The retrofit model of ``ckpt`` on its pretrained base (``base``: the base's file or
    folder when it moved; by default the path the checkpoint recorded). A base whose
    fingerprint differs from the recorded one is refused."""
    from retrodb_model.hf import RetrofitModel, base_fingerprint, load_base

    assert ckpt.base is not None
    path = Path(base if base is not None else ckpt.base["path"])
    if not path.exists():
        raise NotFoundError(
            f"{path}: the base of {ckpt.path} is not there (give its new place with --base)"
        )
    found = base_fingerprint(path)
    if found != ckpt.base["sha256"]:
        raise MismatchError(
            f"{path}: not the base {ckpt.path} was trained on (sha256 {found[7:19]}…, "
            f"recorded {ckpt.base['sha256'][7:19]}…)"
        )
    model = RetrofitModel(ckpt.config, load_base(path), info=ckpt.base)
    load_weights(model, ckpt.path)
    return model


def open_base(path: str | Path, *, db: RetroDB | None = None) -> tuple[RetrievalParts, Checkpoint]:
    """A pretrained decoder (a Hugging Face folder or a .gguf file) as a plain decoder:
    the model (a retrofit at initialisation, which is exactly its base) and a checkpoint
    that says it was trained without retrieval. Given ``db``, its tokenizer must be the
    base's."""
    from retrodb.tokenizer import Tokenizer
    from retrodb_model.config import TrainArgs
    from retrodb_model.hf import RetrofitModel, base_info, config_for_base, load_base

    tok = Tokenizer.load(path).fingerprint
    m = db.chunk_size if db is not None else 64
    where = Path(path)
    info = {"tokenizer_fingerprint": tok, "chunk_size": m}
    if db is not None:
        check_db(info, db, where=where)
    base = load_base(path)
    cfg = config_for_base(base, chunk_size=m, k=2)
    model = RetrofitModel(cfg, base, info=base_info(path, base, tok))
    ckpt = Checkpoint(
        path=where,
        config=cfg,
        train_args={"no_retrieval": True, "seq_len": TrainArgs.seq_len},
        state={"step": 0},
        db_info=info,
        base=model.info,
    )
    return model, ckpt


def load_model(
    directory: str | Path,
    *,
    db: RetroDB | None = None,
    device: str | torch.device = "cpu",
    base: str | Path | None = None,
) -> tuple[RetrievalParts, Checkpoint]:
    """The model of a checkpoint, in eval mode, with its recorded null boost, and its
    metadata. Given ``db``, refuses it unless its tokenizer is the one the model was
    trained with.

    ``directory`` may also be a pretrained base (a Hugging Face folder or a .gguf file),
    which is then a plain decoder (:func:`open_base`); a retrofit checkpoint opens on its
    recorded base, or on ``base`` when given (:func:`open_retrofit`)."""
    from retrodb_model.hf import is_base_path

    if is_base_path(directory):
        plain, ckpt = open_base(directory, db=db)
        return plain.to(device).eval(), ckpt
    ckpt = read_checkpoint(directory)
    if db is not None:
        check_db(ckpt.db_info, db, where=ckpt.path)
    if ckpt.base is not None:
        model: RetrievalParts = open_retrofit(ckpt, base=base)
    else:
        model = RetroModel(ckpt.config)
        load_weights(model, ckpt.path)
    if ckpt.null_boost:
        model.set_null_boost(ckpt.null_boost)
    if ckpt.min_run:
        model.set_min_run(ckpt.min_run)
    return model.to(device).eval(), ckpt


__all__ = [
    "Checkpoint",
    "check_db",
    "db_info",
    "load_model",
    "load_weights",
    "open_base",
    "open_retrofit",
    "read_checkpoint",
    "save_checkpoint",
]
