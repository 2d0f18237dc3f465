"""The training Dataset: shapes and dtypes, tokens and neighbours equal to the database's,
masks at document ends, workers, samplers (and the step sampler of training runs), seeds,
the split, staleness, and the training snippet of docs/neighbours.md."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from retrodb import RetroDB, StaleError, neighbours
from retrodb.neighbours import NeighbourSet
from retrodb.split import is_validation, split_ids, split_value
from retrodb_model.data import (
    RetroDataset,
    StepBatches,
    make_dataloader,
    make_datasets,
    make_train_loader,
)

from .conftest import SMALL
from .test_neighbours import build_db, build_trained_db, random_docs, write_docs

M = 16  # chunk size of the test databases
SEQ = 4 * M


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> RetroDB:
    return build_trained_db(tmp_path_factory.mktemp("data"), tiny_encoder_dir, n=12, seed=1)


def doc_tokens(db: RetroDB, ns: NeighbourSet, di: int) -> list[int]:
    a, c = int(ns.first_row[di]), int(ns.num_rows[di])
    toks, lens = ns.row_tokens(db, np.arange(a, a + c))
    return [int(t) for row, n in zip(toks, lens, strict=True) for t in row[:n]]


def test_shapes_and_dtypes(trained: RetroDB) -> None:
    ds = RetroDataset(trained.path, "train", seq_len=SEQ, split="all")
    item = ds[0]
    want = {
        "tokens": ((SEQ + 1,), torch.int64),
        "token_mask": ((SEQ + 1,), torch.bool),
        "targets": ((SEQ,), torch.int64),
        "retrieved": ((SEQ // M, 2, 2 * M), torch.int64),
        "retrieved_mask": ((SEQ // M, 2, 2 * M), torch.bool),
        "neighbours": ((SEQ // M, 2), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == want
    batch = next(iter(make_dataloader(ds, batch_size=3, shuffle=False)))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (3, *shape) for k, (shape, _) in want.items()
    }
    assert ds.reader.k == 2 and RetroDataset(trained, "train", seq_len=SEQ, k=1)[0][
        "retrieved"
    ].shape == (SEQ // M, 1, 2 * M)
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        RetroDataset(trained, "train", seq_len=SEQ + 1)


def test_windows_are_the_documents_tokens(trained: RetroDB) -> None:
    ds = RetroDataset(trained, "train", seq_len=SEQ, split="all")
    ns = ds.reader.nset
    b = ds.batch(np.arange(len(ds)))
    tokens, mask, targets = b["tokens"].numpy(), b["token_mask"].numpy(), b["targets"].numpy()
    np.testing.assert_array_equal(targets, np.where(mask[:, 1:], tokens[:, 1:], -100))
    assert (tokens[~mask] == trained.pad_id).all()
    # Padding only ever trails inside a window.
    assert (mask[:, :-1] >= mask[:, 1:]).all()
    doc_of_window = np.asarray(ns.doc)[ds.start]
    for di in range(len(ns.doc_ids)):
        wins = np.nonzero(doc_of_window == di)[0]
        got = [int(t) for w in wins for t in tokens[w, :SEQ][mask[w, :SEQ]]]
        assert got == doc_tokens(trained, ns, di)
        # The extra token is the next window's first token, or padding after the last window.
        for w, nxt in zip(wins[:-1], wins[1:], strict=True):
            assert tokens[w, SEQ] == tokens[nxt, 0] and mask[w, SEQ]
        assert not mask[wins[-1], SEQ]


def test_retrieved_is_the_neighbour_and_its_continuation(trained: RetroDB) -> None:
    ds = RetroDataset(trained, "train", seq_len=SEQ, split="all")
    ns = ds.reader.nset
    b = {k: v.numpy() for k, v in ds.batch(np.arange(len(ds))).items()}
    rows = ds.start[:, None] + np.arange(SEQ // M)
    inside = rows < ds.end[:, None]
    np.testing.assert_array_equal(b["neighbours"][inside], np.asarray(ns.keys)[rows[inside]])
    assert (b["neighbours"][~inside] == -1).all() and not b["retrieved_mask"][~inside].any()
    ref = trained.retrieve(b["neighbours"])
    np.testing.assert_array_equal(b["retrieved"], ref.tokens)
    np.testing.assert_array_equal(b["retrieved_mask"], ref.mask)
    # A neighbour that ends its document has an all-padding, all-masked continuation.
    cont = trained.continuation_keys(b["neighbours"])
    at_end = (b["neighbours"] >= 0) & (cont < 0)
    assert at_end.any() and (~at_end & (b["neighbours"] >= 0)).any()
    assert not b["retrieved_mask"][at_end][:, M:].any()
    assert (b["retrieved"][at_end][:, M:] == trained.pad_id).all()
    assert b["retrieved_mask"][~at_end & (b["neighbours"] >= 0)][:, M].all()
    # Neighbours never come from the window's own document.
    own = np.asarray(ns.doc)[ds.start]
    nb_docs = np.array(trained.key_documents(b["neighbours"].ravel()), dtype=object)
    own_ids = np.array(ns.doc_ids, dtype=object)[own]
    assert not (nb_docs.reshape(b["neighbours"].shape) == own_ids[:, None, None]).any()


def collect(loader: DataLoader) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.slow  # starts DataLoader workers, one of them a spawned interpreter
def test_workers_seeds_and_epochs(trained: RetroDB) -> None:
    ds = RetroDataset(trained, "train", seq_len=SEQ, split="all")
    _ = ds[0]  # maps opened in this process must not travel to the workers
    assert ds.reader._maps is not None
    blob = pickle.dumps(ds)
    assert b"memmap" not in blob and len(blob) < 20_000
    base = collect(make_dataloader(ds, batch_size=4, seed=3))
    assert same(base, collect(make_dataloader(ds, batch_size=4, seed=3, num_workers=2)))
    spawned = make_dataloader(
        ds, batch_size=4, seed=3, num_workers=1, multiprocessing_context="spawn"
    )
    assert same(base, collect(spawned))  # the dataset pickles and reopens its maps
    assert same(base, collect(make_dataloader(ds, batch_size=4, seed=3)))
    assert not same(base, collect(make_dataloader(ds, batch_size=4, seed=4)))
    loader = make_dataloader(ds, batch_size=4, seed=3)
    loader.sampler.set_epoch(1)
    epoch1 = collect(loader)
    assert not same(base, epoch1)
    loader.sampler.set_epoch(0)
    assert same(base, collect(loader))
    # Every window once per epoch.
    ordered = torch.cat(
        [b["tokens"] for b in collect(make_dataloader(ds, batch_size=5, shuffle=False))]
    )
    shuffled = torch.cat([b["tokens"] for b in base])
    assert sorted(map(tuple, ordered.tolist())) == sorted(map(tuple, shuffled.tolist()))
    # PyTorch's own DataLoader and default collate work too.
    plain = next(iter(DataLoader(ds, batch_size=5)))
    assert all(torch.equal(plain[k], v) for k, v in ds.batch(range(5)).items())


def test_distributed_sampler_shards_the_windows(trained: RetroDB) -> None:
    ds = RetroDataset(trained, "train", seq_len=SEQ, split="all")
    shards = [
        collect(
            make_dataloader(
                ds,
                batch_size=2,
                seed=1,
                distributed=True,
                rank=r,
                world_size=2,
                num_workers=1 if r else 0,
            )
        )
        for r in (0, 1)
    ]
    seen = [{tuple(t) for b in s for t in b["tokens"].tolist()} for s in shards]
    every = {tuple(t) for t in ds.batch(range(len(ds)))["tokens"].tolist()}
    assert seen[0] | seen[1] == every
    assert len(seen[0] & seen[1]) <= 1  # DistributedSampler pads one shard to equal length


def test_step_batches_resume_at_any_step_and_match_the_epoch_samplers() -> None:
    sampler = StepBatches(10, batch_size=3, seed=4)
    assert sampler.per_epoch == 3  # 10 windows: 3 full batches, the 10th window waits
    run = [b for _, b in zip(range(8), sampler, strict=False)]
    for start in range(8):  # a run resumed at any step sees the same batches from there
        resumed = StepBatches(10, batch_size=3, seed=4, start=start)
        assert [b for _, b in zip(range(8 - start), resumed, strict=False)] == run[start:]
    assert [sampler.epoch_of(s) for s in (0, 2, 3, 7)] == [0, 0, 1, 2]
    # epoch e is EpochShuffle's (and DistributedSampler's) order for seed + e
    epoch1 = [i for b in run[3:6] for i in b]
    ds_order = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert epoch1 == ds_order[:9]
    # shards: DistributedSampler(drop_last=True), each rank batched on its own
    shards = [StepBatches(10, batch_size=2, seed=4, rank=r, world_size=3) for r in range(3)]
    first = [s.epoch(0) for s in shards]
    assert all(len(e) == 1 and len(e[0]) == 2 for e in first)
    whole = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()[:9]
    assert [first[r][0] for r in range(3)] == [whole[r::3][:2] for r in range(3)]
    assert StepBatches(2, batch_size=3).per_epoch == 0 and list(StepBatches(2, batch_size=3)) == []


def test_train_loader_workers_fetch_the_same_batches(trained: RetroDB) -> None:
    ds = RetroDataset(trained, "train", seq_len=SEQ, split="all")
    plain = make_train_loader(ds, batch_size=4, seed=2, start=1)
    forked = make_train_loader(ds, batch_size=4, seed=2, start=1, num_workers=1)
    n = 2 * plain.batch_sampler.per_epoch
    a = [b for _, b in zip(range(n), plain, strict=False)]
    b = [x for _, x in zip(range(n), forked, strict=False)]
    assert same(a, b)
    rows = StepBatches(len(ds), batch_size=4, seed=2, start=1)
    want = [ds.batch(idx) for _, idx in zip(range(n), rows, strict=False)]
    assert same(a, want)


@pytest.mark.usefixtures("torch_one_thread")
def test_the_training_snippet_of_the_docs_runs(trained: RetroDB) -> None:
    text = (Path(__file__).parent.parent / "docs" / "neighbours.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "for_database" in c]
    # the same code, made tiny: the test database, its chunk size, the tiny preset
    for old, new in [('"my.retrodb"', repr(str(trained.path))), ("seq_len=512", f"seq_len={SEQ}"),
                     ('"small"', '"tiny"'), ("batch_size=16", "batch_size=4"),
                     ("num_workers=2", "num_workers=0"), ("range(2)", "range(1)")]:  # fmt: skip
        assert old in code, old
        code = code.replace(old, new)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "docs/neighbours.md", "exec"), scope)
    assert scope["model"].cfg.chunk_size == M and torch.isfinite(scope["loss"])


def test_split_by_document_is_stable(trained: RetroDB) -> None:
    assert split_value("library/os.rst.txt") == split_value("library/os.rst.txt")
    assert 0.0 <= split_value("a") < 1.0 and split_value("a") != split_value("a", seed=1)
    ids = [f"doc{i}" for i in range(2000)]
    train_ids, val_ids = split_ids(ids, 0.1)
    assert 150 < len(val_ids) < 250 and not set(train_ids) & set(val_ids)
    assert set(split_ids(ids, 0.2)[1]) >= set(val_ids)  # growing the fraction only adds
    train, val = make_datasets(trained.path, "train", seq_len=SEQ, val_fraction=0.3)
    ns = train.reader.nset
    t_docs = {ns.doc_ids[d] for d in np.asarray(ns.doc)[train.start]}
    v_docs = {ns.doc_ids[d] for d in np.asarray(ns.doc)[val.start]}
    assert v_docs and t_docs and not t_docs & v_docs
    assert all(is_validation(d, 0.3) for d in v_docs)
    assert not any(is_validation(d, 0.3) for d in t_docs)
    assert len(train) + len(val) == len(RetroDataset(trained, "train", seq_len=SEQ, split="all"))


def test_dataset_refuses_a_stale_set(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    db = build_db(tmp_path, tiny_encoder_dir, n=4)
    neighbours.compute(db, "train", k=2)
    db.add([write_docs(tmp_path / "more", random_docs(1, seed=2, prefix="m"))])
    with pytest.raises(StaleError, match="--refresh"):
        RetroDataset(db.path, "train", seq_len=SEQ)
    neighbours.refresh(db, "train")
    # Two segments now: gathers go through the multi-segment path.
    ds = RetroDataset(db.path, "train", seq_len=SEQ, split="all")
    b = {k: v.numpy() for k, v in ds.batch(np.arange(len(ds))).items()}
    assert len(db.segments) == 2 and (b["neighbours"] >= db.segments[1].meta.first_key).any()
    ref = db.retrieve(b["neighbours"])
    np.testing.assert_array_equal(b["retrieved"], ref.tokens)
    np.testing.assert_array_equal(b["retrieved_mask"], ref.mask)
    ns = ds.reader.nset
    last = ns.doc_ids.index("m00.txt")
    wins = np.nonzero(np.asarray(ns.doc)[ds.start] == last)[0]
    got = [int(t) for w in wins for t in b["tokens"][w, :SEQ][b["token_mask"][w, :SEQ]]]
    assert got == doc_tokens(db, ns, last)


def test_dataset_over_other_inputs(trained: RetroDB, tmp_path: Path) -> None:
    other = write_docs(tmp_path / "other", random_docs(3, seed=21, prefix="q", words=(60, 90)))
    neighbours.compute(trained, "inputs", inputs=[other], k=2)
    ds = RetroDataset(trained, "inputs", seq_len=SEQ, split="all")
    ns = ds.reader.nset
    b = {k: v.numpy() for k, v in ds.batch(np.arange(len(ds))).items()}
    assert {k: v.dtype for k, v in b.items()} == {
        "tokens": np.int64,
        "token_mask": bool,
        "targets": np.int64,
        "retrieved": np.int64,
        "retrieved_mask": bool,
        "neighbours": np.int64,
    }
    doc_of_window = np.asarray(ns.doc)[ds.start]
    for di in range(3):
        wins = np.nonzero(doc_of_window == di)[0]
        got = [int(t) for w in wins for t in b["tokens"][w, :SEQ][b["token_mask"][w, :SEQ]]]
        assert trained.tokenizer.decode(got) == (other / ns.doc_ids[di]).read_text()
    np.testing.assert_array_equal(b["retrieved"], trained.retrieve(b["neighbours"]).tokens)


def test_batches_after_delete_and_compact_read_the_right_rows(
    tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    """Compaction leaves gaps in a segment's keys: batches must still gather by key."""

    db = RetroDB.build(
        tmp_path / "db",
        [write_docs(tmp_path / "a", random_docs(6, seed=3, prefix="a"))],
        config=SMALL,
        encoder=tiny_encoder_dir,
    )
    db.add([write_docs(tmp_path / "b", random_docs(4, seed=4, prefix="b"))])
    db.delete(["a02.txt", "b01.txt"])
    db.compact()
    assert any(s.key_array is not None for s in db.segments)  # keys with gaps
    neighbours.compute(db, "train", k=2)
    ds = RetroDataset(db, "train", seq_len=SEQ, split="all")
    b = {k: v.numpy() for k, v in ds.batch(np.arange(len(ds))).items()}
    ref = db.retrieve(b["neighbours"])
    np.testing.assert_array_equal(b["retrieved"], ref.tokens)
    np.testing.assert_array_equal(b["retrieved_mask"], ref.mask)
    docs = set(db.key_documents(b["neighbours"].ravel())) - {None}
    assert docs and not docs & {"a02.txt", "b01.txt"}
