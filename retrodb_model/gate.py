"""How CCA decides whether to use a neighbour: the null key, the overlap gate, and the
initial score priors.

With `RetroConfig.cca_null`, CCA can attend to a null key whose value is zero
(`with_null_key`): attention it takes adds nothing. With `RetroConfig.cca_overlap_gate`
on, each neighbour's keys also get a score bonus proportional to its overlap with the
chunk that retrieved it (`neighbour_overlap`: the longest common token run, divided by
m; `add_overlap_scores`), and the null key starts ahead (`null_bias_prior`), so that a
neighbour that shares no text with its chunk starts ignored. Gate "shift" first moves
each neighbour so that its longest common run sits at the chunk's offsets
(`align_neighbours`). `locality_prior` is CCA's initial position bias.

With `RetroConfig.cca_copy_bias`, each CCA score of a token against neighbour key j also
gets a learned per-head bias indexed by the length of the common token run that ends at
the token's own position in the text and at neighbour token j - 1 (`copy_runs`, capped at
`COPY_RUN_MAX`; `copy_bias_prior` is its initial table): key j is the token that
continues such a run, so a neighbour is attended where the text is following it right
now, and ignored where its continuation has parted from the text. The run only looks at
tokens up to the query's own, so it is causal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from retrodb_model.config import COPY_RUN_MAX, RetroConfig


def locality_prior(n_heads: int, m: int, r: int) -> Tensor:
    """Initial CCA position bias (H, r + m - 1): -slope_h * |offset - 1| for offsets
    (key position - aligned query position) -(2m-2) .. r-m, with ALiBi's geometric
    slopes from 1 (head 0, sharp) to 2^-(H-1) (broad).

    At initialisation every token then looks mostly at the successor of its counterpart
    in each neighbour - the token it is about to predict, when the neighbour continues
    like the text - and at the tokens around it. With uniform attention over k*2m keys,
    CCA averages its neighbours into noise; in a copy task with m = 64 (tests) the model
    then did not learn to copy at all in the steps that suffice with this prior."""
    offsets = (torch.arange(-(2 * m - 2), r - m + 1, dtype=torch.float32) - 1).abs()  # (r+m-1,)
    slopes = 2.0 ** -torch.arange(n_heads, dtype=torch.float32)  # (H,)
    return -slopes[:, None] * offsets[None, :]


def _common_runs(chunks: Tensor, nb: Tensor) -> Iterator[Tensor]:
    """The common token runs of each chunk (B, n, m) and each of its neighbour chunks
    (B, n, k, m), one chunk token at a time: for i = 0 .. m-1, the length (B, n, k, m)
    of the common run that ends at chunk token i and neighbour token j. Negative tokens
    (padding) never match. The one longest-run computation of this package; it measures
    what `retrodb.rerank.longest_run` measures in numpy (tests/test_model.py checks that
    they agree), batched in torch for the training step."""
    m = chunks.shape[-1]
    eq = chunks[:, :, None, :, None] == nb[:, :, :, None, :]  # (B, n, k, m, m)
    eq &= (chunks >= 0)[:, :, None, :, None]
    run = torch.zeros(*nb.shape[:3], m + 1, dtype=torch.int32, device=chunks.device)
    for i in range(m):  # run[.., j+1]: common run ending at chunk token i, neighbour j
        run = torch.cat(
            (run.new_zeros(*run.shape[:-1], 1), (run[..., :-1] + 1) * eq[..., i, :]), -1
        )
        yield run[..., 1:]


@torch.no_grad()
def neighbour_overlap(
    chunks: Tensor, retrieved: Tensor, valid: Tensor | None, *, aligned: bool = False
) -> Tensor:
    """The longest common contiguous token run between each chunk (B, n, m) and the
    neighbour chunk (first m tokens) of each of its neighbours (B, n, k, r), divided by m:
    (B, n, k) float in [0, 1]. ``aligned``: only runs at the same offset in both (token i
    of the chunk against token i of the neighbour). Tokens that valid (B, n, k, r) marks
    False never match."""
    B, n, m = chunks.shape
    nb = retrieved[..., :m]  # (B, n, k, m)
    if valid is not None:
        nb = nb.masked_fill(~valid[..., :m], -1)
    if aligned:
        same = (chunks[:, :, None, :] == nb) & (nb >= 0)  # (B, n, k, m)
        run = torch.zeros(nb.shape[:3], dtype=torch.int32, device=chunks.device)
        best = torch.zeros_like(run)
        for i in range(m):
            run = (run + 1) * same[..., i]
            best = torch.maximum(best, run)
        return best.float() / m
    best = torch.zeros(nb.shape[:3], dtype=torch.int32, device=chunks.device)
    for run in _common_runs(chunks, nb):
        best = torch.maximum(best, run.max(dim=-1).values)
    return best.float() / m


@torch.no_grad()
def align_neighbours(
    chunks: Tensor, retrieved: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Shift each neighbour (B, n, k, r) so that its longest common token run with its
    chunk (B, n, m), found in the neighbour chunk (first m tokens), sits at the chunk's
    offsets: token p of the result is token p + d of the neighbour, d = the run's offset
    in the neighbour minus its offset in the chunk (0 without a common token). Positions
    shifted in from outside are padding. Returns (tokens, validity), validity all True
    where the input had none. A near-duplicate at another offset becomes aligned, so that
    CCA's position prior (and the aligned overlap gate) can use it."""
    B, n, m = chunks.shape
    k, r = retrieved.shape[2], retrieved.shape[3]
    ok = retrieved >= 0 if valid is None else valid & (retrieved >= 0)
    nb = retrieved[..., :m].masked_fill(~ok[..., :m], -1)  # (B, n, k, m)
    best = torch.zeros(B, n, k, dtype=torch.int32, device=chunks.device)
    shift = torch.zeros(B, n, k, dtype=torch.long, device=chunks.device)
    j = torch.arange(m, device=chunks.device)
    for i, run in enumerate(_common_runs(chunks, nb)):
        length, at = run.max(dim=-1)  # the first longest run ending at chunk token i
        better = length > best
        best = torch.where(better, length, best)
        shift = torch.where(better, j[at] - i, shift)
    index = torch.arange(r, device=chunks.device) + shift[..., None]  # (B, n, k, r)
    inside = (index >= 0) & (index < r)
    index = index.clamp(0, r - 1)
    tokens = retrieved.gather(-1, index)
    mask = ok.gather(-1, index) & inside
    return tokens.masked_fill(~mask, -1), mask


#: Initial weight of a neighbour's overlap (0..1) in its keys' CCA scores (overlap gate).
OVERLAP_WEIGHT_INIT = 8.0
#: How far the null key starts ahead of a neighbour without overlap (overlap gate), in
#: nats: without overlap a token starts with ~95 % of its attention on the null key.
NULL_MARGIN_INIT = 3.0


def null_bias_prior(cfg: RetroConfig) -> Tensor:
    """Initial null-key score per head (H,) for the overlap gate: the log of the total
    attention weight the position prior gives the keys of cfg.num_neighbours neighbours
    (averaged over query offsets), plus NULL_MARGIN_INIT. A neighbour must then overlap its
    chunk by about (NULL_MARGIN_INIT / OVERLAP_WEIGHT_INIT) of m tokens or more to take
    over half of the attention."""
    m, r = cfg.chunk_size, cfg.neighbour_len
    table = (
        locality_prior(cfg.n_heads, m, r)
        if cfg.cca_position_bias
        else torch.zeros(cfg.n_heads, r + m - 1)
    )
    offset = torch.arange(r)[None, :] - torch.arange(m)[:, None] - (m - 1) + (2 * m - 2)
    rows = table[:, offset]  # (H, m, r): one neighbour's key scores for every query offset
    mass = torch.logsumexp(rows, dim=-1).mean(dim=-1)  # (H,)
    return mass + math.log(cfg.num_neighbours) + NULL_MARGIN_INIT


def add_overlap_scores(
    mask: Tensor | None, overlap: Tensor, weight: Tensor, kr: int, dtype: torch.dtype
) -> Tensor:
    """CCA's score mask with the overlap gate's term: weight_h * overlap of each key's
    neighbour added to that key's score in head h.

    mask: None, (G, 1, 1, k*r) bool (True = may attend) or a float score mask
    (1 or G, H, m, k*r); overlap (B, c, k) with G = B*c; weight (H,). Returns a float mask,
    (G, H, 1, k*r) from a bool or no mask (padding -inf), else (G, H, m, k*r)."""
    B, c, k = overlap.shape
    per_key = overlap.repeat_interleave(kr // k, dim=-1)  # (B, c, k*r)
    per_head = weight.to(dtype).view(1, -1, 1, 1)  # (1, H, 1, 1)
    gate = per_key.reshape(B * c, 1, 1, kr).to(dtype) * per_head  # (G, H, 1, k*r)
    if mask is None or mask.dtype == torch.bool:
        base = gate.new_zeros(1, 1, 1, kr)
        if mask is not None:
            base = base.masked_fill(~mask, float("-inf"))
        return base + gate  # (G, H, 1, k*r)
    return mask + gate  # (G, H, m, k*r)


#: The initial copy bias of keys that continue no run, and of keys that continue a run of
#: COPY_RUN_MAX tokens; in between it grows with the log of the run's length.
COPY_BIAS_RANGE = (-2.0, 2.0)


def copy_bias_prior(n_heads: int) -> Tensor:
    """The initial copy-bias table (H, COPY_RUN_MAX + 1): entry n is the score bias of a
    key that continues a common run of n tokens, the same in every head, rising from
    COPY_BIAS_RANGE[0] (no run: a neighbour whose continuation has left the text starts
    behind the null key) to COPY_BIAS_RANGE[1] with log(1 + n)."""
    lo, hi = COPY_BIAS_RANGE
    n = torch.arange(COPY_RUN_MAX + 1, dtype=torch.float32)
    row = lo + (hi - lo) * torch.log1p(n) / math.log1p(COPY_RUN_MAX)
    return row.expand(n_heads, -1).clone()


@torch.no_grad()
def copy_runs(text: Tensor, neighbours: Tensor, r: int) -> Tensor:
    """Run lengths for the copy bias.

    text (B, c, m, R): for each query of c shifted chunks, its own token (index 0) and the
    R - 1 tokens before it (index l: l tokens back), negative where unknown;
    neighbours (B, c, k*r): the tokens of the k neighbours each chunk attends to, negative
    where not real. Returns (B, c, m, k*r) int64: for key j, the length (at most R) of the
    common run of the text ending at the query and the neighbour ending at token j - 1, in
    the same neighbour (0 for each neighbour's first key)."""
    B, c, m, R = text.shape
    kr = neighbours.shape[-1]
    k = kr // r
    nb = neighbours.reshape(B, c, k, r).masked_fill(neighbours.reshape(B, c, k, r) < 0, -2)
    nb = torch.nn.functional.pad(nb, (R + 1, 0), value=-2)  # (B, c, k, R + 1 + r)
    alive = torch.ones(B, c, m, k, r, dtype=torch.bool, device=text.device)
    run = torch.zeros(B, c, m, k, r, dtype=torch.int64, device=text.device)
    for back in range(R):  # key j against neighbour token j - 1 - back
        shifted = nb[..., R - back : R - back + r]  # (B, c, k, r)
        alive &= text[:, :, :, back, None, None] == shifted[:, :, None]
        run += alive
        if not bool(alive.any()):
            break
    return run.view(B, c, m, kr)


def with_null_key(
    k: Tensor, v: Tensor, mask: Tensor | None, null_key: Tensor, null_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Append the null key null_key (H, hd) with value 0 to keys and values (G, H, S, hd)
    and extend the mask: True for a bool mask, the null's score bias null_bias (H,) for a
    float one. Attention that the null key takes adds nothing to the update."""
    G, H, _, hd = k.shape
    null_k = null_key.to(k.dtype)[None, :, None, :].expand(G, H, 1, hd)
    k = torch.cat((k, null_k), dim=2)  # (G, H, S+1, hd)
    v = torch.cat((v, v.new_zeros(G, H, 1, hd)), dim=2)
    if mask is None or mask.dtype == torch.bool:  # None or (G, 1, 1, S)
        S = k.shape[2] - 1
        base = k.new_zeros(1, 1, 1, S)
        if mask is not None:
            base = base.masked_fill(~mask, float("-inf"))  # (G, 1, 1, S)
        base = base.expand(base.shape[0], H, 1, S)
        nb = null_bias.to(k.dtype).view(1, H, 1, 1).expand(base.shape[0], H, 1, 1)
        mask = torch.cat((base, nb), dim=-1)  # (G or 1, H, 1, S+1)
    else:  # float (H, m, S) or (G, H, m, S)
        nb = null_bias.to(mask.dtype)
        shape = (*mask.shape[:-1], 1)
        nb = nb.view(H, 1, 1) if mask.dim() == 3 else nb.view(1, H, 1, 1)
        mask = torch.cat((mask, nb.expand(shape)), dim=-1)
    return k, v, mask


__all__ = [
    "COPY_BIAS_RANGE",
    "COPY_RUN_MAX",
    "NULL_MARGIN_INIT",
    "OVERLAP_WEIGHT_INIT",
    "add_overlap_scores",
    "align_neighbours",
    "copy_bias_prior",
    "copy_runs",
    "locality_prior",
    "neighbour_overlap",
    "null_bias_prior",
    "with_null_key",
]
