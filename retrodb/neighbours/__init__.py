"""Neighbour sets: the precomputed retrieval a RETRO training loop reads.

For every chunk of a training corpus a set holds the ``k`` nearest keys of the database
(see :mod:`.compute` for the rules), ``-1`` where fewer exist. A set is tied to the
generation it was computed for: opening it against another generation raises
:class:`~retrodb.errors.StaleError`, and :func:`refresh` brings it up to date by searching
only the segments added since. :class:`SequenceReader` turns windows of rows into
training batches.

- :mod:`.store`: the on-disk description, versions and reading of a set
- :mod:`.compute`: computing, refreshing and updating sets
- :mod:`.reader`: training batches

>>> from retrodb import neighbours                         # doctest: +SKIP
>>> ns = neighbours.compute(db, "train", k=2)              # doctest: +SKIP
>>> ns.keys.shape                                          # doctest: +SKIP
(41230, 2)
"""

from __future__ import annotations

from ..corpus import read_id_file
from .compute import DEFAULT_BATCH, UpdateReport, compute, refresh, self_share_mask, update
from .reader import SequenceReader
from .store import NeighbourSet, NeighbourSetInfo, SegmentRef, delete_set, list_sets

__all__ = [
    "DEFAULT_BATCH",
    "NeighbourSet",
    "NeighbourSetInfo",
    "SegmentRef",
    "SequenceReader",
    "UpdateReport",
    "compute",
    "delete_set",
    "list_sets",
    "read_id_file",
    "refresh",
    "self_share_mask",
    "update",
]
