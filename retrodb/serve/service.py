"""What `retrodb serve` does for a request, without HTTP: one database, shared by every
request, following the writers' commits.

- **Generations.** :meth:`Service.snapshot` checks the database's ``CURRENT`` at most
  every ``follow_s`` seconds (0.2 by default) and moves to a newer generation when a writer
  (`retrodb add` in another process) has committed one. A request takes one snapshot and
  answers everything from it, and says which generation that was. A snapshot whose files a
  later commit removed (compaction) is retried once on the newest one.
- **Micro-batching.** The encoder is the expensive part of a text query and the one thing
  all requests share. :class:`BatchedEncoder` puts every request's texts on one queue; a
  single thread takes what is waiting (and what arrives within ``wait_s``, up to
  ``max_batch`` texts) and encodes it in one ONNX Runtime call with the encoder's bounded
  threads. Searches themselves run on the request threads with no lock (USearch reads an
  index concurrently; the snapshot is read-only).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..encoder import Encoder
from ..errors import CorruptError
from ..snapshot import Snapshot

T = TypeVar("T")
log = logging.getLogger("retrodb.serve")


@dataclass
class _Job:
    texts: list[str]
    future: Future[np.ndarray] = field(default_factory=Future)


@dataclass
class BatchStats:
    """How the batcher has grouped the texts it encoded."""

    calls: int = 0  # encoder runs
    texts: int = 0  # texts encoded
    requests: int = 0  # encode requests served

    def to_dict(self) -> dict[str, Any]:
        mean = self.texts / self.calls if self.calls else 0.0
        return {
            "encoder_calls": self.calls,
            "texts": self.texts,
            "requests": self.requests,
            "mean_batch": mean,
        }


class BatchedEncoder:
    """An :class:`~retrodb.encoder.Encoder` whose :meth:`encode` calls from many threads are
    gathered into shared encoder runs. Everything else is the wrapped encoder's, so a
    snapshot takes it where it takes an encoder."""

    def __init__(self, encoder: Encoder, *, max_batch: int = 256, wait_s: float = 0.001) -> None:
        self.inner = encoder
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_s))
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="retrodb-encode", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # fingerprint, dim, device, threads, ...
        return getattr(self.inner, name)

    def encode(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """Keys of ``texts``, computed together with whatever other threads ask for now."""
        texts = list(texts)
        if not texts:
            return self.inner.encode(texts)
        job = _Job(texts)
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Stop the batching thread (after what is queued)."""
        self._queue.put(None)
        self._thread.join()

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, n = [first], len(first.texts)
        deadline = time.monotonic() + self.wait_s
        while n < self.max_batch:
            try:
                left = deadline - time.monotonic()
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return jobs, True
            jobs.append(nxt)
            n += len(nxt.texts)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            texts = [t for j in jobs for t in j.texts]
            try:
                keys = self.inner.encode(texts)
            except BaseException as exc:  # every waiting request gets the error
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            self.stats.calls += 1
            self.stats.texts += len(texts)
            self.stats.requests += len(jobs)
            start = 0
            for j in jobs:
                j.future.set_result(keys[start : start + len(j.texts)])
                start += len(j.texts)


class Service:
    """The database at ``path`` as a server reads it (see the module docstring).
    ``batching``: gather requests' texts into shared encoder runs; False encodes each
    request on its own thread; None (the default) batches when the encoder runs on a GPU
    and not on a CPU, where a batch of texts costs more per text than texts one by one
    (docs/serve.md has the measurement)."""

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        batching: bool | None = None,
        max_batch: int = 256,
        wait_s: float = 0.001,
        follow_s: float = 0.2,
        load_indexes: bool = False,
    ) -> None:
        first = Snapshot.open(path, threads=threads, device=device, load_indexes=load_indexes)
        self.batcher: BatchedEncoder | None = None
        if batching is None:
            batching = not str(first.encoder.device).startswith("cpu")
        if batching:
            self.batcher = BatchedEncoder(first.encoder, max_batch=max_batch, wait_s=wait_s)
            first = Snapshot.open(
                first.storage,
                threads=threads,
                device=device,
                encoder=self.batcher,  # type: ignore[arg-type]
                load_indexes=load_indexes,
            )
        self.path = first.path
        self.follow_s = follow_s
        self._snap = first
        self._checked = time.monotonic()
        self._lock = threading.Lock()  # guards moving to a new generation, nothing else

    def snapshot(self, *, force: bool = False) -> Snapshot:
        """The generation to answer from: the newest committed one, checked at most every
        ``follow_s`` seconds (every call when ``force``)."""
        now = time.monotonic()
        if not force and now - self._checked < self.follow_s:
            return self._snap
        with self._lock:
            if force or now - self._checked >= self.follow_s:
                try:
                    newer = self._snap.latest()
                except (CorruptError, OSError) as exc:  # mid-commit: keep answering
                    log.warning("cannot read the newest generation yet: %s", exc)
                else:
                    if newer is not self._snap:
                        log.info("generation %d -> %d", self._snap.generation, newer.generation)
                    self._snap = newer
                self._checked = time.monotonic()
            return self._snap

    def run(self, read: Callable[[Snapshot], T]) -> tuple[T, int]:
        """``read(snapshot)`` and the generation it read; once more on the newest
        generation if a commit removed a file the snapshot needed."""
        snap = self.snapshot()
        try:
            return read(snap), snap.generation
        except (CorruptError, FileNotFoundError):  # NotFoundError is one too
            newer = self.snapshot(force=True)
            if newer is snap:
                raise
            return read(newer), newer.generation

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


__all__ = ["BatchStats", "BatchedEncoder", "Service"]
