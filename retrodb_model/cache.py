"""The generation cache: what `RetroModel.forward_step` keeps between calls.

`RetroCache` holds each decoder layer's self-attention keys and values, the decoder states
and tokens of the unfinished chunk (they condition the neighbour encoder once the chunk
completes), and per RETRO layer the CCA keys and values of every completed chunk, so that
each call encodes only the neighbours of the chunks it completes. `CCAInputs` is what one
layer's CCA attends to in one call, with or without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from retrodb_model.gate import COPY_RUN_MAX


class Encoded(NamedTuple):
    """The neighbours of the chunks one call completes, encoded: states (B, n, k*r, E),
    validity (B, n, k*r) (None: every token real), each neighbour's overlap with its chunk
    (B, n, k) (None: no overlap gate), and the tokens the states encode (B, n, k*r),
    negative where not real (None: no copy bias)."""

    states: Tensor
    valid: Tensor | None
    overlap: Tensor | None
    tokens: Tensor | None


@dataclass(frozen=True)
class CCAInputs:
    """What the CCA of one decoder layer attends to in one call: keys and values (B, c,
    H, k*r, hd) of the encoded neighbours of chunks first_chunk .. first_chunk + c - 1,
    their validity (B, c, k*r) bool (None: every token real), and each neighbour's overlap
    with its chunk (B, c, k) for the overlap gate (None: no gate); with the copy bias, the
    neighbours' tokens and the text before and in the call."""

    keys: Tensor
    values: Tensor
    valid: Tensor | None
    first_chunk: int
    overlap: Tensor | None = None
    # the copy bias's inputs: the neighbours' tokens (B, c, k*r), and the call's tokens
    # after the COPY_RUN_MAX - 1 before it (B, COPY_RUN_MAX - 1 + T), negative = unknown
    tokens: Tensor | None = None
    text: Tensor | None = None


@dataclass
class RetroCache:
    """Everything `RetroModel.forward_step` needs to continue a batch of sequences.

    Make one with `RetroModel.new_cache`. All sequences of the batch advance together.
    """

    batch_size: int
    max_len: int  # capacity in tokens
    chunk_size: int  # m
    retrieval: bool  # whether CCA is on for this generation
    # self-attention keys and values per decoder layer, each (B, H, max_len, hd)
    keys: list[Tensor]
    values: list[Tensor]
    pos: int = 0  # tokens consumed so far
    # decoder activations at the conditioning layer's input for the tokens of the
    # unfinished chunk, (B, pos % m, D); they condition the encoder when it completes
    pending_states: Tensor | None = None
    # the token ids of that unfinished chunk, (B, pos % m) (the overlap gate needs them)
    pending_tokens: Tensor | None = None
    # per RETRO layer (0-based index): CCA keys and values of every completed chunk, one
    # (B, H, k*r, hd) tensor per chunk, in chunk order
    cca_keys: dict[int, list[Tensor]] = field(default_factory=dict)
    cca_values: dict[int, list[Tensor]] = field(default_factory=dict)
    # per completed chunk: (B, k*r) bool validity of its neighbour tokens, None = all real
    cca_valid: list[Tensor | None] = field(default_factory=list)
    # per completed chunk (overlap gate only): (B, k) overlap of its neighbours with it
    cca_overlap: list[Tensor] = field(default_factory=list)
    # per completed chunk (copy bias only): (B, k*r) the tokens of its neighbours
    cca_tokens: list[Tensor] = field(default_factory=list)
    # the last COPY_RUN_MAX - 1 tokens consumed, (B, <= COPY_RUN_MAX - 1) (copy bias)
    recent_tokens: Tensor | None = None

    @property
    def completed_chunks(self) -> int:
        """Chunks whose neighbours are encoded (pos // m when retrieval is on, else 0)."""
        return len(self.cca_valid)

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """The self-attention keys and values of decoder layer ``layer`` (0-based)."""
        return self.keys[layer], self.values[layer]

    def chunk_states(self, x: Tensor, tokens: Tensor, n_new: int) -> tuple[Tensor, Tensor]:
        """The conditioning states (B, n_new*m, D) and token ids (B, n_new*m) of the
        chunks completed by a call with states x (B, T, D) and tokens (B, T): the kept
        ones of the unfinished chunk, then this call's. Keeps what is left of an
        unfinished chunk for the next call."""
        if self.pending_states is not None and self.pending_tokens is not None:
            x = torch.cat((self.pending_states, x), 1)
            tokens = torch.cat((self.pending_tokens, tokens), 1)
        cut = n_new * self.chunk_size
        self.pending_states, self.pending_tokens = x[:, cut:], tokens[:, cut:]
        return x[:, :cut], tokens[:, :cut]

    def text(self, tokens: Tensor) -> Tensor:
        """The copy bias's text for a call with tokens (B, T): the COPY_RUN_MAX - 1 tokens
        before them (-1 where there are fewer), then tokens."""
        return text_with_history(tokens, self.recent_tokens)

    def advance(self, tokens: Tensor) -> None:
        """Count a call's tokens (B, T) as consumed: pos and the recent tokens move on."""
        self.pos += tokens.shape[1]
        self.recent_tokens = self.text(tokens)[:, -(COPY_RUN_MAX - 1) :]

    def add_chunks(self, layer: int, new: CCAInputs, *, first: bool) -> None:
        """Keep the CCA keys and values (B, n, H, k*r, hd) of n newly completed chunks
        for decoder layer ``layer``; ``first``: the first RETRO layer, which also records
        each chunk's validity (B, n, k*r) (None: all real), its neighbours' overlap
        (B, n, k) (None: no overlap gate) and their tokens (B, n, k*r) (None: no copy
        bias)."""
        self.cca_keys.setdefault(layer, []).extend(new.keys.unbind(1))
        self.cca_values.setdefault(layer, []).extend(new.values.unbind(1))
        if first:
            n = new.keys.shape[1]
            self.cca_valid.extend([None] * n if new.valid is None else new.valid.unbind(1))
            if new.overlap is not None:
                self.cca_overlap.extend(new.overlap.unbind(1))
            if new.tokens is not None:
                self.cca_tokens.extend(new.tokens.unbind(1))

    def cca_inputs(self, layer: int, start: int, n_tokens: int) -> CCAInputs | None:
        """What the CCA of ``layer`` attends to for n_tokens tokens from position start:
        the chunks from that of the first token to that of the last (None: no token of
        the call has a completed chunk yet)."""
        m = self.chunk_size
        lo = max(0, (start + 1) // m - 1)  # chunk of the first token (0 if it has none)
        hi = (start + n_tokens) // m  # one past the chunk of the last token
        if hi <= lo:
            return None
        keys, values = self.cca_keys[layer][lo:hi], self.cca_values[layer][lo:hi]
        valid = None
        if any(v is not None for v in self.cca_valid[lo:hi]):
            B, _, kr, _ = keys[0].shape
            all_real = torch.ones(B, kr, dtype=torch.bool, device=keys[0].device)
            valid = torch.stack(
                [all_real if v is None else v for v in self.cca_valid[lo:hi]], dim=1
            )  # (B, c, k*r)
        overlap = torch.stack(self.cca_overlap[lo:hi], dim=1) if self.cca_overlap else None
        tokens = torch.stack(self.cca_tokens[lo:hi], dim=1) if self.cca_tokens else None
        # keys and values (B, c, H, k*r, hd), overlap (B, c, k), tokens (B, c, k*r)
        return CCAInputs(
            torch.stack(keys, dim=1),
            torch.stack(values, dim=1),
            valid,
            lo,
            overlap=overlap,
            tokens=tokens,
        )

    def chunks_completed_by(self, n_tokens: int) -> int:
        """How many chunks a forward_step over n_tokens more tokens completes: the number
        of neighbour sets to pass to that call when retrieval is on. They are the chunks
        completed_chunks, completed_chunks + 1, ... (when retrieval is on)."""
        m = self.chunk_size
        return (self.pos + n_tokens) // m - self.pos // m


def text_with_history(tokens: Tensor, recent: Tensor | None) -> Tensor:
    """tokens (B, T) after the COPY_RUN_MAX - 1 tokens before them, from recent
    (B, <= COPY_RUN_MAX - 1; None: none), -1 where there are fewer."""
    before = tokens.new_full((tokens.shape[0], COPY_RUN_MAX - 1), -1)
    if recent is not None and recent.shape[1]:
        before[:, -recent.shape[1] :] = recent
    return torch.cat((before, tokens), dim=1)


__all__ = ["CCAInputs", "Encoded", "RetroCache", "text_with_history"]
