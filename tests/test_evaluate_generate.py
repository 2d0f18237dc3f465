"""Evaluation and generation: byte counts, the overlap measure, live retrieval (and its
self-exclusion), bpb(alpha), the JSON and plot, cached generation equal to a full
recompute, one retrieval per completed chunk, and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from retrodb_cli.main import app
from typer.testing import CliRunner

from retrodb import RetroDB
from retrodb.neighbours import NeighbourSet
from retrodb_model.config import RetroConfig
from retrodb_model.evaluate import (
    ALPHAS,
    evaluate,
    longest_common_run,
    read_documents,
    token_byte_lengths,
)
from retrodb_model.generate import generate, sample
from retrodb_model.model import RetroModel
from retrodb_model.train import TrainArgs, train

from .test_neighbours import build_db

M = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> RetroDB:
    d = build_db(tmp_path_factory.mktemp("evalgen"), tiny_encoder_dir, n=8, seed=3)
    NeighbourSet.compute(d, "train", k=2, exact=True)
    return d


@pytest.fixture(scope="module")
def run_dir(db: RetroDB) -> Path:
    out = db.path.parent / "run"
    train(
        TrainArgs(
            db=str(db.path), neighbours="train", out=str(out), preset="tiny", steps=4,
            seq_len=4 * M, batch_size=2, log_every=2, val_fraction=0.25, threads=1,
        )
    )  # fmt: skip
    return out


def tiny_model(db: RetroDB, seed: int = 0) -> RetroModel:
    torch.manual_seed(seed)
    cfg = RetroConfig.preset("tiny", db.tokenizer.vocab_size, chunk_size=M)
    return RetroModel(cfg).eval()


def test_token_bytes_sum_to_the_decoded_text(db: RetroDB) -> None:
    table = token_byte_lengths(db.tokenizer)
    assert table.shape == (db.tokenizer.vocab_size,) and table[db.pad_id] == 0
    for text in ["kalo mine ru sa. tivo pe", "doc1. gu zo fibe da"]:
        ids = db.tokenizer.encode([text])[0]
        # decode drops the leading space that the first piece stands for
        assert int(table[ids].sum()) == len((" " + db.tokenizer.decode(ids)).encode())
        assert int(table[ids[1:]].sum()) == len(db.tokenizer.decode(ids).encode()) - len(
            db.tokenizer.decode(ids[:1]).encode()
        )


def test_longest_common_run() -> None:
    a = np.array([[1, 2, 3, 4, -2, -2]])
    b = np.array([[[9, 1, 2, 3, 9, 9, 9, 9], [4, -1, -1, -1, -1, -1, -1, -1]]])
    assert longest_common_run(a, b).tolist() == [3]
    assert longest_common_run(np.array([[5, 6]]), b).tolist() == [0]
    # padding never matches padding
    assert longest_common_run(np.array([[-1, -1]]), np.array([[[-1, -1]]])).tolist() == [0]
    ident = np.arange(8)[None]
    assert longest_common_run(ident, ident[:, None, :]).tolist() == [8]


def test_sample_is_greedy_at_zero_and_respects_top_p() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, temperature=0.0, top_p=1.0, generator=g) == 1
    picks = {sample(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)}
    assert picks == {1}  # token 1 alone holds more than half the mass
    picks = {sample(logits, temperature=1.0, top_p=0.99, generator=g) for _ in range(200)}
    assert picks == {1, 2}


@pytest.mark.parametrize("retrieval", [True, False])
def test_cached_generation_equals_full_recompute(db: RetroDB, retrieval: bool) -> None:
    model = tiny_model(db)
    prompt = "kalo mine ru sa tivo pe da gu zo fi be kalo mine ru sa tivo pe"
    kw = dict(max_tokens=40, temperature=0.0, retrieval=retrieval)
    cached = generate(model, db, prompt, use_cache=True, **kw)
    full = generate(model, db, prompt, use_cache=False, **kw)
    assert len(cached.tokens) == 40 and cached.tokens == full.tokens
    assert cached.text == full.text
    if retrieval:
        # one retrieval per chunk completed before the last step, each of the k = 2 nearest
        n = (len(cached.prompt_tokens) + 40 - 1) // M
        assert [r.chunk for r in cached.retrievals] == list(range(n))
        assert all(len(r.keys) == 2 and r.docs[0] is not None for r in cached.retrievals)
    else:
        assert cached.retrievals == [] and cached.retrieval_seconds == 0


def test_sampled_generation_is_reproducible_by_seed(db: RetroDB) -> None:
    model = tiny_model(db)
    kw = dict(max_tokens=20, temperature=1.0, top_p=0.9)
    a = generate(model, db, "kalo mine", seed=1, **kw)
    b = generate(model, db, "kalo mine", seed=1, **kw)
    c = generate(model, db, "kalo mine", seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_evaluate_retrieves_live_and_excludes_self(db: RetroDB, tmp_path: Path) -> None:
    model = tiny_model(db)
    docs = read_documents([db.path.parent / "corpus"])
    res = evaluate(model, db, docs, seq_len=4 * M)
    excl = evaluate(model, db, docs, seq_len=4 * M, exclude_self=True)
    assert res["documents"] == len(docs) and res["tokens"] > 0 and res["bytes"] > res["tokens"]
    for r in (res, excl):
        assert set(r["bpb"]) == {"retrieval", "no_retrieval"}
        assert all(np.isfinite(v) for v in r["bpb"].values())
        t = r["bpb_alpha"]
        assert t["alpha"] == list(ALPHAS) and len(t["retrieval"]) == len(ALPHAS)
        assert t["fraction"] == sorted(t["fraction"]) and t["fraction"][-1] == 1.0
    # Retrieval off does not depend on the database: identical either way.
    assert res["bpb"]["no_retrieval"] == excl["bpb"]["no_retrieval"]
    # The documents are in the database: without exclusion a chunk's nearest neighbour is
    # itself, whose continuation is the next chunk (overlap 100 %); with it, never.
    assert res["bpb_alpha"]["mean_overlap"] > 0.9
    assert excl["bpb_alpha"]["mean_overlap"] < 0.6
    assert res["bpb"]["retrieval"] != res["bpb"]["no_retrieval"]


def test_cli_evaluate_writes_json_and_plot(db: RetroDB, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    corpus = str(db.path.parent / "corpus")
    res = CliRunner().invoke(
        app, ["evaluate", str(run_dir), str(db.path), corpus, "-o", str(out), "-q"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "bpb retrieval" in res.output and "bpb(alpha)" in res.output
    data = json.loads(out.read_text())
    assert data["step"] == 4 and data["k"] == 2 and data["seq_len"] == 4 * M
    assert out.with_suffix(".png").stat().st_size > 1000
    res = CliRunner().invoke(
        app,
        ["evaluate", str(run_dir), str(db.path), corpus, "--json", "--no-retrieval",
         "-o", str(tmp_path / "plain.json")],
    )  # fmt: skip
    data = json.loads(res.output)
    assert list(data["bpb"]) == ["no_retrieval"] and "bpb_alpha" not in data


def test_cli_generate(db: RetroDB, run_dir: Path) -> None:
    base = ["generate", str(run_dir), str(db.path), "kalo mine ru sa tivo pe da gu", "-n", "24"]
    res = CliRunner().invoke(app, [*base, "--show-neighbours", "-t", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[chunk 0]" in res.output and ".txt key" in res.output
    res = CliRunner().invoke(app, [*base, "--json", "--seed", "3"], catch_exceptions=False)
    data = json.loads(res.output)
    assert data["tokens"] <= 24 and data["retrievals"] and data["retrieval_seconds"] > 0
    res = CliRunner().invoke(app, [*base, "--no-retrieval", "--json"], catch_exceptions=False)
    assert json.loads(res.output)["retrievals"] == []
    res = CliRunner().invoke(app, [*base[:3], "x", "-n", "100000"])
    assert res.exit_code == 1 and "max_seq_len" in res.output
