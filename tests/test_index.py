from __future__ import annotations

import numpy as np
import pytest

from retrodb.config import IndexConfig
from retrodb.errors import BadInputError, CorruptError, MismatchError
from retrodb.index import SegmentIndex, build_index, check_vectors
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
