"""The Ray engine: builds, adds and neighbour sets on a Ray cluster. The only Ray user.

Ray is an optional extra (``pip install 'retrodb[ray]'``): this module imports it only
when an engine runs, so ``import retrodb`` and every local command work without it.

**Build and add** (:meth:`RayEngine.write_segments`, called by ``writer.build``/``add``
between their validation and their commit; see docs/scale.md)::

    driver: scan + validate inputs, train/load the tokenizer, plan shards (input order)
    Ray Data:  shards --flat_map: read, tokenize, chunk (tasks)--> parts      [materialized]
    driver:    chunk counts per shard -> first key of each shard (a prefix sum)
    Ray Data:  parts --map_batches: encode (a pool of encoder actors)--> encoded parts
               --groupby(shard) (sort shuffle).map_groups: write one sealed segment (tasks)-->
               manifest entries
    driver:    writer commits ONE generation listing every segment (build: temp dir + rename;
               add: under the writer lock, manifest N+1)

A worker that dies is retried by Ray (tasks and actors); what it had written is an
uncommitted segment directory, removed after the commit. A driver that dies commits
nothing; its segment directories are leftovers that the next writer or ``retrodb verify
--repair`` removes.

**Neighbour sets** (:meth:`RayEngine.neighbours`, called by ``neighbours.compute``): the
rows are put in the object store once; each searcher actor opens the database (every
segment's index memory-mapped once) and runs :class:`~retrodb.neighbours.compute.Searcher`
on blocks of rows aligned to the search batches, so the result is the local one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import corpus as corpus_mod
from .config import DBConfig, EncoderConfig
from .errors import BadInputError, EngineError, NotFoundError, RetroDBError
from .progress import ProgressFn, no_progress
from .shards import (
    PART_ROWS,
    SHARD_BYTES,
    Part,
    Shard,
    encode_part,
    first_keys,
    iter_rows,
    kill_hook,
    load_tokenizer,
    plan_shards,
    tokenize_shard,
    write_shard,
)
from .storage import ENCODER_DIR, SEGMENTS, SegmentMeta, Storage
from .threads import available_cores

if TYPE_CHECKING:
    from .ingest import SegmentJob
    from .neighbours.compute import SearchJob, SearchRules
    from .neighbours.store import Rows

#: How to install the engine.
RAY_INSTALL = "pip install 'retrodb[ray]'"
#: Seconds between two progress reports while Ray works.
POLL_SECONDS = 0.5
#: Blocks of rows per searcher actor (more blocks balance the actors better).
BLOCKS_PER_ACTOR = 4
#: A retrodb error in the text of a worker's traceback.
_WORKER_ERROR = re.compile(r"^retrodb\.errors\.(\w+): (.+)$", re.MULTILINE)
#: ``ray.init`` options of every driver: the library never prints, nor lets Ray print.
_QUIET_DRIVER: dict[str, Any] = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.WARNING,
}
#: Ray's logger that warns on every start that token authentication is on (the default).
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

T = TypeVar("T")
log = logging.getLogger(__name__)


def _ray() -> ModuleType:
    """The ``ray`` module, or a one-line :class:`EngineError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from exc
    return ray


def _ray_data() -> ModuleType:
    _ray()
    import ray.data

    return ray.data


@dataclass(frozen=True, slots=True)
class RayEngine:
    """Where and how wide a distributed build or neighbour computation runs.

    >>> db = RetroDB.build("my.retrodb", ["docs/"], engine=RayEngine(workers=4))  # doctest: +SKIP
    """

    workers: int | None = None
    """Encoder actors of a build, searcher actors of a neighbour set; without ``address``
    also the CPUs of the local Ray started for the run. Default: the cluster's CPUs (GPUs
    with ``device="cuda"``); this machine's cores for a local Ray."""
    address: str | None = None
    """A running Ray cluster (the address ``ray start --head`` prints, or ``auto``). None:
    start a local Ray for the run and stop it at the end. Ignored when this process is
    already connected to Ray (``ray.init`` was called)."""
    device: str = "cpu"
    """Where each encoder actor runs its encoder (``cpu`` or ``cuda``: one GPU each)."""
    threads: int | None = None
    """ONNX Runtime threads per encoder actor (default: the actor's CPUs, at least 1)."""
    actor_cpus: float = 1.0
    """CPUs each actor reserves; below 1 actors share CPUs with the read and write tasks."""
    shards: int | None = None
    """Segments to write (default: one per ``shard_bytes`` of input, at least one per worker)."""
    shard_bytes: int = SHARD_BYTES
    part_rows: int | None = None
    """Chunk rows per unit of encoding work (default :data:`~retrodb.shards.PART_ROWS`)."""

    def __post_init__(self) -> None:
        from .encoder_device import parse_device

        if self.workers is not None and self.workers < 1:
            raise BadInputError(f"workers must be at least 1, got {self.workers}")
        if not self.actor_cpus > 0:
            raise BadInputError(f"actor_cpus must be positive, got {self.actor_cpus}")
        if self.shards is not None and self.shards < 1:
            raise BadInputError(f"shards must be at least 1, got {self.shards}")
        if (self.part_rows is not None and self.part_rows < 1) or self.shard_bytes < 1:
            raise BadInputError("part_rows and shard_bytes must be positive")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"threads must be at least 1, got {self.threads}")
        kind, _ = parse_device(self.device)
        if kind == "auto":
            raise BadInputError("--engine ray takes --device cpu or cuda (not auto)")
        if importlib.util.find_spec("ray") is None:  # fail before anything is written
            raise EngineError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}")

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    # ------------------------------------------------------------ the cluster

    @contextlib.contextmanager
    def session(self) -> Iterator[int]:
        """Connect to Ray (or start a local one) for one run; yields the number of workers.
        A Ray this call started is stopped at the end, whatever happens."""
        ray = _ray()
        started = False
        if not ray.is_initialized():
            try:
                with _quiet_logger(_AUTH_LOGGER):
                    if self.address:
                        ray.init(address=self.address, **_QUIET_DRIVER)
                    else:
                        ray.init(**local_ray_options(self.workers or available_cores()))
            except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                raise EngineError(f"cannot start or reach {where}: {_first_line(exc)}") from exc
            started = True
        try:
            with _data_context():
                yield self._workers(ray)
        finally:
            if started:
                ray.shutdown()

    def _workers(self, ray: ModuleType) -> int:
        if self.workers is not None:
            return self.workers
        res = ray.cluster_resources()
        if self.gpu:
            gpus = int(res.get("GPU", 0))
            if gpus < 1:
                raise EngineError("--device cuda: the Ray cluster has no GPU")
            return gpus
        return max(1, int(res.get("CPU", 1) / self.actor_cpus))

    # ------------------------------------------------------------ build and add

    def write_segments(self, job: SegmentJob) -> tuple[SegmentMeta, ...]:
        """Write the job's corpus as sealed, uncommitted segments (one per shard) with
        contiguous keys from ``job.first_key``; see the module docstring."""
        storage, corpus = job.storage, job.corpus
        if corpus.spooled:
            raise BadInputError(
                "--engine ray reads the inputs on its workers: give files or folders, not '-'"
            )
        enc_dir = storage.root / ENCODER_DIR
        try:
            dim = int(json.loads((enc_dir / "encoder.json").read_text())["dim"])
        except (OSError, ValueError, KeyError) as exc:
            raise NotFoundError(f"{enc_dir / 'encoder.json'}: cannot read ({exc})") from exc
        with self.session() as workers:
            shards = plan_shards(
                corpus, shards=self.shards, min_shards=workers, shard_bytes=self.shard_bytes
            )
            return self._build(
                storage,
                shards,
                job.tokenizer.manifest_entry(),
                job.config,
                corpus.errors,
                workers=workers,
                dim=dim,
                first_key=job.first_key,
                generation=job.generation,
                progress=job.progress,
            )

    def _build(
        self,
        storage: Storage,
        shards: Sequence[Shard],
        tokenizer: dict[str, Any],
        config: DBConfig,
        errors: corpus_mod.Errors,
        *,
        workers: int,
        dim: int,
        first_key: int,
        generation: int,
        progress: ProgressFn,
    ) -> tuple[SegmentMeta, ...]:
        ray = _ray()
        rd = _ray_data()
        tally = _tally_class(ray).remote()
        root = str(storage.root.absolute())  # workers run in other directories
        docs = sum(len(s.refs) for s in shards)
        parts = rd.from_items(
            [{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards)
        ).flat_map(
            _tokenize_row,
            fn_kwargs={
                "root": root,
                "tokenizer": tokenizer,
                "chunk_size": config.chunk.chunk_size,
                "errors": errors,
                "part_rows": self.part_rows or PART_ROWS["cuda" if self.gpu else "cpu"],
                "tally": tally,
            },
            num_cpus=1,
        )
        parts = _watch(parts.materialize, ray, tally, progress, {"tokenize": docs})
        chunks = [0] * len(shards)
        counted = parts.select_columns(["shard", "rows"]).take_all()
        for row in counted:
            chunks[int(row["shard"])] += int(row["rows"])
        starts = first_keys(first_key, chunks)
        total = sum(chunks)
        # One part a block, and one block in flight per actor: encoding spreads over every
        # actor by parts, not by shards. Materialized first: the encoder actors hold their
        # CPUs from the start of the next execution, and the split needs tasks.
        parts = parts.repartition(len(counted)).materialize()
        encoded = parts.map_batches(
            _EncodeParts,
            fn_constructor_kwargs={
                "root": root,
                "tokenizer": tokenizer,
                "config": config.encoder,
                "device": self.device,
                "threads": self.threads or max(1, int(self.actor_cpus)),
                "tally": tally,
            },
            batch_size=1,
            batch_format="numpy",
            compute=rd.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=self.actor_cpus,
            num_gpus=1 if self.gpu else 0,
        )
        written = encoded.groupby("shard").map_groups(
            _write_group,
            fn_kwargs={
                "root": root,
                "config": config,
                "dim": dim,
                "first_keys": starts,
                "generation": generation,
                "tally": tally,
            },
            batch_format="numpy",
            num_cpus=1,
        )
        rows = _watch(written.take_all, ray, tally, progress, {"encode": total, "index": total})
        log.info("ray build: work per node %s", _per_node(ray.get(tally.get.remote())))
        metas = {int(r["shard"]): SegmentMeta.from_dict(json.loads(str(r["meta"]))) for r in rows}
        missing = sorted(set(range(len(shards))) - set(metas))
        if missing:
            raise EngineError(f"{root}: shards {missing} produced no segment")
        return tuple(metas[s] for s in range(len(shards)))

    # ------------------------------------------------------------ neighbour sets

    def neighbours(self, job: SearchJob) -> tuple[np.ndarray, np.ndarray]:
        """The top ``rules.k`` of every row (re-ranked as ``rules.rerank`` says), computed by
        searcher actors (see the module docstring)."""
        rows, rules, batch_size, progress = job.rows, job.rules, job.batch_size, job.progress
        with self.session() as workers:
            ray = _ray()
            from ray.util import ActorPool

            # Given with every block (inside a list: the actor fetches it once, zero-copy), not
            # to the constructor, so that a restarted actor needs nothing kept for it.
            rows_ref = [ray.put(rows)]
            actor = _searcher_class(ray).options(num_cpus=self.actor_cpus)
            actors = [
                actor.remote(str(job.snap.path.absolute()), job.snap.generation, rules)
                for _ in range(workers)
            ]
            blocks = search_blocks(rows.n, batch_size, workers)
            keys = np.full((rows.n, rules.k), -1, np.int64)
            dist = np.full((rows.n, rules.k), np.inf, np.float32)
            progress("neighbours", 0, rows.n)
            try:
                results = ActorPool(actors).map(
                    lambda a, ab: a.run.remote(rows_ref, ab[0], ab[1], batch_size), blocks
                )
                done = 0
                where: dict[str, int] = {}
                for (a, b), (kb, db_, node) in zip(blocks, results, strict=True):
                    keys[a:b], dist[a:b] = kb, db_
                    done += b - a
                    where[node] = where.get(node, 0) + b - a
                    progress("neighbours", done, rows.n)
                log.info("ray neighbours: rows per node %s", where)
            except Exception as exc:
                raise _engine_error(exc, ray) from exc
            finally:
                for a in actors:
                    ray.kill(a)
            return keys, dist


def local_ray_options(cpus: int) -> dict[str, Any]:
    """``ray.init`` options that start a local Ray of ``cpus`` CPUs as the engine does: no
    dashboard, no worker output on this process, and room for idle workers.

    Ray keeps at most ``num_workers_soft_limit`` idle worker processes and kills those above
    it after a second idle; by default the limit is the CPUs not held by actors, so while
    the encoder actors run, the task workers that tokenized are killed and the write stage
    starts new ones (each a new process that imports retrodb). A limit that leaves room for
    a task worker per CPU beside the actors (``cpus`` encoder or searcher actors and the
    progress tally) keeps them: on 2 CPUs the Ray tests started 4-5 task workers instead of
    10-13 (docs/scale.md)."""
    return {
        "address": "local",
        "num_cpus": cpus,
        **_QUIET_DRIVER,
        "_system_config": {"num_workers_soft_limit": 2 * cpus + 2},
    }


def search_blocks(n: int, batch_size: int, actors: int) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks of ``n`` rows for ``actors`` searchers: about
    :data:`BLOCKS_PER_ACTOR` each, every boundary a multiple of ``batch_size`` (so that each
    search call sees the rows a local computation gives it)."""
    batches = -(-n // batch_size)
    per = max(1, -(-batches // (actors * BLOCKS_PER_ACTOR))) * batch_size
    return [(a, min(n, a + per)) for a in range(0, n, per)]


# ---------------------------------------------------------------- what runs on workers


def _segments_dir(root: str) -> Path:
    """The database's ``segments/`` as a worker sees it (refused when it cannot)."""
    seg = Path(root) / SEGMENTS
    if not seg.is_dir():
        raise NotFoundError(
            f"{seg}: not found on this worker; the database directory must be on a "
            f"filesystem every worker sees"
        )
    return seg


def _tokenize_row(
    row: dict[str, Any],
    *,
    root: str,
    tokenizer: dict[str, Any],
    chunk_size: int,
    errors: corpus_mod.Errors,
    part_rows: int,
    tally: Any,
) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one shard -> its parts (rows of plain columns)."""
    kill_hook("tokenize")
    shard = Shard.from_json(str(row["shard"]))
    tok = load_tokenizer(Path(root), tokenizer)
    parts = tokenize_shard(shard, tok, chunk_size=chunk_size, errors=errors, part_rows=part_rows)
    _add(tally, "tokenize", len(shard.refs))
    return [p.to_row() for p in parts]


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows of plain values -> a numpy column batch (bytes and strings as objects)."""
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        kind = object if isinstance(values[0], bytes | str) else np.int64
        out[name] = np.array(values, dtype=kind)
    return out


class _EncodeParts:
    """Ray Data ``map_batches`` actor: one tokenizer and one encoder session per actor."""

    def __init__(
        self,
        *,
        root: str,
        tokenizer: dict[str, Any],
        config: EncoderConfig,
        device: str,
        threads: int,
        tally: Any,
    ) -> None:
        from .ingest import open_encoder

        self.tokenizer = load_tokenizer(Path(root), tokenizer)
        self.encoder = open_encoder(
            Path(root) / ENCODER_DIR, config, threads=threads, device=device
        )
        self.tally = tally

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in iter_rows(batch):
            kill_hook("encode")
            part = encode_part(Part.from_row(row), self.tokenizer, self.encoder)
            _add(self.tally, "encode", part.rows)
            out.append(part.to_row())
        return _columns(out)


def _write_group(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    config: DBConfig,
    dim: int,
    first_keys: Sequence[int],
    generation: int,
    tally: Any,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_groups``: every encoded part of one shard -> one sealed segment."""
    kill_hook("write")
    _segments_dir(root)
    parts = [Part.from_row(r) for r in iter_rows(batch)]
    shard = parts[0].shard
    meta = write_shard(
        Storage(Path(root)),
        parts,
        config=config,
        dim=dim,
        first_key=first_keys[shard],
        generation=generation,
        tally=lambda stage, n: _add(tally, stage, n),
    )
    return {
        "shard": np.array([shard], dtype=np.int64),
        "meta": np.array([json.dumps(meta.to_dict())], dtype=object),
    }


class _SearcherActor:
    """A searcher: the database opened once (every index mapped), and on its first block
    a :class:`~retrodb.neighbours.compute.Searcher` for the rows of the set."""

    def __init__(self, path: str, generation: int, rules: SearchRules) -> None:
        from .snapshot import Snapshot

        # the driver's generation, also when a writer has committed since it opened it
        snap = Snapshot.open(path, threads=1).at_generation(generation)
        _ = snap.indexes  # map every segment's index now, once
        self.snap = snap
        self.rules = rules
        self.search: Any = None

    def run(
        self, rows_ref: list[Any], start: int, stop: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Keys and distances of rows ``start .. stop - 1``, and this actor's node."""
        import ray

        from .neighbours.compute import Searcher

        kill_hook("search")
        if self.search is None:
            rows: Rows = ray.get(rows_ref[0])
            self.search = Searcher(self.snap, rows, self.rules)
        segments = list(range(len(self.snap.segments)))
        keys, dist = self.search.run(np.arange(start, stop), segments, batch_size, no_progress)
        return keys, dist, _node()


class _Tally:
    """Counts what the workers report (stage -> units), for the driver's progress."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, stage: str, n: int) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + int(n)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def _node() -> str:
    """This worker's node (the first 8 hex digits of its Ray node id)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())[:8]


def _add(tally: Any, stage: str, n: int) -> None:
    """Tell the tally of ``n`` units of ``stage`` done, here and on this node."""
    tally.add.remote(stage, n)
    tally.add.remote(f"{stage}@{_node()}", n)


def _per_node(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """``{stage: {node: units}}`` from a tally's ``stage@node`` counts."""
    out: dict[str, dict[str, int]] = {}
    for key, n in sorted(counts.items()):
        stage, _, node = key.partition("@")
        if node:
            out.setdefault(stage, {})[node] = n
    return out


@functools.cache
def _tally_class(ray: ModuleType) -> Any:
    return ray.remote(num_cpus=0)(_Tally)


@functools.cache
def _searcher_class(ray: ModuleType) -> Any:
    return ray.remote(max_restarts=3, max_task_retries=3)(_SearcherActor)


# ---------------------------------------------------------------- driver helpers


def _watch(
    run: Callable[[], T],
    ray: ModuleType,
    tally: Any,
    progress: ProgressFn,
    totals: dict[str, int],
) -> T:
    """Run ``run`` (a Ray Data execution) on a thread while reporting the workers' tallies
    for the stages of ``totals``; re-raise its error as a retrodb error."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = run()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    for stage, total in totals.items():
        progress(stage, 0, total)
    worker = threading.Thread(target=target, name="retrodb-ray", daemon=True)
    worker.start()
    shown: dict[str, int] = {}
    while worker.is_alive():
        worker.join(POLL_SECONDS)
        counts = ray.get(tally.get.remote())
        for stage, total in totals.items():
            done = min(total, counts.get(stage, 0))  # a retried task reports again
            if done > shown.get(stage, 0):
                shown[stage] = done
                progress(stage, done, total)
    if "error" in result:
        raise _engine_error(result["error"], ray) from result["error"]
    for stage, total in totals.items():
        if shown.get(stage, 0) < total:
            progress(stage, total, total)
    return result["value"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _engine_error(exc: BaseException, ray: ModuleType) -> BaseException:
    """The retrodb error a worker raised, or an :class:`EngineError` with the first line of
    Ray's. Ray wraps a task's error, and Ray Data wraps it again keeping only its text; the
    last retrodb error named in that text is the outermost one the worker raised."""
    from . import errors

    named = _WORKER_ERROR.findall(str(exc))
    if named:
        name, message = named[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, RetroDBError):
            return cls(message.strip())
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RetroDBError) and not isinstance(e, ray.exceptions.RayError):
            return e
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    if not isinstance(exc, Exception):
        return exc  # KeyboardInterrupt, SystemExit
    return EngineError(f"Ray: {type(exc).__name__}: {_first_line(exc)}")


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for the run, restored at the end (the caller may use Ray Data too):

    - no progress bars or per-dataset log lines (the library never prints);
    - the sort-based, pull-based shuffle for the groupby that hands each shard's parts to
      its writer. It runs as tasks on the workers Ray already has; the default hash
      shuffle starts aggregator actors (new processes) for every run, which took a small
      ``add`` on 2 CPUs from 4.8 s to 9.7 s.
    """
    rd = _ray_data()
    ctx = rd.DataContext.get_current()
    bars, strategy = ctx.enable_progress_bars, ctx.shuffle_strategy
    ctx.enable_progress_bars = False
    ctx.shuffle_strategy = rd.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        with _quiet_logger("ray.data"):
            yield
    finally:
        ctx.enable_progress_bars, ctx.shuffle_strategy = bars, strategy


__all__ = ["RAY_INSTALL", "RayEngine", "local_ray_options", "search_blocks"]
