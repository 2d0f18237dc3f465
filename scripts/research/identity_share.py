"""Share of the neighbour encoder's output variance explained by the token id, at init,
for widths 64, 128 and 384 (the small preset otherwise) and each RetroConfig.enc_input.

.venv/bin/python scripts/research/identity_share.py   (about a minute, 1 thread)
"""

from __future__ import annotations

import torch

from retrodb_model.config import RetroConfig
from retrodb_model.diagnostics import token_identity_share
from retrodb_model.model import RetroModel

if __name__ == "__main__":
    torch.set_num_threads(1)
    for dim, heads in ((64, 4), (128, 4), (384, 6)):
        row = []
        for mode in ("raw", "scaled", "norm"):
            torch.manual_seed(0)
            cfg = RetroConfig.preset(
                "small", 8192, dim=dim, n_heads=heads, enc_dim=dim, enc_heads=heads, enc_input=mode
            )
            share = token_identity_share(RetroModel(cfg), chunks=16)
            row.append(f"{mode} {share:.3f}")
        print(f"width {dim:>4}: " + ", ".join(row), flush=True)
