from __future__ import annotations

import json

import numpy as np
import pytest

from retrodb.config import IndexConfig
from retrodb.errors import BadInputError, CorruptError, MismatchError
from retrodb.index import (
    REACH_K,
    IndexBuilder,
    SegmentIndex,
    build_index,
    check_vectors,
    side_file,
    unreachable_keys,
)
from retrodb.search import search_segments

CFG = IndexConfig()


def _segment(tmp_path, name: str, first_key: int, vectors: np.ndarray) -> SegmentIndex:
    path = tmp_path / f"{name}.usearch"
    keys = np.arange(first_key, first_key + len(vectors))
    build_index(path, keys, vectors, config=CFG)
    return SegmentIndex.open(
        path,
        first_key=first_key,
        count=len(vectors),
        ndim=vectors.shape[1],
        expected_size=path.stat().st_size,
        config=CFG,
    )


def _vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32)


def test_each_vector_finds_itself_and_merge_across_segments(tmp_path) -> None:
    a, b = _vectors(300, seed=1), _vectors(200, seed=2)
    segs = [_segment(tmp_path, "a", 0, a), _segment(tmp_path, "b", 300, b)]
    both = np.concatenate([a, b])
    keys, dist = search_segments(segs, both, 5)
    assert keys.shape == (500, 5)
    assert (keys[:, 0] == np.arange(500)).mean() > 0.99
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_padding_when_fewer_than_k_and_keep_filter(tmp_path) -> None:
    seg = _segment(tmp_path, "a", 10, _vectors(3))
    keys, dist = search_segments([seg], _vectors(2, seed=5), 5)
    assert (keys[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all()
    keys, _ = search_segments([seg], _vectors(2, seed=5), 3, kept=lambda k: k != 11)
    assert 11 not in keys
    assert (keys[:, 2] == -1).all()


def test_keep_filter_searches_deeper_until_k_found(tmp_path) -> None:
    v = _vectors(400, seed=3)
    seg = _segment(tmp_path, "a", 0, v)
    # Drop the 50 closest candidates of every query: the search must go deeper, not give up.
    exact, _ = search_segments([seg], v[:4], 50, exact=True)
    banned = set(exact.ravel().tolist())
    keys, _ = search_segments([seg], v[:4], 4, kept=lambda k: ~np.isin(k, list(banned)))
    assert (keys >= 0).all() and not (set(keys.ravel().tolist()) & banned)


def test_open_checks_size_and_header(tmp_path) -> None:
    seg = _segment(tmp_path, "a", 0, _vectors(20))
    with pytest.raises(CorruptError, match="a.usearch"):
        SegmentIndex.open(seg.path, first_key=0, count=20, ndim=16, expected_size=1, config=CFG)
    with pytest.raises(CorruptError, match="expected 21"):
        SegmentIndex.open(seg.path, first_key=0, count=21, ndim=16, expected_size=None, config=CFG)
    junk = tmp_path / "junk.usearch"
    junk.write_bytes(b"x" * 100)
    with pytest.raises(CorruptError, match="junk.usearch"):
        SegmentIndex.open(junk, first_key=0, count=20, ndim=16, expected_size=100, config=CFG)


def test_vector_validation() -> None:
    with pytest.raises(BadInputError, match="NaN"):
        check_vectors(np.array([[np.nan, 1.0]]))
    with pytest.raises(MismatchError, match="dimension 2"):
        check_vectors(np.ones((1, 2)), dim=3)
    with pytest.raises(BadInputError):
        check_vectors(np.ones((1, 2, 3)))
    with pytest.raises(BadInputError, match="k must be a positive integer"):
        search_segments([], np.ones((1, 2), np.float32), 0)


# ------------------------------------------------------------------ reachability (issue 10)

#: Tiny links and clustered vectors: single-threaded adds leave nodes no search reaches
#: (deterministically: 21 of 600 with USearch 2.26).
SPARSE = IndexConfig(connectivity=4, expansion_add=16, expansion_search=16)


def _clustered(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d)).astype(np.float32)
    return centres[rng.integers(0, 8, n)] + 0.05 * rng.standard_normal((n, d)).astype(np.float32)


def _sparse_builder(vectors: np.ndarray, *, repair: bool = True) -> IndexBuilder:
    builder = IndexBuilder(vectors.shape[1], SPARSE, repair=repair)
    builder.index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=1)
    return builder


def _open(path, n: int, d: int, config: IndexConfig) -> SegmentIndex:
    return SegmentIndex.open(
        path, first_key=0, count=n, ndim=d, expected_size=path.stat().st_size, config=config
    )


def _own_search_misses(index, vectors: np.ndarray, k: int = REACH_K) -> set[int]:
    """The definition, one query at a time: keys a search for their vector does not return."""
    misses = set()
    for key, vec in enumerate(vectors):
        got = np.asarray(index.search(vec, k).keys).tolist()
        if key not in got:
            misses.add(key)
    return misses


def test_check_matches_one_search_per_key_and_a_healthy_index_has_none(tmp_path) -> None:
    v = _clustered()
    builder = _sparse_builder(v)
    stored = np.stack([builder.index.get(i, dtype=np.float32) for i in range(len(v))])
    found = unreachable_keys(builder.index)
    assert found.dtype == np.int64 and (np.diff(found) > 0).all()
    assert set(found.tolist()) == _own_search_misses(builder.index, stored)
    assert found.size > 0
    # Default links, spread-out vectors, one adding thread (concurrent adds are not
    # deterministic): the graph reaches every key and saving writes no side list.
    healthy = IndexBuilder(16, CFG)
    healthy.index.add(np.arange(300, dtype=np.uint64), _vectors(300), threads=1)
    assert unreachable_keys(healthy.index).size == 0
    healthy.save(tmp_path / "h.usearch")
    opened = _open(tmp_path / "h.usearch", 300, 16, CFG)
    assert opened.unreachable().size == 0 and opened.side is None


def test_repair_on_save_makes_every_key_reachable(tmp_path) -> None:
    v = _clustered()
    plain = _sparse_builder(v, repair=False)
    plain.save(tmp_path / "plain.usearch")
    assert not side_file(tmp_path / "plain.usearch").exists()
    unrepaired = _open(tmp_path / "plain.usearch", len(v), 16, SPARSE)
    lost = unrepaired.unreachable()
    assert lost.size > 0  # the graph alone loses keys

    builder = _sparse_builder(v)
    builder.save(tmp_path / "fixed.usearch")
    assert builder.side_keys.tolist() == lost.tolist()  # the same graph, the same keys
    assert side_file(tmp_path / "fixed.usearch").exists()
    seg = _open(tmp_path / "fixed.usearch", len(v), 16, SPARSE)
    assert seg.side_keys.tolist() == lost.tolist()
    assert seg.unreachable().size == 0
    # Each lost key is now the best answer to its own vector, through search_segments too.
    keys, dist = search_segments([seg], seg.vectors(lost), 3)
    assert (keys[:, 0] == lost).all() and (dist[:, 0] <= 1e-6).all()
    assert all(len(set(row)) == len(row) for row in keys.tolist())  # no key twice
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_side_list_merge_keeps_other_results_and_exact_search(tmp_path) -> None:
    v = _clustered()
    _sparse_builder(v).save(tmp_path / "x.usearch")
    seg = _open(tmp_path / "x.usearch", len(v), 16, SPARSE)
    queries = _clustered(20, seed=9)
    exact, exact_dist = seg.search(queries, 10, exact=True)
    approx, approx_dist = seg.search(queries, 10)
    assert approx.shape == exact.shape == (20, 10)
    # The merged approximate answer is never worse than the graph's alone, nor than exact.
    graph_dist = np.asarray(seg.index.search(queries, 10).distances).reshape(20, 10)
    assert (approx_dist <= graph_dist + 1e-6).all()
    assert (exact_dist <= approx_dist + 1e-6).all()


def test_side_list_must_match_the_index(tmp_path) -> None:
    v = _clustered()
    _sparse_builder(v).save(tmp_path / "x.usearch")
    side = side_file(tmp_path / "x.usearch")
    side.write_text('{"unreachable": [99999]}')
    with pytest.raises(CorruptError, match="x-side.json"):
        _open(tmp_path / "x.usearch", len(v), 16, SPARSE)
    side.write_text("not json")
    with pytest.raises(CorruptError, match="x-side.json"):
        _open(tmp_path / "x.usearch", len(v), 16, SPARSE)


def test_exact_duplicates_are_ties_not_unreachable(tmp_path) -> None:
    v = np.concatenate([np.repeat(_vectors(1, seed=4), 15, axis=0), _vectors(100, seed=5)])
    seg = _segment(tmp_path, "d", 0, v)
    assert seg.unreachable().size == 0


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i8"])
@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
def test_side_list_distances_are_usearch_distances(tmp_path, dtype: str, metric: str) -> None:
    cfg = IndexConfig(dtype=dtype, metric=metric)  # type: ignore[arg-type]
    v, q = _vectors(40, seed=6), _vectors(5, seed=7)
    if metric == "ip":
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    path = tmp_path / "x.usearch"
    build_index(path, np.arange(40), v, config=cfg)
    side_file(path).write_text(json.dumps({"unreachable": list(range(40))}))
    seg = SegmentIndex.open(
        path, first_key=0, count=40, ndim=16, expected_size=path.stat().st_size, config=cfg
    )
    assert seg.side is not None
    keys, dist = seg.search(q, 40, exact=True)
    side = np.take_along_axis(seg.side.distances(q), keys, axis=1)
    np.testing.assert_allclose(side, dist, rtol=1e-5, atol=1e-5)
    merged, merged_dist = seg.search(q, 5)  # every key is in the side list: exact answers
    assert (merged == keys[:, :5]).all() or np.allclose(merged_dist, dist[:, :5], atol=1e-5)
