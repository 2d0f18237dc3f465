"""Training: the loop overfits a tiny corpus, checkpoints hold what they promise, resume
equals an uninterrupted run, retrofit trains only CCA and the encoder, a tokenizer mismatch
is refused, and a 2-process DDP run on CPU (torchrun, gloo) trains and checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from retrodb_cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrodb import RetroDB
from retrodb.errors import BadInputError, MismatchError
from retrodb.neighbours import NeighbourSet
from retrodb_model.checkpoint import load_model, read_checkpoint
from retrodb_model.train import TrainArgs, iter_log, lr_at, train

from .conftest import TOPICS, write_corpus
from .test_neighbours import SMALL, build_db

SEQ = 64  # 4 chunks of 16 (the test databases' chunk size)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> RetroDB:
    db = build_db(tmp_path_factory.mktemp("train"), tiny_encoder_dir, n=12, seed=1)
    NeighbourSet.compute(db, "train", k=2, exact=True)
    return db


def args_for(db: RetroDB, out: Path, **kw: object) -> TrainArgs:
    base: dict = dict(
        db=str(db.path),
        neighbours="train",
        out=str(out),
        preset="tiny",
        steps=6,
        seq_len=SEQ,
        batch_size=4,
        lr=3e-3,
        log_every=2,
        eval_every=3,
        eval_batches=2,
        val_fraction=0.25,
        threads=1,
    )
    base.update(kw)
    return TrainArgs(**base)  # type: ignore[arg-type]


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    a = TrainArgs(db="x", neighbours="n", out="o", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, a) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(100, a) == pytest.approx(0.1)


def test_tiny_model_overfits_a_tiny_corpus(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", TOPICS, repeat=3)
    db = RetroDB.build(tmp_path / "db", [corpus], config=SMALL, encoder=tiny_encoder_dir)
    NeighbourSet.compute(db, "train", k=2, exact=True)
    args = args_for(db, tmp_path / "run", steps=200, log_every=20, eval_every=0, val_fraction=0.0)
    hist = train(args)["history"]
    first, last = hist[0]["bpb"], hist[-1]["bpb"]
    assert last < 0.2 and last < 0.1 * first, (first, last)
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in hist)


def test_checkpoint_files_log_and_metadata(tiny_db: RetroDB, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(args_for(tiny_db, out))
    names = {"model.safetensors", "config.json", "optimizer.pt", "state.json", "db.json"}
    assert names <= {p.name for p in out.iterdir()}
    ck = read_checkpoint(out)
    assert ck.step == 6 and ck.retrieval and ck.config.chunk_size == tiny_db.chunk_size
    assert ck.train_args["steps"] == 6 and ck.train_args["preset"] == "tiny"
    info = json.loads((out / "db.json").read_text())
    assert info["tokenizer_fingerprint"] == tiny_db.manifest.tokenizer["fingerprint"]
    assert info["encoder_fingerprint"] == tiny_db.manifest.encoder["fingerprint"]
    assert (info["chunk_size"], info["k"], info["neighbour_set"]) == (16, 2, "train")
    log = list(iter_log(out))
    assert [r["step"] for r in log] == [2, 4, 6]
    assert {"step", "loss", "bpb", "lr", "tokens_per_s"} <= set(log[0])
    assert "val_bpb" in log[-1] and log[-1]["val_bpb"] is not None  # validated at the end
    # the tied head is stored once; the loaded model is the trained one
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    model, _ = load_model(out, db=tiny_db)
    assert not model.training
    # a second run into the same directory must be asked for
    with pytest.raises(BadInputError, match="--resume"):
        train(args_for(tiny_db, out))


def test_resume_equals_an_uninterrupted_run(tiny_db: RetroDB, tmp_path: Path) -> None:
    full = train(args_for(tiny_db, tmp_path / "full", steps=6))

    def interrupt(record: dict) -> None:  # Ctrl-C after step 4: the run saves, then stops
        if record.get("step") == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(args_for(tiny_db, tmp_path / "part", steps=6), log=interrupt)
    assert read_checkpoint(tmp_path / "part").step == 4
    resumed = train(args_for(tiny_db, tmp_path / "part", steps=6, resume=True))
    assert resumed["step"] == 6
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in full["history"]] == [r["loss"] for r in resumed["history"]]
    assert [r["step"] for r in iter_log(tmp_path / "part")] == [2, 4, 6]


def test_no_retrieval_run_leaves_encoder_and_cca_untouched(
    tiny_db: RetroDB, tmp_path: Path
) -> None:
    out = tmp_path / "plain"
    torch.manual_seed(0)
    state = train(args_for(tiny_db, out, no_retrieval=True))
    assert state["trainable_fraction"] < 1.0
    model, ck = load_model(out)
    assert not ck.retrieval
    torch.manual_seed(0)  # the run's seed: the same initial weights
    fresh = type(model)(ck.config)
    for name, p in model.encoder.state_dict().items():
        torch.testing.assert_close(p, fresh.encoder.state_dict()[name], msg=name)


def test_retrofit_trains_only_cca_and_encoder(tiny_db: RetroDB, tmp_path: Path) -> None:
    base = tmp_path / "base"
    train(args_for(tiny_db, base, no_retrieval=True))
    out = tmp_path / "retrofit"
    state = train(args_for(tiny_db, out, retrofit=str(base), steps=4, lr=1e-2))
    assert 0 < state["trainable_fraction"] < 1
    before, _ = load_model(base)
    after, _ = load_model(out)
    ids = {id(p) for mod in after.retrieval_modules() for p in mod.parameters()}
    retrieval = {n for n, p in after.named_parameters() if id(p) in ids}
    sb, sa = before.state_dict(), after.state_dict()
    changed = {n for n in sa if not torch.equal(sa[n], sb[n])}
    assert changed and changed <= retrieval, sorted(changed - retrieval)[:5]
    assert any(n.startswith("encoder.") for n in changed)
    assert any(".cca." in n for n in changed)
    # a base trained with retrieval is refused
    with pytest.raises(BadInputError, match="no-retrieval"):
        train(args_for(tiny_db, tmp_path / "again", retrofit=str(out)))


def test_a_database_with_another_tokenizer_is_refused(
    tiny_db: RetroDB, tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    out = tmp_path / "run"
    train(args_for(tiny_db, out, steps=2))
    other = build_db(tmp_path / "other", tiny_encoder_dir, n=6, seed=7)
    assert other.manifest.tokenizer["fingerprint"] != tiny_db.manifest.tokenizer["fingerprint"]
    with pytest.raises(MismatchError, match="tokenizer"):
        load_model(out, db=other)
    res = CliRunner().invoke(
        app, ["generate", str(out), str(other.path), "ka lo", "-n", "2"], catch_exceptions=False
    )
    assert res.exit_code == 1 and "tokenizer" in res.output


def test_cli_train_prints_log_lines(tiny_db: RetroDB, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        [
            "train", str(tiny_db.path), "--neighbours", "train", "--out", str(out),
            "--preset", "tiny", "--steps", "4", "--seq-len", str(SEQ), "--log-every", "2",
            "--val-fraction", "0.25", "--threads", "1",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "step      2" in res.output and "tok/s" in res.output and "val_bpb" in res.output
    assert read_checkpoint(out).step == 4
    bad = CliRunner().invoke(
        app,
        ["train", str(tiny_db.path), "-n", "train", "-o", str(tmp_path / "x"), "--seq-len", "60",
         "--preset", "tiny"],
    )  # fmt: skip
    assert bad.exit_code == 1 and "multiple of the chunk size" in bad.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny_db: RetroDB, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "retrodb_cli.main", "train", str(tiny_db.path), "--neighbours", "train",
        "--out", str(out), "--preset", "tiny", "--steps", "4", "--seq-len", str(SEQ),
        "--batch-size", "2", "--log-every", "2", "--val-fraction", "0.25", "--threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("step      4") == 1  # only rank 0 prints and writes
    ck = read_checkpoint(out)
    assert ck.step == 4 and ck.state["world_size"] == 2
    assert ck.state["tokens"] == 4 * 2 * 2 * SEQ  # global: steps x batch x ranks x L
    model, _ = load_model(out, db=tiny_db)
    batch = torch.randint(0, 100, (1, SEQ))
    assert torch.isfinite(model(batch)[0]).all()
