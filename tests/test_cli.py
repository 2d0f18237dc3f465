"""Every command driven in-process, plus the interface other scripts rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from retrodb_cli.main import app
from typer.testing import CliRunner

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
