"""Training: the loop overfits a tiny corpus, checkpoints hold what they promise, resume
equals an uninterrupted run (with DataLoader workers too), retrofit trains only CCA and
the encoder, a tokenizer mismatch is refused, a run that fails validation writes nothing,
Ctrl-C says what it saved, the CLI options are TrainArgs', the default thread rule, and a
2-process DDP run on CPU (torchrun, gloo) trains and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrodb import RetroDB, neighbours
from retrodb.errors import BadInputError, MismatchError, NotFoundError
from retrodb.threads import THREADS_ENV
from retrodb_cli import model as cli_model
from retrodb_cli.main import app
from retrodb_model.checkpoint import load_model, read_checkpoint
from retrodb_model.config import RetroConfig, default_lr
from retrodb_model.data import RetroDataset
from retrodb_model.model import RetroModel
from retrodb_model.options import parse_model_overrides
from retrodb_model.threads import RULE, default_threads
from retrodb_model.train import (
    TrainArgs,
    Trainer,
    TrainingInterrupted,
    _Dist,
    distractor_rows,
    iter_log,
    lr_at,
    train,
)

from .conftest import SMALL, TOPICS, write_corpus
from .test_neighbours import build_db, build_trained_db

SEQ = 64  # 4 chunks of 16 (the test databases' chunk size)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> RetroDB:
    return build_trained_db(tmp_path_factory.mktemp("train"), tiny_encoder_dir, n=12, seed=1)


@pytest.fixture(scope="module")
def full_run(tiny_db: RetroDB) -> tuple[Path, dict]:
    """A finished 6-step run with retrieval (read only: copy it to continue it)."""
    out = tiny_db.path.parent / "full"
    return out, train(args_for(tiny_db, out))


@pytest.fixture(scope="module")
def plain_run(tiny_db: RetroDB) -> tuple[Path, dict]:
    """A finished 6-step --no-retrieval run (read only)."""
    out = tiny_db.path.parent / "plain"
    torch.manual_seed(0)
    return out, train(args_for(tiny_db, out, no_retrieval=True))


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


def test_default_lr_scales_with_width_and_is_recorded(tiny_db: RetroDB, tmp_path: Path) -> None:
    assert default_lr(64) == pytest.approx(3e-3) and default_lr(32) == pytest.approx(3e-3)
    assert default_lr(384) == pytest.approx(1.02e-3, rel=0.01)
    assert default_lr(896) == pytest.approx(6.2e-4, rel=0.01)
    out = tmp_path / "run"
    train(args_for(tiny_db, out, lr=None, steps=2))
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == pytest.approx(default_lr(saved["model"]["dim"]))


@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_corpus(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", TOPICS, repeat=3)
    db = RetroDB.build(tmp_path / "db", [corpus], config=SMALL, encoder=tiny_encoder_dir)
    neighbours.compute(db, "train", k=2, exact=True)
    args = args_for(
        db, tmp_path / "run", steps=120, lr=5e-3, log_every=10, eval_every=0, val_fraction=0.0
    )
    hist = train(args)["history"]  # measured: bpb 3.92 -> 0.08 (200 steps at 3e-3: 0.025)
    first, last = hist[0]["bpb"], hist[-1]["bpb"]
    assert last < 0.2 and last < 0.1 * first, (first, last)
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in hist)


def test_checkpoint_files_log_and_metadata(tiny_db: RetroDB, full_run: tuple) -> None:
    out, _ = full_run
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


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_equals_an_uninterrupted_run(
    tiny_db: RetroDB, full_run: tuple, tmp_path: Path, workers: int
) -> None:
    full_dir, full = full_run

    def interrupt(record: dict) -> None:  # Ctrl-C after step 4: the run saves, then stops
        if record.get("step") == 4:
            raise KeyboardInterrupt

    # with workers, a DataLoader worker process fetches the batches (and runs ahead)
    with pytest.raises(TrainingInterrupted) as info:
        train(args_for(tiny_db, tmp_path / "part", workers=workers), log=interrupt)
    assert isinstance(info.value, KeyboardInterrupt)  # what a caller catching Ctrl-C sees
    assert (info.value.step, info.value.saved, info.value.checkpoint) == (4, 4, 4)
    assert read_checkpoint(tmp_path / "part").step == 4
    resumed = train(args_for(tiny_db, tmp_path / "part", resume=True, workers=workers))
    assert resumed["step"] == 6
    a = load_file(str(full_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in full["history"]] == [r["loss"] for r in resumed["history"]]
    assert [r["step"] for r in iter_log(tmp_path / "part")] == [2, 4, 6]


def test_a_moved_checkpoint_resumes_where_it_lies(tiny_db: RetroDB, tmp_path: Path) -> None:
    def interrupt(record: dict) -> None:
        if record.get("step") == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(args_for(tiny_db, tmp_path / "first"), log=interrupt)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "first", moved)
    state = train(args_for(tiny_db, moved, resume=True))
    assert state["step"] == 6 and read_checkpoint(moved).step == 6
    assert not (tmp_path / "first").exists()  # nothing written to the old place
    assert json.loads((moved / "config.json").read_text())["train"]["out"] == str(moved)
    assert [r["step"] for r in iter_log(moved)] == [2, 4, 6]


def test_no_retrieval_run_leaves_encoder_and_cca_untouched(plain_run: tuple) -> None:
    out, state = plain_run
    assert state["trainable_fraction"] < 1.0
    model, ck = load_model(out)
    assert not ck.retrieval
    torch.manual_seed(0)  # the run's seed: the same initial weights
    fresh = type(model)(ck.config)
    for name, p in model.encoder.state_dict().items():
        torch.testing.assert_close(p, fresh.encoder.state_dict()[name], msg=name)


def test_retrofit_trains_only_cca_and_encoder(
    tiny_db: RetroDB, plain_run: tuple, tmp_path: Path
) -> None:
    base, _ = plain_run
    out = tmp_path / "retrofit"
    # the retrieval modules' fields may be chosen (not the default gate here); others not
    choice = {"cca_overlap_gate": "run", "dim": 999}
    state = train(args_for(tiny_db, out, retrofit=str(base), steps=4, lr=1e-2, model=choice))
    assert 0 < state["trainable_fraction"] < 1
    _, ck = load_model(out)
    assert ck.config.cca_null and ck.config.cca_overlap_gate == "run"
    assert ck.config.dim == 64
    assert ck.config.enc_input == "norm" and ck.config.cca_position_bias
    before, _ = load_model(base)
    after, _ = load_model(out)
    ids = {id(p) for mod in after.retrieval_modules() for p in mod.parameters()}
    retrieval = {n for n, p in after.named_parameters() if id(p) in ids}
    sb, sa = before.state_dict(), after.state_dict()
    changed = {n for n in sa if n not in sb or not torch.equal(sa[n], sb[n])}
    assert changed and changed <= retrieval, sorted(changed - retrieval)[:5]
    assert any(n.startswith("encoder.") for n in changed)
    assert any(".cca." in n for n in changed)
    # a base trained with retrieval is refused
    with pytest.raises(BadInputError, match="no-retrieval"):
        train(args_for(tiny_db, tmp_path / "again", retrofit=str(out)))


def test_a_database_with_another_tokenizer_is_refused(
    tiny_db: RetroDB, full_run: tuple, tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    out, _ = full_run
    other = build_db(tmp_path / "other", tiny_encoder_dir, n=6, seed=7)
    assert other.manifest.tokenizer["fingerprint"] != tiny_db.manifest.tokenizer["fingerprint"]
    with pytest.raises(MismatchError, match="tokenizer"):
        load_model(out, db=other)
    res = CliRunner().invoke(
        app, ["generate", str(out), str(other.path), "ka lo", "-n", "2"], catch_exceptions=False
    )
    assert res.exit_code == 1 and "tokenizer" in res.output
    # a retrofit from a base trained on another tokenizer fails before writing anything
    neighbours.compute(other, "train", k=2, exact=True)
    with pytest.raises(MismatchError, match="tokenizer"):
        train(args_for(other, tmp_path / "never", retrofit=str(out)))
    assert not (tmp_path / "never").exists()


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


@pytest.mark.parametrize(
    "change, error",
    [
        ({"neighbours": "no-such-set"}, NotFoundError),
        ({"seq_len": SEQ + 8}, BadInputError),  # not a multiple of the chunk size 16
        ({"model": {"chunk_size": 8}}, MismatchError),
        ({"batch_size": 1000}, BadInputError),  # fewer sequences than one batch
        ({"retrofit": "no-such-checkpoint"}, NotFoundError),
    ],
)
def test_a_run_that_fails_validation_writes_nothing(
    tiny_db: RetroDB, tmp_path: Path, change: dict, error: type
) -> None:
    out = tmp_path / "out"
    with pytest.raises(error):
        train(args_for(tiny_db, out, **change))
    assert not out.exists()


def test_cli_bad_arguments_leave_no_out_folder(tiny_db: RetroDB, tmp_path: Path) -> None:
    base = ["train", str(tiny_db.path), "-n", "train", "--preset", "tiny", "--threads", "1"]
    for extra in (["--seq-len", "60"], ["-n", "missing"], ["--log-every", "0"]):
        out = tmp_path / "x"
        res = CliRunner().invoke(app, [*base, "-o", str(out), *extra])
        assert res.exit_code == 1 and res.output.startswith("error:"), (extra, res.output)
        assert not out.exists(), extra


def test_cli_interrupt_says_what_was_saved(
    tiny_db: RetroDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = cli_model._print_record

    def ctrl_c_after_step_2(record: dict) -> None:
        printed(record)
        if record.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_model, "_print_record", ctrl_c_after_step_2)
    out = tmp_path / "cli"
    args = ["train", str(tiny_db.path), "-n", "train", "-o", str(out), "--preset", "tiny"]
    args += ["--steps", "6", "--seq-len", str(SEQ), "--log-every", "2", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    assert "nothing was committed" not in res.output
    assert f"interrupted after step 2: saved it in {out}" in res.output
    assert read_checkpoint(out).step == 2

    # interrupted again before a step completes: nothing new is saved, and it says so
    def ctrl_c(record: dict) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_model, "_print_record", ctrl_c)
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 130 and "saved it" not in res.output
    assert f"interrupted at step 2: {out} holds its checkpoint" in res.output
    assert read_checkpoint(out).step == 2


def test_cli_options_are_the_train_args() -> None:
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    for f in dataclasses.fields(TrainArgs):
        assert f.name in params, f"TrainArgs.{f.name} has no option"
        assert params[f.name].help, f"TrainArgs.{f.name} has no help"
        if f.default is not dataclasses.MISSING:
            want = list(f.default) if isinstance(f.default, tuple) else f.default
            got = params[f.name].default
            assert (list(got) if isinstance(got, tuple) else got) == want, f.name
    assert set(params) == {f.name for f in dataclasses.fields(TrainArgs)}
    spelled = {name for p in command.params for name in p.opts}
    for flag in ["--steps", "--seq-len", "--batch-size", "-b", "--lr", "--warmup", "--dtype",
                 "--eval-every", "--eval-batches", "--log-every", "--save-every", "--threads",
                 "--resume", "--no-retrieval", "--retrofit", "--preset", "--val-fraction",
                 "-k", "--model", "--neighbours", "-n", "--out", "-o", "--weight-decay",
                 "--grad-clip", "--seed", "--workers", "--min-lr-ratio", "--betas"]:  # fmt: skip
        assert flag in spelled, flag
    assert RULE in " ".join(params["threads"].help.split())
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "<bool>" not in help_text and "{db}" not in help_text
    assert "Usage: retrodb train [OPTIONS] DB" in help_text
    for name in ("evaluate", "generate"):
        text = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
        assert "<bool>" not in text and "{" not in text and "DB" in text, name
        assert RULE in " ".join(text.replace("│", " ").split()), name


def test_the_cli_starts_without_torch() -> None:
    """The train options come from TrainArgs, which must not pull torch into every command."""
    code = "import sys, retrodb_cli.main; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_overrides_parse_key_value_and_json() -> None:
    parse = parse_model_overrides
    assert parse(["dropout=0.1", "n_layers=2", 'retro_layers=[1, 2]', "x=abc"]) == {
        "dropout": 0.1, "n_layers": 2, "retro_layers": [1, 2], "x": "abc"
    }  # fmt: skip
    assert parse(['{"dropout": 0.2}', "dropout=0.3"]) == {"dropout": 0.3}
    assert parse(None) == {}
    for bad in (["dropout"], ["{not json"], ["=1"]):
        with pytest.raises(BadInputError):
            parse(bad)


def test_default_threads_count_the_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert default_threads(cores=2, load=0.0) == 2  # an idle 2-core machine
    assert default_threads(cores=2, load=0.4) == 2
    assert default_threads(cores=2, load=0.6) == 1  # one core already busy
    assert default_threads(cores=2, load=9.3) == 1  # oversubscribed: never below 1
    assert default_threads(cores=16, load=3.0) == 13
    assert default_threads(2, cores=16, load=3.0) == 6  # torchrun: 2 local processes
    assert default_threads(4, cores=2, load=0.0) == 1
    assert 1 <= default_threads() <= (os.cpu_count() or 1)
    monkeypatch.setenv(THREADS_ENV, "3")  # what the user says wins, per process
    assert default_threads(cores=2, load=9.3) == 3
    assert default_threads(2, cores=16, load=0.0) == 3
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(BadInputError, match=THREADS_ENV):
        default_threads()


def test_config_for_database_fits_its_chunks_vocabulary_and_k(tiny_db: RetroDB) -> None:
    cfg = RetroConfig.for_database(tiny_db, "tiny", k=3, seq_len=512)
    assert cfg.chunk_size == tiny_db.chunk_size == 16
    assert cfg.vocab_size == tiny_db.tokenizer.vocab_size
    assert cfg.num_neighbours == 3 and cfg.max_seq_len == 512
    assert RetroConfig.for_database(str(tiny_db.path), "tiny", dropout=0.1).dropout == 0.1
    with pytest.raises(MismatchError, match="chunk_size 8"):
        RetroConfig.for_database(tiny_db, "tiny", chunk_size=8)
    # the obvious model over a database's batches runs (preset("tiny") has chunks of 8)
    model = RetroModel(cfg)
    batch = RetroDataset(tiny_db, "train", seq_len=SEQ).batch([0, 1])
    _, loss = model(batch["tokens"][:, :-1], batch["retrieved"], batch["retrieved_mask"],
                    batch["targets"])  # fmt: skip
    assert loss is not None and torch.isfinite(loss)


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


def test_distractor_rows_are_drawn_per_step_and_never_their_own_donor() -> None:
    draws = [distractor_rows(4, 0.5, seed=0, step=s) for s in range(400)]
    assert 0.4 < sum(len(rows) for rows, _ in draws) / 1600 < 0.6
    for rows, donors in draws:
        assert len(rows) == len(donors) and bool((rows != donors).all())
        assert bool(((donors >= 0) & (donors < 4)).all())
    again = distractor_rows(4, 0.5, seed=0, step=7)  # a resumed run draws the same
    assert all(torch.equal(a, b) for a, b in zip(again, draws[7], strict=True))
    assert not any(len(distractor_rows(4, 0.0, seed=0, step=s)[0]) for s in range(50))
    with pytest.raises(BadInputError, match="batch-size 2"):
        TrainArgs(db="d", neighbours="n", out="o", distractors=0.25, batch_size=1)
    with pytest.raises(BadInputError, match="distractors"):
        TrainArgs(db="d", neighbours="n", out="o", distractors=1.0)


def test_distracted_rows_are_trained_toward_the_prediction_without_retrieval(
    tiny_db: RetroDB, tmp_path: Path
) -> None:
    trainer = Trainer.setup(args_for(tiny_db, tmp_path / "d", distractors=0.5), _Dist(), print)
    trainer.model.eval()  # no dropout: the two computations below see the same model
    torch.manual_seed(0)
    with torch.no_grad():  # CCA starts as a no-op: give retrieval something to change
        for module in trainer.model.retrieval_modules():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    batch = next(iter(trainer.loader))
    rows, donors, kept = torch.tensor([0, 2]), torch.tensor([3, 1]), torch.tensor([1, 3])
    loss, lm_loss, targets = trainer._forward_distracted(batch, rows, donors)

    tokens, t = batch["tokens"][:, :-1], batch["targets"]
    retrieved, mask = batch["retrieved"].clone(), batch["retrieved_mask"].clone()
    retrieved[rows], mask[rows] = batch["retrieved"][donors], batch["retrieved_mask"][donors]
    with torch.no_grad():
        on, _ = trainer.model(tokens, retrieved, mask)
        off, _ = trainer.model(tokens[rows])
    real = t != -100
    ce = F.cross_entropy(on[kept].flatten(0, 1), t[kept].flatten(), reduction="sum")
    kl = F.kl_div(on[rows].log_softmax(-1), off.log_softmax(-1), log_target=True, reduction="none")
    kl = (kl.sum(-1) * real[rows]).sum()
    assert kl > 1e-4  # the donor's neighbours move this model's prediction
    torch.testing.assert_close(loss.detach(), (ce + kl) / real.sum())
    torch.testing.assert_close(lm_loss, ce / real[kept].sum())
    assert bool((targets[rows] == -100).all()) and torch.equal(targets[kept], t[kept])


def test_a_run_with_distractors_logs_their_kl_and_resumes_exactly(
    tiny_db: RetroDB, tmp_path: Path
) -> None:
    full = train(args_for(tiny_db, tmp_path / "full", distractors=0.5))
    kls = [r["distractor_kl"] for r in full["history"]]
    assert all(kl is not None and kl > -1e-6 for kl in kls) and max(kls) > 0  # rounding

    def interrupt(record: dict) -> None:
        if record.get("step") == 4:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train(args_for(tiny_db, part, distractors=0.5), log=interrupt)
    train(args_for(tiny_db, part, distractors=0.5, resume=True))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
