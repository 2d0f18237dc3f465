"""Training data for RETRO: a PyTorch Dataset over a retrodb neighbour set.

One item is a window of ``L = seq_len`` tokens (``L / m`` consecutive chunks of one
document) with the neighbours precomputed for each of its chunks:

    tokens          [L+1]            int64  the window and the token after it (pad id past
                                            the document's end): inputs tokens[:-1]
    token_mask      [L+1]            bool   True for real tokens
    targets         [L]              int64  tokens[1:], -100 (ignored by the loss) where padding
    retrieved       [L/m, k, 2m]     int64  chunk u's k neighbours: neighbour chunk + continuation
    retrieved_mask  [L/m, k, 2m]     bool   True for real neighbour tokens (False for -1 keys,
                                            padding, and continuations past a document's end)
    neighbours      [L/m, k]         int64  the neighbour keys (-1 = none)

Every array is read through memory maps (:class:`retrodb.neighbours.SequenceReader`); the
maps are opened lazily in each process, so the dataset works with ``num_workers > 0`` and
pickles small. A DataLoader from :func:`make_dataloader` fetches a whole batch with one
vectorised gather (``__getitems__``) instead of one item at a time; the endless one of
:func:`make_train_loader` yields the batches of a training run by step
(:class:`StepBatches`), so a run resumed at step s continues exactly.

>>> train, val = make_datasets("my.retrodb", "train", seq_len=512)      # doctest: +SKIP
>>> loader = make_dataloader(train, batch_size=16, seed=0, num_workers=2) # doctest: +SKIP
>>> batch = next(iter(loader))                                          # doctest: +SKIP
>>> logits, loss = model(batch["tokens"][:, :-1], batch["retrieved"],    # doctest: +SKIP
...                      batch["retrieved_mask"], batch["targets"])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from retrodb.db import RetroDB
from retrodb.neighbours import NeighbourSet, SequenceReader
from retrodb.split import DEFAULT_FRACTION, validation_mask

Split = Literal["train", "validation", "all"]
Batch = dict[str, torch.Tensor]


class RetroDataset(Dataset):
    """Windows of one split of a neighbour set, with their retrieved neighbours.

    ``db``: a database path or an open :class:`RetroDB`; ``name``: the neighbour set
    (opening a stale one raises :class:`retrodb.StaleError`). ``split``: documents are
    assigned to ``train`` or ``validation`` by :func:`retrodb.split.is_validation` on
    their id (``val_fraction``, ``split_seed``), stable across runs. ``k``: use the first
    k neighbours of each chunk (default: all the set has). Items are deterministic: window
    ``i`` is always the same rows; the order comes from the sampler."""

    def __init__(
        self,
        db: str | Path | RetroDB,
        name: str,
        *,
        seq_len: int,
        split: Split = "train",
        val_fraction: float = DEFAULT_FRACTION,
        split_seed: int = 0,
        k: int | None = None,
    ) -> None:
        if split not in ("train", "validation", "all"):
            raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
        rdb = db if isinstance(db, RetroDB) else RetroDB.open(db)
        nset = NeighbourSet.open(rdb, name)
        self.reader = SequenceReader(rdb, nset, seq_len=seq_len, k=k)
        self.split = split
        if split == "all":
            docs = None
        else:
            val = validation_mask(nset.doc_ids, val_fraction, split_seed)
            docs = val if split == "validation" else ~val
        self.start, self.end = self.reader.windows(docs)
        self.seq_len = seq_len
        self.chunk_size = self.reader.chunk_size
        self.k = self.reader.k
        self.pad_id = self.reader.pad_id

    def __len__(self) -> int:
        return int(self.start.size)

    def _index(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"window index out of range 0..{n - 1}")
        return idx % n if n else idx

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Windows ``indices`` as tensors with a leading batch axis (zero-copy from numpy)."""
        idx = self._index(indices)
        arrays = self.reader.read(self.start[idx], self.end[idx])
        return {key: torch.from_numpy(a) for key, a in arrays.items()}

    def __getitem__(self, i: int) -> Batch:
        return {key: t[0] for key, t in self.batch([i]).items()}

    def __getitems__(self, indices: Sequence[int]) -> _Batch:
        """What a DataLoader calls to fetch a batch: one gather for all of it."""
        return _Batch(self.batch(indices))


class _Batch(Sequence):
    """A fetched batch that also looks like a list of items, so that PyTorch's default
    collate still works; :func:`collate` returns the batched tensors directly."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return int(next(iter(self.batch.values())).shape[0])

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {key: t[i] for key, t in self.batch.items()}


def collate(data: Any) -> Batch:
    """Collate for :class:`RetroDataset`: a pre-batched fetch passes through unchanged."""
    if isinstance(data, _Batch):
        return data.batch
    return default_collate(data)


def make_datasets(
    db: str | Path | RetroDB,
    name: str,
    *,
    seq_len: int,
    val_fraction: float = DEFAULT_FRACTION,
    split_seed: int = 0,
    k: int | None = None,
) -> tuple[RetroDataset, RetroDataset]:
    """The train and validation datasets of one neighbour set (disjoint by document)."""
    rdb = db if isinstance(db, RetroDB) else RetroDB.open(db)
    kw: dict[str, Any] = {
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "k": k,
    }
    return (
        RetroDataset(rdb, name, split="train", **kw),
        RetroDataset(rdb, name, split="validation", **kw),
    )


class EpochShuffle(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``: call :meth:`set_epoch` each
    epoch (as with ``DistributedSampler``), and a resumed run sees the same order."""

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class StepBatches(Sampler[list[int]]):
    """The batches of a training run by step, from ``start`` on, without end: batch ``s``
    depends only on ``(seed, s)``, so a run resumed at step s sees exactly the batches an
    uninterrupted run sees from s on. Its whole state is ``start`` (the step to resume at).

    Epoch e is ``torch.randperm(n)`` seeded with ``seed + e`` (the order of
    :class:`EpochShuffle` and of ``DistributedSampler(shuffle=True)``); with ``world_size``
    > 1 it is cut to a multiple of world_size and rank r takes every world_size-th window
    from r (DistributedSampler's ``drop_last=True`` shard). Each rank's share is cut into
    batches of ``batch_size``; an incomplete last batch is dropped."""

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start < 0:
            raise ValueError(
                f"bad StepBatches(batch_size={batch_size}, rank={rank}, "
                f"world_size={world_size}, start={start})"
            )
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.per_epoch = (n // world_size) // batch_size
        """Batches per epoch and rank (0: the windows do not fill one batch per rank)."""

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch if self.per_epoch else 0

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order (this rank's share)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g)
        mine = order[: self.n - self.n % self.world_size][self.rank :: self.world_size]
        b = self.batch_size
        return [mine[i * b : (i + 1) * b].tolist() for i in range(self.per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        if self.per_epoch == 0:
            return
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


def make_train_loader(
    dataset: RetroDataset,
    *,
    batch_size: int,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader of training batches from step ``start`` on (see
    :class:`StepBatches`; ``loader.batch_sampler.per_epoch`` batches make an epoch).
    With ``num_workers`` > 0 the workers fetch and collate the batches (each maps the
    files itself); the order never depends on them."""
    sampler = StepBatches(
        len(dataset),
        batch_size=batch_size,
        seed=seed,
        start=start,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_worker_init,
        pin_memory=pin_memory,
        # a generator of its own, so that starting workers never draws from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )


def _worker_init(worker_id: int) -> None:
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, RetroDataset):
        info.dataset.reader.reopen()  # this worker maps the files itself
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def make_dataloader(
    dataset: RetroDataset,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    distributed: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` that is deterministic for ``seed`` (and epoch).

    ``distributed``: shard with ``DistributedSampler`` (default: when torch.distributed
    is initialised; ``rank``/``world_size`` default to the process group's). Call
    ``loader.sampler.set_epoch(epoch)`` at the start of each epoch to reshuffle.
    ``multiprocessing_context``: "fork", "spawn" or "forkserver" for the workers."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler: Sampler[int]
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
    elif shuffle:
        sampler = EpochShuffle(len(dataset), seed=seed)
    else:
        sampler = _InOrder(len(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_worker_init,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )


class _InOrder(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:  # same interface as the shuffling samplers
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


__all__ = [
    "EpochShuffle",
    "RetroDataset",
    "StepBatches",
    "collate",
    "make_dataloader",
    "make_datasets",
    "make_train_loader",
]
