"""Evaluate a RETRO model on held-out documents: bits per byte with retrieval on, with
shuffled neighbours and off, and bits per byte as a function of how much of each chunk its
neighbours contain.

Documents are tokenized with the database's tokenizer and cut into windows of L tokens
(each window starts at a chunk boundary and predicts the L tokens after its first, as in
training). For every full chunk of a window the k neighbours are retrieved *live* from the
database (the chunk is encoded with the database's encoder and searched), so documents
added with ``retrodb add`` after training are retrievable at once.

**Three modes.** ``retrieval``: each chunk attends to its own neighbours. ``shuffled``:
each chunk attends to the neighbours of a chunk of another evaluated document (a random
derangement of the retrieved rows, seeded, that keeps every chunk away from its own
document's wherever the documents allow): neighbours that are real text but not about the
chunk, which tells a gain from the right neighbours apart from a gain from any text.
(Another chunk of the same document is about the chunk: once the document is in the
database its neighbours are that chunk's own text, which a copying model rightly uses.
``shuffle_any_chunk`` allows them, as evaluations before 2026-12-06 did.)
``no_retrieval``: no neighbours (CCA adds nothing). A model that uses its neighbours only
where they help scores retrieval <= no_retrieval <= shuffled, or close to it.

**Bits per byte.** The sum of the targets' negative log-likelihood in nats, divided by
ln 2 and by the UTF-8 bytes of the text the targets decode to (:func:`token_byte_lengths`).

**bpb(alpha)** (our reading of Section 2.6 of the paper). Window chunk j >= 1 is scored by
the tokens that attend to the neighbours of chunk j-1 (under the CCA shift: the last token
of chunk j-1 through the last but one of chunk j), which are exactly the tokens of chunk j
as targets. Its overlap ratio is the longest common contiguous token substring between
chunk j and any neighbour of chunk j-1 (neighbour chunk + continuation, 2m tokens),
divided by chunk j's length. bpb(alpha) is the bits per byte over the chunks whose overlap
ratio is at most alpha, for alpha in 0, 12.5, 25, 50, 75, 100 %: a model that only gains
at high alpha gains by copying. The first chunk of every window attends to no neighbours
and is left out of bpb(alpha) (so bpb(100 %) covers fewer tokens than the overall bpb).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from retrodb import corpus as corpus_mod
from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb.progress import ProgressFn, no_progress
from retrodb.rerank import longest_run
from retrodb.tokenizer import Tokenizer
from retrodb_model.config import BOOSTS, FLOORS, MIN_RUNS, NEVER_HURT, EvalArgs, RetroConfig
from retrodb_model.kernels import IGNORE_INDEX
from retrodb_model.model import RetrievalParts
from retrodb_model.retrieve import LiveRetriever, Neighbours

#: Overlap thresholds of bpb(alpha), in percent of the chunk length.
ALPHAS = (0.0, 12.5, 25.0, 50.0, 75.0, 100.0)
LN2 = math.log(2.0)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for inside a document, ``[V]`` int64 (0 for special
    and control tokens): :meth:`retrodb.tokenizer.Tokenizer.token_byte_lengths`."""
    return tok.token_byte_lengths()


def longest_common_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common contiguous run between each row of ``a [n, m]`` and the
    rows of ``b [n, K, r]``, maximised over the K rows: ``[n]`` int64. Entries < 0 never
    match (:func:`retrodb.rerank.longest_run`, the measure re-ranking uses)."""
    runs = longest_run(a, b)  # (n, K)
    return runs.max(axis=-1) if runs.shape[-1] else np.zeros(runs.shape[:-1], np.int64)


@dataclass(frozen=True)
class _Window:
    doc: int  # document number in this evaluation
    start: int  # first input token (a multiple of m)
    length: int  # input tokens T (targets are tokens start+1 .. start+T)


def read_documents(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(id, text)`` of every document of ``inputs`` (files, folders, JSONL)."""
    corpus = corpus_mod.scan(list(inputs))
    try:
        return list(corpus.iter_documents())
    finally:
        corpus.cleanup()


@dataclass
class Evaluation:
    """What :func:`evaluate` measured (the fields of the JSON it saves; see
    docs/results-model.md). ``checkpoint``, ``step``, ``inputs`` and ``note`` are set by
    :func:`evaluate_checkpoint`."""

    documents: int
    windows: int
    tokens: int
    bytes: int
    seq_len: int
    chunk_size: int
    k: int
    exclude_self: bool
    rerank: str
    """How the neighbours were chosen: ``none`` (dense order) or ``overlap``."""
    fetch: int
    """Dense candidates per kept neighbour (1 without re-ranking)."""
    min_overlap: float
    """The overlap floor (0: every neighbour kept)."""
    dropped: int
    """Neighbours the floor made null (of k per retrieving chunk)."""
    null_boost: float
    """What CCA added to its null key's score (0: as trained)."""
    min_run: int
    """The copy floor (0: off): keys attended only where the text follows them."""
    shuffle_seed: int
    shuffle_any_chunk: bool
    """Shuffled neighbours from any other chunk (False: from another document's chunks)."""
    max_tokens_per_document: int | None
    db: str
    generation: int
    bpb: dict[str, float | None]
    """Bits per byte per mode: ``retrieval`` and ``shuffled`` (when evaluated with
    retrieval) and ``no_retrieval``."""
    bpb_alpha: dict[str, Any] | None
    """bpb(alpha) per mode, chunk counts and shares, mean overlap; None without retrieval."""
    per_document: list[dict[str, Any]]
    seconds: dict[str, float]
    checkpoint: str | None = None
    step: int | None = None
    inputs: list[str] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the checkpoint's fields first, ``bpb_alpha`` only with
        retrieval, ``note`` only when there is one."""
        data = dataclasses.asdict(self)
        head = {key: data.pop(key) for key in ("checkpoint", "step", "inputs")}
        note = data.pop("note")
        if data["bpb_alpha"] is None:
            del data["bpb_alpha"]
        out = {**(head if self.checkpoint is not None else {}), **data}
        return {**out, "note": note} if note is not None else out

    def save(self, path: str | Path, *, title: str = "") -> list[Path]:
        """Write the JSON to ``path`` (folders created) and the bpb(alpha) plot beside it
        (same name, .png) when there is one; returns the files written."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        if title == "" and self.checkpoint is not None:
            title = f"{Path(self.checkpoint).name} step {self.step}"
        png = plot_alpha(self.to_dict(), out.with_suffix(".png"), title=title)
        return [out] if png is None else [out, png]


def _check_seq_len(cfg: RetroConfig, seq_len: int | None) -> int:
    m, L = cfg.chunk_size, seq_len or cfg.max_seq_len
    if L % m or L <= 0:
        raise BadInputError(f"seq_len must be a positive multiple of the chunk size {m}, got {L}")
    if L > cfg.max_seq_len:
        raise BadInputError(f"seq_len {L} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return L


def _windows(toks: list[np.ndarray], L: int) -> list[_Window]:
    """Every document cut into windows of at most L inputs (each with its L targets)."""
    windows = [
        _Window(di, s, min(L, len(t) - 1 - s))
        for di, t in enumerate(toks)
        for s in range(0, max(len(t) - 1, 0), L)
    ]
    if not windows:
        raise BadInputError("the documents are too short to evaluate (need 2 tokens)")
    return windows


@dataclass
class _Retrieved:
    """The live neighbours of every full chunk of every window: row ``rows[(doc, first
    token)]`` of ``got`` (and of its tensors, -1 where masked)."""

    rows: dict[tuple[int, int], int]
    got: Neighbours
    tokens: torch.Tensor  # (R, k, 2m)
    mask: torch.Tensor  # (R, k, 2m)
    shuffle: np.ndarray  # (R,): row i gets the neighbours of row shuffle[i] when shuffled

    def batch(
        self, windows: list[_Window], n_chunks: int, m: int, *, shuffled: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``retrieved`` and its mask (B, n_chunks, k, 2m) for a batch of windows; with
        ``shuffled`` every chunk gets the neighbours of its row in :attr:`shuffle`."""
        k, r = self.tokens.shape[1:]
        retrieved = torch.full((len(windows), n_chunks, k, r), -1, dtype=torch.long)
        mask = torch.zeros((len(windows), n_chunks, k, r), dtype=torch.bool)
        for i, w in enumerate(windows):
            for j in range(w.length // m):
                row = self.rows[(w.doc, w.start + j * m)]
                if shuffled:
                    row = int(self.shuffle[row])
                retrieved[i, j], mask[i, j] = self.tokens[row], self.mask[row]
        return retrieved, mask


def derangement(n: int, *, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """A random permutation of ``range(n)`` without fixed points (for n >= 2; the identity
    for n < 2): row i gets the neighbours of row ``perm[i] != i``. With ``groups`` (one
    label per row: the evaluated document), row i also gets a row of another group
    wherever a swap can give it one; only where one group holds more than half of the
    rows do some of its rows keep a row of their own group."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if n < 2:
        return perm
    for i in np.nonzero(perm == np.arange(n))[0]:
        if perm[i] == i:  # an earlier swap may have moved it already
            j = (i + 1) % n  # perm[j] != i, and after the swap perm[j] = i != j
            perm[i], perm[j] = perm[j], perm[i]
    if groups is None:
        return perm
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one label per row ({n}), got shape {g.shape}")
    rows = np.arange(n)
    for i in np.nonzero(g[perm] == g)[0]:
        if g[perm[i]] != g[i]:  # an earlier swap may have fixed it already
            continue
        # rows r such that after swapping perm[i] and perm[r] both rows are valid
        ok = (g[perm] != g[i]) & (perm != i) & (g != g[perm[i]]) & (rows != perm[i])
        candidates = np.nonzero(ok)[0]
        if len(candidates):
            r = int(rng.choice(candidates))
            perm[i], perm[r] = perm[r], perm[i]
    return perm


def _retrieve(
    retriever: LiveRetriever,
    windows: list[_Window],
    toks: list[np.ndarray],
    own: list[int] | None,
    m: int,
    progress: ProgressFn,
    *,
    shuffle_seed: int = 0,
    shuffle_any_chunk: bool = False,
) -> _Retrieved:
    """Live retrieval for every full chunk of every window, all at once. ``own``: the
    database document number of each evaluated document, excluded from its neighbours.
    ``shuffle_seed``: the seed of the shuffled mode's derangement of the rows, which gives
    every chunk the neighbours of a chunk of another document (``shuffle_any_chunk``: of
    any other chunk)."""
    rows: dict[tuple[int, int], int] = {}
    chunks: list[np.ndarray] = []
    exclude: list[int] = []
    docs: list[int] = []
    for w in windows:
        for j in range(w.length // m):
            a = w.start + j * m
            rows[(w.doc, a)] = len(chunks)
            chunks.append(toks[w.doc][a : a + m])
            exclude.append(own[w.doc] if own is not None else -2)
            docs.append(w.doc)
    progress("retrieve", 0, len(chunks))
    got = retriever(
        np.stack(chunks) if chunks else np.zeros((0, m), np.int64),
        exclude=np.array(exclude, dtype=np.int64) if own is not None else None,
    )
    progress("retrieve", len(chunks), len(chunks))
    tokens, mask = got.tensors()
    groups = None if shuffle_any_chunk else np.array(docs, dtype=np.int64)
    shuffle = derangement(len(chunks), seed=shuffle_seed, groups=groups)
    return _Retrieved(rows, got, tokens, mask, shuffle)


def _score(
    model: RetrievalParts,
    windows: list[_Window],
    toks: list[np.ndarray],
    retrieved: _Retrieved | None,
    *,
    L: int,
    pad: int,
    batch_size: int,
    progress: ProgressFn,
) -> dict[str, list[np.ndarray]]:
    """Per mode and window, the NLL (nats) of each of its targets."""
    m = model.cfg.chunk_size
    modes = _modes(retrieved is not None)
    nll: dict[str, list[np.ndarray]] = {mode: [np.zeros(0)] * len(windows) for mode in modes}
    progress("evaluate", 0, len(windows))
    for b0 in range(0, len(windows), batch_size):
        batch = windows[b0 : b0 + batch_size]
        inp = torch.full((len(batch), L), pad, dtype=torch.long)
        tgt = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
        for i, w in enumerate(batch):
            t = torch.from_numpy(toks[w.doc][w.start : w.start + w.length + 1])
            inp[i, : w.length], tgt[i, : w.length] = t[:-1], t[1:]
        for mode in modes:
            neighbours: tuple[Tensor | None, Tensor | None] = (None, None)
            if mode != "no_retrieval" and retrieved is not None:
                neighbours = retrieved.batch(batch, L // m, m, shuffled=mode == "shuffled")
            logits, _ = model(inp, *neighbours)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                tgt.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(len(batch), L)
            for i, w in enumerate(batch):
                nll[mode][b0 + i] = loss[i, : w.length].double().numpy()
        progress("evaluate", b0 + len(batch), len(windows))
    return nll


def _modes(retrieval: bool) -> list[str]:
    return ["retrieval", "shuffled", "no_retrieval"] if retrieval else ["no_retrieval"]


def _bpb(nll: float, nbytes: float) -> float | None:
    return float(nll / LN2 / nbytes) if nbytes > 0 else None


def _alpha_table(
    windows: list[_Window],
    toks: list[np.ndarray],
    nll: dict[str, list[np.ndarray]],
    retrieved: _Retrieved,
    nbytes_of: np.ndarray,
    m: int,
) -> dict[str, Any]:
    """bpb(alpha): window chunks j >= 1, by their overlap with the neighbours of j-1."""
    modes = list(nll)
    c_nll: dict[str, list[float]] = {mode: [] for mode in modes}
    c_bytes, c_rows, c_tokens = [], [], []
    for wi, w in enumerate(windows):
        for j in range(1, w.length // m + 1):
            lo, hi = j * m - 1, min((j + 1) * m - 1, w.length)  # input positions
            if lo >= hi:
                continue
            targets = toks[w.doc][w.start + 1 + lo : w.start + 1 + hi]
            c_tokens.append(np.pad(targets, (0, m - targets.size), constant_values=-2))
            c_rows.append(retrieved.rows[(w.doc, w.start + (j - 1) * m)])
            c_bytes.append(int(nbytes_of[targets].sum()))
            for mode in modes:
                c_nll[mode].append(float(nll[mode][wi][lo:hi].sum()))
    ctoks = np.stack(c_tokens) if c_tokens else np.zeros((0, m), np.int64)
    lens = (ctoks >= 0).sum(axis=1)
    got = retrieved.got
    neigh = np.where(got.mask, got.tokens, -1)[np.asarray(c_rows, dtype=np.int64)]
    overlap = longest_common_run(ctoks, neigh) / np.maximum(lens, 1)  # (C,)
    cb = np.asarray(c_bytes, dtype=np.float64)
    # chunks are counted whole, however short (the last target of a full window is a
    # chunk of one token); "tokens" counts their targets, a share that short ones cannot skew
    table: dict[str, Any] = {"alpha": list(ALPHAS), "chunks": [], "fraction": [], "tokens": []}
    for mode in modes:
        table[mode] = []
    for alpha in ALPHAS:
        sel = overlap <= alpha / 100.0 + 1e-9
        table["chunks"].append(int(sel.sum()))
        table["fraction"].append(float(sel.mean()) if sel.size else 0.0)
        table["tokens"].append(int(lens[sel].sum()))
        for mode in modes:
            table[mode].append(_bpb(np.asarray(c_nll[mode])[sel].sum(), cb[sel].sum()))
    table["mean_overlap"] = float(overlap.mean()) if overlap.size else 0.0
    table["overlap_histogram"] = {
        f"<={a:g}%": int((overlap <= a / 100.0 + 1e-9).sum()) for a in ALPHAS
    }
    return table


@dataclass(frozen=True)
class _Totals:
    """Per evaluated document: summed NLL per mode, target bytes and tokens."""

    nll: dict[str, np.ndarray]
    bytes: np.ndarray
    tokens: np.ndarray

    @classmethod
    def of(
        cls,
        windows: list[_Window],
        toks: list[np.ndarray],
        nll: dict[str, list[np.ndarray]],
        nbytes_of: np.ndarray,
        n_docs: int,
    ) -> _Totals:
        totals = cls(
            {mode: np.zeros(n_docs) for mode in nll},
            np.zeros(n_docs, dtype=np.int64),
            np.zeros(n_docs, dtype=np.int64),
        )
        for wi, w in enumerate(windows):
            targets = toks[w.doc][w.start + 1 : w.start + 1 + w.length]
            totals.bytes[w.doc] += int(nbytes_of[targets].sum())
            totals.tokens[w.doc] += w.length
            for mode, per_window in nll.items():
                totals.nll[mode][w.doc] += per_window[wi].sum()
        return totals

    def per_document(self, ids: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "id": doc_id,
                "tokens": int(self.tokens[d]),
                "bytes": int(self.bytes[d]),
                **{f"bpb_{mode}": _bpb(v[d], self.bytes[d]) for mode, v in self.nll.items()},
            }
            for d, doc_id in enumerate(ids)
        ]


@torch.no_grad()
def evaluate(
    model: RetrievalParts,
    db: RetroDB,
    documents: Sequence[tuple[str, str]],
    args: EvalArgs = EvalArgs(),
    *,
    progress: ProgressFn = no_progress,
) -> Evaluation:
    """Bits per byte of ``documents`` (``(id, text)`` pairs) with retrieval on, shuffled
    and off (see the module docstring), and bpb(alpha), scored as ``args`` says
    (:class:`~retrodb_model.config.EvalArgs`; without a checkpoint, ``k`` and ``seq_len``
    default to the model's ``num_neighbours`` and ``max_seq_len``). ``args.no_retrieval``
    evaluates without retrieval only (no search at all); ``args.max_tokens`` scores only
    the first max_tokens targets of each document (a cheaper estimate); ``args.rerank``
    and ``args.fetch`` choose the neighbours (:class:`~retrodb_model.retrieve.LiveRetriever`);
    ``args.null_boost`` and ``args.min_run``, when given, are the model's null boost and
    copy floor for this evaluation (the model's own are restored after it)."""
    if args.null_boost is not None or args.min_run is not None:
        with model.inference_settings(null_boost=args.null_boost, min_run=args.min_run):
            plain = dataclasses.replace(args, null_boost=None, min_run=None)
            return evaluate(model, db, documents, plain, progress=progress)
    cfg = model.cfg
    m, L = cfg.chunk_size, _check_seq_len(cfg, args.seq_len)
    k = args.k or cfg.num_neighbours
    tok = db.tokenizer
    assert tok is not None
    if not documents:
        raise BadInputError("no documents to evaluate")
    t_start = time.perf_counter()
    nbytes_of = token_byte_lengths(tok)
    ids = [d for d, _ in documents]
    toks = [np.asarray(t, dtype=np.int64) for t in tok.encode([text for _, text in documents])]
    if args.max_tokens is not None:
        toks = [t[: args.max_tokens + 1] for t in toks]
    windows = _windows(toks, L)
    retriever = LiveRetriever(
        db, k, rerank=args.rerank, fetch=args.fetch, min_overlap=args.min_overlap or 0.0
    )
    retrieved = None
    if not args.no_retrieval:
        own = [retriever.doc_number(i) for i in ids] if args.exclude_self else None
        retrieved = _retrieve(
            retriever, windows, toks, own, m, progress,
            shuffle_seed=args.shuffle_seed, shuffle_any_chunk=args.shuffle_any_chunk,
        )  # fmt: skip
    t_model = time.perf_counter()
    nll = _score(
        model, windows, toks, retrieved,
        L=L, pad=db.pad_id, batch_size=args.batch_size, progress=progress,
    )  # fmt: skip
    model_seconds = time.perf_counter() - t_model
    totals = _Totals.of(windows, toks, nll, nbytes_of, len(documents))
    total_bytes = int(totals.bytes.sum())
    return Evaluation(
        documents=len(documents),
        windows=len(windows),
        tokens=int(totals.tokens.sum()),
        bytes=total_bytes,
        seq_len=L,
        chunk_size=m,
        k=k,
        exclude_self=args.exclude_self,
        rerank=args.rerank,
        fetch=int(retriever.fetch or 1),
        min_overlap=retriever.min_overlap,
        dropped=retriever.dropped,
        null_boost=model.null_boost if retrieved is not None else 0.0,
        min_run=model.min_run if retrieved is not None else 0,
        shuffle_seed=args.shuffle_seed,
        shuffle_any_chunk=args.shuffle_any_chunk,
        max_tokens_per_document=args.max_tokens,
        db=str(db.path),
        generation=db.generation,
        bpb={mode: _bpb(v.sum(), total_bytes) for mode, v in totals.nll.items()},
        bpb_alpha=(
            None if retrieved is None else _alpha_table(windows, toks, nll, retrieved, nbytes_of, m)
        ),
        per_document=totals.per_document(ids),
        seconds={
            "total": time.perf_counter() - t_start,
            "retrieval": retriever.seconds,
            "model": model_seconds,
        },
    )


def evaluate_checkpoint(
    directory: str | Path,
    db: RetroDB,
    inputs: Sequence[str | Path],
    args: EvalArgs = EvalArgs(),
    *,
    progress: ProgressFn = no_progress,
) -> Evaluation:
    """:func:`evaluate` the checkpoint in ``directory`` on the documents of ``inputs``
    (files, folders, JSONL). ``args.seq_len`` defaults to the training length; a model
    trained without retrieval is evaluated without it. Refuses a database with another
    tokenizer (:class:`retrodb.errors.MismatchError`)."""
    from retrodb_model.checkpoint import load_model

    model, ckpt = load_model(directory, db=db)
    args = dataclasses.replace(
        args,
        seq_len=args.seq_len or int(ckpt.train_args.get("seq_len", model.cfg.max_seq_len)),
        no_retrieval=args.no_retrieval or not ckpt.retrieval,
        min_overlap=ckpt.min_overlap if args.min_overlap is None else args.min_overlap,
        null_boost=ckpt.null_boost if args.null_boost is None else args.null_boost,
        min_run=ckpt.min_run if args.min_run is None else args.min_run,
    )
    result = evaluate(model, db, read_documents(inputs), args, progress=progress)
    result.checkpoint, result.step = str(directory), ckpt.step
    result.inputs = [str(i) for i in inputs]
    if not ckpt.retrieval:
        result.note = "the model was trained with --no-retrieval"
    return result


def hurt(res: Evaluation) -> dict[str, float | None]:
    """How much retrieval costs in ``res``: on - off overall, the worst on - off of the
    bpb(alpha) buckets up to 50 %, and off - shuffled (None where a mode is missing)."""
    bpb = res.bpb
    on, off, shuffled = bpb.get("retrieval"), bpb.get("no_retrieval"), bpb.get("shuffled")
    worst = None
    if res.bpb_alpha:
        t = res.bpb_alpha
        gaps = [
            a_on - a_off
            for a, a_on, a_off in zip(t["alpha"], t["retrieval"], t["no_retrieval"], strict=True)
            if a <= 50 and a_on is not None and a_off is not None
        ]
        worst = max(gaps) if gaps else None
    return {
        "overall": None if on is None or off is None else on - off,
        "bucket": worst,
        "shuffled": None if shuffled is None or off is None else off - shuffled,
    }


def never_hurts(res: Evaluation) -> bool:
    """Whether ``res`` meets :data:`NEVER_HURT` (a missing figure counts as met)."""
    return all(v is None or v <= NEVER_HURT[k] for k, v in hurt(res).items())


def calibrate_floor(
    directory: str | Path,
    db: RetroDB,
    inputs: Sequence[str | Path],
    args: EvalArgs = EvalArgs(),
    *,
    floors: Sequence[float] = FLOORS,
    boosts: Sequence[float] = BOOSTS,
    min_runs: Sequence[int] = MIN_RUNS,
    copy_check: bool = False,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Choose the checkpoint's overlap floor, null boost and copy floor on ``inputs`` (its
    validation documents, with ``args.exclude_self`` when they are in the database) and
    record them in its retrieval.json. Every setting of ``floors`` x ``boosts`` x
    ``min_runs`` is evaluated; of those that meet :data:`NEVER_HURT` the one with the
    lowest bpb with retrieval on is chosen, else the most cautious (the largest floor, then
    boost, then copy floor). Returns what was recorded: the choice and every setting's
    figures (under ``"floors"``).

    ``copy_check`` (needs ``args.exclude_self``): every setting is also evaluated with the
    documents' own chunks retrievable, the regime of a document after ``retrodb add``,
    where every neighbour, shuffled ones too, is text copied verbatim from the database;
    a setting then meets only if shuffled is no better than off - 0.002 there as well (its
    figures under ``"copy"``, with on / off: how much copying pays). Exclusion alone cannot
    see what shuffled neighbours give a model in that regime."""
    from retrodb_model.checkpoint import write_retrieval_settings

    if copy_check and not args.exclude_self:
        raise BadInputError(
            "--copy-check (copy_check) compares with the documents' own chunks "
            "retrievable: calibrate with --exclude-self (exclude_self) to use it"
        )
    tried: list[dict[str, Any]] = []
    for a, b, n in itertools.product(
        sorted(set(floors)), sorted(set(boosts)), sorted(set(min_runs))
    ):
        setting = dataclasses.replace(args, min_overlap=a, null_boost=b, min_run=n)
        res = evaluate_checkpoint(directory, db, inputs, setting, progress=progress)
        pair: dict[str, Any] = {
            "min_overlap": a,
            "null_boost": b,
            "min_run": n,
            "bpb": res.bpb,
            "hurt": hurt(res),
            "meets": never_hurts(res),
        }
        if copy_check:
            own = evaluate_checkpoint(
                directory,
                db,
                inputs,
                dataclasses.replace(setting, exclude_self=False),
                progress=progress,
            )
            copy_hurt = hurt(own)["shuffled"]
            on, off = own.bpb.get("retrieval"), own.bpb.get("no_retrieval")
            pair["copy"] = {
                "bpb": own.bpb,
                "hurt": {"shuffled": copy_hurt},
                "on_over_off": on / off if on is not None and off else None,
            }
            pair["meets"] = pair["meets"] and (
                copy_hurt is None or copy_hurt <= NEVER_HURT["shuffled"]
            )
        tried.append(pair)
    meeting = [t for t in tried if t["meets"]]
    chosen = min(meeting, key=lambda t: t["bpb"]["retrieval"]) if meeting else tried[-1]
    settings = {
        "min_overlap": chosen["min_overlap"],
        "null_boost": chosen["null_boost"],
        "min_run": chosen["min_run"],
        "chosen_on": [str(i) for i in inputs],
        "exclude_self": args.exclude_self,
        "copy_check": copy_check,
        "rules": NEVER_HURT,
        "floors": tried,
    }
    write_retrieval_settings(directory, settings)
    return settings


def plot_alpha(result: dict[str, Any], path: str | Path, *, title: str = "") -> Path | None:
    """A PNG of bpb(alpha) with retrieval on, shuffled and off (matplotlib, Agg); None
    without alpha, or without matplotlib (the ``plot`` extra), which a warning names."""
    table = result.get("bpb_alpha")
    if not table:
        return None
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            f"no plot at {path}: matplotlib is not installed (pip install 'retrodb[plot]')",
            stacklevel=2,
        )
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("retrieval", "o-"), ("shuffled", "^:"), ("no_retrieval", "s--")):
        ys = table.get(mode)
        if ys:
            ax.plot(table["alpha"], ys, style, label=mode.replace("_", " "))
    for a, y, f in zip(table["alpha"], table.get("retrieval", []), table["fraction"], strict=False):
        if y is not None:
            ax.annotate(
                f"{100 * f:.0f}%",
                (a, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    ax.set_xlabel("max overlap with neighbours, alpha (% of chunk)")
    ax.set_ylabel("bits per byte")
    ax.set_xticks(table["alpha"])
    ax.set_title(title or "bpb of chunks with overlap <= alpha (labels: share of chunks)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = [
    "calibrate_floor",
    "hurt",
    "never_hurts",
    "ALPHAS",
    "EvalArgs",
    "Evaluation",
    "derangement",
    "evaluate",
    "evaluate_checkpoint",
    "longest_common_run",
    "plot_alpha",
    "read_documents",
    "token_byte_lengths",
]
