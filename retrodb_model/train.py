"""Train a RETRO model on a retrodb neighbour set, in one process or under torchrun (DDP).

    args = TrainArgs(db="my.retrodb", neighbours="train", out="runs/retro", steps=2000)
    summary = train(args, log=print)

- Data: :class:`retrodb_model.data.RetroDataset` windows of the ``train`` split (a stable
  hash of each document id); validation loss on the ``validation`` split every
  ``eval_every`` steps. With ``no_retrieval`` the model gets no neighbours (``retrieved
  =None``): it is exactly a plain decoder, and its encoder and CCA weights stay untouched.
- Optimisation: AdamW (decay on matrices only), linear warm-up then cosine decay to
  ``min_lr_ratio * lr``, gradient clipping, optional bf16 autocast.
- Data: a real DataLoader (``workers`` processes fetch and collate) over
  :class:`retrodb_model.data.StepBatches`, whose only state is the step, so a resumed run
  sees exactly the batches an uninterrupted one sees.
- Logging: every ``log_every`` steps a record (step, loss, bits per byte, lr, tokens/s,
  gradient norm, and val_loss / val_bpb when validated) goes to ``OUT/log.jsonl`` and to
  the ``log`` callback.
- Checkpoints (:mod:`retrodb_model.checkpoint`) every ``save_every`` steps, at the end
  and on Ctrl-C (:class:`TrainingInterrupted` says which step was saved); ``resume``
  continues a run exactly where its last checkpoint left it (same data order).
- Nothing is written before every input is checked: a run that fails validation leaves
  no ``out`` directory behind.
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
import itertools
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
import torch.nn.functional as F

from retrodb.db import RetroDB
from retrodb.errors import BadInputError, MismatchError, NotFoundError
from retrodb_model import checkpoint as ckpt_mod
from retrodb_model.config import RetroConfig, TrainArgs, default_lr
from retrodb_model.data import (
    RetroDataset,
    StepBatches,
    make_dataloader,
    make_datasets,
    make_train_loader,
)
from retrodb_model.evaluate import LN2, token_byte_lengths
from retrodb_model.kernels import IGNORE_INDEX
from retrodb_model.model import RetrievalParts, RetroModel
from retrodb_model.threads import default_threads

LogFn = Callable[[dict[str, Any]], None]


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if args.lr is None:
        raise BadInputError("lr_at needs the run's learning rate (Trainer.setup fills it in)")
    peak = args.lr
    warm = args.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, args.steps - warm)
    progress = min(1.0, (step - warm) / span)
    low = peak * args.min_lr_ratio
    return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * progress))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once the run has stopped: ``step`` is the last
    completed step, ``saved`` the step of the checkpoint written on the interrupt (None:
    none was), ``checkpoint`` the step of the checkpoint ``out`` holds now (None: none)."""

    def __init__(self, out: Path, *, step: int, saved: int | None, checkpoint: int | None):
        self.out, self.step, self.saved, self.checkpoint = out, step, saved, checkpoint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        out, step = self.out, self.step
        if self.saved is not None:
            return f"interrupted after step {step}: saved it in {out} (continue with --resume)"
        if self.checkpoint == step:
            return (
                f"interrupted at step {step}: {out} holds its checkpoint (continue with --resume)"
            )
        kept = (
            "no checkpoint was written"
            if self.checkpoint is None
            else f"{out} holds the checkpoint of step {self.checkpoint}"
        )
        when = f"after step {step}" if step else "before the first step"
        return f"interrupted {when}, which was not saved; {kept}"


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


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(s: str) -> None:
    raw = torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(raw.clone())


# ---------------------------------------------------------------- setup (writes nothing)


def build_config(args: TrainArgs, db: RetroDB, k: int) -> RetroConfig:
    """The model configuration of a fresh run: the preset, sized to the database."""
    return RetroConfig.for_database(db, args.preset, k=k, seq_len=args.seq_len, **args.model)


def _resolve_args(args: TrainArgs) -> tuple[TrainArgs, ckpt_mod.Checkpoint | None]:
    """The arguments of the run and the checkpoint it resumes (None: a fresh run)."""
    out = Path(args.out)
    if not (out / ckpt_mod.STATE).is_file():
        return args, None
    resumed = ckpt_mod.read_checkpoint(out)
    if not args.resume:
        raise BadInputError(
            f"{out} already holds a checkpoint (step {resumed.step}); pass --resume to "
            "continue it, or choose another --out"
        )
    # The saved run defines the model and the data; the command line may extend it, and
    # says where the checkpoint is now (a folder moved or copied resumes where it lies).
    saved = TrainArgs.from_dict(resumed.train_args)
    args = dataclasses.replace(
        saved,
        out=args.out,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
        save_every=args.save_every,
        threads=args.threads,
        workers=args.workers,
        resume=True,
    )
    return args, resumed


#: The RetroConfig fields of the retrieval modules, which a retrofit starts afresh.
RETROFIT_FIELDS = (
    "cca_position_bias",
    "enc_input",
    "cca_null",
    "cca_overlap_gate",
    "cca_copy_bias",
)


def _pretrained_retrofit(
    args: TrainArgs, db: RetroDB, k: int, resumed: ckpt_mod.Checkpoint | None
) -> RetrievalParts | None:
    """The model of a retrofit of a pretrained decoder (a Hugging Face folder or a .gguf
    file): the resumed checkpoint's on its recorded base, or a fresh one on --retrofit
    (its tokenizer must be the database's, checked before the weights are read). None for
    any other run."""
    from retrodb.tokenizer import Tokenizer
    from retrodb_model import hf

    if resumed is not None:
        if resumed.base is None:
            return None
        ckpt_mod.check_db(resumed.db_info, db, where=resumed.path)
        return ckpt_mod.open_retrofit(resumed)
    if not args.retrofit or not hf.is_base_path(args.retrofit):
        return None
    path = Path(args.retrofit)
    if not path.exists():
        raise NotFoundError(f"{path}: base model not found")
    tok = Tokenizer.load(path).fingerprint
    if tok != db.manifest.tokenizer["fingerprint"]:
        raise MismatchError(
            f"{path}: its tokenizer ({tok[:19]}…) is not the one of {db.path} "
            f"({db.manifest.tokenizer['fingerprint'][:19]}…); build the database with "
            f"--tokenizer {path}"
        )
    base = hf.load_base(path)
    try:
        config = hf.config_for_base(base, chunk_size=db.chunk_size, k=k, **args.model)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"--model: {exc}") from exc
    torch.manual_seed(args.seed)
    return hf.RetrofitModel(config, base, info=hf.base_info(path, base, tok))


def _model_config(
    args: TrainArgs, db: RetroDB, k: int, resumed: ckpt_mod.Checkpoint | None
) -> RetroConfig:
    """The resumed run's configuration, the retrofit base's, or a fresh one; checked
    against the database and the sequence length."""
    if resumed is not None:
        ckpt_mod.check_db(resumed.db_info, db, where=resumed.path)
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
        # with the current defaults (position bias, encoder input, null key and overlap
        # gate) unless --model chooses otherwise
        fresh = {name: getattr(RetroConfig, name) for name in RETROFIT_FIELDS}
        fresh.update({key: v for key, v in args.model.items() if key in RETROFIT_FIELDS})
        config = base.config.replace(num_neighbours=k, **fresh)
        if config.max_seq_len < args.seq_len:
            config = config.replace(max_seq_len=args.seq_len)
    else:
        config = build_config(args, db, k)
    return _check_config(config, args, db)


def _check_config(config: RetroConfig, args: TrainArgs, db: RetroDB) -> RetroConfig:
    if config.chunk_size != db.chunk_size:
        raise MismatchError(
            f"the model's chunk size {config.chunk_size} differs from {db.path}'s {db.chunk_size}"
        )
    if args.seq_len % config.chunk_size:
        raise BadInputError(
            f"seq_len {args.seq_len} is not a multiple of the chunk size {config.chunk_size}"
        )
    if args.seq_len > config.max_seq_len:
        raise BadInputError(
            f"seq_len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}"
        )
    return config


def _build_model(
    args: TrainArgs, config: RetroConfig, resumed: ckpt_mod.Checkpoint | None
) -> tuple[RetroModel, int, int]:
    """The model with its starting weights and what is trained; (model, trainable,
    total) parameter counts."""
    torch.manual_seed(args.seed)
    model = RetroModel(config)
    if resumed is not None:
        ckpt_mod.load_weights(model, resumed.path)
    elif args.retrofit:
        ckpt_mod.load_weights(model, args.retrofit, decoder_only=True)
    if args.retrofit:
        trainable, total = model.freeze_for_retrofit()
        return model, trainable, total
    if args.no_retrieval:  # the encoder and CCA get no gradient: leave them out
        for module in model.retrieval_modules():
            module.requires_grad_(False)
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return model, trainable, sum(p.numel() for p in unique)


@dataclass
class _Window:
    """What the steps since the last log record add up to: summed NLL (nats), target
    tokens and their UTF-8 bytes; how many steps, since when."""

    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, values: tuple[float, float, float]) -> None:
        self.sums = [a + b for a, b in zip(self.sums, values, strict=True)]


def _bpb(nll: float, n: float, nbytes: float) -> dict[str, float | None]:
    return {"loss": nll / n if n else None, "bpb": nll / LN2 / nbytes if nbytes else None}


def distractor_rows(
    batch_size: int, share: float, seed: int, step: int, rank: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, donors) of a step's batch under ``--distractors share``: the sequences (each
    with probability ``share``) that get the neighbours of another sequence of the batch,
    and whose. A function of (seed, step, rank) alone, so a resumed run draws the same."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + rank)
    pick = torch.rand(batch_size, generator=gen) < share
    offset = torch.randint(1, max(batch_size, 2), (batch_size,), generator=gen)
    donors = (torch.arange(batch_size) + offset) % batch_size
    rows = pick.nonzero().flatten()
    return rows, donors[rows]


# ---------------------------------------------------------------- the run


class Trainer:
    """One training run in parts: :meth:`setup` checks every input and builds the model,
    the optimizer and the data (resuming when asked) without writing anything;
    :meth:`run` loops over :meth:`step`, :meth:`log_window` (which calls :meth:`validate`)
    and :meth:`save`."""

    def __init__(
        self,
        args: TrainArgs,
        d: _Dist,
        log: LogFn,
        *,
        db: RetroDB,
        data: tuple[RetroDataset, RetroDataset],
        model: RetrievalParts,
        counts: tuple[int, int],
        resumed: ckpt_mod.Checkpoint | None,
    ) -> None:
        self.args, self.d, self.log = args, d, log
        self.out = Path(args.out)
        self.db, (self.train_ds, self.val_ds) = db, data
        self.device = _device()
        self.model = model.to(self.device).train()
        self.ddp: torch.nn.Module = self._wrap(self.model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = model.configure_optimizer(args.weight_decay, lr_at(0, args), args.betas)
        assert db.tokenizer is not None  # RetroDB refuses to open without one
        self.byte_table = torch.from_numpy(token_byte_lengths(db.tokenizer)).to(self.device)
        self.meta = ckpt_mod.db_info(db, neighbours=args.neighbours, k=self.train_ds.k)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "history": [], "elapsed_s": 0.0}
        self.checkpoint: int | None = None  # the step of the checkpoint in out
        self.resumed = resumed
        if resumed is not None:
            self._restore(resumed)
        trainable, total = counts
        self.state.update(
            world_size=d.world,
            trainable_parameters=trainable,
            total_parameters=total,
            trainable_fraction=trainable / total,
        )
        self.loader = make_train_loader(
            self.train_ds,
            batch_size=args.batch_size,
            seed=args.seed,
            start=int(self.state["step"]),
            rank=d.rank,
            world_size=d.world,
            num_workers=args.workers,
            pin_memory=self.device.type == "cuda",
        )
        self.sampler: StepBatches = self.loader.batch_sampler  # type: ignore[assignment]
        if self.sampler.per_epoch == 0:
            raise BadInputError(
                f"the training split has {len(self.train_ds)} sequences of "
                f"{self.train_ds.seq_len} tokens, fewer than one batch ({args.batch_size} x "
                f"{d.world} processes); use a smaller --batch-size or --seq-len, or more "
                "documents"
            )
        self._elapsed0 = float(self.state.get("elapsed_s", 0.0))
        self._t0 = time.perf_counter()  # reset when the run starts
        self._updating = False  # inside the optimizer update: the weights are mid-step
        self.grad_norm = 0.0  # of the last step (0 without clipping)
        self.distractor_kl = [0.0, 0.0]  # nats and targets of distracted rows since the log

    # ---- setup

    @classmethod
    def setup(cls, args: TrainArgs, d: _Dist, log: LogFn) -> Trainer:
        """Check everything and build the run; nothing is written."""
        torch.set_num_threads(args.threads or default_threads(d.local_world))
        args, resumed = _resolve_args(args)
        db = RetroDB.open(args.db)
        data = make_datasets(
            db,
            args.neighbours,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            k=args.k,
        )
        pretrained = _pretrained_retrofit(args, db, data[0].k, resumed)
        if pretrained is not None:
            config = _check_config(pretrained.cfg, args, db)
        else:
            config = _model_config(args, db, data[0].k, resumed)
        if args.lr is None:  # recorded in the checkpoint: a resumed run keeps it
            args = dataclasses.replace(args, lr=default_lr(config.dim))
        if pretrained is not None:
            model: RetrievalParts = pretrained
            counts = pretrained.freeze_for_retrofit()
        else:
            model, *sizes = _build_model(args, config, resumed)
            counts = (sizes[0], sizes[1])
        return cls(args, d, log, db=db, data=data, model=model, counts=counts, resumed=resumed)

    def _wrap(self, model: RetrievalParts) -> torch.nn.Module:
        if self.d.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _restore(self, resumed: ckpt_mod.Checkpoint) -> None:
        """Optimizer state, counters, history and the RNG of the resumed checkpoint."""
        opt_path = resumed.path / ckpt_mod.OPTIMIZER
        if opt_path.is_file():
            state = torch.load(opt_path, map_location=self.device, weights_only=True)
            self.opt.load_state_dict(state)
        self.state = dict(resumed.state)
        self.checkpoint = int(self.state["step"])
        if "rng" in self.state:
            _set_rng_state(self.state["rng"])

    def note(self, text: str) -> None:
        if self.d.main:
            self.log({"note": text})

    def _start(self) -> None:
        """Create the output directory (the first write of the run) and say what runs."""
        args, step = self.args, int(self.state["step"])
        self._t0 = time.perf_counter()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed is not None:  # records logged after the checkpoint: again
                kept = [r for r in iter_log(self.out) if r["step"] <= step]
                text = "".join(json.dumps(r) + "\n" for r in kept)
                (self.out / ckpt_mod.LOG).write_text(text)
                self.note(f"resuming {self.out} at step {step} of {args.steps}")
        trainable, total = self.state["trainable_parameters"], self.state["total_parameters"]
        kind = "retrofit" if args.retrofit else "no retrieval" if args.no_retrieval else "retrieval"
        self.note(
            f"model {args.preset if not args.retrofit else 'from ' + args.retrofit}: "
            f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"({100 * trainable / total:.1f}%), {kind}, k={self.train_ds.k}; "
            f"{len(self.train_ds)} train / {len(self.val_ds)} validation sequences of "
            f"{args.seq_len}; {self.d.world} process(es)"
        )
        if step >= args.steps:
            self.note(f"{self.out} is already at step {step} (of {args.steps}): nothing to do")

    # ---- the loop

    def run(self) -> dict[str, Any]:
        """Train up to ``args.steps``; returns the final state (step, history, counts).
        Ctrl-C saves the last completed step (single process) and raises
        :class:`TrainingInterrupted`."""
        step = int(self.state["step"])
        batches: Iterator[dict[str, torch.Tensor]] | None = None
        try:
            self._start()
            batches = iter(self.loader)  # starts the workers, if any
            window = _Window()
            while step < self.args.steps:
                window.add(self.step(next(batches), step))
                step += 1
                window.steps += 1
                self.state["tokens"] = int(self.state["tokens"]) + self.tokens_per_step
                last = step == self.args.steps
                if step % self.args.log_every == 0 or last:
                    self.log_window(step, window, validate=self._due(step, self.args.eval_every))
                    window = _Window()
                if self._due(step, self.args.save_every):
                    self.save(step)
        except KeyboardInterrupt:
            # the loader's workers stop here, not whenever the traceback that holds them is freed
            batches = None
            self._interrupted(step)
        return self.state

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.d.world

    def _due(self, step: int, every: int) -> bool:
        """Whether something done every ``every`` steps (0: only at the end) is due."""
        return step == self.args.steps or bool(every and step % every == 0)

    def _forward(
        self, batch: dict[str, torch.Tensor], module: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, targets) of one batch."""
        tokens = batch["tokens"][:, :-1].to(self.device)
        targets = batch["targets"].to(self.device)
        retrieved = mask = None
        if not self.args.no_retrieval:
            retrieved = batch["retrieved"].to(self.device)
            mask = batch["retrieved_mask"].to(self.device)
        with _autocast(self.args.dtype, self.device):
            _, loss = module(tokens, retrieved, mask, targets)
        assert loss is not None
        return loss, targets

    def _distractors(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, donors) of this step under ``--distractors``; None when no row is."""
        a = self.args
        if not a.distractors:
            return None
        rows, donors = distractor_rows(a.batch_size, a.distractors, a.seed, step, self.d.rank)
        return (rows, donors) if len(rows) else None

    def _forward_distracted(
        self, batch: dict[str, torch.Tensor], rows: torch.Tensor, donors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to minimise, next-token loss, its targets) of a batch whose ``rows`` get
        the neighbours of ``donors``: their loss is the KL divergence of the prediction
        from the model's own with retrieval off (held fixed), in nats per target; the other
        rows' is the next-token loss. Both are summed over targets and divided by them all.
        The next-token loss and its targets (the distracted rows ignored) are what is
        logged."""
        tokens = batch["tokens"][:, :-1].to(self.device)
        targets = batch["targets"].to(self.device)
        source = torch.arange(tokens.shape[0])  # whose neighbours each row reads
        source[rows] = donors
        retrieved = batch["retrieved"][source].to(self.device)
        mask = batch["retrieved_mask"][source].to(self.device)
        rows = rows.to(self.device)
        distracted = (source != torch.arange(tokens.shape[0])).to(self.device)
        real = targets != IGNORE_INDEX
        with _autocast(self.args.dtype, self.device):
            with torch.no_grad():
                plain, _ = self.model(tokens[rows])  # retrieval off
            logits, _ = self.ddp(tokens, retrieved, mask)
        logp = F.log_softmax(logits.float(), dim=-1)
        lm_targets = targets.masked_fill(distracted[:, None], IGNORE_INDEX)
        lm_sum = F.nll_loss(
            logp.flatten(0, 1), lm_targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        p_plain = F.log_softmax(plain.float(), dim=-1)
        kl = F.kl_div(logp[rows], p_plain, log_target=True, reduction="none").sum(-1)
        kl_sum = (kl * real[rows]).sum()
        n_lm = (lm_targets != IGNORE_INDEX).sum()
        loss = (lm_sum + kl_sum) / real.sum().clamp(min=1)
        self.distractor_kl[0] += float(kl_sum.detach())
        self.distractor_kl[1] += float(real[rows].sum())
        return loss, (lm_sum / n_lm.clamp(min=1)).detach(), lm_targets

    def _measure(self, loss: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
        """(summed NLL in nats, target tokens, their UTF-8 bytes) of one batch."""
        real = targets != IGNORE_INDEX
        n = float(real.sum())
        return float(loss.detach()) * n, n, float(self.byte_table[targets[real]].sum())

    def step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[float, float, float]:
        """One optimizer step (0-based ``step`` sets the learning rate) on ``batch``;
        returns what :meth:`_measure` measures of it (with ``--distractors``, of the rows
        trained on their next tokens)."""
        lr = lr_at(step, self.args)
        for group in self.opt.param_groups:
            group["lr"] = lr
        drawn = self._distractors(step)
        if drawn is not None:
            loss, lm_loss, targets = self._forward_distracted(batch, *drawn)
        else:
            loss, targets = self._forward(batch, self.ddp)
            lm_loss = loss
        loss.backward()
        if self.args.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
            self.grad_norm = float(norm)
        self._updating = True
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._updating = False
        return self._measure(lm_loss, targets)

    def log_window(self, step: int, window: _Window, *, validate: bool) -> None:
        """Record the steps of ``window`` (and validation when asked): history, log.jsonl
        and the log callback."""
        seconds = time.perf_counter() - window.t0
        record: dict[str, Any] = {
            "step": step,
            **_bpb(*self.d.all_sum(window.sums)),
            "lr": lr_at(step - 1, self.args),
            "tokens_per_s": window.steps * self.tokens_per_step / seconds,
            "grad_norm": self.grad_norm,
            "tokens": self.state["tokens"],
            "elapsed_s": self._elapsed(),
        }
        if self.args.distractors:
            kl, n = self.d.all_sum(self.distractor_kl)
            record["distractor_kl"] = kl / n if n else None
            self.distractor_kl = [0.0, 0.0]
        if validate:
            record.update(self.validate())
        self.state["history"].append(record)
        self.state["elapsed_s"] = record["elapsed_s"]
        if self.d.main:
            with open(self.out / ckpt_mod.LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.log(record)

    def _elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t0

    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        """Validation loss and bits per byte over ``eval_batches`` batches per process."""
        if len(self.val_ds) == 0:
            return {"val_loss": None, "val_bpb": None}
        d = self.d
        loader = make_dataloader(
            self.val_ds,
            batch_size=self.args.batch_size,
            shuffle=False,
            num_workers=self.args.workers,
            distributed=d.world > 1,
            rank=d.rank if d.world > 1 else None,
            world_size=d.world if d.world > 1 else None,
        )
        self.model.eval()
        window = _Window()
        for batch in itertools.islice(loader, self.args.eval_batches):
            window.add(self._measure(*self._forward(batch, self.model)))
        self.model.train()
        scores = _bpb(*d.all_sum(window.sums))
        return {"val_loss": scores["loss"], "val_bpb": scores["bpb"]}

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (rank 0 writes; every rank waits for it)."""
        if self.d.main:
            self.state.update(step=step, epoch=self.sampler.epoch_of(step), rng=_rng_state())
            ckpt_mod.save_checkpoint(
                self.out,
                self.model,
                train_args=self.args.to_dict(),
                state=self.state,
                db_meta=self.meta,
                optimizer=self.opt,
            )
        self.checkpoint = step
        self.d.barrier()

    def _interrupted(self, step: int) -> None:
        """Ctrl-C: save the last completed step when that is safe, then stop."""
        saved = None
        # one process only (the others would not stop at the same step), and never
        # weights caught inside an optimizer update
        if self.d.world == 1 and not self._updating and 0 < step != self.checkpoint:
            self.state["elapsed_s"] = self._elapsed()
            self.save(step)
            saved = step
        raise TrainingInterrupted(
            self.out, step=step, saved=saved, checkpoint=self.checkpoint
        ) from None


def train(args: TrainArgs, *, log: LogFn | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final state (step, history, parameters).
    ``log`` receives every log record on rank 0 (and notes as ``{"note": ...}``)."""
    d = _setup_distributed()
    threads = torch.get_num_threads()
    try:
        return Trainer.setup(args, d, log or (lambda record: None)).run()
    finally:
        torch.set_num_threads(threads)
        if d.started_here and dist.is_initialized():
            dist.destroy_process_group()


def iter_log(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The records of ``DIR/log.jsonl``, in order."""
    path = Path(directory) / ckpt_mod.LOG
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


__all__ = [
    "Trainer",
    "TrainArgs",
    "TrainingInterrupted",
    "build_config",
    "distractor_rows",
    "iter_log",
    "lr_at",
    "train",
]
