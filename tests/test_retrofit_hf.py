"""RETRO-fitting a pretrained decoder loaded through transformers: tiny random Llama and
GPT-2 models built by the tests (no weights are downloaded). With retrieval off the
retrofit is its base exactly; it is causal; cached generation equals the full forward;
training leaves the base bit-identical; a checkpoint opens only on its own base; a
database with another tokenizer is refused."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from retrodb import RetroDB, neighbours
from retrodb.errors import BadInputError, MismatchError
from retrodb_model.checkpoint import load_model, read_checkpoint
from retrodb_model.config import TrainArgs
from retrodb_model.evaluate import evaluate_checkpoint
from retrodb_model.generate import generate
from retrodb_model.hf import (
    RetrofitModel,
    base_fingerprint,
    config_for_base,
    is_base_path,
    load_base,
)
from retrodb_model.train import train

from .conftest import SMALL
from .test_neighbours import random_docs, write_docs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

VOCAB = 96
M = 8  # chunk size of the model-level tests


def tiny_llama(vocab: int = VOCAB, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int = VOCAB, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def retrofit(base: Any, **overrides: Any) -> RetrofitModel:
    cfg = config_for_base(base, chunk_size=M, k=2, retro_layers=(2, 4), enc_dim=16, **overrides)
    return RetrofitModel(cfg, base)


def trained(model: RetrofitModel, seed: int = 1) -> RetrofitModel:
    """Give every CCA a non-zero output projection (as training does)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.cca.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def batch(seed: int = 0, T: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, T), generator=g)
    retrieved = torch.randint(0, VOCAB, (2, T // M, 2, 2 * M), generator=g)
    return tokens, retrieved


@pytest.mark.parametrize("kind", sorted(BASES))
def test_retrieval_off_and_initial_retrofit_are_the_base_exactly(kind: str) -> None:
    base = BASES[kind]()
    model = retrofit(base)
    tokens, retrieved = batch()
    with torch.no_grad():
        ref = base(input_ids=tokens).logits
        assert torch.equal(model(tokens)[0], ref)
        assert torch.equal(model(tokens, retrieved)[0], ref)  # CCA starts at zero
        trained(model)
        assert torch.equal(model(tokens)[0], ref)
        assert not torch.equal(model(tokens, retrieved)[0], ref)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_retrofit_is_causal(kind: str) -> None:
    model = trained(retrofit(BASES[kind]()))
    tokens, retrieved = batch()
    changed = tokens.clone()
    changed[:, 29] = (changed[:, 29] + 1) % VOCAB
    later = retrieved.clone()
    later[:, 29 // M + 1 :] = (later[:, 29 // M + 1 :] + 1) % VOCAB  # chunks after 29's
    with torch.no_grad():
        a = model(tokens, retrieved)[0]
        b = model(changed, later)[0]
    assert torch.equal(a[:, :29], b[:, :29])
    assert not torch.equal(a[:, 29:], b[:, 29:])


@pytest.mark.parametrize(
    ("kind", "copy"), [(kind, False) for kind in sorted(BASES)] + [("llama", True)]
)
def test_cached_steps_equal_the_full_forward(kind: str, copy: bool) -> None:
    model = trained(retrofit(BASES[kind](), cca_copy_bias=copy))
    tokens, retrieved = batch(T=48)
    if copy:  # neighbour 0 of chunk u is the text from chunk u on: long common runs
        for u in range(retrieved.shape[1]):
            piece = tokens[:, u * M : u * M + 2 * M]
            retrieved[:, u, 0, : piece.shape[1]] = piece
    with torch.no_grad():
        full = model(tokens, retrieved)[0]
        cache = model.new_cache(2, max_len=64)
        outs, pos = [], 0
        for step in (5, 7, 1, 3, 12, 1, 11, 8):
            c, done = cache.chunks_completed_by(step), cache.completed_chunks
            r = retrieved[:, done : done + c] if c else None
            outs.append(model.forward_step(tokens[:, pos : pos + step], cache, r))
            pos += step
        off = model.new_cache(2, retrieval=False, max_len=64)
        plain = torch.cat(
            [model.forward_step(tokens[:, :20], off), model.forward_step(tokens[:, 20:], off)], 1
        )
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, model(tokens)[0], rtol=1e-5, atol=1e-5)


def test_training_steps_leave_the_base_unchanged() -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = retrofit(base).train()
    trainable, total = model.freeze_for_retrofit()
    assert 0 < trainable < total
    assert not base.training  # dropout of the base stays off
    opt = model.configure_optimizer(0.1, 1e-2)
    cca0 = {k: v.clone() for k, v in model.cca.state_dict().items()}
    for seed in range(3):
        tokens, retrieved = batch(seed)
        _, loss = model(tokens[:, :-1], retrieved[:, : 39 // M], None, tokens[:, 1:])
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.grad is None for p in base.parameters())
    assert any(not torch.equal(cca0[k], v) for k, v in model.cca.state_dict().items())


def test_config_keeps_the_base_shape() -> None:
    base = tiny_llama()
    with pytest.raises(BadInputError, match="dim"):
        config_for_base(base, chunk_size=M, k=2, dim=64)
    cfg = config_for_base(base, chunk_size=M, k=2)
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size) == (32, 4, VOCAB)


def test_a_gguf_without_the_gguf_package_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real = builtins.__import__

    def no_gguf(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(BadInputError, match=r"retrodb\[hf\]"):
        load_base(path)


# ---------------------------------------------------------------- with a database


def _bpe(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (the GPT-2 / SmolLM kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> dict[str, Any]:
    """A tiny Llama saved as a Hugging Face folder with its own byte-level BPE tokenizer, a
    database built with that tokenizer and a neighbour set; and a second folder, the same
    model with another tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    docs = random_docs(12, seed=3, prefix="doc")
    corpus = write_docs(root / "corpus", docs)
    tok = _bpe(list(docs.values()), 300)
    base_dir = root / "base"
    tiny_llama(tok.get_vocab_size()).save_pretrained(base_dir)
    tok.save(str(base_dir / "tokenizer.json"))
    other_dir = root / "other"
    tiny_llama(tok.get_vocab_size()).save_pretrained(other_dir)
    _bpe(list(docs.values())[:3], 280).save(str(other_dir / "tokenizer.json"))
    db = RetroDB.build(
        root / "db", [corpus], config=SMALL, encoder=tiny_encoder_dir, tokenizer=base_dir
    )
    neighbours.compute(db, "train", k=2, exact=True)
    return {"root": root, "base": base_dir, "other": other_dir, "db": db, "corpus": corpus}


def _args(setup: dict[str, Any], out: Path, **kw: Any) -> TrainArgs:
    args: dict[str, Any] = dict(
        db=str(setup["db"].path),
        neighbours="train",
        out=str(out),
        retrofit=str(setup["base"]),
        model={"retro_layers": [2, 4], "enc_dim": 16},
        steps=4,
        seq_len=32,
        batch_size=2,
        lr=1e-2,
        log_every=2,
        eval_every=0,
        eval_batches=1,
        val_fraction=0.25,
        threads=1,
    )
    args.update(kw)
    return TrainArgs(**args)


def test_train_evaluate_generate_a_retrofit_of_a_hf_folder(hf_setup: dict[str, Any]) -> None:
    base_dir: Path = hf_setup["base"]
    db: RetroDB = hf_setup["db"]
    assert is_base_path(base_dir) and db.manifest.tokenizer.get("kind") == "huggingface"
    weights = base_fingerprint(base_dir)
    out = hf_setup["root"] / "rf"
    state = train(_args(hf_setup, out))
    assert state["step"] == 4 and 0 < state["trainable_fraction"] < 1
    assert base_fingerprint(base_dir) == weights  # the base's files are untouched
    ckpt = read_checkpoint(out)
    assert ckpt.base is not None and ckpt.base["sha256"] == weights
    stored = json.loads((out / "config.json").read_text())["base"]
    assert stored["path"] == str(base_dir.resolve())
    from safetensors.torch import load_file

    names = load_file(str(out / "model.safetensors")).keys()
    assert names and not any(n.startswith("base.") for n in names)  # only what was trained

    # the checkpoint opens on its base; its weights equal the base's
    model, _ = load_model(out, db=db)
    plain = load_base(base_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.base.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    # evaluate: the retrofit with retrieval off and the bare base score the same bpb
    rf = evaluate_checkpoint(out, db, [hf_setup["corpus"]], _eval_args())
    bare = evaluate_checkpoint(base_dir, db, [hf_setup["corpus"]], _eval_args())
    assert set(bare.bpb) == {"no_retrieval"}
    assert rf.bpb["no_retrieval"] == pytest.approx(bare.bpb["no_retrieval"], abs=1e-9)
    assert rf.bpb["retrieval"] is not None
    # generation: cached equals uncached, with retrieval, and the neighbours are shown
    text = (hf_setup["corpus"] / "doc00.txt").read_text()[:120]
    streamed: list[str] = []
    a = generate(model, db, text, max_tokens=12, temperature=0.0, on_text=streamed.append)
    b = generate(model, db, text, max_tokens=12, temperature=0.0, use_cache=False)
    assert a.tokens == b.tokens and a.retrievals
    assert "".join(streamed) == a.text
    # resuming continues on the same base
    more = train(_args(hf_setup, out, steps=6, resume=True))
    assert more["step"] == 6


def _eval_args() -> Any:
    from retrodb_model.config import EvalArgs

    return EvalArgs(seq_len=32, max_tokens=64, exclude_self=True)


def test_a_retrofit_refuses_a_database_with_another_tokenizer(hf_setup: dict[str, Any]) -> None:
    out = hf_setup["root"] / "never"
    with pytest.raises(MismatchError, match="tokenizer") as info:
        train(_args(hf_setup, out, retrofit=str(hf_setup["other"])))
    assert "\n" not in str(info.value)
    assert not out.exists()
    with pytest.raises(MismatchError, match="tokenizer"):
        load_model(hf_setup["other"], db=hf_setup["db"])


def test_a_retrofit_checkpoint_refuses_another_base_file(
    hf_setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "rf"
    train(_args(hf_setup, out, steps=2))
    moved = tmp_path / "base-copy"
    import shutil

    shutil.copytree(hf_setup["base"], moved)
    model, _ = load_model(out, base=moved)  # the same weights elsewhere: accepted
    assert isinstance(model, RetrofitModel)
    changed = tmp_path / "changed"
    tiny_llama(model.cfg.vocab_size, seed=5).save_pretrained(changed)
    shutil.copyfile(hf_setup["base"] / "tokenizer.json", changed / "tokenizer.json")
    with pytest.raises(MismatchError, match="not the base"):
        load_model(out, base=changed)


def test_distracted_rows_of_a_fresh_retrofit_cost_nothing_and_the_base_stays(
    hf_setup: dict[str, Any], tmp_path: Path
) -> None:
    """A fresh retrofit is its base, so the distracted rows' KL from the base is 0 and the
    loss is the next-token loss of the other rows; training with distractors still leaves
    the base's files and weights as they were."""
    import torch.nn.functional as F

    from retrodb_model.train import Trainer, _Dist

    args = _args(hf_setup, tmp_path / "rf", batch_size=4, distractors=0.5)
    trainer = Trainer.setup(args, _Dist(), print)
    batch = next(iter(trainer.loader))
    rows, donors, kept = torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([0, 3])
    loss, lm_loss, _ = trainer._forward_distracted(batch, rows, donors)
    tokens, t = batch["tokens"][:, :-1], batch["targets"]
    with torch.no_grad():
        logits, _ = trainer.model(tokens[kept])
    ce = F.cross_entropy(logits.flatten(0, 1), t[kept].flatten(), reduction="sum")
    torch.testing.assert_close(loss.detach(), ce / (t != -100).sum())
    torch.testing.assert_close(lm_loss, ce / (t[kept] != -100).sum())
    assert trainer.distractor_kl[1] > 0 and abs(trainer.distractor_kl[0]) < 1e-3

    weights = base_fingerprint(hf_setup["base"])
    state = train(args)
    assert all(r["distractor_kl"] is not None for r in state["history"])
    assert base_fingerprint(hf_setup["base"]) == weights
    model, _ = load_model(tmp_path / "rf", db=hf_setup["db"])
    plain = load_base(hf_setup["base"])
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.base.state_dict().values(), plain.state_dict().values(), strict=True)
    )
