"""Tests of the RETRO model: shapes, causality, retrieval off == plain decoder, masking,
the generation cache, a tiny overfit, RETRO-fitting, presets and the config."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from retrodb.errors import BadInputError
from retrodb_model.config import RetroConfig, default_retro_layers
from retrodb_model.model import RetroModel

V = 37  # vocabulary of the tiny test models
M = 4  # chunk size of the tiny test models
K = 2  # neighbours per chunk
R = 2 * M  # tokens per neighbour


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_config(**overrides: object) -> RetroConfig:
    return RetroConfig.preset("tiny", vocab_size=V, chunk_size=M, **overrides)


def tiny_model(seed: int = 0, **overrides: object) -> RetroModel:
    torch.manual_seed(seed)
    return RetroModel(tiny_config(**overrides)).eval()


def batch(seed: int, B: int, T: int, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    retrieved = torch.randint(0, V, (B, T // M, k, R), generator=g)
    return tokens, retrieved


# ---- shapes and loss ------------------------------------------------------------------


@pytest.mark.parametrize("T", [3, 8, 13, 24])
def test_shapes_and_finite_loss(T: int) -> None:
    model = tiny_model()
    tokens, retrieved = batch(1, 2, T)
    for neighbours in (retrieved, None):
        logits, loss = model(tokens, neighbours, targets=tokens)
        assert logits.shape == (2, T, V)
        assert loss is not None and torch.isfinite(loss)
        _, no_loss = model(tokens, neighbours)
        assert no_loss is None


def test_loss_ignores_minus_100() -> None:
    model = tiny_model()
    tokens, retrieved = batch(2, 2, 16)
    targets = tokens.clone()
    targets[:, :5] = -100
    logits, loss = model(tokens, retrieved, targets=targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, V), tokens[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_bf16_autocast_trains() -> None:
    model = tiny_model().train()
    tokens, retrieved = batch(17, 2, 16)
    _, ref_loss = model(tokens, retrieved, targets=tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens, retrieved, targets=tokens)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_neighbour_shapes_raise() -> None:
    model = tiny_model()
    tokens, retrieved = batch(3, 2, 16)
    with pytest.raises(ValueError, match="retrieved must be"):
        model(tokens, retrieved[:, :3])  # one chunk short
    with pytest.raises(ValueError, match="neighbour_len"):
        model(tokens, retrieved[..., :5])
    with pytest.raises(ValueError, match="retrieved_mask"):
        model(tokens, retrieved, retrieved[..., :4] > 0)


# ---- causality ------------------------------------------------------------------------


def test_changing_neighbours_of_chunk_u_only_affects_from_its_last_token() -> None:
    model = tiny_model()
    T = 22  # 5 chunks with neighbours, two tokens of a sixth chunk
    tokens, retrieved = batch(4, 2, T)
    base, _ = model(tokens, retrieved)
    for u in range(T // M):
        changed = retrieved.clone()
        changed[:, u] = (changed[:, u] + 1 + torch.arange(R)) % V
        logits, _ = model(tokens, changed)
        first = (u + 1) * M - 1  # the last token of chunk u is the first to see them
        torch.testing.assert_close(logits[:, :first], base[:, :first], rtol=0, atol=1e-6)
        assert (logits[:, first] - base[:, first]).abs().max() > 1e-4, u


def test_changing_future_tokens_changes_nothing_before_them() -> None:
    model = tiny_model()
    T = 21
    tokens, retrieved = batch(5, 2, T)
    base, _ = model(tokens, retrieved)
    for p in (0, 3, 4, 10, 20):
        changed = tokens.clone()
        changed[:, p] = (changed[:, p] + 1) % V
        logits, _ = model(changed, retrieved)
        torch.testing.assert_close(logits[:, :p], base[:, :p], rtol=0, atol=1e-6)
        assert (logits[:, p] - base[:, p]).abs().max() > 1e-4


# ---- retrieval off is the plain decoder ------------------------------------------------


def reference_decoder(model: RetroModel, tokens: torch.Tensor) -> torch.Tensor:
    """An independent plain pre-norm decoder (explicit softmax attention, rotary on
    consecutive pairs, SwiGLU) that reads the model's weights by name."""
    cfg = model.cfg
    w = model.state_dict()
    B, T = tokens.shape
    H, hd = cfg.n_heads, cfg.head_dim

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = (torch.arange(T, dtype=torch.float64)[:, None] * inv_freq).float()  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, hd)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["wte.weight"][tokens]  # (B, T, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "norm_attn.weight"])
        q, k, v = (h @ w[p + "attn.qkv.weight"].T).split(H * hd, dim=-1)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + y @ w[p + "attn.proj.weight"].T
        h = rms(x, w[p + "norm_ff.weight"])
        gate, up = (h @ w[p + "ff.gate_up.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "ff.down.weight"].T
    x = rms(x, w["norm_out.weight"])
    return x @ w["lm_head.weight"].T


def test_retrieval_off_equals_plain_decoder() -> None:
    model = tiny_model()
    tokens, retrieved = batch(6, 2, 19)
    expected = reference_decoder(model, tokens)
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    with_retrieval, _ = model(tokens, retrieved)
    assert (with_retrieval - expected).abs().max() > 1e-3  # retrieval does something
    # and the first m - 1 positions never see any neighbour
    torch.testing.assert_close(with_retrieval[:, : M - 1], expected[:, : M - 1])


def test_blocks_run_on_their_own() -> None:
    model = tiny_model()
    tokens, _ = batch(12, 2, 10)
    x = model.wte(tokens)
    rot = model.rope(slice(0, 10))
    for block in model.decoder_blocks():  # no neighbours: CCA is skipped
        x = block(x, rot, model.rope)
    logits = model.lm_head(model.norm_out(x))
    torch.testing.assert_close(logits, model(tokens)[0], rtol=0, atol=0)
    # encoder blocks: (N, r, E) neighbours conditioned on (B*n, m, D) chunk states
    enc, cfg = model.encoder, model.cfg
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2 * K, R, cfg.enc_dim, generator=g)  # one chunk's k neighbours, twice
    ctx = torch.randn(2, M, cfg.dim, generator=g)
    kw = dict(
        rot=enc.rope(slice(0, R)),
        rot_q=enc.rope(torch.arange(K * R) % R),
        rot_c=enc.rope(slice(0, M)),
    )
    crossed, plain = enc.blocks[0], tiny_model(enc_cross_attn_layers=()).encoder.blocks[0]
    assert crossed.cross is not None and plain.cross is None
    out = crossed(h, ctx, **kw)
    assert out.shape == h.shape and not torch.equal(out, crossed(h, ctx + 1.0, **kw))
    torch.testing.assert_close(plain(h, ctx, **kw), plain(h, ctx + 1.0, **kw), rtol=0, atol=0)


# ---- masking --------------------------------------------------------------------------


def test_fully_masked_neighbours_equal_no_retrieval_and_are_finite() -> None:
    model = tiny_model()
    tokens, retrieved = batch(7, 2, 20)
    plain, _ = model(tokens)
    mask = torch.zeros_like(retrieved, dtype=torch.bool)
    logits, loss = model(tokens, retrieved, mask, targets=tokens)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    # -1 (no neighbour) is padding without any mask
    logits, _ = model(tokens, torch.full_like(retrieved, -1))
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    # gradients stay finite too
    model.train()
    _, loss = model(tokens, retrieved, mask, targets=tokens)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padded_neighbour_tokens_are_ignored() -> None:
    model = tiny_model()
    tokens, retrieved = batch(8, 2, 16)
    mask = torch.ones_like(retrieved, dtype=torch.bool)
    mask[:, :, 1] = False  # the second neighbour of every chunk is missing
    mask[:, 2, 0, M:] = False  # chunk 2's first neighbour has no continuation
    base, _ = model(tokens, retrieved, mask)
    assert torch.isfinite(base).all()
    scrambled = torch.where(mask, retrieved, (retrieved * 7 + 3) % V)
    logits, _ = model(tokens, scrambled, mask)
    torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-6)
    # the same padding expressed as -1 ids
    logits, _ = model(tokens, torch.where(mask, retrieved, -1))
    torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-6)


def test_pad_id_marks_padding_when_no_mask_is_given() -> None:
    model = tiny_model(pad_id=0)
    tokens, retrieved = batch(9, 1, 12)
    retrieved = retrieved.clamp(min=1)
    retrieved[:, :, :, M + 1 :] = 0
    explicit = retrieved != 0
    a, _ = model(tokens, retrieved)
    b, _ = model(tokens, retrieved, explicit)
    torch.testing.assert_close(a, b)


# ---- generation cache -----------------------------------------------------------------


@pytest.mark.parametrize("retrieval", [True, False])
def test_cache_steps_equal_full_forward(retrieval: bool) -> None:
    model = tiny_model()
    T = 27
    tokens, retrieved = batch(10, 2, T)
    full, _ = model(tokens, retrieved if retrieval else None)
    cache = model.new_cache(2, retrieval=retrieval, max_len=32)
    outs, pos = [], 0
    for t in (5, 1, 1, 1, 6, 1, 4, 8):  # prefill, single tokens, chunk-crossing blocks
        n_new = cache.chunks_completed_by(t)
        first = pos // M
        neighbours = retrieved[:, first : first + n_new] if retrieval and n_new else None
        outs.append(model.forward_step(tokens[:, pos : pos + t], cache, neighbours))
        pos += t
    assert pos == T and cache.pos == T
    assert cache.completed_chunks == (T // M if retrieval else 0)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_cache_equals_recompute() -> None:
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, V, (2, 6), generator=g)
    bank = torch.randint(0, V, (64, K, R), generator=g)

    def neighbours_for(chunks: torch.Tensor) -> torch.Tensor:
        """A stand-in retriever: (B, c, m) chunks -> (B, c, k, r) neighbours."""
        key = chunks.sum(-1) % bank.shape[0]  # (B, c)
        return bank[key]

    # with the cache, one token per step
    cache = model.new_cache(2)
    seq = prompt
    logits = model.forward_step(prompt, cache, neighbours_for(prompt[:, :M].view(2, 1, M)))
    cached_logits = [logits[:, -1]]
    for _ in range(14):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat((seq, nxt), dim=1)
        done = cache.chunks_completed_by(1)
        neighbours = None
        if done:
            c = seq.shape[1] // M - 1
            neighbours = neighbours_for(seq[:, c * M : (c + 1) * M].view(2, 1, M))
        logits = model.forward_step(nxt, cache, neighbours)
        cached_logits.append(logits[:, -1])
    # without the cache: a full forward over the whole sequence at every step
    for i, step_logits in enumerate(cached_logits):
        prefix = seq[:, : prompt.shape[1] + i]
        n = prefix.shape[1] // M
        neighbours = neighbours_for(prefix[:, : n * M].view(2, n, M))
        full, _ = model(prefix, neighbours)
        torch.testing.assert_close(step_logits, full[:, -1], rtol=1e-5, atol=1e-5)


def test_cache_checks_its_inputs() -> None:
    model = tiny_model()
    tokens, retrieved = batch(12, 2, 8)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="pass their neighbours"):
        model.forward_step(tokens[:, :4], cache)
    cache = model.new_cache(2, retrieval=False)
    with pytest.raises(ValueError, match="retrieval=False"):
        model.forward_step(tokens[:, :4], cache, retrieved[:, :1])
    with pytest.raises(ValueError, match="capacity"):
        model.forward_step(torch.zeros(2, 300, dtype=torch.long), model.new_cache(2))


# ---- other wirings --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dec_enc_condition_layer=1),
        dict(enc_dim=64, enc_heads=4, enc_cross_attn_layers=(2,)),
        dict(n_layers=3, retro_layers=None, tie_embeddings=False),
        dict(cca_null=True),
        dict(cca_null=True, cca_position_bias=False),
        dict(cca_null=True, cca_overlap_gate="run"),
        dict(cca_null=True, cca_overlap_gate="aligned", cca_position_bias=False),
        dict(cca_overlap_gate="shift"),
        dict(cca_copy_bias=True),
        dict(cca_copy_bias=True, cca_overlap_gate="none"),
    ],
)
def test_other_wirings_keep_cache_equivalence_and_causality(overrides: dict) -> None:
    model = tiny_model(**overrides)
    tokens, retrieved = batch(13, 1, 14)
    full, _ = model(tokens, retrieved)
    cache = model.new_cache(1)
    a = model.forward_step(tokens[:, :9], cache, retrieved[:, :2])
    b = model.forward_step(tokens[:, 9:], cache, retrieved[:, 2:])
    torch.testing.assert_close(torch.cat((a, b), 1), full, rtol=1e-5, atol=1e-5)
    changed = retrieved.clone()
    changed[:, 1] = (changed[:, 1] + 1) % V
    logits, _ = model(tokens, changed)
    torch.testing.assert_close(logits[:, : 2 * M - 1], full[:, : 2 * M - 1])


# ---- training -------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_corpus() -> None:
    torch.manual_seed(0)
    model = RetroModel(tiny_config(n_layers=2, retro_layers=(2,))).train()
    g = torch.Generator().manual_seed(14)
    data = torch.randint(0, V, (4, 25), generator=g)
    tokens, targets = data[:, :-1], data[:, 1:]  # (4, 24)
    retrieved = torch.randint(0, V, (4, 24 // M, K, R), generator=g)
    opt = model.configure_optimizer(weight_decay=0.0, lr=1e-2, betas=(0.9, 0.99))
    losses = []
    for _ in range(150):
        _, loss = model(tokens, retrieved, targets=targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[0] > 3.0 and losses[-1] < 0.1


def test_freeze_for_retrofit_trains_only_cca_and_encoder() -> None:
    model = tiny_model().train()
    trainable, total = model.freeze_for_retrofit()
    assert total == model.num_parameters() and 0 < trainable < total
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("encoder.") or ".cca." in n for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-2)
    tokens, retrieved = batch(15, 2, 16)
    _, loss = model(tokens, retrieved, targets=tokens)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_configure_optimizer_decays_only_matrices() -> None:
    model = tiny_model()
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    biases = {id(b.cca.position_bias) for b in model.decoder_blocks() if b.cca is not None}
    nulls = {id(b.cca.null_key) for b in model.decoder_blocks() if b.cca is not None}
    copies = {id(b.cca.copy_bias) for b in model.decoder_blocks() if b.cca is not None}
    assert len(biases) == len(nulls) == len(copies) == len(model.cfg.retro_layers)
    tables = biases | nulls | copies
    assert all(p.dim() == 1 or id(p) in tables for p in no_decay["params"])
    # the position and copy tables and the null keys are not decayed
    assert tables <= {id(p) for p in no_decay["params"]}
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_parameters()  # the tied head is counted once


# ---- presets and config ---------------------------------------------------------------


def test_preset_parameter_counts() -> None:
    counts = {}
    for name in ("tiny", "small", "base"):
        with torch.device("meta"):
            model = RetroModel(RetroConfig.preset(name, vocab_size=32000))
        counts[name] = (model.num_parameters(), model.num_parameters(exclude_embeddings=True))
        print(f"{name}: {counts[name][0] / 1e6:.1f}M, {counts[name][1] / 1e6:.1f}M non-embedding")
    assert counts["tiny"][1] < 1e6
    assert 10e6 < counts["small"][1] < 30e6
    assert 120e6 < counts["base"][1] < 200e6  # the paper's 172M RETRO, same order


def test_default_retro_layers_rule() -> None:
    assert default_retro_layers(12) == (6, 9, 12)
    assert default_retro_layers(32)[:3] == (6, 9, 12) and default_retro_layers(32)[-1] == 30
    assert default_retro_layers(6) == (6,)
    assert default_retro_layers(5) == (2, 5)
    assert default_retro_layers(4) == (1, 4)
    assert default_retro_layers(2) == (2,)
    cfg = RetroConfig(vocab_size=100)
    assert cfg.retro_layers == (6, 9, 12) and cfg.dec_enc_condition_layer == 6
    assert cfg.neighbour_len == 128 and cfg.head_dim == 56 and cfg.enc_dim == 896


def test_config_round_trip_and_validation() -> None:
    cfg = tiny_config(pad_id=3)
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(dropout=0.1).dropout == 0.1
    bad: list[dict[str, Any]] = [
        dict(retro_layers=(0,)),
        dict(retro_layers=(5,)),
        dict(dec_enc_condition_layer=3),  # after the first CCA layer (2)
        dict(n_heads=5),
        dict(enc_cross_attn_layers=(3,)),
        dict(dropout=1.0),
        dict(pad_id=V),
        dict(max_seq_len=2),
    ]
    for overrides in bad:
        with pytest.raises(ValueError):
            tiny_config(**overrides)
    with pytest.raises(ValueError, match="unknown"):
        RetroConfig.from_dict({**cfg.to_dict(), "typo": 1})
    with pytest.raises(ValueError, match="preset"):
        RetroConfig.preset("huge", vocab_size=V)


# ---- the CCA position bias -------------------------------------------------------------


def copy_task_loss(steps: int, *, lr: float = 6e-3, **overrides: Any) -> tuple[float, float]:
    """The copy task (:func:`retrodb_model.diagnostics.copy_task`, the copy in a random
    slot) on a tiny model with m = 16 and a 64-token vocabulary: (first loss, mean of the
    last 20). ``overrides``: RetroConfig fields. The sweep behind the numbers:
    scripts/research/copy_task.py."""
    from retrodb_model.diagnostics import copy_task

    cfg = RetroConfig.preset("tiny", vocab_size=64, chunk_size=16, **overrides)
    losses = copy_task(cfg, steps=steps, lr=lr)
    return losses[0], sum(losses[-20:]) / 20


@pytest.mark.slow
def test_model_learns_to_copy_the_right_neighbour(torch_one_thread: None) -> None:
    # Tokens from the last of chunk 0 on (49 of 64) can copy. Choosing the copy floors at
    # ~15/64 log V = 0.97 nats; attending to both neighbours alike gives half the mass to
    # the noise token, ~0.97 + 49/64 ln 2 = 1.50. Measured at 80 steps: 0.998 with the
    # defaults (seeds 1-3: 0.994, 0.999, 1.005; the overlap gate picks the copy); 2.007
    # without the null key and gate (cca_null=False, cca_overlap_gate="none"); 2.647 with
    # raw encoder inputs (enc_input="raw"). At 200 steps: 0.986 with the defaults.
    first, last = copy_task_loss(steps=80)
    print(f"copy task: loss {first:.3f} -> {last:.3f} (log V = {math.log(64):.3f})")
    assert first > 0.95 * math.log(64)
    assert last < 1.10


def test_position_bias_starts_at_the_predicted_tokens_counterpart() -> None:
    model = tiny_model()
    cca = next(b.cca for b in model.decoder_blocks() if b.cca is not None)
    bias = cca.score_bias(K * R, torch.float32)  # (H, m, k*r)
    assert bias is not None and bias.shape == (model.cfg.n_heads, M, K * R)
    # query j (position m-1+j) scores highest the key at position m+j of every neighbour
    best = bias[0].view(M, K, R).argmax(dim=-1)  # (m, k)
    assert torch.equal(best, (torch.arange(M) + M)[:, None].expand(M, K))
    assert (
        tiny_model(cca_position_bias=False).layers[1].cca.score_bias(K * R, torch.float32) is None
    )


def test_configs_written_before_the_position_bias_load_without_it() -> None:
    cfg = tiny_config()
    assert cfg.cca_position_bias
    old = {key: value for key, value in cfg.to_dict().items() if key != "cca_position_bias"}
    assert RetroConfig.from_dict(old) == cfg.replace(cca_position_bias=False)


def test_retrofit_loads_a_decoder_saved_without_the_position_bias(tmp_path) -> None:
    from safetensors.torch import save_file

    from retrodb.errors import CorruptError
    from retrodb_model.checkpoint import WEIGHTS, load_weights

    old = tiny_model(cca_position_bias=False)
    weights = {n: t for n, t in old.state_dict().items() if n != "lm_head.weight"}
    save_file(weights, str(tmp_path / WEIGHTS))
    new = tiny_model(seed=1)
    with pytest.raises(CorruptError, match="position_bias"):
        load_weights(new, tmp_path)  # strict: a missing tensor is an error
    load_weights(new, tmp_path, decoder_only=True)
    assert torch.equal(new.wte.weight, old.wte.weight)
    assert new.layers[1].cca.position_bias is not None  # kept its initial prior


# ---- the fast paths of training equal a straightforward computation ---------------------


def straightforward_forward(model: RetroModel, tokens, retrieved, mask, targets):  # type: ignore[no-untyped-def]
    """Logits and loss of `model` through its plain modules (see use_straightforward_ops)."""
    logits = model.lm_head(model._decode(tokens, retrieved, mask, cache=None))
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    return logits, loss


def use_straightforward_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention as softmax(q k^T / sqrt(hd) + bias) v, RMSNorm and SwiGLU written out,
    all differentiated by autograd: what the fused kernels and hand-written backward
    passes of the model must equal."""
    import retrodb_model.model as mm

    def attend(q, k, v, *, mask=None, causal=False, dropout=0.0):  # type: ignore[no-untyped-def]
        assert dropout == 0.0
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., H, L, S)
        if causal:
            L, S = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        elif mask is not None:
            scores = scores + mask  # the CCA position bias (-inf at padding)
        return scores.softmax(dim=-1) @ v

    def rms_norm(self, x):  # type: ignore[no-untyped-def]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def feed_forward(self, x):  # type: ignore[no-untyped-def]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    monkeypatch.setattr(mm, "attend", attend)
    monkeypatch.setattr(mm.RMSNorm, "forward", rms_norm)
    monkeypatch.setattr(mm.FeedForward, "forward", feed_forward)


@pytest.mark.parametrize(("bias", "bf16"), [(True, False), (False, False), (True, True)])
def test_training_step_equals_straightforward_computation(
    bias: bool, bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss, logits and every gradient of the optimised training forward (fused head
    and loss, RMSNorm and SwiGLU backward passes, fused attention with the CCA bias) equal
    those of the plain computation, with padded neighbours, ignored targets and a second
    loss term on the logits; under bf16 autocast within bf16's precision."""
    from retrodb_model.kernels import HeadCrossEntropyFunction

    monkeypatch.setattr(HeadCrossEntropyFunction, "ROWS_ELEMENTS", 5 * V)  # chunks of 5 rows
    model = tiny_model(cca_position_bias=bias).train()
    tokens, retrieved = batch(21, 2, 23)
    retrieved[0, 1, 1] = -1  # a missing neighbour
    retrieved[1, 0, 0, M:] = -1  # a neighbour without continuation
    retrieved[0, 2, 1, :M] = tokens[0, 2 * M : 3 * M]  # a copy: the overlap gate opens
    retrieved[1, 3, 0, 1:3] = tokens[1, 3 * M + 1 : 3 * M + 3]  # a partial overlap
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :3] = -100

    def grads(forward, on_logits: float) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = forward(model, tokens, retrieved, None, targets)
        (loss + on_logits * logits.square().mean() if on_logits else loss).backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), loss.detach(), named  # type: ignore[return-value]

    def optimised(model, tokens, retrieved, mask, targets):  # type: ignore[no-untyped-def]
        return model(tokens, retrieved, mask, targets)

    fast = [grads(optimised, w) for w in (0.0, 0.1)]  # the loss alone; and with the logits
    with torch.no_grad():
        eval_logits, eval_loss = model(tokens, retrieved, targets=targets)
    use_straightforward_ops(monkeypatch)
    ref = [grads(straightforward_forward, w) for w in (0.0, 0.1)]

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        if bf16:  # bf16 rounds relative to a tensor's scale
            scale = float(expected.abs().max())
            actual, expected, tol = actual / scale, expected / scale, dict(rtol=0, atol=0.05)
        else:
            tol = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")

    for (logits, loss, named), (ref_logits, ref_loss, ref_named) in zip(fast, ref, strict=True):
        close(loss, ref_loss, "loss")
        close(logits, ref_logits, "logits")
        assert named.keys() == ref_named.keys()
        assert any(".cca.position_bias" in n for n in named) == bias
        for name, grad in ref_named.items():
            close(named[name], grad, name)
    if not bf16:  # the no-grad paths (fused attention with the bias as a 4-D mask)
        close(eval_loss, ref[0][1], "loss without grad")
        close(eval_logits, ref[0][0], "logits without grad")


def test_fused_loss_matches_cross_entropy_when_every_target_is_ignored() -> None:
    model = tiny_model().train()
    tokens, retrieved = batch(22, 1, 8)
    _, loss = model(tokens, retrieved, targets=torch.full_like(tokens, -100))
    assert loss is not None and torch.isnan(loss)  # as F.cross_entropy's mean of nothing


@pytest.mark.parametrize("enc_input", ["scaled", "norm"])
def test_encoder_keeps_token_identity_at_init_at_the_small_width(enc_input: str) -> None:
    from retrodb_model.diagnostics import token_identity_share

    def share(mode: str) -> float:
        torch.manual_seed(0)
        cfg = RetroConfig.preset("small", vocab_size=512, enc_input=mode)  # width 384
        return token_identity_share(RetroModel(cfg), ids=64, chunks=2, batch=2)

    # measured: raw 0.41, scaled 0.998, norm 0.9996 (chance: ~0.06)
    assert share(enc_input) > 0.95
    assert share("raw") < 0.7  # the fault the input scale fixes
    assert RetroConfig.preset("small", vocab_size=512).enc_input == "norm"


def test_neighbour_overlap_is_the_longest_common_run() -> None:
    import numpy as np

    from retrodb.rerank import longest_run
    from retrodb_model.gate import neighbour_overlap

    g = torch.Generator().manual_seed(3)
    chunks = torch.randint(0, 4, (2, 3, M), generator=g)
    retrieved = torch.randint(0, 4, (2, 3, K, R), generator=g)
    retrieved[0, 1, 0, :M] = chunks[0, 1]  # an exact copy
    valid = torch.ones_like(retrieved, dtype=torch.bool)
    valid[1, 2, 1, 2:] = False
    got = neighbour_overlap(chunks, retrieved, valid)
    nb = np.where(valid.numpy(), retrieved.numpy(), -2)[..., :M].reshape(6, K, M)
    expect = longest_run(chunks.numpy().reshape(6, M), nb).reshape(2, 3, K) / M
    np.testing.assert_allclose(got.numpy(), expect)
    assert got[0, 1, 0] == 1.0 and got[1, 2, 1] <= 2 / M
    # aligned: only runs at the same offset count; a copy shifted by one does not
    chunks = torch.tensor([[[1, 2, 3, 4]]])
    retrieved = torch.tensor([[[[1, 2, 3, 4, 0, 0, 0, 0], [9, 1, 2, 3, 0, 0, 0, 0]]]])
    assert neighbour_overlap(chunks, retrieved, None).tolist() == [[[1.0, 0.75]]]
    aligned = neighbour_overlap(chunks, retrieved, None, aligned=True)
    assert aligned.tolist() == [[[1.0, 0.0]]]
    retrieved[0, 0, 1, :4] = torch.tensor([1, 2, 7, 4])
    assert neighbour_overlap(chunks, retrieved, None, aligned=True).tolist() == [[[1.0, 0.5]]]


@pytest.mark.parametrize("m", [1, 3, 8])
def test_neighbour_overlap_agrees_exactly_with_rerank_longest_run(m: int) -> None:
    """The overlap gate's longest common run (batched torch, on the training step) and
    `retrodb.rerank.longest_run` (numpy: re-ranking, and the evaluation's alpha table
    through `longest_common_run`) are two implementations of one measure. On random tokens
    from small vocabularies (long runs; ties between neighbours and between offsets), with
    padding (-1, -2) on both sides, masked tokens, missing neighbours, chunks of padding
    only, copies and shifted copies, they agree exactly, with a mask and without."""
    import numpy as np

    from retrodb.rerank import longest_run
    from retrodb_model.gate import align_neighbours, neighbour_overlap

    g = torch.Generator().manual_seed(100 + m)
    B, n, k, r = 2, 3, 5, 2 * m
    for trial in range(24):
        vocab = (1, 2, 3, 6)[trial % 4]
        chunks = torch.randint(0, vocab, (B, n, m), generator=g)
        retrieved = torch.randint(0, vocab, (B, n, k, r), generator=g)
        pad = torch.rand(B, n, m, generator=g) < 0.15
        chunks[pad] = -1 - torch.randint(0, 2, (int(pad.sum()),), generator=g)
        pad = torch.rand(B, n, k, r, generator=g) < 0.15
        retrieved[pad] = -1 - torch.randint(0, 2, (int(pad.sum()),), generator=g)
        valid = torch.rand(B, n, k, r, generator=g) > 0.2
        retrieved[0, 0, 0, :m] = chunks[0, 0]  # a copy
        retrieved[0, 0, 1, 1 : m + 1] = chunks[0, 0]  # a shifted copy: a tie with it
        valid[0, 0, :2] = True
        retrieved[0, 1, 2] = -1  # a missing neighbour
        valid[1, 0, 3] = False  # a neighbour masked out
        chunks[1, 2] = -1  # a chunk of padding only
        if trial % 3 == 0:
            valid[...] = True
        flat_chunks = chunks.numpy().reshape(B * n, m)
        for mask in (valid, None):
            nb = retrieved.numpy() if mask is None else np.where(mask, retrieved.numpy(), -1)
            runs = longest_run(flat_chunks, nb[..., :m].reshape(B * n, k, m))
            expect = torch.from_numpy(runs.reshape(B, n, k)).float() / m
            got = neighbour_overlap(chunks, retrieved, mask)
            assert torch.equal(got, expect), (trial, mask is None)
            # the shift moves that run to the chunk's offsets: aligned, it counts whole
            tokens, shifted_valid = align_neighbours(chunks, retrieved, mask)
            aligned = neighbour_overlap(chunks, tokens, shifted_valid, aligned=True)
            assert bool((aligned >= got).all()), (trial, mask is None)


def test_overlap_gate_starts_on_the_null_key_unless_a_neighbour_overlaps() -> None:
    from retrodb_model.gate import OVERLAP_WEIGHT_INIT, locality_prior, null_bias_prior

    cfg = RetroConfig.preset("small", vocab_size=V, cca_null=True, cca_overlap_gate="aligned")
    m, r, k = cfg.chunk_size, cfg.neighbour_len, cfg.num_neighbours
    table = locality_prior(cfg.n_heads, m, r)
    offset = torch.arange(r)[None, :] - torch.arange(m)[:, None] + (m - 1)
    rows = table[:, offset]  # (H, m, r): scores of one neighbour's keys, every query
    null = null_bias_prior(cfg)[:, None]  # (H, 1)

    def null_share(*overlaps: float) -> torch.Tensor:
        real = torch.logsumexp(
            torch.stack([rows + OVERLAP_WEIGHT_INIT * ov for ov in overlaps], -1), dim=(-2, -1)
        )
        return torch.sigmoid(null - real)  # (H, m)

    assert null_share(*[0.0] * k).min() > 0.9  # no overlap: attend (almost) to nothing
    assert null_share(*[0.1] * k).min() > 0.8  # shared markup or a few common words
    assert null_share(1.0, *[0.0] * (k - 1)).max() < 0.03  # a copy: attend to it
    model = RetroModel(cfg)
    cca = next(b.cca for b in model.decoder_blocks() if b.cca is not None)
    assert cca.null_bias is not None and cca.overlap_weight is not None
    torch.testing.assert_close(cca.null_bias.data, null_bias_prior(cfg))
    with pytest.raises(ValueError, match="cca_null"):
        RetroConfig.preset("tiny", vocab_size=V, cca_null=False, cca_overlap_gate="run")
    old = {  # a config written before these fields
        key: v
        for key, v in cfg.to_dict().items()
        if key not in ("cca_null", "cca_overlap_gate", "cca_copy_bias")
    }
    assert RetroConfig.from_dict(old).cca_overlap_gate == "none"
    assert (
        RetroConfig.from_dict({**old, "cca_null": True, "cca_overlap_gate": True}).cca_overlap_gate
        == "run"
    )


def test_align_neighbours_moves_the_longest_common_run_to_the_chunks_offsets() -> None:
    from retrodb_model.gate import align_neighbours, neighbour_overlap

    chunks = torch.tensor([[[1, 2, 3, 4]]])
    retrieved = torch.tensor(
        [
            [
                [
                    [9, 9, 1, 2, 3, 4, 5, 6],  # the chunk two tokens later: shift by 2
                    [1, 2, 3, 4, 11, 12, 13, 14],  # aligned already
                    [4, 7, 7, 7, 7, 7, 7, 7],  # one common token: chunk 3 at neighbour 0
                    [7, 7, 7, 7, 7, 7, 7, 7],  # none: unchanged
                ]
            ]
        ]
    )
    valid = torch.ones_like(retrieved, dtype=torch.bool)
    tokens, mask = align_neighbours(chunks, retrieved, valid)
    assert tokens[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, -1, -1]
    assert mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert torch.equal(tokens[0, 0, 1], retrieved[0, 0, 1])
    assert tokens[0, 0, 2].tolist() == [-1, -1, -1, 4, 7, 7, 7, 7]  # shifted right by 3
    assert torch.equal(tokens[0, 0, 3], retrieved[0, 0, 3]) and mask[0, 0, 3].all()
    overlap = neighbour_overlap(chunks, tokens, mask, aligned=True)
    assert overlap.tolist() == [[[1.0, 1.0, 0.25, 0.0]]]


# ---- the copy bias ----------------------------------------------------------------------


def copying(tokens: torch.Tensor, retrieved: torch.Tensor, m: int = M) -> torch.Tensor:
    """retrieved with neighbour 0 of each chunk u the text itself from chunk u on (chunk
    and continuation, as far as the text goes) and neighbour 1 only its chunk: so that
    the copy bias sees long runs and runs that end."""
    out = retrieved.clone()
    T = tokens.shape[1]
    for u in range(out.shape[1]):
        piece = tokens[:, u * m : min(T, u * m + out.shape[-1])]
        out[:, u, 0, : piece.shape[1]] = piece
        out[:, u, 1, :m] = tokens[:, u * m : u * m + m]
    return out


def test_copy_runs_are_the_common_runs_ending_at_the_query_and_the_key_before() -> None:
    from retrodb_model.gate import COPY_RUN_MAX, copy_runs

    g = torch.Generator().manual_seed(3)
    B, c, m, k, r, Rm = 2, 3, 5, 2, 9, COPY_RUN_MAX
    text = torch.randint(0, 3, (B, c, m, Rm), generator=g)  # 3 symbols: many long runs
    text[0, 0, 0, 4:] = -1  # the start of the text: unknown before it
    nb = torch.randint(0, 3, (B, c, k * r), generator=g)
    nb[1, 1, 3] = -1  # not a real token
    run = copy_runs(text, nb, r)
    expected = torch.zeros_like(run)
    for b, ci, q, key in torch.cartesian_prod(*map(torch.arange, run.shape)).tolist():
        n, j = divmod(key, r)
        length = 0
        while length < Rm and j - 1 - length >= 0:
            t, x = int(text[b, ci, q, length]), int(nb[b, ci, n * r + j - 1 - length])
            if t < 0 or t != x:
                break
            length += 1
        expected[b, ci, q, key] = length
    assert torch.equal(run, expected)
    assert int(run.max()) >= 3  # the case is not trivial


def test_copy_bias_keeps_cache_equivalence_and_causality_on_copied_text() -> None:
    model = tiny_model(cca_copy_bias=True)
    with torch.no_grad():
        for cca in (b.cca for b in model.decoder_blocks() if b.cca is not None):
            assert cca.copy_bias is not None
            cca.copy_bias.add_(torch.randn(cca.copy_bias.shape))  # a trained table
    tokens, retrieved = batch(5, 2, 23)
    retrieved = copying(tokens, retrieved)
    with torch.no_grad():
        full, _ = model(tokens, retrieved)
        cache = model.new_cache(2)
        outs, pos = [], 0
        for step in (3, 1, 6, 1, 1, 11):
            n, done = cache.chunks_completed_by(step), cache.completed_chunks
            outs.append(
                model.forward_step(
                    tokens[:, pos : pos + step], cache, retrieved[:, done : done + n] if n else None
                )
            )
            pos += step
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
        changed = tokens.clone()
        changed[:, 13] = (changed[:, 13] + 1) % V
        after, _ = model(changed, retrieved)
    assert torch.equal(after[:, :13], full[:, :13])
    assert not torch.equal(after[:, 13:], full[:, 13:])


def test_copy_floor_leaves_tokens_that_follow_no_neighbour_to_the_decoder() -> None:
    """set_min_run(n): a token attends to a neighbour key only where the text has followed
    that neighbour for n tokens. With n = 4, random neighbours (no such run over 37
    symbols) give exactly the decoder without retrieval; a neighbour that is the text
    itself is still used; the cache still equals the full forward; 0 restores the model."""
    from retrodb_model.config import COPY_RUN_MAX

    model = tiny_model(cca_copy_bias=True)
    with torch.no_grad():
        for cca in (b.cca for b in model.decoder_blocks() if b.cca is not None):
            assert cca.copy_bias is not None
            cca.copy_bias.add_(torch.randn(cca.copy_bias.shape))  # a trained table
    tokens, retrieved = batch(6, 2, 16 * M)
    copied = copying(tokens, retrieved)
    with torch.no_grad():
        plain = model(tokens)[0]
        before = model(tokens, retrieved)[0], model(tokens, copied)[0]
        model.set_min_run(4)
        assert model.min_run == 4
        torch.testing.assert_close(model(tokens, retrieved)[0], plain, rtol=0, atol=1e-6)
        floored = model(tokens, copied)[0]
        assert not torch.allclose(floored, plain, atol=1e-3)
        assert not torch.allclose(floored, before[1], atol=1e-3)  # short runs left out
        cache = model.new_cache(2)
        outs, pos = [], 0
        for step in (3, 20, 1, 17, 1, 22):
            n, done = cache.chunks_completed_by(step), cache.completed_chunks
            r = copied[:, done : done + n] if n else None
            outs.append(model.forward_step(tokens[:, pos : pos + step], cache, r))
            pos += step
        torch.testing.assert_close(torch.cat(outs, 1), floored, rtol=1e-5, atol=1e-5)
        model.set_min_run(0)
        assert torch.equal(model(tokens, retrieved)[0], before[0])
    for bad in (-1, COPY_RUN_MAX + 1, 1.5, True):
        with pytest.raises(BadInputError, match="min_run"):
            model.set_min_run(bad)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="copy bias"):
        tiny_model(cca_copy_bias=False).set_min_run(2)
    tiny_model(cca_copy_bias=False).set_min_run(0)  # off needs nothing


def test_copy_bias_points_at_the_key_that_continues_the_text() -> None:
    """With the initial table, a token whose text a neighbour follows gives that
    neighbour's next token a higher score than every key that continues no run."""
    from retrodb_model.gate import COPY_RUN_MAX, copy_bias_prior

    cfg = tiny_config(cca_copy_bias=True)
    model = RetroModel(cfg).eval()
    cca = next(b.cca for b in model.decoder_blocks() if b.cca is not None)
    assert cca is not None and cca.copy_bias is not None
    torch.testing.assert_close(cca.copy_bias.data, copy_bias_prior(cfg.n_heads))
    table = cca.copy_bias.data
    assert bool((table[:, 1:] > table[:, :-1]).all())  # longer runs, more trust
    assert table.shape == (cfg.n_heads, COPY_RUN_MAX + 1)
    tokens = torch.arange(2 * M)[None] % V  # no repeated token
    nb = torch.full((1, 1, K * R), -1)
    nb[0, 0, :R] = tokens[0, :R]  # neighbour 0 is the text
    text = torch.cat((torch.full((1, COPY_RUN_MAX - 1), -1), tokens[:, : 2 * M - 1]), 1)
    with torch.no_grad():  # the queries: tokens M-1 .. 2M-2 (skip M - 1 of 2M - 1)
        mask = cca._add_copy_bias(None, text, nb, M - 1, 0, 1, torch.float32)  # (1, H, m, k*r)
    for j in range(M):  # query j (token M-1+j) follows the text: key M+j is its next token
        best = mask[0, :, j].argmax(-1)
        assert bool((best == M + j).all())
        assert float(mask[0, 0, j, M + j]) > float(table[0, 0])
    with pytest.raises(ValueError, match="cca_null"):
        tiny_config(cca_copy_bias=True, cca_null=False, cca_overlap_gate="none")
    assert not RetroConfig.from_dict(
        {key: v for key, v in cfg.to_dict().items() if key != "cca_copy_bias"}
    ).cca_copy_bias
