"""Evaluation and generation: byte counts, the overlap measure, live retrieval (and its
self-exclusion), bpb(alpha), the JSON and plot, cached generation equal to a full
recompute, one retrieval per completed chunk, and the CLI commands."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from retrodb import RetroDB
from retrodb.errors import BadInputError
from retrodb_cli.main import app
from retrodb_model import generate as generate_mod
from retrodb_model.checkpoint import read_checkpoint, write_retrieval_settings
from retrodb_model.config import COPY_RUN_MAX, RetroConfig
from retrodb_model.evaluate import (
    ALPHAS,
    EvalArgs,
    derangement,
    evaluate,
    evaluate_checkpoint,
    longest_common_run,
    plot_alpha,
    read_documents,
    token_byte_lengths,
)
from retrodb_model.generate import TextStream, generate, printable, sample
from retrodb_model.model import RetroModel
from retrodb_model.retrieve import LiveRetriever
from retrodb_model.train import TrainArgs, train

from .test_neighbours import build_trained_db

M = 16
GENERATE_JSON_FIELDS = [
    "prompt", "text", "tokens", "seconds", "retrieval_seconds", "tokens_per_s", "retrievals",
]  # fmt: skip
JSON_FIELDS = [
    "documents", "windows", "tokens", "bytes", "seq_len", "chunk_size", "k", "exclude_self",
    "rerank", "fetch", "min_overlap", "dropped", "null_boost", "min_run", "shuffle_seed",
    "shuffle_any_chunk", "max_tokens_per_document",
    "db", "generation", "bpb", "bpb_alpha", "per_document", "seconds",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> RetroDB:
    return build_trained_db(tmp_path_factory.mktemp("evalgen"), tiny_encoder_dir, n=8, seed=3)


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


def piece_ids(db: RetroDB) -> dict[str, int]:
    tok = db.tokenizer
    return {tok.id_to_piece(i): i for i in range(tok.vocab_size)}


def test_text_stream_gathers_bytes_and_escapes_controls(db: RetroDB) -> None:
    ids = piece_ids(db)

    def byte(b: int) -> int:
        return ids[f"<0x{b:02X}>"]

    stream = TextStream(db.tokenizer)
    assert stream.push(byte(0xC3)) == ""  # half of "é": wait for the rest
    assert stream.push(byte(0xA9)) == "é"
    for b in "✓".encode():  # three bytes, one character
        out = stream.push(byte(b))
    assert out == "✓"
    assert stream.push(byte(0x1B)) == "\\x1b"  # ESC would restyle the terminal
    assert stream.push(byte(0x0A)) == "\n" and stream.push(byte(0x09)) == "\t"
    assert stream.push(byte(0x0D)) == "\\x0d" and stream.push(byte(0x07)) == "\\x07"
    assert stream.push(byte(0xFF)) == "\\xff"  # never valid UTF-8
    word = next(i for p, i in ids.items() if p.startswith("\u2581") and len(p) > 2)
    assert stream.push(byte(0xE2)) == ""
    assert stream.push(word) == "\\xe2" + db.tokenizer.id_to_piece(word).replace("\u2581", " ")
    assert stream.push(byte(0xC3)) == "" and stream.flush() == "\\xc3"
    assert printable("a\x1b[31mb\u0085\n") == "a\\x1b[31mb\\x85\n"


def test_streamed_text_is_the_generated_text(db: RetroDB) -> None:
    model = tiny_model(db)
    pieces: list[str] = []
    prompt = "kalo mine ru sa tivo pe da gu"
    res = generate(model, db, prompt, max_tokens=30, temperature=1.0, on_text=pieces.append)
    streamed = "".join(pieces)
    assert "\ufffd" not in streamed
    if "\ufffd" not in res.text:  # the same text, but for bytes that form no character
        assert streamed == printable(res.text)


def test_the_prompt_is_decoded_once_and_given_before_the_text(db: RetroDB) -> None:
    model, seen = tiny_model(db), []
    prompt = "kalo  mine ru sa"
    res = generate(model, db, prompt, max_tokens=4, on_prompt=lambda t: seen.append(("p", t)),
                   on_token=lambda t: seen.append(("t", t)))  # fmt: skip
    assert seen[0] == ("p", printable(res.prompt_text)) and len(seen) == 1 + len(res.tokens)
    assert res.prompt_text == db.tokenizer.decode(res.prompt_tokens)
    data = res.to_dict()
    assert list(data) == GENERATE_JSON_FIELDS
    assert data["tokens"] == len(res.tokens) and data["text"] == res.text
    assert data["retrievals"] == [dataclasses.asdict(r) for r in res.retrievals]
    json.dumps(data)  # JSON as it is


def test_cli_generate_prints_no_control_characters_or_replacement_marks(
    db: RetroDB, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = piece_ids(db)
    script = [ids[f"<0x{b:02X}>"] for b in [0xC3, 0xA9, 0x1B, 0x5B, 0x33, 0x31, 0x6D, 0xFF]]
    script += [ids[f"<0x{b:02X}>"] for b in "\n✓".encode()] + [ids["<0xE2>"]]
    chosen = iter(script)
    monkeypatch.setattr(generate_mod, "sample", lambda *a, **kw: next(chosen))
    args = ["generate", str(run_dir), str(db.path), "kalo mine", "-n", str(len(script))]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "\ufffd" not in res.output and "\x1b" not in res.output
    assert "é\\x1b[31m\\xff\n✓\\xe2" in res.output


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
    res = evaluate(model, db, docs, EvalArgs(seq_len=4 * M))
    excl = evaluate(model, db, docs, EvalArgs(seq_len=4 * M, exclude_self=True))
    assert res.documents == len(docs) and res.tokens > 0 and res.bytes > res.tokens
    for r in (res, excl):
        assert set(r.bpb) == {"retrieval", "shuffled", "no_retrieval"}
        assert all(np.isfinite(v) for v in r.bpb.values())
        t = r.bpb_alpha
        assert t is not None and t["alpha"] == list(ALPHAS)
        assert len(t["retrieval"]) == len(ALPHAS)
        assert t["fraction"] == sorted(t["fraction"]) and t["fraction"][-1] == 1.0
        # every scored chunk j >= 1 is counted with its targets
        assert t["tokens"] == sorted(t["tokens"]) and 0 < t["tokens"][-1] < r.tokens
        assert t["chunks"][-1] <= t["tokens"][-1] <= M * t["chunks"][-1]
    # Retrieval off does not depend on the database: identical either way.
    assert res.bpb["no_retrieval"] == excl.bpb["no_retrieval"]
    # The documents are in the database: without exclusion a chunk's nearest neighbour is
    # itself, whose continuation is the next chunk (overlap 100 %); with it, never.
    assert res.bpb_alpha is not None and excl.bpb_alpha is not None
    assert res.bpb_alpha["mean_overlap"] > 0.9
    assert excl.bpb_alpha["mean_overlap"] < 0.6
    assert res.bpb["retrieval"] != res.bpb["no_retrieval"]
    # the result saves itself: the JSON fields, and the plot beside it
    written = res.save(tmp_path / "sub" / "eval.json")
    assert written == [tmp_path / "sub" / "eval.json", tmp_path / "sub" / "eval.png"]
    data = json.loads(written[0].read_text())
    assert list(data) == JSON_FIELDS and "checkpoint" not in data
    plain = evaluate(model, db, docs, EvalArgs(seq_len=4 * M, no_retrieval=True))
    assert plain.save(tmp_path / "plain.json") == [tmp_path / "plain.json"]
    assert "bpb_alpha" not in plain.to_dict() and list(plain.bpb) == ["no_retrieval"]
    assert res.bpb["shuffled"] not in (res.bpb["retrieval"], res.bpb["no_retrieval"])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 257])
def test_shuffled_neighbours_come_from_another_chunk(n: int) -> None:
    for seed in range(20):
        perm = derangement(n, seed=seed)
        assert sorted(perm.tolist()) == list(range(n))
        if n >= 2:
            assert (perm != np.arange(n)).all()
    assert not np.array_equal(derangement(257, seed=0), derangement(257, seed=1))


@pytest.mark.parametrize("sizes", [[1, 1], [3, 5, 2], [10, 1, 1, 1, 4, 7], [6, 6], [2] * 40])
def test_shuffled_neighbours_come_from_another_document(sizes: list[int]) -> None:
    groups = np.repeat(np.arange(len(sizes)), sizes)
    n = len(groups)
    for seed in range(20):
        perm = derangement(n, seed=seed, groups=groups)
        assert sorted(perm.tolist()) == list(range(n))
        assert (groups[perm] != groups).all()  # no group holds more than half the rows


def test_a_document_with_most_of_the_chunks_keeps_some_of_its_own() -> None:
    """Where one document holds more than half of the rows, the others still get rows of
    another document, and no row gets its own: a derangement that does what it can."""
    groups = np.array([0] * 7 + [1] * 3)
    for seed in range(20):
        perm = derangement(10, seed=seed, groups=groups)
        assert sorted(perm.tolist()) == list(range(10)) and (perm != np.arange(10)).all()
        assert (groups[perm[7:]] == 0).all()  # the small document's rows all moved away
        assert (groups[perm[:7]] == 1).sum() == 3  # as many as there are to give
    one = np.zeros(9, dtype=np.int64)  # one document: the plain derangement
    assert np.array_equal(derangement(9, seed=4, groups=one), derangement(9, seed=4))
    with pytest.raises(ValueError, match="one label per row"):
        derangement(9, groups=np.zeros(8))


def _record_neighbours(model: RetroModel) -> list[torch.Tensor | None]:
    """The ``retrieved`` tensor of every forward pass of ``model`` from now on."""
    seen: list[torch.Tensor | None] = []
    forward = model.forward

    def spy(tokens, retrieved=None, retrieved_mask=None, targets=None):  # noqa: ANN001, ANN202
        seen.append(retrieved)
        return forward(tokens, retrieved, retrieved_mask, targets)

    model.forward = spy  # type: ignore[method-assign]
    return seen


def test_evaluate_shuffles_across_documents_unless_told(db: RetroDB) -> None:
    """Shuffled neighbours come from another evaluated document; shuffle_any_chunk gives
    the plain derangement of all the chunks."""
    model = tiny_model(db)
    docs = read_documents([db.path.parent / "corpus"])[:2]
    seen = _record_neighbours(model)
    for any_chunk in (False, True):
        seen.clear()
        args = EvalArgs(seq_len=4 * M, batch_size=64, shuffle_any_chunk=any_chunk)
        res = evaluate(model, db, docs, args)
        assert res.shuffle_any_chunk is any_chunk
        on, shuffled, _ = seen
        real = on[:, :, 0, 0] != -1  # the chunks with neighbours, in window order
        rows_on, rows_sh = on[real], shuffled[real]
        doc_of_window = torch.tensor([w_doc for w_doc in _window_docs(docs, db, 4 * M)])
        doc_of_row = doc_of_window[:, None].expand(real.shape)[real].numpy()
        perm = derangement(len(rows_on), seed=0, groups=None if any_chunk else doc_of_row)
        assert torch.equal(rows_sh, rows_on[torch.from_numpy(perm)])
        if not any_chunk:
            assert len(set(doc_of_row)) == 2 and (doc_of_row[perm] != doc_of_row).all()


def _window_docs(docs: list[tuple[str, str]], db: RetroDB, L: int) -> list[int]:
    """The evaluated document of each window, in the order evaluate makes them."""
    toks = db.tokenizer.encode([text for _, text in docs])
    return [d for d, t in enumerate(toks) for _ in range(0, max(len(t) - 1, 0), L)]


def test_evaluate_shuffles_the_neighbours_it_retrieved(db: RetroDB) -> None:
    """A model whose CCA copies perfectly is not needed: with shuffled neighbours the
    chunks a model attends to are exactly the retrieved rows of the derangement."""
    model = tiny_model(db)
    docs = read_documents([db.path.parent / "corpus"])
    seen = _record_neighbours(model)
    res = evaluate(model, db, docs[:1], EvalArgs(seq_len=4 * M, batch_size=64))
    on, shuffled, off = seen
    assert off is None and on.shape == shuffled.shape
    n = int((on[:, :, 0, 0] != -1).sum())  # chunks with neighbours (all real here)
    rows_on = on.reshape(-1, *on.shape[2:])[:n]
    rows_sh = shuffled.reshape(-1, *on.shape[2:])[:n]
    assert n >= 2 and res.windows == on.shape[0]
    # every chunk's shuffled neighbours are another chunk's retrieved ones
    perm = torch.from_numpy(derangement(n, seed=0))
    assert torch.equal(rows_sh, rows_on[perm])


def test_cli_evaluate_writes_json_and_plot(db: RetroDB, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    corpus = str(db.path.parent / "corpus")
    res = CliRunner().invoke(
        app, ["evaluate", str(run_dir), str(db.path), corpus, "-o", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "bpb retrieval" in res.output and "bpb shuffled" in res.output
    assert "bpb(alpha)" in res.output and "shuffled" in res.output.split("bpb(alpha)")[1]
    quiet = CliRunner().invoke(
        app, ["evaluate", str(run_dir), str(db.path), corpus, "-o", str(out), "-q"],
    )  # fmt: skip
    assert quiet.exit_code == 0 and quiet.output == ""  # -q: no summary, as everywhere
    data = json.loads(out.read_text())
    assert list(data) == ["checkpoint", "step", "inputs", *JSON_FIELDS]
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
    res = CliRunner().invoke(app, [*base, "--json", "-n", "0"], catch_exceptions=False)
    data = json.loads(res.output)
    assert list(data) == GENERATE_JSON_FIELDS and data["tokens_per_s"] is None


def test_cli_evaluate_options_are_the_eval_args() -> None:
    command = typer.main.get_command(app).commands["evaluate"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    for f in dataclasses.fields(EvalArgs):
        assert f.name in params, f"EvalArgs.{f.name} has no option"
        assert params[f.name].help and params[f.name].default == f.default, f.name
    own = {"directory", "db", "inputs", "as_json", "out", "threads", "quiet"}
    assert set(params) == own | {f.name for f in dataclasses.fields(EvalArgs)}
    spelled = {name for p in command.params for name in p.opts}
    for flag in ["-k", "--seq-len", "--batch-size", "-b", "--no-retrieval", "--exclude-self",
                 "--max-tokens", "--rerank", "--fetch", "--shuffle-seed"]:  # fmt: skip
        assert flag in spelled, flag


@pytest.mark.parametrize(
    "bad",
    [dict(k=0), dict(seq_len=0), dict(batch_size=0), dict(max_tokens=0), dict(rerank="bm25"),
     dict(fetch=2), dict(rerank="overlap", fetch=0)],
)  # fmt: skip
def test_eval_args_refuse_what_cannot_be_evaluated(bad: dict) -> None:
    with pytest.raises(BadInputError):
        EvalArgs(**bad)


def test_live_retrieval_reranks_the_dense_candidates(db: RetroDB) -> None:
    from retrodb_model.retrieve import LiveRetriever

    own = db.retrieve(np.arange(6))
    chunks, lengths = own.tokens[:, :M], own.mask[:, :M].sum(axis=1)
    dense = LiveRetriever(db, 8)(chunks, lengths)
    got = LiveRetriever(db, 2, rerank="overlap", fetch=4)(chunks, lengths)
    assert got.keys.shape == (6, 2) and got.tokens.shape == (6, 2, 2 * M)
    assert all(set(a) <= set(b) for a, b in zip(got.keys, dense.keys, strict=True))
    # a chunk of the database shares all its tokens with itself: it comes first
    assert (got.keys[:, 0] == np.arange(6)).all()
    # the tokens are those of the kept keys
    np.testing.assert_array_equal(got.tokens, db.retrieve(got.keys).tokens)
    docs = read_documents([db.path.parent / "corpus"])[:1]
    res = evaluate(tiny_model(db), db, docs, EvalArgs(seq_len=4 * M, rerank="overlap"))
    assert res.rerank == "overlap" and np.isfinite(res.bpb["retrieval"])
    with pytest.raises(BadInputError, match="rerank"):
        LiveRetriever(db, 2, rerank="bm25")


def test_plot_without_matplotlib_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is the `plot` extra: without it the JSON is still written, and the missing
    plot is named in a warning, not an ImportError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    table = {"alpha": [0, 50], "retrieval": [1.0, 1.1], "fraction": [0.5, 1.0]}
    with pytest.warns(UserWarning, match=r"retrodb\[plot\]"):
        assert plot_alpha({"bpb_alpha": table}, tmp_path / "a.png") is None
    assert not (tmp_path / "a.png").exists()


def test_the_overlap_floor_keeps_copies_and_drops_the_rest(
    db: RetroDB, run_dir: Path, tmp_path: Path
) -> None:
    """--min-overlap A: a neighbour sharing fewer than A x the chunk's tokens becomes the
    null neighbour. A chunk that retrieves itself (overlap 100 %) keeps it; with every
    neighbour dropped, retrieval on is exactly off; the floor recorded in the checkpoint
    (retrieval.json) is the default."""
    model = tiny_model(db)
    docs = read_documents([db.path.parent / "corpus"])[:3]
    keep = LiveRetriever(db, 2, min_overlap=1.0)
    toks, lens = db.chunks(np.arange(4))
    got = keep(toks, lens)
    assert (got.keys[:, 0] == np.arange(4)).all()  # each chunk is its own nearest
    # another document's chunks share less than the whole chunk: all dropped at A = 1
    excl = np.array([keep.doc_number(d) for d in db.key_documents(np.arange(4))])
    assert (keep(toks, lens, exclude=excl).keys == -1).all() and keep.dropped >= 8
    args = EvalArgs(seq_len=4 * M, exclude_self=True)
    floor = evaluate(model, db, docs, dataclasses.replace(args, min_overlap=1.0))
    assert floor.dropped > 0 and floor.min_overlap == 1.0
    assert floor.bpb["retrieval"] == pytest.approx(floor.bpb["no_retrieval"], abs=1e-5)
    plain = evaluate(model, db, docs, args)
    assert plain.dropped == 0 and plain.bpb["retrieval"] != floor.bpb["retrieval"]
    with pytest.raises(BadInputError, match="min_overlap"):
        EvalArgs(min_overlap=1.5)
    # recorded in the checkpoint: evaluate_checkpoint and generate take it by default
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    write_retrieval_settings(ckpt, {"min_overlap": 1.0})
    assert read_checkpoint(ckpt).min_overlap == 1.0
    res = evaluate_checkpoint(ckpt, db, [db.path.parent / "corpus"], args)
    assert res.min_overlap == 1.0 and res.dropped > 0


@pytest.mark.parametrize(
    ("name", "safe", "bad", "bad_cli"),
    [
        ("null_boost", 1e4, [-1.0, float("inf"), float("nan")], ("-1", "--null-boost")),
        ("min_run", COPY_RUN_MAX, [-1, COPY_RUN_MAX + 1, 1.5], (str(COPY_RUN_MAX + 1), "min_run")),
    ],
)
def test_an_inference_setting_moves_retrieval_to_off_and_is_recorded(
    db: RetroDB,
    run_dir: Path,
    tmp_path: Path,
    name: str,
    safe: float,
    bad: list[float],
    bad_cli: tuple[str, str],
) -> None:
    """--null-boost B adds B to the score of CCA's null key (value zero): a large B puts
    all attention there. --min-run N (the copy floor) lets a token attend to a neighbour
    only where the text has followed it for N tokens: at COPY_RUN_MAX no neighbour of
    another document does. Either way retrieval on is exactly off. evaluate records the
    setting and leaves the model's own as it was; the value recorded in retrieval.json is
    what load_model applies; evaluate and generate take the flag."""
    from retrodb_model.checkpoint import load_model

    flag = "--" + name.replace("_", "-")
    model = tiny_model(db)
    assert model.cfg.cca_null and model.cfg.cca_copy_bias
    docs = read_documents([db.path.parent / "corpus"])[:3]
    args = EvalArgs(seq_len=4 * M, exclude_self=True)
    plain = evaluate(model, db, docs, args)
    moved = evaluate(model, db, docs, dataclasses.replace(args, **{name: safe}))
    assert getattr(plain, name) == 0 and getattr(moved, name) == safe
    assert getattr(model, name) == 0
    assert moved.bpb["retrieval"] == pytest.approx(moved.bpb["no_retrieval"], abs=1e-6)
    assert plain.bpb["retrieval"] != moved.bpb["retrieval"]
    assert evaluate(model, db, docs, args).bpb == plain.bpb  # nothing left behind
    for value in bad:
        with pytest.raises(BadInputError, match=name):
            EvalArgs(**{name: value})
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    write_retrieval_settings(ckpt, {"min_overlap": 0.0, name: safe})
    loaded, meta = load_model(ckpt, db=db)
    assert getattr(meta, name) == safe and getattr(loaded, name) == safe
    res = evaluate_checkpoint(ckpt, db, [db.path.parent / "corpus"], args)
    assert getattr(res, name) == safe
    assert res.bpb["retrieval"] == pytest.approx(res.bpb["no_retrieval"], abs=1e-6)
    corpus = str(db.path.parent / "corpus")
    out = CliRunner().invoke(
        app, ["evaluate", str(ckpt), str(db.path), corpus, "--exclude-self", flag, "0",
              "--max-tokens", "64", "--json", "-o", str(tmp_path / "e.json")],
        catch_exceptions=False,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[name] == 0
    gen = CliRunner().invoke(
        app, ["generate", str(ckpt), str(db.path), "kalo mine", "-n", "20", "-t", "0",
              flag, "2", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert gen.exit_code == 0, gen.output
    value, named = bad_cli
    out = CliRunner().invoke(app, ["generate", str(ckpt), str(db.path), "kalo", flag, value])
    assert out.exit_code != 0 and named in out.output


def test_cli_calibrate_records_the_best_floor_and_boost_that_never_hurt(
    db: RetroDB, run_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    corpus = str(db.path.parent / "corpus")
    res = CliRunner().invoke(
        app, ["calibrate", str(ckpt), str(db.path), corpus, "--floors", "1,0", "--boosts", "0,1e4",
              "--min-runs", "16,0", "--exclude-self", "--max-tokens", "64", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    settings = json.loads(res.output)
    keys = ("min_overlap", "null_boost", "min_run")
    tried = [tuple(t[key] for key in keys) for t in settings["floors"]]
    assert tried == [(a, b, n) for a in (0.0, 1.0) for b in (0.0, 1e4) for n in (0, 16)]
    # at floor 1 every neighbour from another document is dropped, at boost 1e4 every
    # token attends to the null key, and no token follows another document's text for
    # 16 tokens: on is off, and it meets
    for t in settings["floors"][1:]:
        assert t["meets"] and abs(t["hurt"]["overall"]) < 1e-5
    best = min((t for t in settings["floors"] if t["meets"]), key=lambda t: t["bpb"]["retrieval"])
    assert tuple(settings[key] for key in keys) == tuple(best[key] for key in keys)
    recorded = read_checkpoint(ckpt)
    assert (recorded.min_overlap, recorded.null_boost, recorded.min_run) == tuple(
        best[key] for key in keys
    )
    bad = CliRunner().invoke(app, ["calibrate", str(ckpt), str(db.path), corpus, "--floors", "2"])
    assert bad.exit_code == 1 and "--floors" in bad.output
    bad = CliRunner().invoke(app, ["calibrate", str(ckpt), str(db.path), corpus, "--boosts", "x"])
    assert bad.exit_code == 1 and "--boosts" in bad.output
    for runs in ("1.5", "17", "-1"):
        args = ["calibrate", str(ckpt), str(db.path), corpus, "--min-runs", runs]
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code == 1 and "--min-runs" in bad.output


def test_cli_calibrate_copy_check_judges_shuffled_with_own_chunks_retrievable(
    db: RetroDB, run_dir: Path, tmp_path: Path
) -> None:
    """--copy-check evaluates every pair again with the documents' own chunks retrievable
    and a pair meets only if shuffled is no better than off - 0.002 there too."""
    from retrodb_model.config import NEVER_HURT

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    corpus = str(db.path.parent / "corpus")
    common = [str(ckpt), str(db.path), corpus, "--floors", "0", "--boosts", "0,1e4",
              "--min-runs", "0", "--max-tokens", "64"]  # fmt: skip
    res = CliRunner().invoke(
        app, ["calibrate", *common, "--exclude-self", "--copy-check", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    settings = json.loads(res.output)
    assert settings["copy_check"] is True
    plain = evaluate_checkpoint(
        ckpt, db, [corpus], EvalArgs(max_tokens=64, exclude_self=True, min_overlap=0, null_boost=0)
    )
    own = evaluate_checkpoint(
        ckpt, db, [corpus], EvalArgs(max_tokens=64, min_overlap=0, null_boost=0)
    )
    first, boosted = settings["floors"]
    # the copy figures are those of the same documents with their own chunks retrievable
    assert first["bpb"] == pytest.approx(plain.bpb)
    assert first["copy"]["bpb"] == pytest.approx(own.bpb)
    assert first["copy"]["bpb"] != first["bpb"]
    ratio = own.bpb["retrieval"] / own.bpb["no_retrieval"]
    assert first["copy"]["on_over_off"] == pytest.approx(ratio)
    for t in settings["floors"]:
        copy_ok = t["copy"]["hurt"]["shuffled"] <= NEVER_HURT["shuffled"]
        assert t["meets"] == (all(v is None or v <= NEVER_HURT[k]
                                  for k, v in t["hurt"].items()) and copy_ok)  # fmt: skip
    # at boost 1e4 every token attends to the null key: shuffled is off in both regimes
    assert boosted["meets"] and abs(boosted["copy"]["hurt"]["shuffled"]) < 1e-5
    bad = CliRunner().invoke(app, ["calibrate", *common, "--copy-check"])
    assert bad.exit_code == 1 and "--copy-check" in bad.output and "--exclude-self" in bad.output


def test_cli_generate_and_evaluate_through_a_server(
    db: RetroDB, run_dir: Path, tmp_path: Path
) -> None:
    """`generate CKPT URL` and `evaluate CKPT URL` give what they give on the path."""
    from retrodb.serve.service import Service

    from .serve_helpers import Running

    served = Running(Service(db.path, threads=1))
    try:
        prompt = ["kalo mine ru sa tivo pe da gu", "-n", "24", "-t", "0", "--json"]
        outs = []
        for where in (str(db.path), served.url):
            res = CliRunner().invoke(app, ["generate", str(run_dir), where, *prompt])
            assert res.exit_code == 0, res.output
            outs.append(json.loads(res.output))
        assert outs[1]["text"] == outs[0]["text"] and outs[1]["retrievals"] == outs[0]["retrievals"]
        corpus = str(db.path.parent / "corpus")
        evals = []
        for i, where in enumerate((str(db.path), served.url)):
            args = ["evaluate", str(run_dir), where, corpus, "--exclude-self", "--json"]
            res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / f"e{i}.json")])
            assert res.exit_code == 0, res.output
            evals.append(json.loads(res.output))
        assert evals[1]["db"] == served.url and evals[1]["generation"] == 1
        assert evals[1]["bpb"] == pytest.approx(evals[0]["bpb"], rel=1e-5)
    finally:
        served.stop()


def test_cli_generate_compare_equals_two_separate_generations(db: RetroDB, run_dir: Path) -> None:
    base = ["generate", str(run_dir), str(db.path), "kalo mine ru sa tivo pe da gu", "-n", "20"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--compare", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    both = json.loads(res.output)
    off = json.loads(runner.invoke(app, [*base, "-t", "0", "--no-retrieval", "--json"]).output)
    on = json.loads(runner.invoke(app, [*base, "-t", "0", "--json"]).output)
    assert both["off"]["text"] == off["text"] and both["on"]["text"] == on["text"]
    assert both["on"]["retrievals"] == on["retrievals"] and both["off"]["retrievals"] == []
    res = runner.invoke(app, [*base, "--compare"], catch_exceptions=False)
    assert res.exit_code == 0 and "retrieval off" in res.output and "[chunk 0]" in res.output
