"""The tasks of a distributed build without any engine (shards, parts, one segment per
shard), and Ray staying optional: `import retrodb` and a local build never import it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrodb import RetroDB
from retrodb.corpus import scan
from retrodb.errors import BadInputError, EngineError
from retrodb.ray_engine import RayEngine, search_blocks
from retrodb.segment import Segment
from retrodb.shards import (
    Part,
    Shard,
    document_sizes,
    encode_part,
    first_keys,
    plan_shards,
    tokenize_shard,
    write_shard,
)
from retrodb.storage import Storage
from retrodb_cli.main import app

from .conftest import SMALL


def _docs(root: Path, sizes: list[int]) -> Path:
    root.mkdir(parents=True)
    for i, n in enumerate(sizes):
        (root / f"d{i:02d}.txt").write_text(f"word{i} " * n, encoding="utf-8")
    return root


def test_shards_are_contiguous_balanced_and_never_empty(tmp_path: Path) -> None:
    corpus = scan([_docs(tmp_path / "c", [50, 10, 10, 10, 10, 50, 5, 5])])
    shards = plan_shards(corpus, shards=3)
    assert [s.index for s in shards] == [0, 1, 2]
    assert [r.id for s in shards for r in s.refs] == corpus.ids  # input order, each once
    assert all(s.refs for s in shards)
    assert max(s.bytes for s in shards) < 0.6 * sum(s.bytes for s in shards)
    # More shards asked than documents: one document each.
    assert len(plan_shards(corpus, shards=20)) == 8
    # By size: at least min_shards, else one per shard_bytes.
    assert len(plan_shards(corpus, min_shards=2, shard_bytes=1 << 30)) == 2
    total = sum(s.bytes for s in shards)
    assert len(plan_shards(corpus, shard_bytes=total // 4 + 1)) == 4
    assert Shard.from_json(shards[1].to_json()) == shards[1]


def test_jsonl_documents_are_sized_by_their_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = [{"id": "short", "text": "x"}, {"id": "long", "text": "y " * 500}, {"text": "z"}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    corpus = scan([p])
    short, long, last = document_sizes(corpus.refs)
    assert long > 1000 and short < 40 and last < 40
    shards = plan_shards(corpus, shards=3)
    assert [[r.id for r in s.refs] for s in shards] == [["short"], ["long"], ["a.jsonl:3"]]


def test_first_keys_are_a_prefix_sum() -> None:
    assert first_keys(100, [3, 0, 5, 2]) == [100, 103, 103, 108]


def test_search_blocks_follow_the_batches() -> None:
    blocks = search_blocks(1000, 64, 2)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000
    assert all(a % 64 == 0 for a, _ in blocks)
    assert all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:], strict=False))
    assert search_blocks(10, 64, 4) == [(0, 10)]


def test_shard_tasks_write_what_a_local_build_writes(tmp_path: Path, tiny_encoder_dir) -> None:
    """Tokenize, encode and write three shards by hand: the segments hold the local build's
    rows and keys, contiguous from first key 0."""
    corpus_dir = _docs(tmp_path / "c", [40, 3, 25, 60, 1])
    local = RetroDB.build(tmp_path / "local", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    tok, enc = local.tokenizer, local.encoder
    assert tok is not None
    corpus = scan([corpus_dir])
    shards = plan_shards(corpus, shards=3)
    parts = [tokenize_shard(s, tok, chunk_size=16, errors="strict", part_rows=5) for s in shards]
    counts = [sum(p.rows for p in ps) for ps in parts]
    starts = first_keys(0, counts)
    store = Storage(tmp_path / "local")
    for ps, start in zip(parts, starts, strict=True):
        # Parts go through their row form, as between Ray tasks, and arrive in any order.
        encoded = [encode_part(Part.from_row(p.to_row()), tok, enc) for p in ps]
        encoded = [Part.from_row(p.to_row()) for p in encoded]
        meta = write_shard(
            store, encoded[::-1], config=SMALL, dim=enc.dim, first_key=start, generation=9
        )
        assert (meta.first_key, meta.chunks) == (start, sum(p.rows for p in ps))
        seg = Segment(store.segment_dir(meta.name), meta, 16, tok.token_dtype)
        want_tokens, want_lengths = local.chunks(start + np.arange(meta.chunks))
        assert (seg.tokens == want_tokens).all() and (seg.lengths == want_lengths).all()
        index = seg.open_index(dim=enc.dim, config=SMALL.index)
        keys = start + np.arange(meta.chunks)
        assert np.allclose(index.vectors(keys), local.indexes[0].vectors(keys), atol=1e-3)
    assert sum(counts) == local.manifest.chunks


def test_import_and_local_build_do_not_import_ray(tmp_path: Path, corpus_dir, tiny_encoder_dir):
    code = (
        "import sys, retrodb, retrodb.ray_engine, retrodb.shards, retrodb_cli.main\n"
        "from retrodb import RetroDB, DBConfig\n"
        f"c = DBConfig.from_dict({SMALL.to_dict()!r})\n"
        f"RetroDB.build({str(tmp_path / 'db')!r}, [{str(corpus_dir)!r}], config=c, "
        f"encoder={str(tiny_encoder_dir)!r})\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_without_ray_the_engine_says_how_to_install_it(
    tmp_path: Path, corpus_dir, tiny_encoder_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'retrodb\[ray\]'"):
        RayEngine()
    res = CliRunner().invoke(
        app,
        ["build", str(tmp_path / "db"), str(corpus_dir), "--engine", "ray", "--vocab-size", "400",
         "--encoder", str(tiny_encoder_dir)],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "retrodb[ray]" in res.output and "Traceback" not in res.output
    assert "tokenizer" not in res.output  # refused before any work
    assert not (tmp_path / "db").exists()


def test_engine_options_are_checked() -> None:
    with pytest.raises(BadInputError, match="workers"):
        RayEngine(workers=0)
    with pytest.raises(BadInputError, match="auto"):
        RayEngine(device="auto")
    res = CliRunner().invoke(app, ["build", "x", "y", "--workers", "2"])
    assert res.exit_code == 1 and "--engine ray" in res.output
