"""`neighbours --self-share P`: a stable-hashed share of the documents may retrieve their
own chunks; the others keep the paper's rule; P = 0 is the paper's rule exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrodb import RetroDB, neighbours
from retrodb.errors import BadInputError
from retrodb.neighbours import self_share_mask
from retrodb.split import validation_mask

from .test_neighbours import assert_same_sets, db, own_docs, pristine, random_docs, write_docs

__all__ = ["db", "pristine"]  # module-scoped database, copied per test


def test_self_share_zero_is_the_paper_rule(db: RetroDB) -> None:
    plain = neighbours.compute(db, "plain", k=2, exact=True)
    zero = neighbours.compute(db, "zero", k=2, exact=True, self_share=0.0)
    assert_same_sets(plain, zero)
    assert zero.info.self_share == 0.0


def test_self_share_documents_retrieve_their_own_chunks(db: RetroDB, tmp_path: Path) -> None:
    share = 0.5
    assert self_share_mask(db.segments[0].ids, share).any()
    assert not self_share_mask(db.segments[0].ids, share).all()  # both kinds here
    ns = neighbours.compute(db, "mix", k=2, exact=True, self_share=share)
    assert ns.info.self_share == share
    allowed = self_share_mask(ns.doc_ids, share)[np.asarray(ns.doc)]  # per row
    keys = np.asarray(ns.keys)
    own = db.key_doc_numbers(keys) == own_docs(db, ns)[:, None]
    assert not own[~allowed].any()  # the paper's rule for the other documents
    # a self-share chunk's nearest neighbour is itself: its continuation is the next chunk
    assert (keys[allowed, 0] == np.asarray(ns.chunk_keys)[allowed]).mean() > 0.9
    # a refresh keeps the share and equals a full recompute
    db.add([write_docs(tmp_path / "more", random_docs(2, seed=7, prefix="more"))])
    assert_same_sets(
        neighbours.refresh(db, "mix"),
        neighbours.compute(db, "check", k=2, exact=True, self_share=share),
    )
    with pytest.raises(BadInputError, match="self_share"):
        neighbours.compute(db, "bad", self_share=1.5)


def test_self_share_picks_a_stable_growing_share_of_documents() -> None:
    ids = [f"library/doc{i}.rst" for i in range(4000)]
    quarter, half = self_share_mask(ids, 0.25), self_share_mask(ids, 0.5)
    assert abs(quarter.mean() - 0.25) < 0.03 and abs(half.mean() - 0.5) < 0.03
    assert not (quarter & ~half).any()  # raising the share only adds documents
    # a document's side depends on its id only, not on the other ids or their order
    assert (self_share_mask(ids[::-1], 0.25)[::-1] == quarter).all()
    assert (self_share_mask(ids[:50], 0.25) == quarter[:50]).all()
    assert not self_share_mask(ids, 0.0).any() and self_share_mask(ids, 1.0).all()
    # independent of the train/validation split (another seed of the same hash)
    val = validation_mask(ids, 0.25)
    assert abs((quarter & val).mean() - 0.25 * 0.25) < 0.02


def test_cli_self_share(db: RetroDB) -> None:
    from retrodb_cli.main import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["neighbours", str(db.path), "mix", "--self-share", "0.5", "--json", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["self_share"] == 0.5
    res = runner.invoke(app, ["neighbours", str(db.path), "bad", "--self-share", "2"])
    assert res.exit_code != 0
