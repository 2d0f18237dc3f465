"""Shared fixtures: tiny corpora made here, the test databases' configuration (SMALL), a
tiny tokenizer, and the encoders (a tiny random BERT for speed, the bundled
all-MiniLM-L6-v2 where quality matters)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from retrodb import RetroDB
from retrodb.config import ChunkConfig, DBConfig, TokenizerConfig
from retrodb.threads import THREADS_ENV, available_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.encoder_fixtures"]

#: The test databases' configuration: chunks of 16 tokens, a vocabulary of 400.
SMALL = DBConfig(chunk=ChunkConfig(chunk_size=16), tokenizer=TokenizerConfig(vocab_size=400))

TOPICS = {
    "files.txt": (
        "To open a file in Python, call open() with a path and a mode such as 'r' or 'w'. "
        "The with statement closes the file automatically when the block ends. "
        "Reading a file returns strings in text mode and bytes in binary mode. "
    ),
    "regex.md": (
        "Regular expressions are patterns that match text. The re module compiles a pattern "
        "and searches strings with it; groups capture parts of a match, and flags change how "
        "the pattern is interpreted. "
    ),
    "sorting.rst": (
        "Sorting a list in place uses list.sort(); the built-in sorted() returns a new list. "
        "A key function transforms each element before comparison, and reverse=True sorts "
        "in descending order. Sorting is stable. "
    ),
    "sub/threads.txt": (
        "Threads run concurrently inside one process and share memory. A lock protects shared "
        "state; a queue passes work between threads safely. The global interpreter lock lets "
        "one thread run Python bytecode at a time. "
    ),
}


def write_corpus(root: Path, docs: dict[str, str], repeat: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text((text * repeat).strip() + "\n", encoding="utf-8")
    return root


def copy_db(pristine: Path, dest: Path) -> Path:
    """A private copy of a database that a module built once (tests may write to it)."""
    shutil.copytree(pristine, dest)
    return dest


def pristine_db(name: str, write_inputs: Callable[[Path], Path]):
    """A module fixture: the path of a database (SMALL, the tiny encoder) built once per
    module from the folder that ``write_inputs(root)`` writes under a fresh temporary
    directory ``name``. Read only: tests copy it with :func:`copy_db`. The fixture takes the
    name it is assigned to (``pristine = pristine_db("rel", ...)``)."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> Path:
        root = tmp_path_factory.mktemp(name)
        RetroDB.build(root / "db", [write_inputs(root)], config=SMALL, encoder=tiny_encoder_dir)
        return root / "db"

    return fixture


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores for the encoder's threads
    (``RETRODB_THREADS``, inherited by the processes it starts), unless the caller set it:
    workers that each start a thread per core spin against each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and THREADS_ENV not in os.environ:
        os.environ[THREADS_ENV] = str(max(1, available_cores() // int(workers)))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own cache (the encoder store, fp16 models), never the user's; child
    processes inherit it."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("RETRODB_CACHE_DIR")
    os.environ["RETRODB_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RETRODB_CACHE_DIR", None)
    else:
        os.environ["RETRODB_CACHE_DIR"] = old


@pytest.fixture
def torch_one_thread():
    """One torch thread for tiny models: they gain nothing from threads, and on a busy
    machine the OpenMP barriers of a second thread make small ops many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", TOPICS)


ASYNCIO = {
    "asyncio.txt": (
        "An event loop runs coroutines: async def defines one, await suspends it until "
        "a future completes, and asyncio.run starts the loop. "
    ),
}


@pytest.fixture
def more_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "more", ASYNCIO)


#: Modules that wait longest on other processes (pip, a Ray cluster, ONNX exports, kill -9
#: children). They start first, so that under pytest-xdist the other workers fill that time
#: with the rest rather than idling at the end.
START_FIRST = ("test_install.py", "test_ray_engine.py", "test_export.py", "test_reliability.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(START_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
