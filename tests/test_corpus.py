from __future__ import annotations

import gzip
import io
import json

import pytest

from retrodb.corpus import EMPTY, NOT_A_FILE, UNSUPPORTED, describe_skipped, plural, scan
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
    (tmp_path / "x.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\x00stream")
    with pytest.raises(BadInputError, match=r"x.pdf: binary data \(NUL byte at offset 27\)"):
        scan([tmp_path / "x.pdf"])  # given by name: read as text, refused as binary


def test_nothing_is_skipped_without_a_reason(tmp_path) -> None:
    """A folder's files that are not read, and empty documents, are listed with the reason
    (they used to vanish: this folder built as "2 documents" and said nothing more)."""
    d = tmp_path / "d"
    d.mkdir()
    for name, text in {
        "LICENSE": "Permission is hereby granted",
        "code.py": "print('hello')",
        "readme.text": "read me",
        "doc.md": "# A document",
        "notes.TXT": "Notes in upper case.",
        "empty.txt": " \n",
    }.items():
        (d / name).write_text(text)
    (d / "gone.txt").symlink_to(tmp_path / "nowhere")
    records = [{"id": "a", "text": "kept"}, {"id": "b", "text": ""}, {"text": " \t"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    c = scan([d, tmp_path / "r.jsonl"])
    assert c.ids == ["doc.md", "notes.TXT", "a"]  # extensions in any case
    got = {(s.name, s.reason) for s in c.skipped}
    assert got == {
        ("LICENSE", UNSUPPORTED),
        ("code.py", UNSUPPORTED),
        ("readme.text", UNSUPPORTED),
        ("empty.txt", EMPTY),
        ("gone.txt", NOT_A_FILE),
        (f"{tmp_path / 'r.jsonl'}:2", EMPTY),
        (f"{tmp_path / 'r.jsonl'}:3", EMPTY),
    }
    assert sorted(c.skipped_empty) == ["b", "empty.txt", "r.jsonl:3"]
    line = describe_skipped(c.skipped)
    assert line.startswith("skipped 5 files and 2 JSONL records: ")
    assert "3 with an unsupported extension (LICENSE, code.py, readme.text)" in line
    assert "3 empty (empty.txt, " in line and "1 not a regular file (gone.txt)" in line
    assert [s.to_dict()["line"] for s in c.skipped if s.line] == [2, 3]

    # A file given by name is read whatever its extension.
    c = scan([d / "LICENSE", d / "code.py", d / "readme.text"])
    assert c.ids == ["LICENSE", "code.py", "readme.text"] and not c.skipped
    assert dict(c.iter_documents())["code.py"] == "print('hello')"


def test_plural() -> None:
    assert [plural(n, "document") for n in (0, 1, 2, 26797)] == [
        "0 documents",
        "1 document",
        "2 documents",
        "26,797 documents",
    ]
    assert plural(3, "index", "indexes") == "3 indexes"
