"""A document-level train/validation split that never changes between runs.

A document's side depends only on its id, the seed and the fraction: the first 8 bytes of
``sha256(f"{seed}:{doc_id}")`` read as a number in [0, 1). Adding or removing other
documents, reordering inputs or running on another machine never moves a document, and
raising the fraction only moves documents from train to validation, never back.

>>> is_validation("library/os.rst.txt", fraction=0.05)   # doctest: +SKIP
False
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

#: The validation fraction used when none is given.
DEFAULT_FRACTION = 0.05


def split_value(doc_id: str, *, seed: int = 0) -> float:
    """A number in [0, 1), uniform over ids, fixed for ``(doc_id, seed)``."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def is_validation(doc_id: str, fraction: float = DEFAULT_FRACTION, seed: int = 0) -> bool:
    """True if the document belongs to the validation split."""
    _check_fraction(fraction)
    return split_value(doc_id, seed=seed) < fraction


def validation_mask(
    doc_ids: Iterable[str], fraction: float = DEFAULT_FRACTION, seed: int = 0
) -> np.ndarray:
    """``is_validation`` for many ids at once, as a bool array."""
    _check_fraction(fraction)
    return np.array([split_value(d, seed=seed) < fraction for d in doc_ids], dtype=bool)


def split_ids(
    doc_ids: Iterable[str], fraction: float = DEFAULT_FRACTION, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``(train_ids, validation_ids)``, each in the order given."""
    ids = list(doc_ids)
    val = validation_mask(ids, fraction, seed)
    return [d for d, v in zip(ids, val, strict=True) if not v], [
        d for d, v in zip(ids, val, strict=True) if v
    ]


__all__ = ["DEFAULT_FRACTION", "is_validation", "split_ids", "split_value", "validation_mask"]
