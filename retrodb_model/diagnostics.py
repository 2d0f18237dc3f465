"""Diagnostics of a RETRO model's retrieval path.

:func:`token_identity_share`: how much of the neighbour encoder's output is explained by
the identity of the token at each position. CCA's values are projections of that output;
if it carries no token identity, copying a neighbour's token is not learnable. At
initialisation with raw embeddings (std 0.02) the share falls with width, because the
encoder's residual stream starts from the embeddings while each layer's update grows with
width (RetroConfig.enc_input fixes it).

:func:`copy_task`: train a model on random tokens whose neighbours hold an exact copy of
each chunk and its continuation (in a random slot) beside noise: the losses show whether
it learns to copy, and to choose the right neighbour.
"""

from __future__ import annotations

import torch

from retrodb_model.config import RetroConfig
from retrodb_model.model import RetroModel


@torch.no_grad()
def token_identity_share(
    model: RetroModel, *, ids: int = 256, chunks: int = 4, batch: int = 4, seed: int = 0
) -> float:
    """eta^2 of the encoder output over the token id: the between-id sum of squares over
    the total, for random neighbours drawn from the first ``ids`` token ids and conditioned
    on random chunks (``batch`` sequences of ``chunks`` chunks). 1 = the output is a
    function of the token id alone; about (ids - 1) / (positions - 1) = no identity."""
    cfg: RetroConfig = model.cfg
    m, r = cfg.chunk_size, cfg.neighbour_len
    k = cfg.num_neighbours
    ids = min(ids, cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ids, (batch, chunks * m), generator=g)
    retrieved = torch.randint(0, ids, (batch, chunks, k, r), generator=g)
    was_training = model.training
    model.eval()
    x = model.wte(tokens)  # (B, T, D)
    rot = model.rope(slice(0, chunks * m))
    for i, block in enumerate(model.decoder_blocks()):
        if i + 1 == cfg.dec_enc_condition_layer:
            break
        x = x + block.attn(block.norm_attn(x), rot, causal=True)
        x = x + block.ff(block.norm_ff(x))
    # the encoder itself, on the neighbours as given (the overlap gate's "shift" would move
    # their tokens before encoding, and this measures what the encoder does with them)
    states = x.reshape(batch, chunks, m, -1)  # (B, n, m, D)
    encoded = model.encoder(model.wte(retrieved), None, states)  # (B, n, k*r, E)
    model.train(was_training)
    out = encoded.reshape(-1, encoded.shape[-1]).double()  # (P, E)
    tok = retrieved.reshape(-1)
    mean = out.mean(0)
    total = ((out - mean) ** 2).sum()
    sums = torch.zeros(ids, out.shape[1], dtype=torch.float64).index_add_(0, tok, out)
    counts = torch.bincount(tok, minlength=ids).double()[:, None]
    means = sums / counts.clamp(min=1)
    between = (counts * (means - mean) ** 2).sum()
    return float(between / total)


def copy_task(
    cfg: RetroConfig,
    *,
    steps: int,
    lr: float,
    batch: int = 16,
    chunks: int = 4,
    random_slot: bool = True,
    seed: int = 0,
) -> list[float]:
    """Train a fresh ``RetroModel(cfg)`` (``cfg.vocab_size`` random tokens, chunks of
    ``cfg.chunk_size``) for ``steps`` AdamW steps at ``lr`` on sequences of ``chunks``
    chunks; every chunk has two neighbours, an exact copy of the chunk and its continuation
    and random noise, the copy in a random slot per chunk (slot 0 without
    ``random_slot``). Returns the training loss of every step.

    Only copying lowers the loss below log V; tokens of the first chunk and the first
    m - 1 of the next cannot copy, so choosing the copy floors at about (2m - 1) / (chunks
    * m) log V, and attending to both neighbours alike costs about ln 2 more per copyable
    token."""
    m, vocab, T = cfg.chunk_size, cfg.vocab_size, chunks * cfg.chunk_size
    torch.manual_seed(seed)
    model = RetroModel(cfg).train()
    opt = model.configure_optimizer(weight_decay=0.1, lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        data = torch.randint(0, vocab, (batch, T + m + 1), generator=g)
        copy = torch.stack([data[:, u * m : (u + 2) * m] for u in range(chunks)], 1)
        noise = torch.randint(0, vocab, copy.shape, generator=g)
        retrieved = torch.stack([copy, noise], 2)  # (B, n, 2, 2m)
        if random_slot:
            swap = torch.rand(batch, chunks, generator=g) < 0.5  # the copy in slot 1
            retrieved = torch.where(swap[..., None, None], retrieved.flip(2), retrieved)
        _, loss = model(data[:, :T], retrieved, targets=data[:, 1 : T + 1])
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


__all__ = ["copy_task", "token_identity_share"]
