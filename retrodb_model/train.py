"""Train a RETRO model on a retrodb neighbour set, in one process or under torchrun (DDP).

    args = TrainArgs(db="my.retrodb", neighbours="train", out="runs/retro", steps=2000)
    summary = train(args, log=print)

- Data: :class:`retrodb_model.data.RetroDataset` windows of the ``train`` split (a stable
  hash of each document id); validation loss on the ``validation`` split every
  ``eval_every`` steps. With ``no_retrieval`` the model gets no neighbours (``retrieved
  =None``): it is exactly a plain decoder, and its encoder and CCA weights stay untouched.
- Optimisation: AdamW (decay on matrices only), linear warm-up then cosine decay to
  ``min_lr_ratio * lr``, gradient clipping, optional bf16 autocast.
- Logging: every ``log_every`` steps a record (step, loss, bits per byte, lr, tokens/s,
  gradient norm, and val_loss / val_bpb when validated) goes to ``OUT/log.jsonl`` and to
  the ``log`` callback.
- Checkpoints (:mod:`retrodb_model.checkpoint`) every ``save_every`` steps and at the end;
  ``resume`` continues a run exactly where its last checkpoint left it (same data order).
- Retrofit: ``retrofit=BASE`` starts from a checkpoint trained with ``no_retrieval``,
  freezes it and trains only the neighbour encoder and CCA.
- Distributed: when launched by torchrun (``WORLD_SIZE`` > 1) the process group is
  initialised (gloo on CPU, nccl on GPUs), batches are sharded with DistributedSampler
  (``batch_size`` is per process) and only rank 0 writes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from retrodb.db import RetroDB
from retrodb.errors import BadInputError, MismatchError
from retrodb_model import checkpoint as ckpt_mod
from retrodb_model.config import RetroConfig
from retrodb_model.data import RetroDataset, collate, make_dataloader, make_datasets
from retrodb_model.evaluate import LN2, token_byte_lengths
from retrodb_model.model import IGNORE_INDEX, RetroModel

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainArgs:
    """Everything a training run depends on; stored in the checkpoint's config.json."""

    db: str
    """The database directory."""
    neighbours: str
    """The neighbour set to train on (``retrodb neighbours DB NAME``)."""
    out: str
    """The checkpoint directory."""
    preset: str = "small"
    """Model size: tiny, small or base (see RetroConfig.preset)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's RetroConfig fields."""
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this)."""
    seq_len: int = 512
    """Tokens per training sequence (a multiple of the chunk size)."""
    batch_size: int = 4
    """Sequences per step and process."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    warmup: int | None = None
    """Linear warm-up steps (default: 10 % of steps, at most 100)."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    no_retrieval: bool = False
    """Train without neighbours: a plain decoder (the baseline, and a retrofit base)."""
    retrofit: str | None = None
    """A checkpoint trained with no_retrieval: freeze it, train only CCA and the encoder."""
    k: int | None = None
    """Neighbours per chunk (default: all the neighbour set has)."""
    val_fraction: float = 0.05
    split_seed: int = 0
    eval_every: int = 100
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 20
    """Validation batches per process."""
    log_every: int = 10
    save_every: int = 500
    """Checkpoint every this many steps (and always at the end)."""
    seed: int = 0
    dtype: str = "fp32"
    """fp32, or bf16 (CPU/GPU autocast for forward and loss; weights stay fp32)."""
    threads: int | None = None
    """torch threads per process (default: the cores divided among local processes)."""
    resume: bool = False
    """Continue from the checkpoint in out (start afresh if there is none)."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise BadInputError(f"steps must be positive, got {self.steps}")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise BadInputError("batch_size and seq_len must be positive")
        if self.dtype not in ("fp32", "bf16"):
            raise BadInputError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.no_retrieval and self.retrofit:
            raise BadInputError("--retrofit trains retrieval: it cannot be --no-retrieval")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise BadInputError("lr must be positive and min_lr_ratio in [0, 1]")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {key: v for key, v in d.items() if key in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, min(100, self.steps // 10))


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    warm = args.warmup_steps
    if step < warm:
        return args.lr * (step + 1) / warm
    span = max(1, args.steps - warm)
    progress = min(1.0, (step - warm) / span)
    low = args.lr * args.min_lr_ratio
    return low + 0.5 * (args.lr - low) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    started = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        started = True
    return _Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        started_here=started,
    )


# ---------------------------------------------------------------- the run


class _Batches:
    """Batch ``step`` of a run, the same whether the run was resumed or not: the order of
    an epoch depends only on (seed, epoch), and a step is an index into it."""

    def __init__(self, ds: RetroDataset, args: TrainArgs, d: _Dist) -> None:
        self.ds = ds
        self.loader = make_dataloader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            seed=args.seed,
            drop_last=True,
            distributed=d.world > 1,
            rank=d.rank if d.world > 1 else None,
            world_size=d.world if d.world > 1 else None,
        )
        self.per_epoch = len(self.loader)
        if self.per_epoch == 0:
            raise BadInputError(
                f"the training split has {len(ds)} sequences of {ds.seq_len} tokens, fewer than "
                f"one batch ({args.batch_size} x {d.world} processes); use a smaller "
                "--batch-size or --seq-len, or more documents"
            )
        self._epoch = -1
        self._order: list[list[int]] = []

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            self._order = [list(b) for b in self.loader.batch_sampler]  # type: ignore[union-attr]
            self._epoch = epoch
        return collate(self.ds.__getitems__(self._order[offset]))


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(s: str) -> None:
    raw = torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(raw.clone())


def build_config(args: TrainArgs, db: RetroDB, k: int) -> RetroConfig:
    """The model configuration of a fresh run: the preset, sized to the database."""
    vocab = int(db.manifest.tokenizer["vocab_size"])
    overrides = dict(args.model)
    overrides.setdefault("chunk_size", db.chunk_size)
    overrides.setdefault("num_neighbours", k)
    base = RetroConfig.preset(args.preset, vocab, **overrides)
    if base.max_seq_len < args.seq_len:
        base = base.replace(max_seq_len=args.seq_len)
    return base


def train(args: TrainArgs, *, log: LogFn | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final state (step, history, parameters).
    ``log`` receives every log record on rank 0 (and notes as ``{"note": ...}``)."""
    d = _setup_distributed()
    threads = torch.get_num_threads()
    try:
        return _train(args, d, log or (lambda record: None))
    finally:
        torch.set_num_threads(threads)
        if d.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: TrainArgs, d: _Dist, log: LogFn) -> dict[str, Any]:
    def note(text: str) -> None:
        if d.main:
            log({"note": text})

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    out = Path(args.out)
    existing = (out / ckpt_mod.STATE).is_file()
    if existing and not args.resume:
        step = ckpt_mod.read_checkpoint(out).step
        raise BadInputError(
            f"{out} already holds a checkpoint (step {step}); pass --resume to continue it, "
            "or choose another --out"
        )
    resumed: ckpt_mod.Checkpoint | None = None
    if existing:
        resumed = ckpt_mod.read_checkpoint(out)
        saved = TrainArgs.from_dict(resumed.train_args)
        # The saved run defines the model and the data; the command line may extend it.
        args = dataclasses.replace(
            saved,
            steps=args.steps,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            log_every=args.log_every,
            save_every=args.save_every,
            threads=args.threads,
            resume=True,
        )

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    db = RetroDB.open(args.db)
    train_ds, val_ds = make_datasets(
        db,
        args.neighbours,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        k=args.k,
    )
    k = train_ds.k
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    meta = ckpt_mod.db_info(db, neighbours=args.neighbours, k=k)

    torch.manual_seed(args.seed)
    if resumed is not None:
        ckpt_mod.check_db(resumed.db_info, db, where=out)
        config = resumed.config
    elif args.retrofit:
        base = ckpt_mod.read_checkpoint(args.retrofit)
        ckpt_mod.check_db(base.db_info, db, where=base.path)
        if base.retrieval:
            raise BadInputError(
                f"{base.path} was trained with retrieval; --retrofit expects a decoder trained "
                "with --no-retrieval"
            )
        # the base's retrieval modules were never trained: a retrofit starts them afresh
        # with the current defaults (the CCA position bias included)
        config = base.config.replace(num_neighbours=k, cca_position_bias=True)
        if config.max_seq_len < args.seq_len:
            config = config.replace(max_seq_len=args.seq_len)
    else:
        config = build_config(args, db, k)
    if config.chunk_size != db.chunk_size:
        raise MismatchError(
            f"the model's chunk size {config.chunk_size} differs from {db.path}'s {db.chunk_size}"
        )
    if args.seq_len % config.chunk_size:
        raise BadInputError(
            f"seq_len {args.seq_len} is not a multiple of the chunk size {config.chunk_size}"
        )

    model = RetroModel(config)
    if resumed is not None:
        ckpt_mod.load_weights(model, out)
    elif args.retrofit:
        ckpt_mod.load_weights(model, args.retrofit, decoder_only=True)
    if args.retrofit:
        trainable, total = model.freeze_for_retrofit()
    else:
        if args.no_retrieval:  # the encoder and CCA get no gradient: leave them out
            for module in model.retrieval_modules():
                module.requires_grad_(False)
        unique = {id(p): p for p in model.parameters()}.values()
        trainable = sum(p.numel() for p in unique if p.requires_grad)
        total = sum(p.numel() for p in unique)
    model.to(device).train()
    opt = model.configure_optimizer(args.weight_decay, args.lr, args.betas)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "history": [], "elapsed_s": 0.0}
    if resumed is not None:
        opt_path = out / ckpt_mod.OPTIMIZER
        if opt_path.is_file():
            opt.load_state_dict(torch.load(opt_path, map_location=device, weights_only=True))
        state = dict(resumed.state)
        if d.main:  # records logged after the checkpoint was written will be logged again
            kept = [r for r in iter_log(out) if r["step"] <= state["step"]]
            (out / ckpt_mod.LOG).write_text("".join(json.dumps(r) + "\n" for r in kept))
        if "rng" in state:
            _set_rng_state(state["rng"])
        note(f"resuming {out} at step {state['step']} of {args.steps}")
    state.update(
        world_size=d.world,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_fraction=trainable / total,
    )
    if d.main:
        kind = (
            "retrofit" if args.retrofit else ("no retrieval" if args.no_retrieval else "retrieval")
        )
        note(
            f"model {args.preset if not args.retrofit else 'from ' + args.retrofit}: "
            f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"({100 * trainable / total:.1f}%), {kind}, k={k}; {len(train_ds)} train / "
            f"{len(val_ds)} validation sequences of {args.seq_len}; {d.world} process(es)"
        )

    ddp: torch.nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    batches = _Batches(train_ds, args, d)
    assert db.tokenizer is not None  # RetroDB refuses to open without one
    byte_table = torch.from_numpy(token_byte_lengths(db.tokenizer)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> None:
        if d.main:
            state.update(step=step, epoch=batches.epoch_of(step), rng=_rng_state())
            ckpt_mod.save_checkpoint(
                out,
                model,
                train_args=args.to_dict(),
                state=state,
                db_meta=meta,
                optimizer=opt,
            )
        d.barrier()

    def run_model(
        b: dict[str, torch.Tensor], m: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = b["tokens"][:, :-1].to(device)
        targets = b["targets"].to(device)
        retrieved = mask = None
        if not args.no_retrieval:
            retrieved, mask = b["retrieved"].to(device), b["retrieved_mask"].to(device)
        with _autocast(args.dtype, device):
            _, loss = m(tokens, retrieved, mask, targets)
        assert loss is not None
        return loss, targets

    def measure(loss: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
        real = targets != IGNORE_INDEX
        n = float(real.sum())
        return float(loss.detach()) * n, n, float(byte_table[targets[real]].sum())

    @torch.no_grad()
    def validate() -> dict[str, float | None]:
        if len(val_ds) == 0:
            return {"val_loss": None, "val_bpb": None}
        model.eval()
        loader = make_dataloader(
            val_ds,
            batch_size=args.batch_size,
            shuffle=False,
            distributed=d.world > 1,
            rank=d.rank if d.world > 1 else None,
            world_size=d.world if d.world > 1 else None,
        )
        sums = [0.0, 0.0, 0.0]
        for i, b in enumerate(loader):
            if i >= args.eval_batches:
                break
            loss, targets = run_model(b, model)
            sums = [a + c for a, c in zip(sums, measure(loss, targets), strict=True)]
        model.train()
        nll, n, nbytes = d.all_sum(sums)
        return {
            "val_loss": nll / n if n else None,
            "val_bpb": nll / LN2 / nbytes if nbytes else None,
        }

    step = int(state["step"])
    if step >= args.steps:
        note(f"{out} is already at step {step} (of {args.steps}): nothing to do")
    sums = [0.0, 0.0, 0.0]
    window_t0, window_steps, grad_norm = time.perf_counter(), 0, 0.0
    run_t0, elapsed0 = time.perf_counter(), float(state.get("elapsed_s", 0.0))
    tokens_per_step = args.batch_size * args.seq_len * d.world
    try:
        while step < args.steps:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, targets = run_model(batches(step), ddp)
            loss.backward()
            if args.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sums = [a + c for a, c in zip(sums, measure(loss, targets), strict=True)]
            step += 1
            window_steps += 1
            state["tokens"] = int(state["tokens"]) + tokens_per_step
            last = step == args.steps
            if step % args.log_every == 0 or last:
                nll, n, nbytes = d.all_sum(sums)
                seconds = time.perf_counter() - window_t0
                record: dict[str, Any] = {
                    "step": step,
                    "loss": nll / n if n else None,
                    "bpb": nll / LN2 / nbytes if nbytes else None,
                    "lr": lr,
                    "tokens_per_s": window_steps * tokens_per_step / seconds,
                    "grad_norm": grad_norm,
                    "tokens": state["tokens"],
                    "elapsed_s": elapsed0 + time.perf_counter() - run_t0,
                }
                if (args.eval_every and step % args.eval_every == 0) or last:
                    record.update(validate())
                state["history"].append(record)
                state["elapsed_s"] = record["elapsed_s"]
                if d.main:
                    with open(out / ckpt_mod.LOG, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    log(record)
                sums = [0.0, 0.0, 0.0]
                window_t0, window_steps = time.perf_counter(), 0
            if (args.save_every and step % args.save_every == 0) or last:
                save(step)
    except KeyboardInterrupt:
        if d.world == 1 and step > int(state["step"]):
            note(f"interrupted: saving step {step}")
            state["elapsed_s"] = elapsed0 + time.perf_counter() - run_t0
            save(step)
        raise
    return state


def iter_log(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The records of ``DIR/log.jsonl``, in order."""
    path = Path(directory) / ckpt_mod.LOG
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


__all__ = ["TrainArgs", "build_config", "iter_log", "lr_at", "train"]
