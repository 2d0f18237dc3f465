"""The copy task of tests/test_model.py at any width, with the copy in a random slot.

Random tokens; for every chunk one of the k = 2 neighbours (a random slot per chunk when
--random-slot) is an exact copy of the chunk and its continuation, the other is noise.
Only copying lowers the loss below log V; averaging both neighbours floors at ~1.50 nats,
choosing the copy at ~0.97 (15/64 of the targets cannot be copied).

.venv/bin/python scripts/research/copy_task.py --dim 384 --lr 3e-4 --enc-input norm --random-slot
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from retrodb_model.config import RetroConfig
from retrodb_model.diagnostics import copy_task


def config(
    *, dim: int, enc_input: str, position_bias: bool, preset: str, gate: bool
) -> RetroConfig:
    heads = max(4, dim // 64)  # head width 16 at 64, 64 from 256 on
    return RetroConfig.preset(
        preset,
        vocab_size=64,
        chunk_size=16,
        dim=dim,
        n_heads=heads,
        enc_dim=dim // 2 if preset == "tiny" else dim,
        enc_heads=max(2, heads // 2) if preset == "tiny" else heads,
        cca_position_bias=position_bias,
        enc_input=enc_input,
        max_seq_len=256,
        cca_null=gate,
        cca_overlap_gate="aligned" if gate else "none",
        cca_copy_bias=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    ap.add_argument("--enc-input", nargs="+", default=["norm"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--random-slot", action="store_true")
    ap.add_argument("--no-position-bias", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--gate", action="store_true", help="null key + overlap gate")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for enc in a.enc_input:
        for lr in a.lr:
            lasts = []
            t0 = time.perf_counter()
            for seed in range(a.seeds):
                cfg = config(
                    dim=a.dim,
                    enc_input=enc,
                    position_bias=not a.no_position_bias,
                    preset=a.preset,
                    gate=a.gate,
                )
                losses = copy_task(cfg, steps=a.steps, lr=lr, random_slot=a.random_slot, seed=seed)
                lasts.append(sum(losses[-20:]) / 20)
            print(
                f"{a.preset} dim {a.dim} enc_input {enc:<6} lr {lr:.0e} random_slot "
                f"{a.random_slot} bias {not a.no_position_bias} gate {a.gate}: last-20 loss "
                + " ".join(f"{x:.3f}" for x in lasts)
                + f" (log V {math.log(64):.2f}; {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
