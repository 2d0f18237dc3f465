"""Re-ranking dense candidates by token overlap: the longest common run, the order (ties
and short runs keep the dense order, missing candidates last) and k kept."""

from __future__ import annotations

import numpy as np
import pytest

from retrodb.errors import BadInputError
from retrodb.rerank import (
    DEFAULT_FETCH,
    check_rerank,
    longest_run,
    overlap_order,
    rerank_keys,
    resolve_fetch,
)
from retrodb_model.evaluate import longest_common_run


def test_longest_run_matches_the_evaluation_measure() -> None:
    rng = np.random.default_rng(0)
    query = rng.integers(0, 5, size=(6, 8))
    cands = rng.integers(0, 5, size=(6, 3, 8))
    query[0, 5:] = -1  # padding never matches ...
    cands[0, :, 5:] = -2  # ... on either side
    got = longest_run(query, cands)
    assert got.shape == (6, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[:, c], longest_common_run(query, cands[:, c : c + 1]))
    assert longest_run(np.array([[1, 2, 3, 4]]), np.array([[[9, 1, 2, 3, 9, 4]]]))[0, 0] == 3


def test_overlap_order_and_rerank_keep_k() -> None:
    query = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    cands = np.array(
        [
            [
                [9, 9, 9, 9, 9, 9, 9, 9],  # dense best, no overlap
                [0, 1, 2, 3, 4, 5, 0, 0],  # run of 5
                [5, 6, 7, 0, 0, 0, 0, 0],  # run of 3: below min_run, counts as none
                [3, 4, 5, 6, 7, 8, 0, 0],  # run of 6
                [1, 2, 3, 4, 5, 6, 7, 8],  # missing (key -1): last whatever its tokens
            ]
        ]
    )
    keys = np.array([[10, 11, 12, 13, -1]])
    dist = np.array([[0.1, 0.2, 0.3, 0.4, np.inf]], dtype=np.float32)
    order = overlap_order(query, cands, keys >= 0, min_run=4)
    assert order.tolist() == [[3, 1, 0, 2, 4]]
    k_keys, k_dist = rerank_keys(query, keys, dist, cands, 3, min_run=4)
    assert k_keys.tolist() == [[13, 11, 10]]
    np.testing.assert_allclose(k_dist, [[0.4, 0.2, 0.1]])
    # without any overlap the dense order stands
    same, _ = rerank_keys(query, keys, dist, np.full_like(cands, 9), 2)
    assert same.tolist() == [[10, 11]]
    check_rerank("overlap")
    with pytest.raises(BadInputError):
        check_rerank("bm25")


def test_fetch_is_one_without_reranking_and_checked() -> None:
    assert resolve_fetch("none", None) == 1 and resolve_fetch("none", 1) == 1
    assert resolve_fetch("overlap", None) == DEFAULT_FETCH and resolve_fetch("overlap", 2) == 2
    with pytest.raises(BadInputError, match="only to rerank 'overlap'"):
        resolve_fetch("none", 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(BadInputError, match="fetch must be a positive integer"):
            resolve_fetch("overlap", bad)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="rerank must be one of"):
        resolve_fetch("bm25", None)
