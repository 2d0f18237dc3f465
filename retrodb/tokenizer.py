"""Tokenizers: SentencePiece (trained here or given) and Hugging Face ``tokenizers``
(a ``tokenizer.json``, a model folder, or the tokenizer inside a ``.gguf`` file), behind
one interface; tokenizing a stream of document pieces exactly as whole documents. The only
sentencepiece and ``tokenizers.Tokenizer`` user of the database (transformers is imported
only to read a model folder without a ``tokenizer.json`` or a ``.gguf`` file)."""

from __future__ import annotations

import abc
import hashlib
import io
import json
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import sentencepiece as spm

from .config import TokenizerConfig
from .errors import BadInputError, CorruptError, FormatVersionError, NotFoundError

if TYPE_CHECKING:
    import tokenizers

#: Special ids of tokenizers that retrodb trains.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Pieces of text tokenized per tokenizer call while writing a segment (and at most
#: about this many characters).
TOKENIZE_PIECES = 256
TOKENIZE_CHARS = 1 << 20
#: The longest sentence (UTF-8 bytes) the SentencePiece trainer accepts; it drops longer ones.
MAX_SENTENCE_BYTES = 1 << 16
#: Lines longer than this (characters) are cut into sentences for the trainer: at most 4
#: bytes a character keeps every sentence within MAX_SENTENCE_BYTES.
SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4
#: Threads of the SentencePiece trainer. Fixed, not the machine's core count: the unigram
#: trainer sums its statistics per thread, so another count gives another model.
TRAIN_THREADS = 2

#: The kinds of tokenizer (the manifest's ``tokenizer.kind``) and their file in a database.
SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"
SENTENCEPIECE_FILE, HUGGINGFACE_FILE = "tokenizer.model", "tokenizer.json"
#: The error's advice when a ``.gguf`` file is given without the optional gguf package.
GGUF_EXTRA = "install retrodb[hf] (the gguf package) to read .gguf files"
#: A SentencePiece byte-fallback piece (``<0x0A>``).
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
#: What ``--tokenizer`` accepts, for error messages.
ACCEPTED = "a SentencePiece model, a Hugging Face tokenizer.json or model folder, or a .gguf file"


def fingerprint(model_bytes: bytes) -> str:
    """The fingerprint of a tokenizer: ``sha256:`` and the hex digest of its stored bytes."""
    return "sha256:" + hashlib.sha256(model_bytes).hexdigest()


def training_sentences(text: str) -> Iterator[str]:
    """The sentences of ``text`` for the trainer: its non-blank lines, stripped, each line
    longer than :data:`SENTENCE_CHARS` cut just before a space (at :data:`SENTENCE_CHARS`
    when a stretch has no space) into sentences of at most that many characters."""
    for line in text.splitlines():
        line = line.strip()
        while len(line) > SENTENCE_CHARS:
            cut = line.rfind(" ", 1, SENTENCE_CHARS + 1)
            if cut <= 0:
                cut = SENTENCE_CHARS
            head, line = line[:cut].rstrip(), line[cut:].lstrip()
            if head:
                yield head
        if line:
            yield line


def trainer_options(config: TokenizerConfig) -> dict[str, Any]:
    """Every option retrodb gives the SentencePiece trainer (besides its input and output)."""
    return {
        "vocab_size": config.vocab_size,
        "model_type": config.model_type,
        "character_coverage": config.character_coverage,
        "byte_fallback": True,
        "hard_vocab_limit": False,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "split_digits": True,
        "remove_extra_whitespaces": False,
        "normalization_rule_name": "identity",
        "allow_whitespace_only_pieces": True,
        "user_defined_symbols": ["\n", "\t"],
        "num_threads": TRAIN_THREADS,
    }


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): every byte as one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


class Tokenizer(abc.ABC):
    """A tokenizer with the few operations retrodb needs: a :class:`SentencePieceTokenizer`
    or an :class:`HFTokenizer`. :meth:`load` reads any of them from a path,
    :meth:`from_bytes` from the file stored in a database, :meth:`train` trains a
    SentencePiece model."""

    kind: ClassVar[str]
    """``sentencepiece`` or ``huggingface`` (the manifest's ``tokenizer.kind``)."""
    file_name: ClassVar[str]
    """The tokenizer's file inside a database: ``tokenizer.model`` or ``tokenizer.json``."""

    __slots__ = ("_bytes", "path", "fingerprint", "trainer", "source")

    def __init__(
        self, model_bytes: bytes, *, path: Path | None = None, source: str | None = None
    ) -> None:
        self._bytes = model_bytes
        self.path = path
        """The file it was read from (None when made in memory)."""
        self.fingerprint = fingerprint(model_bytes)
        self.trainer: dict[str, Any] | None = None
        """How :meth:`train` made this model (None for a tokenizer loaded from a file): the
        sentencepiece version, the seed, the sampling and every trainer option. Recorded in
        the manifest's tokenizer section, since the same corpus gives another model with
        another sentencepiece version or thread count."""
        self.source = source
        """The path the user gave :meth:`load` (recorded in the manifest), else None."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its stored bytes and special ids (Ray workers, DataLoader workers),
        rebuilt through :meth:`from_bytes`: the library's own pickling would drop settings
        that its JSON does not hold."""
        special = {"pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}
        return (_unpickle, (self.kind, self._bytes, self.path, special, self.source, self.trainer))

    # ------------------------------------------------------------ making one

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """The tokenizer at ``path``: a SentencePiece model file; a Hugging Face
        ``tokenizer.json``; a folder (its ``tokenizer.json``, else whatever
        ``transformers.AutoTokenizer`` makes of it, never downloading); or a ``.gguf``
        file's tokenizer (needs the gguf package: ``retrodb[hf]``)."""
        path = Path(path)
        if not path.exists():
            raise NotFoundError(f"{path}: tokenizer not found")
        if path.is_dir():
            tok: Tokenizer = _load_folder(path)
        else:
            try:
                with open(path, "rb") as f:
                    head = f.read(4)
            except OSError as exc:
                raise BadInputError(f"{path}: cannot read the tokenizer ({exc})") from exc
            if path.suffix.lower() == ".gguf" or head == b"GGUF":
                tok = _load_gguf(path)
            elif path.suffix.lower() == ".json" or head.lstrip().startswith(b"{"):
                tok = _load_json(path)
            else:
                tok = SentencePieceTokenizer(_read(path), path=path, expected=ACCEPTED)
        tok.source = str(path)
        return tok

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        kind: str,
        path: Path | None = None,
        special: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """The tokenizer of ``kind`` whose stored file holds ``data`` (a database's
        ``tokenizer.model`` or ``tokenizer.json``). ``special``: the manifest's tokenizer
        section (or any mapping with ``pad_id``, ``eos_id``, ``bos_id``), which fixes a
        Hugging Face tokenizer's special ids as they were when the database was built."""
        if kind == SENTENCEPIECE:
            return SentencePieceTokenizer(data, path=path)
        if kind == HUGGINGFACE:
            return HFTokenizer(data, path=path, special=special)
        raise FormatVersionError(
            f"{path or 'tokenizer'}: tokenizer kind {kind!r} is unknown to this retrodb "
            f"(known: {SENTENCEPIECE}, {HUGGINGFACE}); a newer version wrote it"
        )

    @classmethod
    def train(
        cls, texts: Iterable[str], *, config: TokenizerConfig, seed: int = 0
    ) -> SentencePieceTokenizer:
        """Train a SentencePiece model (see :meth:`SentencePieceTokenizer.train`)."""
        return SentencePieceTokenizer.train(texts, config=config, seed=seed)

    # ------------------------------------------------------------ the stored file

    @property
    def model_bytes(self) -> bytes:
        """The bytes stored in a database (the fingerprint is of these)."""
        return self._bytes

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._bytes)

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's tokenizer section for this tokenizer."""
        return {
            "kind": self.kind,
            "file": self.file_name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "token_dtype": self.token_dtype.name,
            "size": len(self._bytes),
            **({"trainer": self.trainer} if self.trainer is not None else {}),
            **({"source": self.source} if self.source is not None else {}),
        }

    # ------------------------------------------------------------ ids

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Every id is below this."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The id that pads chunks (never a real token of a chunk: lengths say which are)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest dtype that holds every id: uint16 when the vocabulary fits, else
        uint32. (Databases written before uint32 record int32; the manifest says which.)"""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text, with no special token added (no BOS, no EOS)."""

    def encode_one(self, text: str) -> np.ndarray:
        return np.asarray(self.encode([text])[0], dtype=np.int64)

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``; IndexError for an id outside the vocabulary."""

    def decode_many(self, rows: Sequence[Sequence[int] | np.ndarray]) -> list[str]:
        return [self.decode(r) for r in rows]

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` as the tokenizer spells it (``▁the``, ``Ġthe``)."""

    @abc.abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for inside a document, ``[vocab_size]`` int64 (0 for
        special and control tokens). Summed over a span of a document's tokens this is the
        byte length of the span's text."""


def _unpickle(
    kind: str,
    data: bytes,
    path: Path | None,
    special: dict[str, Any],
    source: str | None,
    trainer: dict[str, Any] | None,
) -> Tokenizer:
    tok = Tokenizer.from_bytes(data, kind=kind, path=path, special=special)
    tok.source, tok.trainer = source, trainer
    return tok


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the tokenizer ({exc})") from exc


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model."""

    kind = SENTENCEPIECE
    file_name = SENTENCEPIECE_FILE

    __slots__ = ("_sp",)

    def __init__(
        self,
        model_bytes: bytes,
        *,
        path: Path | None = None,
        source: str | None = None,
        expected: str = "a SentencePiece model",
    ) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with a C++ message
            where = str(path) if path else "tokenizer"
            raise CorruptError(f"{where}: not {expected} ({exc})") from exc
        super().__init__(model_bytes, path=path, source=source)
        self._sp = sp

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        config: TokenizerConfig,
        seed: int = 0,
    ) -> SentencePieceTokenizer:
        """Train a SentencePiece model with byte fallback, so any text round-trips.

        Every line is a sentence; a line longer than :data:`SENTENCE_CHARS` (minified
        JSON, a log, a one-paragraph document) is cut at spaces into sentences the trainer
        accepts (see :func:`training_sentences`). At most ``config.input_sentence_size``
        sentences are sampled (reservoir sampling, seeded) and the vocabulary size is a
        soft limit, so a small corpus still trains. The same texts and settings give the
        same model, byte for byte; :attr:`trainer` records the settings."""
        rng = random.Random(seed)
        sample: list[str] = []
        seen = 0
        for text in texts:
            for sentence in training_sentences(text):
                seen += 1
                if len(sample) < config.input_sentence_size:
                    sample.append(sentence)
                else:
                    j = rng.randrange(seen)
                    if j < config.input_sentence_size:
                        sample[j] = sentence
        if not sample:
            raise BadInputError("cannot train a tokenizer: the input holds no text")
        options = trainer_options(config)
        out = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=out, minloglevel=2, **options
        )
        tok = cls(out.getvalue())
        tok.trainer = {
            "sentencepiece": spm.__version__,
            "seed": seed,
            "input_sentence_size": config.input_sentence_size,
            "sentence_chars": SENTENCE_CHARS,
            "sentences": seen,
            "sampled": len(sample),
            "options": options,
        }
        return tok

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        """The padding id: the model's own pad piece if it has one, else 0."""
        pid = int(self._sp.pad_id())
        return pid if pid >= 0 else 0

    @property
    def eos_id(self) -> int:
        """The model's eos piece (-1 when it has none)."""
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int | None:
        bid = int(self._sp.bos_id())
        return bid if bid >= 0 else None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.Encode(list(texts))]

    def encode_one(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.Encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return str(self._sp.Decode([int(i) for i in ids]))

    def decode_many(self, rows: Sequence[Sequence[int] | np.ndarray]) -> list[str]:
        return [str(s) for s in self._sp.Decode([[int(i) for i in r] for r in rows])]

    def id_to_piece(self, i: int) -> str:
        return str(self._sp.IdToPiece(int(i)))

    def token_byte_lengths(self) -> np.ndarray:
        """Its piece with '▁' as the space it encodes, 1 for a byte-fallback piece, 0 for
        control pieces (pad, bos, eos). SentencePiece's ``decode`` of a whole text drops
        its leading space, which here is counted (inside a document it is real text)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self.id_to_piece(i)
            if _BYTE_PIECE.fullmatch(piece):
                out[i] = 1
            elif self.decode([i]) == "":
                out[i] = 0
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out


#: Names of special tokens, for a tokenizer.json whose folder does not say which is which.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_ROLES = ("pad_id", "eos_id", "bos_id")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``.

    The stored bytes are its canonical JSON (``to_str()``, no padding, no truncation), so
    the same tokenizer read from a ``tokenizer.json``, a model folder or a ``.gguf`` file
    has the same fingerprint each time. :meth:`encode` adds no special token, and the text
    of a special token inside a document is tokenized as text: documents are data, never
    control. The special ids (pad, eos, bos) come from the model folder or the ``.gguf``
    file when there is one, else from the token names; a database records them in its
    manifest and gives them back through ``special``."""

    kind = HUGGINGFACE
    file_name = HUGGINGFACE_FILE

    __slots__ = ("_tk", "_style", "_vocab_size", "_pad_id", "_eos_id", "_bos_id", "_special")

    def __init__(
        self,
        data: bytes,
        *,
        path: Path | None = None,
        source: str | None = None,
        special: Mapping[str, Any] | None = None,
    ) -> None:
        from tokenizers import Tokenizer as HFBackend

        where = str(path) if path else "tokenizer"
        try:
            spec = json.loads(data)
            tk = HFBackend.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception with serde's message
            raise CorruptError(f"{where}: not a Hugging Face tokenizer.json ({exc})") from exc
        tk.no_padding()
        tk.no_truncation()
        if hasattr(tk, "encode_special_tokens"):  # tokenizers >= 0.19
            tk.encode_special_tokens = True
        super().__init__(data, path=path, source=source)
        self._tk = tk
        self._style = _style(spec)
        ids = tk.get_vocab(with_added_tokens=True).values()
        self._vocab_size = max(tk.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        self._special = frozenset(i for i, t in tk.get_added_tokens_decoder().items() if t.special)
        roles = dict(special) if special is not None else _guess_roles(tk, spec)
        found = {k: _valid_id(roles.get(k), self._vocab_size) for k in _ROLES}
        self._eos_id, self._bos_id = found["eos_id"], found["bos_id"]
        pad = found["pad_id"]
        self._pad_id = pad if pad is not None else self._eos_id if self._eos_id is not None else 0

    @classmethod
    def from_backend(
        cls,
        tk: tokenizers.Tokenizer,
        *,
        path: Path | None = None,
        special: Mapping[str, Any] | None = None,
    ) -> HFTokenizer:
        """The canonical form of ``tk``: without padding and truncation, serialized, read
        back and serialized again (the bytes a database stores)."""
        from tokenizers import Tokenizer as HFBackend

        tk = HFBackend.from_str(tk.to_str())  # a copy: the caller's is left as it was
        if special is None:
            special = _guess_roles(tk, json.loads(tk.to_str()))
        tk.no_padding()
        tk.no_truncation()
        data = HFBackend.from_str(tk.to_str()).to_str().encode("utf-8")
        return cls(data, path=path, special=special)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers.Tokenizer`` (special tokens' text is encoded as text)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer has, its added tokens included."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """The pad token if the tokenizer has one, else eos, else 0."""
        return self._pad_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        run = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [list(e.ids) for e in run(texts, add_special_tokens=False)]

    def _check(self, rows: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
        out = [[int(i) for i in r] for r in rows]
        for r in out:
            bad = [i for i in r if not 0 <= i < self._vocab_size]
            if bad:
                raise IndexError(f"token id {bad[0]} out of range (vocabulary {self._vocab_size})")
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return str(self._tk.decode(self._check([ids])[0], skip_special_tokens=False))

    def decode_many(self, rows: Sequence[Sequence[int] | np.ndarray]) -> list[str]:
        decoded = self._tk.decode_batch(self._check(rows), skip_special_tokens=False)
        return [str(s) for s in decoded]

    def id_to_piece(self, i: int) -> str:
        piece = self._tk.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} out of range (vocabulary {self._vocab_size})")
        return str(piece)

    def token_byte_lengths(self) -> np.ndarray:
        """Byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2: ``Ġthe``, ``Ċ``): the bytes the
        piece stands for through the byte alphabet. SentencePiece-style (Llama-2,
        Mistral: ``▁the``, ``<0x0A>``): '▁' counts as a space, a byte piece as 1. Added
        tokens that are not special: their text. Special tokens: 0. Any other model: the
        bytes of the id decoded alone."""
        out = np.zeros(self._vocab_size, dtype=np.int64)
        style = self._style
        alphabet = {c: b for b, c in bytes_to_unicode().items()}
        added = self._tk.get_added_tokens_decoder()
        for i in range(self._vocab_size):
            piece = self._tk.id_to_token(i)
            if piece is None or i in self._special:
                continue
            if i in added:
                out[i] = len(added[i].content.encode("utf-8"))
            elif style == "bytelevel" and all(c in alphabet for c in piece):
                out[i] = len(piece)
            elif style == "sentencepiece" and _BYTE_PIECE.fullmatch(piece):
                out[i] = 1
            elif style == "sentencepiece":
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
            else:
                out[i] = len(self.decode([i]).encode("utf-8"))
        return out


def _types(node: Any) -> set[str]:
    """The ``type`` of a tokenizer.json component and of every component inside it."""
    if isinstance(node, list):
        return set().union(*(_types(x) for x in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    out = {str(node["type"])} if "type" in node else set()
    for key in ("decoders", "pretokenizers", "normalizers", "processors"):
        out |= _types(node.get(key))
    return out


def _style(spec: Mapping[str, Any]) -> str:
    """How a tokenizer.json spells text in its pieces: ``bytelevel``, ``sentencepiece``
    (``▁`` for a space, byte-fallback pieces) or ``other``, read from its decoder."""
    decoder = _types(spec.get("decoder"))
    if "ByteLevel" in decoder:
        return "bytelevel"
    if decoder & {"Metaspace", "ByteFallback"} or "\u2581" in json.dumps(spec.get("decoder")):
        return "sentencepiece"
    return "other"


def _valid_id(value: Any, vocab_size: int) -> int | None:
    return int(value) if isinstance(value, int) and 0 <= value < vocab_size else None


def _guess_roles(tk: tokenizers.Tokenizer, spec: Mapping[str, Any]) -> dict[str, int | None]:
    """Special ids of a tokenizer.json alone: pad from its padding settings, bos from the
    special token its post-processor puts first, else (and eos, pad) by the usual names
    among its special tokens."""
    specials = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}

    def named(names: Sequence[str]) -> int | None:
        return next((specials[n] for n in names if n in specials), None)

    padding = spec.get("padding")
    pad = padding.get("pad_id") if isinstance(padding, dict) else None
    bos = None
    post = spec.get("post_processor") or {}
    single = post.get("single") if isinstance(post, dict) else None
    if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
        bos = tk.token_to_id(str(single[0]["SpecialToken"].get("id")))
    return {
        "pad_id": pad if pad is not None else named(_PAD_NAMES),
        "eos_id": named(_EOS_NAMES),
        "bos_id": bos if bos is not None else named(_BOS_NAMES),
    }


def _folder_roles(folder: Path, tk: tokenizers.Tokenizer) -> dict[str, int | None] | None:
    """Special ids as a model folder's ``tokenizer_config.json`` and
    ``special_tokens_map.json`` name them (None when it has neither)."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if not any(k in config for k in ("pad_token", "eos_token", "bos_token")):
        return None

    def token_id(value: Any) -> int | None:
        content = value.get("content") if isinstance(value, dict) else value
        return tk.token_to_id(content) if isinstance(content, str) else None

    return {
        "pad_id": token_id(config.get("pad_token")),
        "eos_id": token_id(config.get("eos_token")),
        "bos_id": token_id(config.get("bos_token")),
    }


def _load_json(path: Path) -> HFTokenizer:
    """A tokenizer.json file (its folder's tokenizer_config.json names the special ids)."""
    from tokenizers import Tokenizer as HFBackend

    data = _read(path)
    try:
        tk = HFBackend.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception with serde's message
        raise CorruptError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from exc
    roles = _folder_roles(path.parent, tk) if path.name == HUGGINGFACE_FILE else None
    return HFTokenizer.from_backend(tk, path=path, special=roles)


def _load_folder(path: Path) -> HFTokenizer:
    """A Hugging Face model or tokenizer folder: its tokenizer.json, else what
    ``AutoTokenizer`` makes of it (a fast tokenizer, from local files only)."""
    if (path / HUGGINGFACE_FILE).is_file():
        return _load_json(path / HUGGINGFACE_FILE)
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise BadInputError(
            f"{path}: not a tokenizer folder: no {HUGGINGFACE_FILE}, and transformers "
            f"cannot load a tokenizer from it ({type(exc).__name__}: {exc})"
        ) from exc
    return _from_transformers(auto, path)


def require_gguf(path: Path) -> None:
    """Refuse ``path`` (a .gguf file) when the gguf package that transformers reads it
    with is missing, naming the extra that installs it."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise BadInputError(f"{path}: {GGUF_EXTRA}") from exc


def _load_gguf(path: Path) -> HFTokenizer:
    """The tokenizer inside a ``.gguf`` file, as transformers reads it. The file is read
    through a private folder that holds only a link to it, so a tokenizer.json beside the
    file is not taken instead."""
    require_gguf(path)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="retrodb-gguf-") as tmp:
        link = Path(tmp) / path.name
        link.symlink_to(path.resolve())
        try:
            auto = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name, local_files_only=True)
        except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ...
            raise BadInputError(
                f"{path}: cannot read a tokenizer from this .gguf file "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    return _from_transformers(auto, path)


def _from_transformers(auto: Any, path: Path) -> HFTokenizer:
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise BadInputError(
            f"{path}: transformers gives a {type(auto).__name__}, which has no Hugging Face "
            f"fast tokenizer (tokenizers) behind it"
        )
    roles = {
        "pad_id": auto.pad_token_id,
        "eos_id": auto.eos_token_id,
        "bos_id": auto.bos_token_id,
    }
    return HFTokenizer.from_backend(backend, path=path, special=roles)


class PieceTokenizer:
    """Tokenize a document piece by piece with exactly the ids of the whole text.

    Every piece after a document's first starts just after a newline or just before a
    space (see ``Corpus.iter_pieces``). Encoded alone it would get SentencePiece's dummy
    prefix; encoded as ``"\n" + piece`` it is segmented exactly as inside the whole text
    (the newline is a piece of its own that no other piece crosses), so the ids of a lone
    newline (:attr:`prefix`) are dropped from its front. A probe checks this once per
    tokenizer; one that fails it (no newline token, a newline that merges with what
    follows, as in byte-level BPEs that have a ``ĊĊ`` token, other normalization) must be
    given whole documents (:attr:`exact` is False)."""

    _PROBE = (
        "Ab cd\n\nef  gh ij\n kl\tmn op\n\n\nqr st, uv wx yz.\nend 12 345 it's "
        '"quoted" (x) h\u00e9llo w\u00f6rld \u6f22\u5b57\r\nlast line\n \n  \nx'
    )

    def __init__(self, tok: Tokenizer, *, cuts: Callable[[str], list[int]]) -> None:
        """``cuts(text)``: the offsets where the corpus reader may cut ``text`` into pieces."""
        self.tok = tok
        self.prefix = tok.encode(["\n"])[0]
        """The ids of a lone newline (SentencePiece: its dummy prefix, then the newline)."""
        last = self.prefix[-1] if self.prefix else None
        self.newline = last if last is not None and tok.decode([last]) == "\n" else None
        self.exact = self.newline is not None and self._probe(cuts)

    def _probe(self, cuts: Callable[[str], list[int]]) -> bool:
        text = self._PROBE
        whole = self.tok.encode([text])[0]
        for cut in cuts(text):
            try:
                a, b = self.encode([(text[:cut], False), (text[cut:], True)])
            except _NotExact:
                return False
            if a + b != whole:
                return False
        return True

    def encode(self, pieces: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """Ids of each ``(piece, continues_a_document)``."""
        out = self.tok.encode(["\n" + p if cont else p for p, cont in pieces])
        k = len(self.prefix)
        for i, (piece, cont) in enumerate(pieces):
            if cont:
                assert self.newline is not None, "pieces of a document need a newline token"
                ids = out[i]
                if ids[:k] != self.prefix:
                    raise _NotExact(
                        f"{piece[:40]!r}: after a newline its first ids are {ids[:k]}, not "
                        f"the newline's {self.prefix}: this tokenizer needs whole documents"
                    )
                out[i] = ids[k:]
        return out

    def tokenize(self, pieces: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        """``(document number, ids)`` for every ``(document number, piece)``, in order,
        tokenized in batches (many small documents share one tokenizer call)."""
        batch: list[tuple[int, str, bool]] = []
        chars = 0
        last = -1

        def flush() -> list[tuple[int, list[int]]]:
            ids = self.encode([(p, cont) for _, p, cont in batch])
            out = [(d, i) for (d, _, _), i in zip(batch, ids, strict=True)]
            batch.clear()
            return out

        for doc, piece in pieces:
            batch.append((doc, piece, doc == last))
            last = doc
            chars += len(piece)
            if len(batch) >= TOKENIZE_PIECES or chars >= TOKENIZE_CHARS:
                yield from flush()
                chars = 0
        yield from flush()


class _NotExact(RuntimeError):
    """A piece of a document does not tokenize after a newline as inside the document
    (raised only for tokenizers that failed the probe, or past what it probes)."""
