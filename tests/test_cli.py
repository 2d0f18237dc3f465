"""Every command driven in-process, plus the interface other scripts rely on."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrodb_cli.common import PlainProgress
from retrodb_cli.main import app

from .conftest import TOPICS, copy_db, write_corpus

runner = CliRunner()


def run(*args: str, input: str | None = None, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args], input=input)
    assert res.exit_code == code, (
        f"exit {res.exit_code}: {res.output}\n{res.stderr if res.stderr_bytes else ''}"
    )
    return res


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> Path:
    """Built once per module through the CLI; each test gets a copy (``built``)."""
    root = tmp_path_factory.mktemp("cli")
    corpus_dir = write_corpus(root / "corpus", TOPICS)
    db = root / "db"
    run(
        "build",
        db,
        corpus_dir,
        "--vocab-size",
        "400",
        "--chunk-size",
        "16",
        "--encoder",
        tiny_encoder_dir,
        "--quiet",
    )
    return db


@pytest.fixture
def built(pristine: Path, tmp_path: Path) -> Path:
    return copy_db(pristine, tmp_path / "db")


def test_every_command_has_help() -> None:
    import typer.main

    from retrodb_cli.main import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    expected = {"build", "add", "query", "info", "verify", "delete", "compact", "neighbours"}
    assert expected | {"train", "evaluate", "generate"} <= set(names)
    top = run("--help").output
    for cmd in names:
        command = group.commands[cmd]  # type: ignore[attr-defined]
        assert cmd in top and command.help, f"{cmd}: no help text"
        sub = run(cmd, "--help").output
        assert "Usage" in sub and len(sub) > 100, cmd
        for param in command.params:  # every option and argument says what it is for
            assert getattr(param, "help", None) or param.name == "help", f"{cmd} {param.name}"


def test_build_info_query_add_verify(built: Path, more_dir: Path, tmp_path: Path) -> None:
    info = json.loads(run("info", built, "--json").output)
    for key in (
        "documents",
        "chunks",
        "segments",
        "generation",
        "tokenizer",
        "encoder",
        "bytes",
        "config",
    ):
        assert key in info
    assert info["documents"] == 4 and info["generation"] == 1
    assert "documents" in run("info", built).output

    out = run("query", built, "open a file", "sort a list", "-k", "3", "--json").output
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in rows] == ["open a file", "sort a list"]
    for r in rows:
        assert len(r["neighbours"]) == 3
        d = [n["distance"] for n in r["neighbours"]]
        assert d == sorted(d)
        for n in r["neighbours"]:
            assert (
                isinstance(n["key"], int)
                and isinstance(n["doc"], str)
                and isinstance(n["text"], str)
            )
            assert isinstance(n["continuation"], str) and isinstance(n["distance"], float)
    qfile = tmp_path / "q.txt"
    qfile.write_text("threads and locks\n\nregular expressions\n")
    out = run("query", built, "--input", qfile, "--json").output
    assert len(out.splitlines()) == 2 and len(json.loads(out.splitlines()[0])["neighbours"]) == 4
    assert "query: threads" in run("query", built, "threads").output

    run("add", built, more_dir, "--quiet")
    assert json.loads(run("info", built, "--json").output)["documents"] == 5
    assert "ok" in run("verify", built).output


def test_progress_bars_unless_quiet(
    tmp_path: Path, corpus_dir: Path, tiny_encoder_dir: Path
) -> None:
    res = run(
        "build", tmp_path / "db", corpus_dir, "--vocab-size", "400", "--encoder", tiny_encoder_dir
    )
    assert "encode" in res.stderr and "chunks/s" in res.stderr
    assert "built" in res.stdout


def test_version() -> None:
    import retrodb

    assert run("--version").output == f"retrodb {retrodb.__version__}\n"
    assert retrodb.__version__ == importlib.metadata.version("retrodb")


def test_plain_progress_lines_where_stderr_is_no_terminal() -> None:
    """A stage's first call, then a line per interval of the (injected) clock, and its end;
    a stage that never reaches its total is closed by close()."""
    now, lines = [0.0], []
    plain = PlainProgress(lines.append, interval=30.0, clock=lambda: now[0])
    plain("encode", 0, 1000)
    for t, done in ((10, 100), (29.9, 290), (30, 300), (45, 450), (61, 610)):
        now[0] = t
        plain("encode", done, 1000)
    now[0] = 80.0
    plain("encode", 1000, 1000)
    plain("encode", 1000, 1000)  # the end is said once
    plain("tokenize", 5, 0)  # total unknown
    now[0] = 90.0
    plain("tokenize", 9, 0)
    plain.close()
    assert lines == [
        "encode: 0/1,000 chunks, 0%, 0 s",
        "encode: 300/1,000 chunks, 30%, 10 chunks/s, 30 s",
        "encode: 610/1,000 chunks, 61%, 10 chunks/s, 61 s",
        "encode: 1,000/1,000 chunks, 100%, 12 chunks/s, 80 s",
        "tokenize: 5 docs, 0 s",
        "tokenize: 9 docs, 0.9 docs/s, 10 s",
    ]


def test_errors_are_one_clear_line(tmp_path: Path, built: Path, corpus_dir: Path) -> None:
    res = run("query", tmp_path / "no-such-db", "x", code=1)
    assert "no-such-db" in res.stderr and "Traceback" not in res.output
    (tmp_path / "f").write_text("x")
    assert "is a file" in run("info", tmp_path / "f", code=1).stderr
    assert "missing.txt" in run("add", built, tmp_path / "missing.txt", code=1).stderr
    assert "already exists" in run("build", built, corpus_dir, code=1).stderr
    assert "empty query" in run("query", built, " ", code=1).stderr
    run("query", built, "x", "-k", "0", code=1)
    run("query", built, code=1)
    bad = write_corpus(tmp_path / "bad", {"a.txt": "fine"})
    (bad / "b.txt").write_bytes(b"\xc3\x28 invalid")
    assert "b.txt" in run("add", built, bad, code=1).stderr
    run("add", built, bad, "--errors", "replace", "--quiet")
    assert json.loads(run("info", built, "--json").output)["documents"] == 6


def test_skipped_inputs_are_named_with_the_reason(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    """A folder with LICENSE, code.py, readme.text, doc.md and notes.TXT used to build as
    "2 documents" without a word about the other three."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("LICENSE", "code.py", "readme.text", "doc.md", "notes.TXT"):
        (src / name).write_text(f"The file {name} talks about opening files and sorting lists.")
    db = tmp_path / "db"
    res = run("build", db, src, "--vocab-size", "300", "--encoder", tiny_encoder_dir, "-q")
    assert res.stdout == ""  # --quiet: no summary, but what was skipped is still said
    assert "skipped 3 files: 3 with an unsupported extension (LICENSE, code.py, readme.text)" in (
        res.stderr.replace("\n", " ")
    )
    assert "give a file by name" in res.stderr
    assert json.loads(run("info", db, "--json").output)["documents"] == 2

    records = [{"id": "r1", "text": "one record"}, {"id": "r2", "text": ""}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    res = run("add", db, tmp_path / "r.jsonl", src / "LICENSE")  # by name: read
    assert res.stdout.startswith("added 2 documents, ")
    assert f"skipped 1 JSONL record: 1 empty ({tmp_path / 'r.jsonl'}:2)" in res.stderr.replace(
        "\n", ""
    )


def test_quiet_means_the_same_everywhere_and_counts_agree_in_number(
    built: Path, more_dir: Path, tmp_path: Path
) -> None:
    """--quiet: no progress bars and no summary line in every command that has it; the
    summary lines say "1 document", not "1 documents"."""
    res = run("add", built, more_dir)
    assert res.stdout.startswith("added 1 document, ") and "1 documents" not in res.stdout
    res = run("delete", built, "--doc", "asyncio.txt")
    assert res.stdout.startswith("deleted 1 document (generation 3; 1 deleted document stored")
    info = json.loads(run("info", built, "--json").output)
    assert info["live_chunks"] < info["chunks"] and info["documents"] == 4
    text = run("info", built).output
    gone = info["chunks"] - info["live_chunks"]
    assert f"chunks       {info['live_chunks']:,}  (and {gone:,} deleted chunk" in text
    assert "(and 1 deleted document still stored)" in text
    for args in (
        ("verify", built, "-q"),
        ("compact", built, "-q"),
        ("compact", built, "-q"),  # nothing to compact
        ("delete", built, "--doc", "files.txt", "-q"),
        ("add", built, more_dir, "-q"),
        ("neighbours", built, "nb", "-k", "1", "-q"),
        (
            "build",
            tmp_path / "db2",
            more_dir,
            "--vocab-size",
            "300",
            "-q",
            "--encoder",
            built / "encoder",
        ),
    ):
        res = run(*args)
        assert res.stdout == "" and res.stderr == "", (args, res.stdout, res.stderr)
    assert run("compact", built).stdout.startswith(
        "compacted 2 segments into 1, dropped 1 deleted document ("
    )
    assert run("compact", built).stdout == (
        "nothing to compact (generation 7: 1 segment, no deleted documents)\n"
    )
    assert "ok: generation 7, " in run("verify", built).stdout


CHILD_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _retrodb(*args: object) -> list[str]:
    import sys

    return [sys.executable, "-m", "retrodb_cli.main", *map(str, args)]


def test_a_closed_stdout_ends_quietly_with_status_0(built: Path, tmp_path: Path) -> None:
    """`retrodb info DB | head -1` printed `error: Broken pipe` and exited 1 when head had
    gone before retrodb wrote: the reader is gone before the first write here (the pipe's
    read end is closed before the command starts), and after the first line of an output far
    larger than the pipe's buffer."""
    import os
    import subprocess

    env = {**os.environ, **CHILD_ENV}
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: the first write fails with EPIPE
    proc = subprocess.run(
        _retrodb("info", built, "--json"), stdout=w, stderr=subprocess.PIPE, env=env
    )
    os.close(w)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()

    queries = tmp_path / "q.txt"
    queries.write_text("open a file and read it\nsort a list of numbers\n" * 500)
    r, w = os.pipe()
    proc2 = subprocess.Popen(
        _retrodb("query", built, "--input", queries, "--json"),
        stdout=w,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(w)
    first = b""
    while not first.endswith(b"\n"):  # exactly one line, then hang up (as `head -1` does)
        first += os.read(r, 1)
    os.close(r)
    _, err = proc2.communicate(timeout=120)
    assert json.loads(first)["query"] == "open a file and read it"
    assert proc2.returncode == 0 and err == b"", err.decode()


def test_query_rerank_overlap_keeps_k_in_overlap_order(built: Path) -> None:
    """`query --rerank overlap`: of the --fetch * k dense candidates, the k sharing the
    longest token run with the query text (runs under 4 count as none, ties keep the dense
    order), in the same JSON, with the dense distances."""
    import numpy as np

    from retrodb import RetroDB

    text = "A key function transforms each element before comparison"
    dense = json.loads(run("query", built, text, "-k", "8", "--exact", "--json").stdout)
    args = ("query", built, text, "-k", "2", "--exact", "--json", "--rerank", "overlap")
    got = json.loads(run(*args, "--fetch", "4").stdout)
    assert json.loads(run(*args).stdout) == got  # --fetch 4 is the default
    assert set(got) == {"query", "neighbours"} and len(got["neighbours"]) == 2
    assert all(set(h) == set(dense["neighbours"][0]) for h in got["neighbours"])

    db = RetroDB.open(built)
    query = db.tokenizer.encode([text])[0]
    runs = []
    for hit in dense["neighbours"]:  # the longest common run, by brute force
        toks, lens = db.chunks(np.array([hit["key"]]))
        cand = toks[0, : lens[0]].tolist()
        runs.append(
            max(
                (
                    n
                    for i in range(len(query))
                    for j in range(len(cand))
                    for n in range(1, min(len(query) - i, len(cand) - j) + 1)
                    if query[i : i + n] == cand[j : j + n]
                ),
                default=0,
            )
        )
    score = [r if r >= 4 else 0 for r in runs]
    want = sorted(range(8), key=lambda i: -score[i])[:2]  # stable: ties keep the dense order
    assert want != [0, 1], "the overlap order should differ from the dense one here"
    assert [h["key"] for h in got["neighbours"]] == [dense["neighbours"][i]["key"] for i in want]
    for h, i in zip(got["neighbours"], want, strict=True):
        assert h["distance"] == dense["neighbours"][i]["distance"]
        assert h["text"] == dense["neighbours"][i]["text"]

    res = run("query", built, text, "--fetch", "3", code=1)
    assert "fetch" in res.stderr and "overlap" in res.stderr
    assert "rerank" in run("query", built, text, "--rerank", "bm25", code=2).stderr
