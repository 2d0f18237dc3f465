"""Promise 7: bad input is refused before anything is written, with one clear line.

One table drives the library, one the CLI. After every refused case the database is
unchanged: same generation, same files under segments/ and manifests/."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrodb import (
    BadInputError,
    ChunkConfig,
    DBConfig,
    FormatVersionError,
    MismatchError,
    NotADatabaseError,
    NotFoundError,
    RetroDB,
    TokenizerConfig,
)
from retrodb.corpus import scan
from retrodb.tokenizer import Tokenizer
from retrodb_cli.main import app

from .conftest import SMALL, TOPICS, write_corpus


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_encoder_dir: Path, minilm_encoder_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    corpus = write_corpus(root / "corpus", TOPICS)
    RetroDB.build(root / "db", [corpus], config=SMALL, encoder=tiny_encoder_dir)
    files = root / "inputs"
    files.mkdir()
    (files / "empty.txt").write_text("")
    (files / "blank.txt").write_text("  \n\t \n")
    (files / "good.txt").write_text("A good document about parsing text files. " * 4)
    (files / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (files / "nul.jsonl").write_text(json.dumps({"id": "n", "text": "a\x00b"}) + "\n")
    (files / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (files / "latin1.txt.gz").write_bytes(gzip.compress("na\xefve".encode("latin-1")))
    (files / "truncated.txt").write_bytes("ends mid-character \u20ac".encode()[:-1])
    dup = [{"id": "same", "text": "first"}, {"id": "same", "text": "second"}]
    (files / "dup.jsonl").write_text("\n".join(json.dumps(d) for d in dup) + "\n")
    (files / "again.jsonl").write_text(json.dumps({"id": "files.txt", "text": "x y z"}) + "\n")
    (files / "a_file").write_text("not a database")
    (files / "a_binary").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    Tokenizer.train(["other text entirely"], config=TokenizerConfig(vocab_size=300)).save(
        files / "other.model"
    )
    newer = root / "newer"
    shutil.copytree(root / "db", newer)
    m = newer / "manifests" / "000001.json"
    d = json.loads(m.read_text())
    d["format_version"] = 99
    m.write_text(json.dumps(d))
    feature = root / "feature"
    shutil.copytree(root / "db", feature)
    m = feature / "manifests" / "000001.json"
    d = json.loads(m.read_text())
    d["features"] = ["time-travel"]
    m.write_text(json.dumps(d))
    return {
        "db": root / "db",
        "in": files,
        "newer": newer,
        "feature": feature,
        "minilm": minilm_encoder_dir,
        "root": root,
    }


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[RetroDB, dict[str, Path]], object]
    error: type[Exception]
    match: str


def _add(*names: str, **kw) -> Callable[[RetroDB, dict[str, Path]], object]:
    return lambda db, w: db.add([w["in"] / n for n in names], **kw)


NAN = np.full((1, 32), np.nan, np.float32)
CASES = [
    Case(
        "empty-document",
        _add("empty.txt"),
        BadInputError,
        r"no documents .*\(skipped 1 file: 1 empty \(.*empty.txt\)\)",
    ),
    Case(
        "whitespace-only",
        _add("blank.txt", "empty.txt"),
        BadInputError,
        r"skipped 2 files: 2 empty",
    ),
    Case("binary-file", _add("good.txt", "image.txt"), BadInputError, r"image.txt: binary data"),
    Case("nul-in-jsonl", _add("nul.jsonl"), BadInputError, r"nul.jsonl:1: NUL character"),
    Case(
        "invalid-utf8",
        _add("good.txt", "latin1.txt"),
        BadInputError,
        r"latin1.txt: invalid UTF-8 at byte 3",
    ),
    Case(
        "invalid-utf8-gzip", _add("latin1.txt.gz"), BadInputError, r"latin1.txt.gz: invalid UTF-8"
    ),
    Case("truncated-utf8", _add("truncated.txt"), BadInputError, r"truncated.txt: invalid UTF-8"),
    Case("duplicate-in-input", _add("dup.jsonl"), BadInputError, r"duplicate document id 'same'"),
    Case(
        "duplicate-in-database",
        _add("again.jsonl"),
        BadInputError,
        r"'files.txt' is already in the database",
    ),
    Case("missing-path", _add("missing.txt"), NotFoundError, r"missing.txt: no such file"),
    Case("no-inputs", lambda db, w: db.add([]), BadInputError, r"no input given"),
    Case("binary-by-name", _add("a_binary"), BadInputError, r"a_binary: binary data"),
    Case(
        "database-is-a-file",
        lambda db, w: RetroDB.open(w["in"] / "a_file"),
        NotADatabaseError,
        r"is a file",
    ),
    Case(
        "database-missing",
        lambda db, w: RetroDB.open(w["root"] / "nope"),
        NotFoundError,
        r"nope: no such database",
    ),
    Case(
        "build-over-a-file",
        lambda db, w: RetroDB.build(w["in"] / "a_file", [w["in"] / "good.txt"]),
        NotADatabaseError,
        r"a_file: exists and is a file",
    ),
    Case(
        "format-version",
        lambda db, w: RetroDB.open(w["newer"]),
        FormatVersionError,
        r"format version 99",
    ),
    Case(
        "format-feature",
        lambda db, w: RetroDB.open(w["feature"]),
        FormatVersionError,
        r"time-travel",
    ),
    Case(
        "tokenizer-mismatch",
        lambda db, w: db.add([w["in"] / "good.txt"], tokenizer=w["in"] / "other.model"),
        MismatchError,
        r"other.model: tokenizer does not match",
    ),
    Case(
        "encoder-mismatch",
        lambda db, w: db.add([w["in"] / "good.txt"], encoder=w["minilm"]),
        MismatchError,
        r"encoder does not match",
    ),
    Case(
        "vector-dimension",
        lambda db, w: db.search_vectors(np.ones((2, 7), np.float32)),
        MismatchError,
        r"dimension 7, the database uses 32",
    ),
    Case("vector-nan", lambda db, w: db.search_vectors(NAN), BadInputError, r"NaN"),
    Case("vector-3d", lambda db, w: db.search_vectors(np.ones((1, 1, 32))), BadInputError, r"2-D"),
    Case("empty-query", lambda db, w: db.search([""]), BadInputError, r"empty query"),
    Case("blank-query", lambda db, w: db.search(["  \n"]), BadInputError, r"empty query"),
    Case("k-zero", lambda db, w: db.search(["x"], k=0), BadInputError, r"k must be a positive"),
    Case(
        "k-negative",
        lambda db, w: db.search_vectors(np.ones((1, 32)), k=-3),
        BadInputError,
        r"k must be",
    ),
    Case("k-float", lambda db, w: db.search(["x"], k=2.5), BadInputError, r"k must be"),
    Case("k-bool", lambda db, w: db.search(["x"], k=True), BadInputError, r"k must be"),
    Case(
        "unknown-key",
        lambda db, w: db.chunks(np.array([10**9])),
        BadInputError,
        r"not in the database",
    ),
    Case("delete-unknown", lambda db, w: db.delete(["nope.txt"]), BadInputError, r"'nope.txt'"),
    Case("errors-option", _add("good.txt", errors="ignore"), BadInputError, r"strict' or 'replace"),
]


def _state(db_path: Path) -> tuple[str, list[str], list[str]]:
    return (
        (db_path / "CURRENT").read_text(),
        sorted(p.name for p in (db_path / "segments").iterdir()),
        sorted(p.name for p in (db_path / "manifests").iterdir()),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_before_any_write(world: dict[str, Path], case: Case) -> None:
    before = _state(world["db"])
    db = RetroDB.open(world["db"])
    with pytest.raises(case.error, match=case.match) as exc:
        case.run(db, world)
    assert "\n" not in str(exc.value)
    assert _state(world["db"]) == before
    assert not list(world["root"].glob(".*building*"))


def test_empty_documents_are_skipped_with_a_count(world: dict[str, Path], tmp_path: Path) -> None:
    db_path = tmp_path / "db"
    shutil.copytree(world["db"], db_path)
    res = RetroDB.open(db_path).add(
        [world["in"] / n for n in ("good.txt", "empty.txt", "blank.txt")]
    )
    assert res.documents == 1 and res.skipped_empty == 2
    assert [(s.name, s.reason) for s in res.skipped] == [
        (str(world["in"] / "empty.txt"), "empty"),
        (str(world["in"] / "blank.txt"), "empty"),
    ]


def test_invalid_utf8_replaced_on_request(world: dict[str, Path], tmp_path: Path) -> None:
    db_path = tmp_path / "db"
    shutil.copytree(world["db"], db_path)
    db = RetroDB.open(db_path)
    res = db.add([world["in"] / "latin1.txt", world["in"] / "truncated.txt"], errors="replace")
    assert res.documents == 2
    seg = db.segments[-1]
    keys = seg.row_keys(np.arange(seg.meta.chunks))
    assert "\ufffd" in "".join(db.decode(keys))


def test_a_very_large_document_is_read_in_pieces_and_tokenized_exactly(
    world: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """Pieces of 2 KB (instead of 1 MB) make a 300 KB document a hundred and fifty pieces; the
    stored chunks must decode to exactly the text, seams included (newlines, long lines
    cut at spaces, blank lines, tabs, multi-byte characters)."""
    import retrodb.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 2048)
    monkeypatch.setattr(corpus_mod, "_BLOCK", 1000)
    rng = np.random.default_rng(0)
    words = ["files", "read", "écrire", "東京", "lock", "  ", "\t", "sort", "a", "0123"]
    lines = []
    for i in range(3000):
        n = int(rng.integers(0, 40)) if i % 500 else 3000  # a few lines far longer than a piece
        lines.append(" ".join(words[j] for j in rng.integers(0, len(words), n)))
    text = "\n".join(lines) + "\n\n"
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "big.txt").write_text(text, encoding="utf-8")
    corpus = scan([tmp_path / "big"])
    assert sum(1 for _ in corpus.iter_pieces(2048)) > 100
    db_path = tmp_path / "db"
    shutil.copytree(world["db"], db_path)
    db = RetroDB.open(db_path)
    monkeypatch.setattr("retrodb.tokenizer.TOKENIZE_PIECES", 7)
    monkeypatch.setattr("retrodb.chunking.ROW_BLOCK", 100)
    monkeypatch.setattr("retrodb.ingest.ENCODE_WINDOW", 300)
    from retrodb.tokenizer import PieceTokenizer

    seams = []
    real_encode = PieceTokenizer.encode

    def spy(self, pieces):
        seams.extend(cont for _, cont in pieces if cont)
        return real_encode(self, pieces)

    monkeypatch.setattr(PieceTokenizer, "encode", spy)
    db.add([tmp_path / "big"])
    assert len(seams) > 100  # it really went through pieces
    seg = db.segments[-1]
    toks, lens = db.chunks(seg.row_keys(np.arange(seg.meta.chunks)))
    ids = [int(t) for row, n in zip(toks, lens, strict=True) for t in row[:n]]
    assert ids == db.tokenizer.encode([text])[0]  # identical to tokenizing the whole text
    assert db.tokenizer.decode(ids) == text
    assert (lens[:-1] == 16).all() and int(np.asarray(seg.num_chunks)[0]) == seg.meta.chunks
    assert db.verify()["ok"]


# ---------------------------------------------------------------- the CLI: one clear line

CLI_CASES = [
    ("empty", ["add", "{db}", "{in}/empty.txt"], "no documents"),
    ("binary", ["add", "{db}", "{in}/image.txt"], "binary data"),
    ("nul", ["add", "{db}", "{in}/nul.jsonl"], "NUL character"),
    ("utf8", ["add", "{db}", "{in}/latin1.txt"], "--errors replace"),
    ("duplicate", ["add", "{db}", "{in}/dup.jsonl"], "duplicate document id"),
    ("in-database", ["add", "{db}", "{in}/again.jsonl"], "already in the database"),
    ("missing", ["add", "{db}", "{in}/missing.txt"], "no such file"),
    ("db-is-file", ["info", "{in}/a_file"], "is a file"),
    ("version", ["query", "{newer}", "x"], "format version 99"),
    (
        "tokenizer",
        ["add", "{db}", "{in}/good.txt", "--tokenizer", "{in}/other.model"],
        "does not match",
    ),
    ("encoder", ["add", "{db}", "{in}/good.txt", "--encoder", "{minilm}"], "does not match"),
    ("empty-query", ["query", "{db}", " "], "empty query"),
    ("k", ["query", "{db}", "x", "-k", "0"], "-k must be positive"),
    ("delete", ["delete", "{db}", "--doc", "nope.txt"], "nope.txt"),
]


@pytest.mark.parametrize(("name", "argv", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_one_line(
    world: dict[str, Path], name: str, argv: list[str], message: str
) -> None:
    before = _state(world["db"])
    args = [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert _state(world["db"]) == before


# ---------------------------------------------------------------- long lines (issue 10, item 4)


def _one_line(chars: int, seed: int) -> str:
    """``chars`` characters of words and spaces, with no newline (a minified log line)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzé"))
    words = []
    total = 0
    while total < chars:
        word = "".join(rng.choice(letters, int(rng.integers(1, 10))))
        words.append(word)
        total += len(word) + 1
    return " ".join(words)[:chars].rstrip()


@pytest.mark.parametrize("kind", ["text-150k", "jsonl-70k"])
def test_a_corpus_of_one_very_long_line_builds_and_round_trips(
    tmp_path: Path, tiny_encoder_dir: Path, kind: str
) -> None:
    """The SentencePiece trainer drops sentences over max_sentence_length; a corpus that is
    one such line used to stop `build` with `[!sentences_.empty()]`."""
    if kind == "text-150k":
        text = _one_line(150_000, seed=1)
        src = tmp_path / "one-line.txt"
        src.write_text(text, encoding="utf-8")
    else:
        text = _one_line(70_000, seed=2)
        src = tmp_path / "one-record.jsonl"
        src.write_text(json.dumps({"id": "long", "text": text}), encoding="utf-8")  # no newline
    assert "\n" not in text and len(text.encode()) > (1 << 16)
    config = DBConfig(chunk=ChunkConfig(chunk_size=64), tokenizer=TokenizerConfig(vocab_size=400))
    db = RetroDB.build(tmp_path / "db", [src], config=config, encoder=tiny_encoder_dir)
    assert db.manifest.tokenizer["trainer"]["sentences"] > 1  # the line was cut for the trainer
    assert db.tokenizer is not None
    seg = db.segments[0]
    toks, lens = db.chunks(seg.row_keys(np.arange(seg.meta.chunks)))
    ids = [int(t) for row, n in zip(toks, lens, strict=True) for t in row[:n]]
    assert db.tokenizer.decode(ids) == text
    assert db.info()["documents"] == 1
