"""Hugging Face tokenizers: a tokenizer.json, a model folder, the tokenizer inside a .gguf
file. Tiny byte-level BPEs are trained here with the tokenizers library; the .gguf file
is written here with the gguf package."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from typer.testing import CliRunner

from retrodb import RetroDB
from retrodb.corpus import cut_points
from retrodb.errors import BadInputError, CorruptError, MismatchError, NotFoundError
from retrodb.query import query
from retrodb.tokenizer import (
    GGUF_EXTRA,
    HFTokenizer,
    PieceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)
from retrodb_cli.main import app

from .conftest import ASYNCIO, SMALL, TOPICS, copy_db, pristine_db, write_corpus

EOT, PAD = "<|endoftext|>", "<pad>"
TEXTS = [t * 3 for t in TOPICS.values()] + ["Héllo wörld, 東京 and 0123 numbers.\n"] * 3


def train_bpe(texts: list[str], *, vocab_size: int = 500) -> HFBackend:
    """A byte-level BPE (GPT-2 style: ``Ġthe``, ``Ċ``) with an end-of-text and a pad token."""
    tk = HFBackend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return tk


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(TEXTS).save(str(path), pretty=True)  # pretty: not the canonical form
    return path


@pytest.fixture(scope="module")
def pristine(
    tmp_path_factory: pytest.TempPathFactory, bpe_json: Path, tiny_encoder_dir: Path
) -> Path:
    root = tmp_path_factory.mktemp("hfdb")
    corpus = write_corpus(root / "corpus", TOPICS)
    RetroDB.build(root / "db", [corpus], config=SMALL, tokenizer=bpe_json, encoder=tiny_encoder_dir)
    return root / "db"


@pytest.fixture
def db_path(pristine: Path, tmp_path: Path) -> Path:
    return copy_db(pristine, tmp_path / "db")


sp_pristine = pristine_db("sp", lambda root: write_corpus(root / "corpus", TOPICS))


def document_ids(db: RetroDB) -> dict[str, list[int]]:
    """The stored tokens of every document, its chunks concatenated."""
    out: dict[str, list[int]] = {}
    for seg in db.segments:
        toks, lens = db.chunks(seg.row_keys(np.arange(seg.meta.chunks)))
        for row, n, d in zip(toks, lens, np.asarray(seg.doc), strict=True):
            out.setdefault(seg.ids[int(d)], []).extend(int(t) for t in row[:n])
    return out


# ---------------------------------------------------------------- the tokenizer


def test_tokenizer_json_loads_canonical_and_stable(bpe_json: Path) -> None:
    one, two = Tokenizer.load(bpe_json), Tokenizer.load(bpe_json)
    assert isinstance(one, HFTokenizer) and one.kind == "huggingface"
    assert one.file_name == "tokenizer.json" and one.source == str(bpe_json)
    assert one.fingerprint == two.fingerprint and one.fingerprint.startswith("sha256:")
    # the stored bytes are the canonical JSON: reading them back gives the same bytes
    canonical = HFBackend.from_str(bpe_json.read_text()).to_str().encode()
    assert one.model_bytes == canonical != bpe_json.read_bytes()
    again = Tokenizer.from_bytes(one.model_bytes, kind="huggingface")
    assert again.fingerprint == one.fingerprint and again.model_bytes == one.model_bytes
    backend = HFBackend.from_file(str(bpe_json))
    assert one.vocab_size == backend.get_vocab_size(with_added_tokens=True)
    assert one.token_dtype == np.uint16 and one.trainer is None
    eot, pad = backend.token_to_id(EOT), backend.token_to_id(PAD)
    assert (one.eos_id, one.pad_id, one.bos_id) == (eot, pad, None)
    text = "Héllo wörld 😀\n\n  tabs\tand a <|endoftext|> inside"
    ids = one.encode([text])[0]
    assert eot not in ids  # a special token's text in a document is text
    assert one.decode(ids) == text and one.decode_many([ids, ids[:3]])[0] == text
    assert one.encode_one(text).dtype == np.int64 and one.encode_one(text).tolist() == ids
    assert one.id_to_piece(ids[0]) == backend.id_to_token(ids[0])
    with pytest.raises(IndexError):
        one.decode([one.vocab_size])
    copy = pickle.loads(pickle.dumps(one))  # as Ray and DataLoader workers get it
    assert copy.fingerprint == one.fingerprint and copy.source == one.source
    assert copy.encode([text]) == [ids] and copy.pad_id == one.pad_id


def test_byte_lengths_of_a_byte_level_bpe(bpe_json: Path) -> None:
    tok = Tokenizer.load(bpe_json)
    table = tok.token_byte_lengths()
    assert table.shape == (tok.vocab_size,) and table.dtype == np.int64
    assert table[tok.eos_id] == 0 and table[tok.pad_id] == 0
    for text in ["plain", " leading space", "unicode: héllo 漢字 😀\n\ttab", "x\r\n\n\ny"]:
        ids = tok.encode([text])[0]
        assert int(table[ids].sum()) == len(text.encode())


def test_byte_lengths_of_a_sentencepiece_style_tokenizer() -> None:
    """Llama-2 style (``▁`` for a space, byte fallback ``<0x0A>``): '▁' counts as a space
    (the one prepended to a document too), a byte piece as 1, specials 0."""
    chars = sorted(set("the cat sat on a mat"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["\u2581", *chars, "\u2581t", "he", "\u2581the", "at"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("a", "t")]
    tk = HFBackend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok = HFTokenizer.from_backend(tk)
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2  # no pad: eos
    table = tok.token_byte_lengths()
    assert table[vocab["<0x0A>"]] == 1 and table[vocab["\u2581the"]] == 4 and table[1] == 0
    text = "the cat\nsat on 東京 😀 mat"
    ids = tok.encode([text])[0]
    assert vocab["<0x0A>"] in ids and tok.decode(ids) == text
    assert int(table[ids].sum()) == len((" " + text).encode())


def test_load_errors_name_the_file_and_what_was_expected(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(NotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(CorruptError, match=r"tokenizer.json: not a Hugging Face tokenizer.json"):
        Tokenizer.load(bad)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not anything")
    with pytest.raises(CorruptError, match=r"junk.bin: not a SentencePiece model, a Hugging Face"):
        Tokenizer.load(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=r"empty: not a tokenizer folder"):
        Tokenizer.load(tmp_path / "empty")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"GGUF but nothing more")
    with pytest.raises(BadInputError, match=r"model.gguf: cannot read a tokenizer"):
        Tokenizer.load(not_gguf)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(BadInputError, match=r"model.gguf: install retrodb\[hf\] \(the gguf"):
        Tokenizer.load(not_gguf)
    argv = ["build", str(tmp_path / "db"), str(tmp_path), "--tokenizer", str(not_gguf)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1 and res.stderr.strip() == f"error: {not_gguf}: {GGUF_EXTRA}"
    assert not (tmp_path / "db").exists()
    with pytest.raises(Exception, match="unknown to this retrodb"):
        Tokenizer.from_bytes(b"{}", kind="tiktoken")


def test_model_folders(bpe_json: Path, tmp_path: Path) -> None:
    """A folder holding a tokenizer.json gives the file's tokenizer; a folder saved by
    transformers gives the same ids and takes the special tokens its config names."""
    from transformers import PreTrainedTokenizerFast

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(bpe_json, plain / "tokenizer.json")
    tok = Tokenizer.load(bpe_json)
    assert Tokenizer.load(plain).fingerprint == tok.fingerprint
    saved = tmp_path / "saved"
    fast = PreTrainedTokenizerFast(tokenizer_file=str(bpe_json), eos_token=EOT, bos_token=EOT)
    fast.save_pretrained(str(saved))
    from_folder = Tokenizer.load(saved)
    assert isinstance(from_folder, HFTokenizer) and from_folder.source == str(saved)
    assert from_folder.fingerprint == Tokenizer.load(saved).fingerprint
    text = "Sorting a list in place uses list.sort().\n\nThreads share memory."
    assert from_folder.encode([text]) == tok.encode([text])
    assert from_folder.bos_id == from_folder.eos_id == tok.eos_id
    # a folder without tokenizer.json: what transformers makes of vocab.json + merges.txt
    spec = json.loads(bpe_json.read_text())
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (legacy / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT, "bos_token": EOT})
    )
    from_vocab = Tokenizer.load(legacy)
    assert isinstance(from_vocab, HFTokenizer) and from_vocab.eos_id == tok.eos_id
    assert from_vocab.encode([text]) == tok.encode([text])


def write_gguf(path: Path, tk: HFBackend) -> None:
    """A .gguf file with no tensors: a llama architecture whose tokenizer is ``tk`` (a
    byte-level BPE, ``tokenizer.ggml.model`` gpt2), as llama.cpp's converter writes one."""
    import gguf

    spec = json.loads(tk.to_str())
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    writer.add_eos_token_id(vocab[EOT])
    writer.add_pad_token_id(vocab[PAD])
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_tokenizer(bpe_json: Path, tmp_path: Path) -> None:
    """The tokenizer inside a .gguf file: the ids of the tokenizer it was written from, the
    special ids it records, the same fingerprint every time; a tokenizer.json beside the
    file is not taken instead."""
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, HFBackend.from_file(str(bpe_json)))
    tok, src = Tokenizer.load(path), Tokenizer.load(bpe_json)
    assert isinstance(tok, HFTokenizer) and tok.source == str(path)
    assert Tokenizer.load(path).fingerprint == tok.fingerprint
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (
        src.vocab_size,
        src.eos_id,
        src.pad_id,
        None,
    )
    for text in [*TEXTS, "a\n\n\n  b\r\nc 😀"]:
        assert tok.encode([text]) == src.encode([text])
    other = train_bpe(["completely different words"], vocab_size=300)
    other.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(path).fingerprint == tok.fingerprint


# ---------------------------------------------------------------- pieces of a document


@pytest.mark.parametrize("merged_newlines", [False, True])
def test_pieces_give_the_ids_of_whole_documents(
    db_path: Path, tmp_path: Path, monkeypatch, merged_newlines: bool, tiny_encoder_dir: Path
) -> None:
    """A 100 KB document read in pieces of 2 KB is stored with exactly the ids of the whole
    text: through pieces for a BPE that passes the probe, through whole documents for one
    that merges newlines with what surrounds them (``ĊĊ``, ``ĠĊ``)."""
    import retrodb.corpus as corpus_mod

    rng = np.random.default_rng(0)
    words = ["files", "read", "écrire", "東京", "lock", "  ", "\t", "sort", "a", "0123", "\r"]
    lines = []
    for i in range(1000):
        n = int(rng.integers(0, 30)) if i % 300 else 1500  # a few lines longer than a piece
        lines.append(" ".join(words[j] for j in rng.integers(0, len(words), n)))
    text = "\n".join(lines) + "\n\n"
    if merged_newlines:  # a tokenizer trained on blank lines learns ĊĊ and ĠĊ
        tk = train_bpe([text.replace("\n", " \n\n\n")] * 3, vocab_size=600)
        (tmp_path / "merged").mkdir()
        tk.save(str(tmp_path / "merged" / "tokenizer.json"))
        tok = Tokenizer.load(tmp_path / "merged")
        build_root = tmp_path / "merged-db"
        inputs = write_corpus(tmp_path / "small", {"x.txt": "one small document"})
        db = RetroDB.build(
            build_root,
            [inputs],
            config=SMALL,
            tokenizer=tmp_path / "merged",
            encoder=tiny_encoder_dir,
        )
    else:
        db = RetroDB.open(db_path)
        tok = db.tokenizer
    assert PieceTokenizer(tok, cuts=cut_points).exact is not merged_newlines
    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 2048)
    monkeypatch.setattr(corpus_mod, "_BLOCK", 1000)
    monkeypatch.setattr("retrodb.tokenizer.TOKENIZE_PIECES", 7)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "big.txt").write_text(text, encoding="utf-8")
    assert sum(1 for _ in corpus_mod.scan([tmp_path / "big"]).iter_pieces(2048)) > 20
    seams = []
    real_encode = PieceTokenizer.encode

    def spy(self: PieceTokenizer, pieces: list[tuple[str, bool]]) -> list[list[int]]:
        seams.extend(cont for _, cont in pieces if cont)
        return real_encode(self, pieces)

    monkeypatch.setattr(PieceTokenizer, "encode", spy)
    db.add([tmp_path / "big"])
    assert (len(seams) > 20) is not merged_newlines  # through pieces, or whole documents
    ids = document_ids(db)["big.txt"]
    assert ids == db.tokenizer.encode([text])[0]  # identical to tokenizing the whole text
    assert db.tokenizer.decode(ids) == text
    assert db.verify().ok


# ---------------------------------------------------------------- databases


def test_build_query_add_verify_reopen(
    pristine: Path, db_path: Path, bpe_json: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    db = RetroDB.open(db_path)
    section = db.manifest.tokenizer
    tok = Tokenizer.load(bpe_json)
    assert section["kind"] == "huggingface" and section["file"] == "tokenizer.json"
    assert section["source"] == str(bpe_json) and section["fingerprint"] == tok.fingerprint
    assert (section["eos_id"], section["pad_id"], section["bos_id"]) == (
        tok.eos_id,
        tok.pad_id,
        None,
    )
    assert section["token_dtype"] == "uint16" and "trainer" not in section
    assert (db_path / "tokenizer.json").read_bytes() == tok.model_bytes
    assert not (db_path / "tokenizer.model").exists()
    assert isinstance(db.tokenizer, HFTokenizer) and db.pad_id == tok.pad_id
    info = db.info()
    assert info["tokenizer"]["kind"] == "huggingface" and info["tokenizer"]["source"]
    assert info["bytes"]["tokenizer"] == len(tok.model_bytes)
    # chunks are SMALL's 16 tokens of this tokenizer, and a document's chunks are its ids
    corpus = pristine.parent / "corpus"
    stored = document_ids(db)
    assert sorted(stored) == sorted(TOPICS)
    for doc_id, ids in stored.items():
        assert ids == tok.encode([(corpus / doc_id).read_text(encoding="utf-8")])[0]
    assert int(np.asarray(db.segments[0].lengths).max()) == 16
    [found] = query(db.snapshot, "how do I open a file?", k=2)
    assert len(found.neighbours) == 2 and {h.doc for h in found.neighbours} <= set(TOPICS)
    text = db.decode([5])[0]  # a stored chunk's text finds that chunk
    assert db.search(text, k=1, exact=True).keys[0, 0] == 5
    more = write_corpus(tmp_path / "more", ASYNCIO)
    res = db.add([more], tokenizer=bpe_json, encoder=tiny_encoder_dir)  # the guards pass
    assert (
        res.documents == 1
        and document_ids(db)["asyncio.txt"]
        == tok.encode([(more / "asyncio.txt").read_text(encoding="utf-8")])[0]
    )
    assert db.verify().ok
    again = RetroDB.open(db_path)
    assert again.tokenizer.fingerprint == tok.fingerprint and again.generation == 2
    assert again.tokenizer.pad_id == tok.pad_id and again.tokenizer.eos_id == tok.eos_id
    assert again.search("an event loop runs coroutines", k=1).keys.shape == (1, 1)
    # a replaced or damaged tokenizer.json is refused at open, and verify names it
    (db_path / "tokenizer.json").write_bytes(tok.model_bytes.replace(b"<pad>", b"<pbd>"))
    with pytest.raises(MismatchError, match="tokenizer.json"):
        RetroDB.open(db_path)


def test_cli_build_info_and_add_guard(
    bpe_json: Path, db_path: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    import typer.main

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("build", "add"):
        [opt] = [p for p in commands[name].params if "--tokenizer" in p.opts]
        assert "a Hugging Face tokenizer (tokenizer.json or a model folder) or a .gguf file " in (
            opt.help
        )
        assert "needs retrodb[hf]" in opt.help
    runner = CliRunner()
    res = runner.invoke(app, ["info", str(db_path)])
    assert res.exit_code == 0 and "tokenizer    huggingface, vocabulary" in res.output
    assert f"from {bpe_json}" in res.output
    other = tmp_path / "other.json"
    train_bpe(["some other text"], vocab_size=300).save(str(other))
    more = write_corpus(tmp_path / "more", ASYNCIO)
    before = sorted(p.name for p in (db_path / "manifests").iterdir())
    res = runner.invoke(app, ["add", str(db_path), str(more), "--tokenizer", str(other)])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0] == (
        f"error: {other}: tokenizer does not match the database's ({db_path / 'tokenizer.json'})"
    )
    assert sorted(p.name for p in (db_path / "manifests").iterdir()) == before
    argv = ["add", str(db_path), str(more), "--tokenizer", str(bpe_json), "--quiet"]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output


def test_gguf_database_through_the_cli(
    bpe_json: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, HFBackend.from_file(str(bpe_json)))
    corpus = write_corpus(tmp_path / "corpus", TOPICS)
    db = tmp_path / "db"
    args = ["build", db, corpus, "--tokenizer", gguf_path, "--encoder", tiny_encoder_dir]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--chunk-size", "16", "--quiet"]])
    assert res.exit_code == 0, res.output
    rdb = RetroDB.open(db)
    assert rdb.manifest.tokenizer["source"] == str(gguf_path)
    assert rdb.tokenizer.fingerprint == Tokenizer.load(gguf_path).fingerprint
    assert rdb.verify().ok


def test_a_vocabulary_above_65536_stores_uint32(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    import zarr

    vocab = {"[UNK]": 0} | {f"w{i}": i + 1 for i in range(70_000)}
    tk = HFBackend(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "big").mkdir()
    tk.save(str(tmp_path / "big" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "big")
    assert tok.vocab_size == 70_001 and tok.token_dtype == np.uint32
    text = " ".join(f"w{i}" for i in range(69_950, 70_000)) + " w1 w65535 w65536 unknown"
    corpus = write_corpus(tmp_path / "corpus", {"big.txt": text}, repeat=1)
    db = RetroDB.build(
        tmp_path / "db",
        [corpus],
        config=SMALL,
        tokenizer=tmp_path / "big",
        encoder=tiny_encoder_dir,
    )
    assert db.manifest.tokenizer["token_dtype"] == "uint32" == db.token_dtype.name
    seg = db.segments[0]
    assert seg.tokens.dtype == np.uint32
    assert zarr.open_array(str(seg.dir / "tokens"), mode="r").dtype == np.uint32
    ids = document_ids(db)["big.txt"]
    assert ids == tok.encode([text])[0] and max(ids) == 70_000 and 65_536 in ids
    got = db.retrieve(np.array([0, 1]))
    assert got.tokens.dtype == np.int64 and int(got.tokens[got.mask].min()) > 65_536
    assert db.decode([0])[0].startswith("w69950 w69951")
    assert RetroDB.open(tmp_path / "db").verify().ok


def test_a_database_written_before_kind_still_opens(
    sp_pristine: Path, tmp_path: Path, more_dir: Path
) -> None:
    """A manifest from before ``kind`` (and the special ids, and ``source``): a
    SentencePiece model in tokenizer.model. It opens, searches, verifies and takes adds."""
    import dataclasses

    tiny_db = RetroDB.open(copy_db(sp_pristine, tmp_path / "db"))
    m = tiny_db.manifest
    assert m.tokenizer["kind"] == "sentencepiece" and m.tokenizer["file"] == "tokenizer.model"
    old = {k: v for k, v in m.tokenizer.items() if k not in ("kind", "eos_id", "bos_id")}
    tiny_db.storage.commit(dataclasses.replace(m, generation=m.generation + 1, tokenizer=old))
    db = RetroDB.open(tiny_db.path)
    assert "kind" not in db.manifest.tokenizer
    assert isinstance(db.tokenizer, SentencePieceTokenizer)
    assert db.info()["tokenizer"]["kind"] == "sentencepiece"
    assert db.search("open a file", k=2).keys.shape == (1, 2)
    assert db.verify().ok
    assert db.add([more_dir], tokenizer=tiny_db.path / "tokenizer.model").documents == 1


def test_served_database_gives_its_tokenizer(db_path: Path) -> None:
    from retrodb.serve.client import RemoteDB
    from retrodb.serve.service import Service

    from .serve_helpers import Running

    local = RetroDB.open(db_path, threads=1)
    served = Running(Service(db_path, threads=1, follow_s=0.0, batching=False))
    try:
        with RemoteDB(served.url) as remote:
            assert isinstance(remote.tokenizer, HFTokenizer)
            assert remote.tokenizer.fingerprint == local.tokenizer.fingerprint
            assert remote.tokenizer.pad_id == local.pad_id == remote.pad_id
            texts = ["how to open a file"]
            assert np.array_equal(remote.search(texts, k=2).keys, local.search(texts, k=2).keys)
    finally:
        served.stop()
