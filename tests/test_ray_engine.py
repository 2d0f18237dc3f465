"""The Ray engine on a local Ray of 2 CPUs, started once for the module: a Ray build equals
a local build, killed workers are retried and the add commits once, a killed driver
leaves the previous generation, a Ray neighbour set equals the local one.

Workers are killed through ``retrodb.shards.kill_hook``: a file ``arm-<point>`` in the
directory named by ``RETRODB_TEST_KILL_DIR`` makes the first worker that reaches the point
exit (and leaves ``fired-<point>``), so every kill happens once, at a known place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from retrodb import MismatchError, RetroDB, neighbours  # noqa: E402
from retrodb.ray_engine import RayEngine, local_ray_options  # noqa: E402
from retrodb.shards import KILL_DIR_ENV  # noqa: E402

from .conftest import SMALL  # noqa: E402

pytestmark = pytest.mark.slow
#: Encoder actors take half a CPU each, so the read and write tasks always get one.
ENGINE = RayEngine(workers=2, actor_cpus=0.5, shards=3, part_rows=16)
ROOT = Path(__file__).resolve().parents[1]
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "zo", "fi"]


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(n))


def write_inputs(root: Path, *, seed: int, files: int, lines: int) -> Path:
    """Text files and one JSONL file of distinct random words (no two chunks alike)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{seed}-{i:02d}.txt").write_text(_words(rng, int(rng.integers(5, 150))) + "\n")
    with open(root / f"z{seed}.jsonl", "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(json.dumps({"id": f"j{seed}-{i}", "text": _words(rng, 40)}) + "\n")
    return root


@pytest.fixture(scope="module")
def kill_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module")
def ray_address(kill_dir: Path) -> Iterator[str]:
    """One local Ray for the module, started as the engine starts one (the engine uses it:
    it is already connected)."""
    old = os.environ.get(KILL_DIR_ENV)
    os.environ[KILL_DIR_ENV] = str(kill_dir)  # workers inherit it from the raylet
    ray.init(**local_ray_options(2))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(KILL_DIR_ENV, None)
        else:
            os.environ[KILL_DIR_ENV] = old


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, ray_address: str, tiny_encoder_dir: Path
) -> dict[str, Path]:
    """The same inputs built locally and on Ray (with the local build's tokenizer)."""
    root = tmp_path_factory.mktemp("built")
    inputs = write_inputs(root / "inputs", seed=0, files=9, lines=5)
    more = write_inputs(root / "more", seed=1, files=4, lines=3)
    local = RetroDB.build(root / "local", [inputs], config=SMALL, encoder=tiny_encoder_dir)
    RetroDB.build(
        root / "ray",
        [inputs],
        config=SMALL,
        encoder=tiny_encoder_dir,
        tokenizer=local.path / "tokenizer.model",
        engine=ENGINE,
    )
    return {"inputs": inputs, "more": more, "local": local.path, "ray": root / "ray"}


def assert_same_database(a: RetroDB, b: RetroDB) -> None:
    """Same documents, chunks, token arrays and keys; vectors equal to float tolerance;
    the same known-item results."""
    ra, rb = a.keymap.live_rows(), b.keymap.live_rows()
    assert ra.doc_ids == rb.doc_ids
    assert (ra.keys == rb.keys).all() and (ra.doc == rb.doc).all()
    assert a.manifest.next_key == b.manifest.next_key
    ta, la = a.chunks(ra.keys)
    tb, lb = b.chunks(rb.keys)
    assert (ta == tb).all() and (la == lb).all()
    assert a.info()["tokens"] == b.info()["tokens"]

    def vectors(db: RetroDB) -> np.ndarray:
        seg, _ = db.locate(ra.keys)
        out = np.empty((ra.keys.size, db.dim), np.float32)
        for si in np.unique(seg):
            sel = seg == si
            out[sel] = db.indexes[int(si)].vectors(ra.keys[sel])
        return out

    assert np.allclose(vectors(a), vectors(b), atol=2e-3)
    probe = np.array([k for k, t in zip(ra.keys, a.decode(ra.keys), strict=True) if t.strip()])
    probe = probe[:: max(1, probe.size // 30)]
    texts = a.decode(probe)
    ka = a.search(texts, k=1).keys[:, 0]
    kb = b.search(texts, k=1).keys[:, 0]
    assert (ka == kb).all()
    assert (ka == probe).mean() > 0.9  # known items find themselves


def test_ray_build_equals_local_build(built: dict[str, Path]) -> None:
    local, rdb = RetroDB.open(built["local"]), RetroDB.open(built["ray"])
    assert len(local.segments) == 1 and len(rdb.segments) == 3
    metas = [s.meta for s in rdb.segments]
    assert [m.first_key for m in metas] == [0, metas[0].chunks, metas[0].chunks + metas[1].chunks]
    assert rdb.generation == 1
    assert_same_database(local, rdb)
    rep = rdb.verify()
    assert rep.ok and not rep.leftovers


def test_killed_workers_are_retried_and_the_add_commits_once(
    built: dict[str, Path], tmp_path: Path, kill_dir: Path
) -> None:
    local = RetroDB.open(shutil.copytree(built["local"], tmp_path / "local"))
    rdb = RetroDB.open(shutil.copytree(built["ray"], tmp_path / "ray"))
    for point in ("tokenize", "encode", "write"):
        (kill_dir / f"arm-{point}").touch()
    res = rdb.add([built["more"]], engine=ENGINE)
    for point in ("tokenize", "encode", "write"):
        assert (kill_dir / f"fired-{point}").exists(), f"no worker was killed at {point}"
        (kill_dir / f"fired-{point}").unlink()
    assert res.generation == 2 and len(res.segments) == 3
    assert sorted(p.name for p in (rdb.path / "manifests").iterdir()) == [
        "000001.json",
        "000002.json",
    ]
    local.add([built["more"]])
    assert_same_database(local, RetroDB.open(rdb.path))
    rep = rdb.verify()
    assert rep.ok and not rep.leftovers  # what the killed writer left was removed


def test_a_killed_driver_leaves_the_previous_generation(
    built: dict[str, Path], tmp_path: Path, ray_address: str
) -> None:
    """The driver is killed after every segment is written, just before its commit
    (failpoint before_manifest): nothing is committed, and verify --repair removes the
    segments it wrote."""
    db_path = shutil.copytree(built["ray"], tmp_path / "ray")
    before = RetroDB.open(db_path)
    env = {**os.environ, "RETRODB_FAILPOINT": "before_manifest:kill"}
    argv = [sys.executable, "-m", "retrodb_cli.main", "add", str(db_path), str(built["more"])]
    argv += ["--engine", "ray", "--ray-address", ray_address, "--quiet"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-3000:]
    after = RetroDB.open(db_path)
    assert after.generation == before.generation
    assert after.manifest == before.manifest
    assert after.keymap.live_rows().doc_ids == before.keymap.live_rows().doc_ids
    assert after.search(["ka lo mi"], k=2).keys.shape == (1, 2)
    rep = after.verify()
    assert rep.ok
    new = [Path(p) for p in rep.leftovers if Path(p).parent.name == "segments"]
    # The sealed, uncommitted segments: one per worker (the cluster's 2 CPUs).
    assert len(new) == 2 and all(p.name.startswith("000002-") for p in new)
    assert after.verify(repair=True).removed
    rep = after.verify()
    assert rep.ok and not rep.leftovers


def test_a_worker_error_arrives_as_the_retrodb_error_it_was(
    built: dict[str, Path], tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    """A worker that finds another tokenizer than the driver's refuses to tokenize; the
    caller gets that MismatchError (not Ray's wrapper), and nothing is committed."""
    from retrodb.tokenizer import Tokenizer

    db = RetroDB.open(shutil.copytree(built["ray"], tmp_path / "ray"))
    other = tmp_path / "other.model"
    Tokenizer.train(["alpha beta gamma delta " * 200], config=SMALL.tokenizer).save(other)
    shutil.copyfile(other, db.path / "tokenizer.model")  # what the workers will read
    with pytest.raises(MismatchError, match="another tokenizer than the driver"):
        db.add([built["more"]], engine=ENGINE)
    assert db.storage.current_name() == "000001.json"


def test_ray_neighbour_set_equals_the_local_one(
    built: dict[str, Path], tmp_path: Path, kill_dir: Path
) -> None:
    db = RetroDB.open(shutil.copytree(built["ray"], tmp_path / "ray"))
    local = neighbours.compute(db, "local", k=3, batch_size=8)
    (kill_dir / "arm-search").touch()
    ray_set = neighbours.compute(db, "ray", k=3, batch_size=8, engine=ENGINE)
    assert (kill_dir / "fired-search").exists(), "no searcher was killed"
    (kill_dir / "fired-search").unlink()
    assert ray_set.info.rows == local.info.rows
    assert (np.asarray(ray_set.keys) == np.asarray(local.keys)).all()
    assert np.allclose(np.asarray(ray_set.distances), np.asarray(local.distances))
    assert ray_set.info.segments == local.info.segments
    # a re-ranked set too: the searcher actors re-rank like the local searcher
    local_rr = neighbours.compute(db, "local-rr", k=2, rerank="overlap", fetch=3, batch_size=8)
    ray_rr = neighbours.compute(
        db, "ray-rr", k=2, rerank="overlap", fetch=3, batch_size=8, engine=ENGINE
    )
    assert ray_rr.info.rerank == "overlap" and ray_rr.info.fetch == 3
    assert (np.asarray(ray_rr.keys) == np.asarray(local_rr.keys)).all()
