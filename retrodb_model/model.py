"""The RETRO language model (Borgeaud et al., 2022).

Read it top to bottom: small pieces (RMSNorm, rotary positions, feed-forward, attention),
then the blocks (chunked cross-attention, decoder block, encoder block), the
neighbour encoder and finally `RetroModel`. Three modules hold what a reader of the model
need not read: `kernels` (hand-written backward passes behind RMSNorm, the feed-forward
and the output head's loss; each equals the plain computation), `gate` (the null key, the
overlap gate and CCA's initial score priors) and `cache` (the generation cache).

Shape letters used in the comments:

    B  batch                      T  decoder tokens in this call
    m  chunk size (chunk_size)    n  chunks with neighbours (T // m in a full forward)
    k  neighbours per chunk       r  tokens per neighbour (neighbour_len = 2m)
    N  neighbour sequences B*n*k  D  decoder width      E  encoder width
    H  heads                      hd head width         V  vocabulary

How retrieval enters (the paper's Section 2.4):

- chunk u = decoder tokens [u*m, (u+1)*m); `retrieved[:, u]` holds the k neighbours that
  were retrieved for chunk u (each a neighbour chunk and its continuation, r = 2m tokens);
- the encoder reads every neighbour bidirectionally and cross-attends to the decoder's
  activations of chunk u at the input of layer `dec_enc_condition_layer`;
- chunked cross-attention (CCA) in the RETRO layers lets token i attend to the encoded
  neighbours of the last chunk that ended at or before i, i.e. chunk (i + 1) // m - 1;
  tokens 0 .. m-2 have no such chunk and get nothing from CCA (a zero residual update).

Positions: rotary embeddings in every attention. In self-attention they carry absolute
positions (decoder 0..T-1, each neighbour 0..r-1). In the two cross-attentions they carry
a *relative alignment* between a chunk and its neighbours: a neighbour's first m tokens
match the chunk that retrieved it, its last m are the continuation. So in the encoder's
cross-attention, neighbour token j has position j and chunk token i position i; in CCA,
the query at offset j of a shifted chunk (the last token of chunk u, then the first m-1
tokens of chunk u+1) has position m - 1 + j, which is where that token's counterpart sits
inside each neighbour (keys have positions 0..r-1 within each neighbour).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrodb.errors import BadInputError
from retrodb_model.cache import CCAInputs, Encoded, RetroCache, text_with_history
from retrodb_model.config import RetroConfig, check_min_run, ff_hidden
from retrodb_model.gate import (
    COPY_RUN_MAX,
    OVERLAP_WEIGHT_INIT,
    add_overlap_scores,
    align_neighbours,
    copy_bias_prior,
    copy_runs,
    locality_prior,
    neighbour_overlap,
    null_bias_prior,
    with_null_key,
)
from retrodb_model.kernels import head_cross_entropy, rms_norm, swiglu

# ---------------------------------------------------------------------------------------
# small pieces


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position tables: cos and sin of position * frequency, (positions, hd/2)."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        # real buffers: a complex buffer would not survive module.to(dtype)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (P, hd/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)  # (P, hd/2)

    def forward(self, positions: Tensor | slice) -> Tensor:
        """Unit complex rotations for the given positions, (L, hd/2) complex64."""
        return torch.complex(self.cos[positions].float(), self.sin[positions].float())


def apply_rotary(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last axis of x (..., L, hd) by the
    complex rot (L, hd/2). One complex multiply is much cheaper on CPU than the "rotate
    half" form (a concatenation and four real multiplies, forward and backward)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (..., L, hd/2, 2)
    rotated = torch.view_as_complex(pairs) * rot  # (..., L, hd/2) complex
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (..., L, hd)


class FeedForward(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = swiglu(self.gate_up(x))  # gate_up (..., 2 * hidden): gate, then up
        return self.drop(self.down(hidden))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """Fused scaled dot-product attention over (..., H, L, hd) tensors.

    `mask` (bool, True = may attend) broadcasts to (..., H, L, S). A query whose row is all
    False would give NaN; callers make such rows all True and zero the result instead.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout
    )


def safe_key_mask(valid: Tensor) -> tuple[Tensor, Tensor]:
    """A key-padding mask that never masks a whole row, and which rows had any key.

    valid: (..., S) bool. Returns (mask (..., S) with all-False rows made all-True,
    has_any (...,) bool), so attention stays finite and the caller can zero those rows.
    """
    has_any = valid.any(dim=-1)  # (...,)
    return valid | ~has_any.unsqueeze(-1), has_any


# ---------------------------------------------------------------------------------------
# attention modules


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions (causal in the decoder only)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)
        self.proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        rot: Tensor,
        *,
        causal: bool,
        key_mask: Tensor | None = None,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim); rot (T, hd/2) rotations of the T positions.

        key_mask: (B, T) bool, True = real token (encoder padding); None = all real.
        kv_cache: preallocated (keys, values), each (B, H, max_len, hd); this call's keys
        and values are written at [start, start + T) and attention sees [0, start + T).
        """
        B, T, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = qkv.unbind(0)  # each (B, H, T, hd)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]  # (B, H, S, hd)
            if causal and start > 0:
                # is_causal aligns to the top left; with a prefix the query at position
                # start + i must see keys 0 .. start + i (one new token sees them all)
                if T > 1:
                    pos_q = torch.arange(start, start + T, device=x.device)
                    mask = torch.arange(start + T, device=x.device) <= pos_q[:, None]  # (T, S)
                causal = False
        drop = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask=mask, causal=causal, dropout=drop)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return self.drop(self.proj(y))


class CrossAttention(nn.Module):
    """Multi-head attention from queries of width q_dim to a context of width kv_dim.

    Keys and values are projected separately (`project_kv`) so that callers can reuse
    them: the generation cache keeps the CCA keys and values of every completed chunk.
    """

    def __init__(
        self, q_dim: int, kv_dim: int, n_heads: int, head_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        self.q = nn.Linear(q_dim, n_heads * head_dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * n_heads * head_dim, bias=False)
        self.proj = nn.Linear(n_heads * head_dim, q_dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def project_kv(self, ctx: Tensor, rot: Tensor) -> tuple[Tensor, Tensor]:
        """ctx (..., S, kv_dim) -> keys, values, each (..., H, S, hd); keys rotated."""
        *lead, S, _ = ctx.shape
        kv = self.kv(ctx).view(*lead, S, 2, self.n_heads, self.head_dim)  # (..., S, 2, H, hd)
        k, v = kv.movedim(-4, -2).unbind(-4)  # each (..., H, S, hd)
        return apply_rotary(k, rot), v

    def queries(self, x: Tensor, rot: Tensor) -> Tensor:
        """x (..., L, q_dim) -> queries (..., H, L, hd), rotated."""
        *lead, L, _ = x.shape
        q = self.q(x).view(*lead, L, self.n_heads, self.head_dim).transpose(-3, -2)
        return apply_rotary(q, rot)  # (..., H, L, hd)

    def output(self, y: Tensor) -> Tensor:
        """Attention result (..., H, L, hd) -> (..., L, q_dim)."""
        *lead, H, L, hd = y.shape
        y = y.transpose(-3, -2).reshape(*lead, L, H * hd)  # (..., L, H*hd)
        return self.drop(self.proj(y))


# ---------------------------------------------------------------------------------------
# blocks


class ChunkedCrossAttention(nn.Module):
    """CCA: each decoder token attends to the encoded neighbours of the last chunk that
    ended at or before it (the paper's shift by m - 1)."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.norm = RMSNorm(cfg.dim)  # pre-norm of the decoder states
        self.attn = CrossAttention(cfg.dim, cfg.enc_dim, cfg.n_heads, cfg.head_dim, cfg.dropout)
        # learned score bias per head and relative offset: key position p (0..r-1) minus
        # aligned query position m-1+j (j = 0..m-1), i.e. -(2m-2) .. r-m
        self.position_bias = (
            nn.Parameter(locality_prior(cfg.n_heads, cfg.chunk_size, cfg.neighbour_len))
            if cfg.cca_position_bias
            else None
        )
        # the null key (value zero) and its score bias per head, when cfg.cca_null; with
        # the overlap gate, the weight of a neighbour's overlap in its keys' scores
        self.null_key = (
            nn.Parameter(torch.zeros(cfg.n_heads, cfg.head_dim)) if cfg.cca_null else None
        )
        self.null_bias = (
            nn.Parameter(
                null_bias_prior(cfg) if cfg.cca_overlap_gate != "none" else torch.zeros(cfg.n_heads)
            )
            if cfg.cca_null
            else None
        )
        self.overlap_weight = (
            nn.Parameter(torch.full((cfg.n_heads,), OVERLAP_WEIGHT_INIT))
            if cfg.cca_overlap_gate != "none"
            else None
        )
        # the copy bias: a score bias per head and common-run length (0..COPY_RUN_MAX)
        self.copy_bias = nn.Parameter(copy_bias_prior(cfg.n_heads)) if cfg.cca_copy_bias else None
        # added to the null key's score at inference (RetrievalParts.set_null_boost): a
        # setting chosen on validation text (retrodb calibrate), not a weight
        self.null_boost = 0.0
        # the copy floor (RetrievalParts.set_min_run), also an inference setting: a key
        # is attended only where it continues a common run of at least this many tokens
        self.min_run = 0
        # the table index of (query offset j, key position p) inside one neighbour
        m, r = cfg.chunk_size, cfg.neighbour_len
        self.neighbour_len = r
        offset = torch.arange(r)[None, :] - torch.arange(m)[:, None] - (m - 1)  # (m, r)
        self.register_buffer("bias_index", offset + (2 * m - 2), persistent=False)

    bias_index: Tensor

    def score_bias(self, kr: int, dtype: torch.dtype) -> Tensor | None:
        """The additive position bias (H, m, k*r) for one shifted chunk against k*r
        neighbour keys (positions restart in every neighbour), or None when off."""
        if self.position_bias is None:
            return None
        k = kr // self.bias_index.shape[1]
        return self.position_bias[:, self.bias_index.repeat(1, k)].to(dtype)  # (H, m, k*r)

    def neighbour_kv(self, encoded: Tensor, rope: Rotary, r: int) -> tuple[Tensor, Tensor]:
        """encoded (B, n, k*r, E) -> keys, values, each (B, n, H, k*r, hd).

        Key positions restart at 0 in each of the k neighbours (0..r-1)."""
        kr = encoded.shape[-2]
        rot = rope(torch.arange(kr, device=encoded.device) % r)  # (k*r, hd/2)
        return self.attn.project_kv(encoded, rot)

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        valid: Tensor | None,
        rope: Rotary,
        *,
        start: int,
        first_chunk: int,
        overlap: Tensor | None = None,
        text: Tensor | None = None,
        neighbour_tokens: Tensor | None = None,
    ) -> Tensor:
        """The CCA update (B, T, D) of decoder states x (B, T, D) at positions
        [start, start + T); exactly 0 for tokens that have no completed chunk yet.

        keys, values (B, c, H, k*r, hd): CCA keys/values of chunks first_chunk ..
        first_chunk + c - 1, covering every chunk that these tokens attend to.
        valid (B, c, k*r) bool, True = real neighbour token; None = all real.
        overlap (B, c, k) in [0, 1]: each neighbour's overlap with its chunk (used by the
        overlap gate; None = no gate).
        text (B, COPY_RUN_MAX - 1 + T): the tokens of this call after the COPY_RUN_MAX - 1
        before it (negative where unknown), and neighbour_tokens (B, c, k*r) the tokens
        the keys encode (negative = not real): the copy bias's inputs (None = no bias).
        """
        B, T, D = x.shape
        m = self.chunk_size
        # shifted coordinate s = position - (m - 1): the token at s attends to chunk s // m
        s_start = start - (m - 1)
        skip = max(0, -s_start)  # leading tokens that attend to nothing
        if skip >= T:
            return x.new_zeros(B, T, D)
        chunk0, lead = divmod(s_start + skip, m)  # first chunk attended, offset inside it
        L = T - skip
        n_c = (lead + L + m - 1) // m  # shifted chunks touched by this call
        offset = torch.arange(lead, lead + L, device=x.device) % m  # offset j in the chunk
        rot = rope(offset + (m - 1))  # query position m-1+j: its counterpart in a neighbour
        q = self.attn.queries(self.norm(x[:, skip:]), rot)  # (B, H, L, hd)
        q = F.pad(q, (0, 0, lead, n_c * m - lead - L))  # (B, H, n_c*m, hd)
        H, hd = q.shape[1], q.shape[3]
        q = q.view(B, H, n_c, m, hd).transpose(1, 2)  # (B, n_c, H, m, hd)
        c_lo = chunk0 - first_chunk
        k = keys[:, c_lo : c_lo + n_c]  # (B, n_c, H, k*r, hd)
        v = values[:, c_lo : c_lo + n_c]  # (B, n_c, H, k*r, hd)
        kr = k.shape[-2]
        mask: Tensor | None = None
        has_any = None
        if valid is not None:
            mask, has_any = safe_key_mask(valid[:, c_lo : c_lo + n_c])  # (B, n_c, k*r), (B, n_c)
            mask = mask.reshape(B * n_c, 1, 1, kr)  # (B*n_c, 1, 1, k*r)
        bias = self.score_bias(kr, q.dtype)  # (H, m, k*r) or None
        if bias is not None:
            # 4-D: scaled_dot_product_attention takes its fused CPU kernel only with a 4-D
            # mask, and one that needs no gradient (while the bias trains, attention runs
            # on the unfused path, which at these sizes costs well under 1% of a step)
            bias = bias.unsqueeze(0)  # (1, H, m, k*r)
            # a float mask is added to the scores; padding becomes -inf
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        k = k.reshape(B * n_c, H, kr, hd)
        v = v.reshape(B * n_c, H, kr, hd)
        if self.overlap_weight is not None and overlap is not None:
            ov = overlap[:, c_lo : c_lo + n_c]  # (B, n_c, k)
            mask = add_overlap_scores(mask, ov, self.overlap_weight, kr, q.dtype)
        if self.copy_bias is not None and text is not None and neighbour_tokens is not None:
            mask = self._add_copy_bias(
                mask, text, neighbour_tokens[:, c_lo : c_lo + n_c], skip, lead, n_c, q.dtype
            )
        if self.null_key is not None and self.null_bias is not None:
            null_bias = self.null_bias + self.null_boost if self.null_boost else self.null_bias
            k, v, mask = with_null_key(k, v, mask, self.null_key, null_bias)
        drop = self.attn.dropout if self.training else 0.0
        y = attend(q.reshape(B * n_c, H, m, hd), k, v, mask=mask, dropout=drop).view(
            B, n_c, H, m, hd
        )  # (B, n_c, H, m, hd)
        if has_any is not None:
            y = y * has_any[:, :, None, None, None].to(y.dtype)  # no neighbour at all -> 0
        y = y.transpose(1, 2).reshape(B, H, n_c * m, hd)[:, :, lead : lead + L]  # (B, H, L, hd)
        y = self.attn.output(y)  # (B, L, D)
        return F.pad(y, (0, 0, skip, 0))  # (B, T, D): zeros for the first tokens

    def _add_copy_bias(
        self,
        mask: Tensor | None,
        text: Tensor,
        neighbour_tokens: Tensor,
        skip: int,
        lead: int,
        n_c: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """The score mask plus the copy bias (B*n_c, H, m, k*r) of the call's queries
        (the last T - skip tokens, placed from offset lead of n_c shifted chunks) against
        neighbour_tokens (B, n_c, k*r); see `retrodb_model.gate.copy_runs`."""
        assert self.copy_bias is not None
        B, m, R = text.shape[0], self.chunk_size, COPY_RUN_MAX
        back = text.unfold(1, R, 1).flip(-1)[:, skip:]  # (B, L, R): a token, then back
        L = back.shape[1]
        back = F.pad(back, (0, 0, lead, n_c * m - lead - L), value=-1).view(B, n_c, m, R)
        run = copy_runs(back, neighbour_tokens, self.neighbour_len)  # (B, n_c, m, k*r)
        kr = run.shape[-1]
        bias = self.copy_bias.to(dtype).t()[run]  # (B, n_c, m, k*r, H)
        bias = bias.permute(0, 1, 4, 2, 3).reshape(B * n_c, -1, m, kr)  # (B*n_c, H, m, k*r)
        if self.min_run:  # keys the text is not following: only the null key is left
            short = (run < self.min_run).view(B * n_c, 1, m, kr)
            bias = bias.masked_fill(short, float("-inf"))
        if mask is None:
            return bias
        if mask.dtype == torch.bool:
            return bias.masked_fill(~mask, float("-inf"))
        return mask + bias


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, [CCA,] feed-forward."""

    def __init__(self, cfg: RetroConfig, retro: bool) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads, cfg.head_dim, cfg.dropout)
        self.cca = ChunkedCrossAttention(cfg) if retro else None
        self.norm_ff = RMSNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_hidden, cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rot: Tensor,
        rope: Rotary,
        *,
        start: int = 0,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        neighbours: CCAInputs | None = None,
    ) -> Tensor:
        """x (B, T, D) at positions [start, start + T) -> (B, T, D). rot (T, hd/2): the
        rotations of those positions; rope: the table CCA takes its positions from.
        kv_cache: this layer's self-attention cache (see SelfAttention). neighbours: what
        CCA attends to; None (or a block without CCA): no CCA update."""
        x = x + self.attn(self.norm_attn(x), rot, causal=True, kv_cache=kv_cache, start=start)
        if self.cca is not None and neighbours is not None:
            x = x + self.cca(
                x,
                neighbours.keys,
                neighbours.values,
                neighbours.valid,
                rope,
                start=start,
                first_chunk=neighbours.first_chunk,
                overlap=neighbours.overlap,
                text=neighbours.text,
                neighbour_tokens=neighbours.tokens,
            )
        return x + self.ff(self.norm_ff(x))


class ChunkConditioning(nn.Module):
    """Encoder cross-attention from the neighbours of a chunk to the decoder's
    activations of that chunk (the chunk that retrieved them)."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.enc_dim)
        self.norm_ctx = RMSNorm(cfg.dim)
        self.attn = CrossAttention(
            cfg.enc_dim, cfg.dim, cfg.enc_heads, cfg.enc_head_dim, cfg.dropout
        )

    def forward(self, h: Tensor, ctx: Tensor, rot_q: Tensor, rot_c: Tensor) -> Tensor:
        """h (B*n, k*r, E): the k neighbours of each chunk, stacked along the token axis
        (they share the chunk's states, so those are not copied k times); ctx (B*n, m, D):
        the chunk's decoder states. Returns the update (B*n, k*r, E)."""
        k, v = self.attn.project_kv(self.norm_ctx(ctx), rot_c)  # (B*n, H, m, hd)
        q = self.attn.queries(self.norm(h), rot_q)  # (B*n, H, k*r, hd)
        drop = self.attn.dropout if self.training else 0.0
        return self.attn.output(attend(q, k, v, dropout=drop))  # (B*n, k*r, E)


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional encoder block: self-attention, [cross-attention to the
    decoder activations of the retrieving chunk,] feed-forward."""

    def __init__(self, cfg: RetroConfig, cross: bool) -> None:
        super().__init__()
        E, H, hd = cfg.enc_dim, cfg.enc_heads, cfg.enc_head_dim
        self.norm_attn = RMSNorm(E)
        self.attn = SelfAttention(E, H, hd, cfg.dropout)
        self.cross = ChunkConditioning(cfg) if cross else None
        self.norm_ff = RMSNorm(E)
        self.ff = FeedForward(E, ff_hidden(E, cfg.ff_mult), cfg.dropout)

    def forward(
        self,
        h: Tensor,
        ctx: Tensor,
        *,
        rot: Tensor,
        rot_q: Tensor,
        rot_c: Tensor,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """h (N, r, E): every neighbour, N = B*n*k; ctx (B*n, m, D): the decoder states
        of the chunk that retrieved each group of k neighbours. rot (r, hd/2): neighbour
        positions; rot_q (k*r, hd/2), rot_c (m, hd/2): the cross-attention's query and
        context positions; key_mask (N, r) bool, True = real token. Returns (N, r, E)."""
        h = h + self.attn(self.norm_attn(h), rot, causal=False, key_mask=key_mask)
        if self.cross is not None:
            N, r, E = h.shape
            update = self.cross(h.view(ctx.shape[0], -1, E), ctx, rot_q, rot_c)  # (B*n, k*r, E)
            h = h + update.view(N, r, E)
        return h + self.ff(self.norm_ff(h))


class NeighbourEncoder(nn.Module):
    """Bidirectional encoder over retrieved neighbours, conditioned on the decoder."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        # the token embedding is the decoder's (shared): bring it to unit scale (see
        # RetroConfig.enc_input), then map it to the encoder width
        self.norm_in = RMSNorm(cfg.dim) if cfg.enc_input == "norm" else None
        self.scale_in = math.sqrt(cfg.dim) if cfg.enc_input == "scaled" else 1.0
        self.proj_in = (
            nn.Linear(cfg.dim, cfg.enc_dim, bias=False) if cfg.enc_dim != cfg.dim else None
        )
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg, cross=i in (cfg.enc_cross_attn_layers or ()))
            for i in range(1, cfg.enc_layers + 1)
        )
        self.norm_out = RMSNorm(cfg.enc_dim)
        n_pos = max(cfg.neighbour_len, cfg.chunk_size)
        self.rope = Rotary(cfg.enc_head_dim, n_pos, cfg.rope_base)

    def forward(self, emb: Tensor, valid: Tensor | None, chunk_states: Tensor) -> Tensor:
        """Encode the neighbours of n chunks.

        emb (B, n, k, r, D): embedded neighbour tokens.
        valid (B, n, k, r) bool, True = real token; None = all real.
        chunk_states (B, n, m, D): decoder activations of the chunk that retrieved them.
        Returns (B, n, k*r, E).
        """
        B, n, k, r, D = emb.shape
        m = chunk_states.shape[2]
        h = emb.reshape(B * n * k, r, D)  # (N, r, D)
        if self.norm_in is not None:
            h = self.norm_in(h)
        elif self.scale_in != 1.0:
            h = h * self.scale_in
        if self.proj_in is not None:
            h = self.proj_in(h).type_as(emb)  # (N, r, E); the residual stays in emb's dtype
        key_mask = None
        if valid is not None:
            # a neighbour without any real token attends to everything (CCA masks it out
            # later); otherwise padding is never attended to
            key_mask, _ = safe_key_mask(valid.reshape(B * n * k, r))  # (N, r)
        rot_r = self.rope(slice(0, r))  # neighbour token j has position j
        rot_q = self.rope(torch.arange(k * r, device=emb.device) % r)  # (k*r, hd/2)
        rot_c = self.rope(slice(0, m))  # chunk token i has position i
        ctx = chunk_states.reshape(B * n, m, D)  # (B*n, m, D)
        for block in self.blocks:
            h = block(h, ctx, rot=rot_r, rot_q=rot_q, rot_c=rot_c, key_mask=key_mask)  # (N, r, E)
        h = self.norm_out(h)
        return h.view(B, n, k * r, -1)  # (B, n, k*r, E)


# ---------------------------------------------------------------------------------------
# the model


class RetrievalParts(nn.Module):
    """What every RETRO model shares, whatever its decoder: the optimizer over the
    trainable parameters, the checks of a call's neighbours, encoding the neighbours of the
    chunks a call completes, and what each CCA attends to. A subclass has ``cfg``, the
    neighbour ``encoder``, the CCA rotary table ``rope`` and :meth:`embed_neighbours`:
    :class:`RetroModel` (our decoder) and ``retrodb_model.hf.RetrofitModel`` (a frozen
    pretrained one)."""

    cfg: RetroConfig
    encoder: NeighbourEncoder
    rope: Rotary

    def embed_neighbours(self, ids: Tensor) -> Tensor:
        """The decoder's token embedding of neighbour ids (..., r) -> (..., r, D)."""
        raise NotImplementedError

    def retrieval_modules(self) -> list[nn.Module]:
        """The modules only retrieval uses: the neighbour encoder and every CCA."""
        raise NotImplementedError

    def _ccas(self) -> list[ChunkedCrossAttention]:
        return [c for c in self.modules() if isinstance(c, ChunkedCrossAttention)]

    @property
    def null_boost(self) -> float:
        """What every CCA adds to its null key's score (0 unless set)."""
        boosts = {c.null_boost for c in self._ccas()}
        return boosts.pop() if len(boosts) == 1 else 0.0

    def set_null_boost(self, boost: float) -> None:
        """Add ``boost`` to the null key's score in every CCA (an inference setting:
        retrieval judged with more caution, down to off as boost grows). Refused for a
        model without a null key unless 0."""
        if boost and not self.cfg.cca_null:
            raise BadInputError("a null boost needs a model with a null key (cca_null)")
        for c in self._ccas():
            c.null_boost = float(boost)

    @property
    def min_run(self) -> int:
        """The copy floor of every CCA (0: every key may be attended)."""
        runs = {c.min_run for c in self._ccas()}
        return runs.pop() if len(runs) == 1 else 0

    def set_min_run(self, n: int) -> None:
        """The copy floor (an inference setting): in every CCA a token attends to a
        neighbour key only where the text has followed that neighbour for the last ``n``
        tokens (the copy bias's common run, `retrodb_model.gate.copy_runs`); a token that
        follows no neighbour attends to the null key alone, so the decoder predicts it as
        with retrieval off. 0 turns it off. Needs the copy bias (cca_copy_bias); n is at
        most COPY_RUN_MAX, the longest run counted."""
        check_min_run(n)
        if n and not self.cfg.cca_copy_bias:
            raise BadInputError("a copy floor (min_run) needs a model with the copy bias")
        for c in self._ccas():
            c.min_run = int(n)

    @contextlib.contextmanager
    def inference_settings(
        self, *, null_boost: float | None = None, min_run: int | None = None
    ) -> Iterator[None]:
        """Within the block, the null boost and copy floor given (None: the model's own);
        the model's own again after it."""
        before = self.null_boost, self.min_run
        try:
            if null_boost is not None:
                self.set_null_boost(null_boost)
            if min_run is not None:
                self.set_min_run(min_run)
            yield
        finally:
            self.set_null_boost(before[0])
            self.set_min_run(before[1])

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The tensors a checkpoint stores."""
        raise NotImplementedError

    def freeze_for_retrofit(self) -> tuple[int, int]:
        """Train only the retrieval modules; (trainable, total) parameter counts."""
        raise NotImplementedError

    def new_cache(
        self,
        batch_size: int,
        *,
        retrieval: bool = True,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RetroCache:
        """An empty generation cache for :meth:`forward_step`."""
        raise NotImplementedError

    def forward_step(
        self,
        tokens: Tensor,
        cache: RetroCache,
        retrieved: Tensor | None = None,
        retrieved_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits of the next tokens of the sequences in ``cache``."""
        raise NotImplementedError

    def configure_optimizer(
        self,
        weight_decay: float,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        **adamw_kwargs: Any,
    ) -> torch.optim.AdamW:
        """AdamW over the trainable parameters, with weight decay only on weight
        matrices (linear layers and the embedding), none on norm gains, the CCA
        position and copy tables or the null keys.

        Uses the fused AdamW kernel (one pass per tensor; several times faster than the
        default on CPU) unless `fused` or `foreach` is given."""
        named = {id(p): (n, p) for n, p in self.named_parameters() if p.requires_grad}
        decay = {i for i, (n, p) in named.items() if p.dim() >= 2 and n.endswith(".weight")}
        params = [p for _, p in named.values()]
        groups = [
            {
                "params": [p for i, (_, p) in named.items() if i in decay],
                "weight_decay": weight_decay,
            },
            {"params": [p for i, (_, p) in named.items() if i not in decay], "weight_decay": 0.0},
        ]
        if "foreach" not in adamw_kwargs:
            adamw_kwargs.setdefault("fused", all(p.is_floating_point() for p in params))
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **adamw_kwargs)

    def _neighbour_validity(self, retrieved: Tensor, mask: Tensor | None) -> Tensor | None:
        """(..., r) bool validity of retrieved tokens, or None when every token is real."""
        valid = retrieved >= 0
        if mask is not None:
            if mask.shape != retrieved.shape:
                raise ValueError(
                    f"retrieved_mask shape {tuple(mask.shape)} differs from retrieved "
                    f"{tuple(retrieved.shape)}"
                )
            valid = valid & mask.bool()
        elif self.cfg.pad_id is not None:
            valid = valid & (retrieved != self.cfg.pad_id)
        return None if bool(valid.all()) else valid

    def _check_inputs(
        self,
        tokens: Tensor,
        retrieved: Tensor | None,
        retrieved_mask: Tensor | None,
        cache: RetroCache | None,
    ) -> Tensor | None:
        """Check a call's shapes against the config and the cache; returns the neighbours
        to encode ((B, n_new, k, r), empty when no chunk completes), None without
        retrieval."""
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        start = 0 if cache is None else cache.pos
        capacity = cfg.max_seq_len if cache is None else cache.max_len
        if start + T > capacity:
            raise ValueError(f"{start + T} tokens exceed the model/cache capacity {capacity}")
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"batch of {B}, but the cache was made for {cache.batch_size}")
        retrieval = retrieved is not None if cache is None else cache.retrieval
        if not retrieval:
            if retrieved is not None or retrieved_mask is not None:
                raise ValueError("this cache was made with retrieval=False: pass no neighbours")
            return None
        m = cfg.chunk_size
        n_new = (start + T) // m - start // m  # chunks completed by this call
        if retrieved is None:
            if n_new > 0:
                raise ValueError(f"these tokens complete {n_new} chunk(s): pass their neighbours")
            return tokens.new_zeros(B, 0, 1, cfg.neighbour_len)
        if retrieved.dim() != 4 or retrieved.shape[:2] != (B, n_new):
            raise ValueError(
                f"retrieved must be (B={B}, {n_new}, k, r) for {start + T} tokens in "
                f"chunks of {m}, got {tuple(retrieved.shape)}"
            )
        if retrieved.shape[3] != cfg.neighbour_len:
            raise ValueError(
                f"neighbours have {retrieved.shape[3]} tokens, config neighbour_len is "
                f"{cfg.neighbour_len}"
            )
        return retrieved

    def _encode_new_chunks(
        self,
        x: Tensor,
        tokens: Tensor,
        retrieved: Tensor,
        retrieved_mask: Tensor | None,
        cache: RetroCache | None,
    ) -> Encoded | None:
        """Encode the neighbours of the chunks this call completes.

        x: (B, T, D) decoder activations at the conditioning layer's input; tokens (B, T)
        this call's token ids (the overlap gate compares them with the neighbours).
        Returns None when no chunk completes, else their `Encoded` states, validity,
        overlap and tokens. The cache keeps the states and tokens of the unfinished
        chunk."""
        m = self.cfg.chunk_size
        B, n_new, k, r = retrieved.shape
        if cache is None:
            states, tokens = x[:, : n_new * m], tokens[:, : n_new * m]
        else:
            states, tokens = cache.chunk_states(x, tokens, n_new)
        if n_new == 0:
            return None
        valid = self._neighbour_validity(retrieved, retrieved_mask)  # (B, n_new, k, r)
        gate = self.cfg.cca_overlap_gate
        overlap = None
        if gate != "none":
            chunk_tokens = tokens[:, : n_new * m].reshape(B, n_new, m)
            if gate == "shift":
                retrieved, valid = align_neighbours(chunk_tokens, retrieved, valid)
            overlap = neighbour_overlap(chunk_tokens, retrieved, valid, aligned=gate != "run")
        emb = self.embed_neighbours(retrieved.clamp(min=0))  # (B, n_new, k, r, D)
        chunk_states = states.reshape(B, n_new, m, -1)  # (B, n_new, m, D)
        encoded = self.encoder(emb, valid, chunk_states)  # (B, n_new, k*r, E)
        nb_tokens = None
        if self.cfg.cca_copy_bias:  # the tokens the keys encode, -1 where not real
            real = retrieved >= 0 if valid is None else valid & (retrieved >= 0)
            nb_tokens = retrieved.masked_fill(~real, -1).view(B, n_new, k * r)
        if valid is not None:
            valid = valid.view(B, n_new, k * r)  # (B, n_new, k*r)
        return Encoded(encoded, valid, overlap, nb_tokens)

    def _cca_inputs(
        self,
        i: int,
        cca: ChunkedCrossAttention,
        encoded: Encoded | None,
        cache: RetroCache | None,
        tokens: Tensor,
        start: int,
    ) -> CCAInputs | None:
        """What the CCA of decoder layer i (0-based) attends to in this call of tokens
        (B, T) from position start: the new chunks' keys and values, or with a cache every
        completed chunk the call's tokens attend to (the new ones are added to the cache
        first); with the copy bias, also the text it compares with the neighbours."""
        new = None
        if encoded is not None:
            # (B, n_new, H, k*r, hd) each
            keys, values = cca.neighbour_kv(encoded.states, self.rope, self.cfg.neighbour_len)
            new = CCAInputs(
                keys, values, encoded.valid, 0, overlap=encoded.overlap, tokens=encoded.tokens
            )
        if cache is not None:
            if new is not None:
                cache.add_chunks(i, new, first=i + 1 == self.cfg.retro_layers[0])
            new = cache.cca_inputs(i, start, tokens.shape[1])
        if new is None or new.tokens is None:
            return new  # None: shorter than a chunk, nothing to attend to
        text = text_with_history(tokens, None) if cache is None else cache.text(tokens)
        return dataclasses.replace(new, text=text)


class RetroModel(RetrievalParts):
    """RETRO: a decoder-only transformer with chunked cross-attention to retrieved text."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderBlock(cfg, retro=i in cfg.retro_layers) for i in range(1, cfg.n_layers + 1)
        )
        self.norm_out = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.encoder = NeighbourEncoder(cfg)
        # decoder positions; CCA query positions reach 2m - 2 and key positions r - 1
        n_pos = max(cfg.max_seq_len, cfg.neighbour_len, 2 * cfg.chunk_size)
        self.rope = Rotary(cfg.head_dim, n_pos, cfg.rope_base)
        self.apply(self._init_weights)
        # projections back into a residual stream start smaller, as in GPT-2
        n_residual = 2 * cfg.n_layers + len(cfg.retro_layers)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_residual))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- parameters -------------------------------------------------------------------

    def decoder_blocks(self) -> Iterable[DecoderBlock]:
        """self.layers, typed."""
        return cast(Iterable[DecoderBlock], self.layers)

    def retrieval_modules(self) -> list[nn.Module]:
        """The modules only retrieval uses: the neighbour encoder and every CCA."""
        mods: list[nn.Module] = [self.encoder]
        for block in self.decoder_blocks():
            if block.cca is not None:
                mods.append(block.cca)
        return mods

    def embed_neighbours(self, ids: Tensor) -> Tensor:
        return self.wte(ids)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores: every weight, a tied output head once (as wte.weight)."""
        tied = self.cfg.tie_embeddings
        return {k: t for k, t in self.state_dict().items() if not (tied and k == "lm_head.weight")}

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a shared tensor once; optionally without the token embedding
        (and the output head when it is not tied)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.wte.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def freeze_for_retrofit(self) -> tuple[int, int]:
        """RETRO-fitting: freeze the decoder, train only CCA and the neighbour encoder.

        Returns (trainable, total) parameter counts."""
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self.retrieval_modules():
            for p in module.parameters():
                p.requires_grad_(True)
        params = {id(p): p for p in self.parameters()}.values()
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params)

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        retrieved: Tensor | None = None,
        retrieved_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits for every position, and the loss when targets are given.

        tokens: (B, T) token ids; T need not be a multiple of m.
        retrieved: (B, T // m, k, r) neighbour tokens, retrieved[:, u] for chunk u (used
            from the last token of chunk u on). None = retrieval off: the model is then
            exactly its plain decoder (no encoder, no CCA). Negative ids (-1 = no
            neighbour) are padding.
        retrieved_mask: (B, T // m, k, r) bool, True = real token. None = every
            non-negative id is real (except pad_id, when the config sets one).
        targets: (B, T) next-token ids; positions equal to -100 are ignored. The loss is
            the mean cross entropy in nats over the other positions.
        Returns (logits (B, T, V), loss or None).
        """
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} != tokens {tuple(tokens.shape)}")
        h = self._decode(tokens, retrieved, retrieved_mask, cache=None)  # (B, T, D)
        if targets is None:
            return self.lm_head(h), None  # (B, T, V)
        logits, loss = head_cross_entropy(h, self.lm_head.weight, targets)  # (B, T, V), ()
        return logits, loss

    # ---- generation ---------------------------------------------------------------------

    def new_cache(
        self,
        batch_size: int,
        *,
        retrieval: bool = True,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RetroCache:
        """An empty cache for `forward_step`; self-attention keys and values are
        preallocated for max_len tokens (default config.max_seq_len)."""
        cfg = self.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} must lie in 1..max_seq_len={cfg.max_seq_len}")
        ref = self.wte.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        return RetroCache(batch_size, max_len, cfg.chunk_size, retrieval, keys, values)

    @torch.no_grad()
    def forward_step(
        self,
        tokens: Tensor,
        cache: RetroCache,
        retrieved: Tensor | None = None,
        retrieved_mask: Tensor | None = None,
    ) -> Tensor:
        """Continue the sequences in `cache` by tokens (B, t); returns their logits
        (B, t, V), equal to a full forward over all tokens so far. The cache advances.

        With retrieval on, every chunk that these t tokens complete needs its neighbours
        in this call (the last token of chunk u already attends to them): retrieved
        (B, c, k, r) with c = cache.chunks_completed_by(t), in chunk order, and None
        when c == 0. They are encoded conditioned on the cached decoder activations of
        those chunks. With retrieval off, retrieved must be None.
        """
        return self.lm_head(self._decode(tokens, retrieved, retrieved_mask, cache=cache))

    # ---- the body shared by forward and forward_step ------------------------------------

    def _decode(
        self,
        tokens: Tensor,
        retrieved: Tensor | None,
        retrieved_mask: Tensor | None,
        cache: RetroCache | None,
    ) -> Tensor:
        """Final normalised decoder states (B, T, D) of tokens at positions
        [start, start + T), where start = cache.pos (0 without a cache)."""
        retrieved = self._check_inputs(tokens, retrieved, retrieved_mask, cache)
        start, T = (0 if cache is None else cache.pos), tokens.shape[1]
        x = self.drop(self.wte(tokens))  # (B, T, D)
        rot = self.rope(slice(start, start + T))  # (T, hd/2) complex
        encoded: Encoded | None = None
        for i, block in enumerate(self.decoder_blocks()):
            if retrieved is not None and i + 1 == self.cfg.dec_enc_condition_layer:
                encoded = self._encode_new_chunks(x, tokens, retrieved, retrieved_mask, cache)
            neighbours = None
            if retrieved is not None and block.cca is not None:
                neighbours = self._cca_inputs(i, block.cca, encoded, cache, tokens, start)
            kv_cache = None if cache is None else cache.layer_kv(i)
            x = block(x, rot, self.rope, start=start, kv_cache=kv_cache, neighbours=neighbours)
        if cache is not None:
            cache.advance(tokens)
        return self.norm_out(x)
