from __future__ import annotations

import gzip
import io
import json

import pytest

from retrodb.corpus import scan
from retrodb.errors import BadInputError, NotFoundError


def test_folder_recursive_with_relative_ids_and_gzip(tmp_path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / "c.rst.gz").write_bytes(gzip.compress(b"gamma"))
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d" / "empty.txt").write_text("  \n ")
    c = scan([tmp_path / "d"])
    assert sorted(c.ids) == ["a.txt", "c.rst.gz", "sub/b.md"]
    assert c.skipped_empty == ["empty.txt"]
    assert dict(c.iter_documents())["c.rst.gz"] == "gamma"


def test_jsonl_file_and_stdin(tmp_path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text(
        json.dumps({"id": "one", "text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    c = scan([p])
    assert list(c.iter_documents()) == [("one", "first"), ("x.jsonl:3", "second")]
    c = scan(["-"], stdin=io.BytesIO(b'{"id": 7, "text": "seven"}\n'))
    assert list(c.iter_documents()) == [("7", "seven")]
    c.cleanup()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bin.txt", b"abc\x00def", "NUL"),
        ("latin.txt", "café".encode("latin-1"), "invalid UTF-8"),
        ("bad.jsonl", b'{"text": 1}\n', "'text' must be a string"),
        ("bad2.jsonl", b"not json\n", "invalid JSON"),
        ("bad3.jsonl", b'{"id": "a"}\n', "'text' field"),
        (
            "dup.jsonl",
            b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
            "duplicate document id",
        ),
        ("blank.txt", b"   \n", "no documents"),
    ],
)
def test_bad_input_is_refused_naming_the_file(
    tmp_path, name: str, content: bytes, message: str
) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(BadInputError, match=message) as exc:
        scan([p])
    if message != "no documents":
        assert name in str(exc.value)


def test_replace_invalid_utf8_and_missing_path(tmp_path) -> None:
    p = tmp_path / "latin.txt"
    p.write_bytes("café".encode("latin-1"))
    assert next(scan([p], errors="replace").iter_documents())[1] == "caf\ufffd"
    with pytest.raises(NotFoundError, match="missing"):
        scan([tmp_path / "missing"])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(BadInputError, match="unsupported"):
        scan([tmp_path / "x.pdf"])
