"""Training throughput side by side with the public RETRO-pytorch, interleaved in one run.

Both models at the same sizes: the `small` preset (6 decoder layers of width 384, 6 heads
of 64, CCA at layers 3 and 6, an encoder of 2 layers of width 384 with cross-attention in
both, feed-forward 4x), a 32k vocabulary, chunks of 64, k = 2 neighbours of 128 tokens,
sequences of 512 tokens, batch 4, random tokens and neighbours. One step is forward,
loss, backward and an AdamW step (the same fused torch AdamW for both, weight decay on
matrices only). Ours runs with the CCA position bias on and off
(RetroConfig.cca_position_bias), and with and without the retrieval levers of the
recipe (RMSNorm encoder input, CCA null key and overlap gate; `--levers`); the versions
are timed in turns, round after round, at
each thread count, so that the load of a shared machine falls on all of them alike.

    .venv/bin/python benchmarks/bench_vs_public.py [--threads 1 2] [--rounds 3] [--steps 2]
        [--dtype fp32|bf16] [--public matched|released|both|none] [--baseline MODEL_PY]

For every version it prints tokens/s of the best and the median step (wall clock) and
tokens per CPU second of the median step (the process's CPU time, all threads: what the
load of other processes inflates least; at 1 thread, what an idle core would give), and
the ratios to each RETRO-pytorch version. `--baseline` also times RetroModel from another
copy of retrodb_model/model.py (`git show REV:retrodb_model/model.py > /tmp/before.py`).
That copy is loaded on its own and imports the rest of retrodb_model from this tree, so it
times the model of REV only where that model.py held the whole model (revisions before
the split into model, kernels, gate and cache); for a later REV, run this benchmark in a
worktree of REV (`git worktree add /tmp/rev REV`) beside a run in this tree.

The public implementation (lucidrains' RETRO-pytorch, PyPI `retro-pytorch`) is not a
dependency of this project. Install it without its dependencies (faiss, autofaiss, ...)
into a folder of its own and point the script at it:

    .venv/bin/pip install --no-deps --target /tmp/retro-public retro-pytorch==0.3.9 einops
    .venv/bin/python benchmarks/bench_vs_public.py --public-path /tmp/retro-public

Without it the script times only our model and says so. Its package `__init__` imports
the retrieval module, which needs faiss; the script loads only the model module
(`retro_pytorch/retro_pytorch.py`) and gives it the one constant it takes from there.

RETRO-pytorch 0.3.9's RETRO does not pass its `heads` argument on (its encoder and decoder
always get 8 heads of 64, attention 512 wide); the script builds it with 6 heads of 64
like ours (see public_model), and as released with `--public released` or `both`. Where
the sizes still differ: RETRO-pytorch has a GELU feed-forward of width 4d (ours: SwiGLU of
width 2/3 * 4d, the same parameters), biases on its output projections, a learned
absolute position embedding, a null key/value in CCA, an untied output head and an
output projection after its encoder; the script prints both parameter counts by part.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from common import add_model_args
from torch import Tensor, nn

from retrodb_model.config import RetroConfig
from retrodb_model.model import RetroModel

PUBLIC_VERSION = "0.3.9"


def load_public(path: str | None) -> tuple[types.ModuleType | None, str]:
    """RETRO-pytorch's model module without its package (whose __init__ needs faiss),
    or (None, why not)."""
    if path:
        sys.path.insert(0, path)
    if importlib.util.find_spec("einops") is None:
        return None, "einops is not installed"
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None, "retro-pytorch is not installed"
    package = types.ModuleType("retro_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.BERT_VOCAB_SIZE = 28996  # type: ignore[attr-defined]  # a default argument
    sys.modules["retro_pytorch"] = package
    sys.modules["retro_pytorch.retrieval"] = retrieval
    module = importlib.import_module("retro_pytorch.retro_pytorch")
    try:
        from importlib.metadata import version

        found = version("retro-pytorch")
    except Exception:
        found = "unknown version"
    return module, found


def public_model(module: types.ModuleType, cfg: RetroConfig, *, released_heads: bool) -> nn.Module:
    """RETRO-pytorch's RETRO at the sizes of our config.

    RETRO's constructor takes `heads` but does not pass it on to its Encoder and Decoder,
    which then use their default of 8 (8 heads of 64: attention 512 wide where the model
    is 384). Unless released_heads, the two classes get cfg's head count while RETRO is
    built, so that the attention has our width and parameters."""
    if released_heads:
        return build_public(module, cfg)
    encoder, decoder = getattr(module, "Encoder"), getattr(module, "Decoder")  # noqa: B009
    setattr(module, "Encoder", functools.partial(encoder, heads=cfg.enc_heads))  # noqa: B010
    setattr(module, "Decoder", functools.partial(decoder, heads=cfg.n_heads))  # noqa: B010
    try:
        return build_public(module, cfg)
    finally:
        setattr(module, "Encoder", encoder)  # noqa: B010
        setattr(module, "Decoder", decoder)  # noqa: B010


def build_public(module: types.ModuleType, cfg: RetroConfig) -> nn.Module:
    return module.RETRO(  # type: ignore[no-any-return]
        num_tokens=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        enc_dim=cfg.enc_dim,
        enc_depth=cfg.enc_layers,
        enc_cross_attn_layers=cfg.enc_cross_attn_layers,
        dec_depth=cfg.n_layers,
        dec_cross_attn_layers=cfg.retro_layers,
        heads=cfg.n_heads,
        dec_dim=cfg.dim,
        dim_head=cfg.head_dim,
        chunk_size=cfg.chunk_size,
        pad_id=0,
    )


def param_parts(model: nn.Module, public: bool) -> dict[str, int]:
    """Parameter counts by part: embeddings and head, decoder (self-attention, FF, norms),
    CCA, encoder; a shared tensor counted once."""
    parts = {"embeddings + head": 0, "decoder": 0, "CCA": 0, "encoder": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("encoder."):
            part = "encoder"
        elif public and name.startswith("decoder.layers.") and name.split(".")[3] == "1":
            part = "CCA"  # decoder.layers.i.1 = the PreNorm-wrapped CCA
        elif not public and ".cca." in name:
            part = "CCA"
        elif name.startswith(("decoder.", "layers.", "norm_out.", "to_decoder_model_dim.")):
            part = "decoder"
        else:
            part = "embeddings + head"
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def adamw(groups: list[dict[str, object]]) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)  # type: ignore[arg-type]


def decay_groups(model: nn.Module) -> list[dict[str, object]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@dataclass
class Version:
    name: str
    model: nn.Module
    public: bool


@dataclass(frozen=True)
class Batch:
    tokens: Tensor  # (B, L + 1): inputs are [:, :-1], targets [:, 1:]
    retrieved: Tensor  # (B, L // m, k, r)


def make_batch(cfg: RetroConfig, *, batch: int, seq_len: int, k: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # ids from 1: RETRO-pytorch masks id 0 (its pad_id) out of the neighbours
    tokens = torch.randint(1, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    n = seq_len // cfg.chunk_size
    retrieved = torch.randint(1, cfg.vocab_size, (batch, n, k, cfg.neighbour_len), generator=g)
    return Batch(tokens, retrieved)


def autocast(dtype: str) -> contextlib.AbstractContextManager[object]:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def our_step(model: RetroModel, data: Batch, dtype: str) -> Callable[[], None]:
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    model.train()
    tokens, targets = data.tokens[:, :-1], data.tokens[:, 1:]

    def step() -> None:
        with autocast(dtype):
            _, loss = model(tokens, data.retrieved, targets=targets)
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def public_step(model: nn.Module, data: Batch, dtype: str) -> Callable[[], None]:
    opt = adamw(decay_groups(model))
    model.train()

    def step() -> None:
        with autocast(dtype):
            loss = model(data.tokens, data.retrieved, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def initial_loss(v: Version, data: Batch) -> float:
    """The loss before training (near log V for every version: a check that each is a
    language model over the same tokens)."""
    with torch.no_grad():
        if v.public:
            v.model.train()  # RETRO-pytorch returns a loss only in training mode
            return float(v.model(data.tokens, data.retrieved, return_loss=True))
        _, loss = v.model(data.tokens[:, :-1], data.retrieved, targets=data.tokens[:, 1:])
        assert loss is not None
        return float(loss)


def load_model_class(path: str) -> type[RetroModel]:
    """RetroModel from another copy of retrodb_model/model.py (e.g. `git show
    HEAD:retrodb_model/model.py > /tmp/model_before.py`), to time code versions side by side."""
    spec = importlib.util.spec_from_file_location("retrodb_model_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.RetroModel  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="turns of every version")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per turn")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per version")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--public-path", help="a folder holding retro_pytorch and einops")
    parser.add_argument(
        "--public",
        choices=("matched", "released", "both", "none"),
        default="matched",
        help="RETRO-pytorch with our head count (matched), as released (8 heads), both, none",
    )
    parser.add_argument("--bias", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--levers",
        choices=("on", "off", "both"),
        default="both",
        help="ours with the retrieval levers (RMSNorm encoder input, CCA null key and overlap "
        "gate: the defaults), without them (raw input, no null key, no gate), or both",
    )
    parser.add_argument(
        "--baseline", metavar="MODEL_PY", help="also time RetroModel from this model.py"
    )
    parser.add_argument("--baseline-bias", choices=("on", "off", "both"), default="on")
    args = parser.parse_args()

    cfg = RetroConfig.preset(args.preset, args.vocab)
    data = make_batch(cfg, batch=args.batch, seq_len=args.seq_len, k=args.k, seed=0)
    n_tokens = args.batch * args.seq_len

    versions: list[Version] = []
    biases = {"on": [True], "off": [False], "both": [True, False]}
    classes: list[tuple[str, type[RetroModel], list[bool]]] = [
        ("ours", RetroModel, biases[args.bias])
    ]
    if args.baseline:
        classes.append(("baseline", load_model_class(args.baseline), biases[args.baseline_bias]))
    for label, cls, bias_values in classes:
        for bias in bias_values:
            torch.manual_seed(0)
            model = cls(cfg.replace(cca_position_bias=bias))
            versions.append(Version(f"{label}, bias {'on' if bias else 'off'}", model, False))
    if args.levers != "on":  # ours, bias on, without the levers
        torch.manual_seed(0)
        bare = cfg.replace(
            enc_input="raw", cca_null=False, cca_overlap_gate="none", cca_copy_bias=False
        )
        versions.append(Version("ours, no levers", RetroModel(bare), False))
        if args.levers == "off":
            versions = [v for v in versions if not v.name.startswith("ours, bias")]
    if args.public != "none":
        public_mod, why = load_public(args.public_path)
        if public_mod is None:
            print(f"RETRO-pytorch skipped ({why}); to compare, install it (see the docstring):")
            print(
                "  .venv/bin/pip install --no-deps --target /tmp/retro-public "
                f"retro-pytorch=={PUBLIC_VERSION} einops"
            )
        else:
            print(f"RETRO-pytorch {why} (its model module only)")
            kinds = {"matched": [False], "released": [True], "both": [False, True]}[args.public]
            for released in kinds:
                torch.manual_seed(0)
                name = "public, 8 heads" if released else "public"
                versions.append(
                    Version(name, public_model(public_mod, cfg, released_heads=released), True)
                )

    print(
        f"{args.preset}: {cfg.n_layers} decoder layers x {cfg.dim} ({cfg.n_heads} heads of "
        f"{cfg.head_dim}), CCA at {cfg.retro_layers}, encoder {cfg.enc_layers} x {cfg.enc_dim}, "
        f"vocab {cfg.vocab_size}; batch {args.batch} x {args.seq_len}, chunk "
        f"{cfg.chunk_size}, k = {args.k} x {cfg.neighbour_len} tokens, {args.dtype}"
    )
    print("parameters (M):")
    for v in versions:
        parts = param_parts(v.model, public=v.public)
        print(f"  {v.name:18s} " + ", ".join(f"{p} {c / 1e6:.2f}" for p, c in parts.items()))
    print(f"initial loss (log V = {math.log(cfg.vocab_size):.3f}):")
    for v in versions:
        print(f"  {v.name:18s} {initial_loss(v, data):.3f}")

    steps = {
        v.name: public_step(v.model, data, args.dtype)
        if v.public
        else our_step(cast(RetroModel, v.model), data, args.dtype)
        for v in versions
    }
    refs = [v.name for v in versions if v.public]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        load0 = os.getloadavg()[0]
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        wall: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        order = list(steps)
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                for _ in range(args.steps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    steps[name]()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        load1 = os.getloadavg()[0]
        print(
            f"\n{threads} thread(s), {args.dtype}, {args.rounds} rounds x {args.steps} steps; "
            f"1-min load average {load0:.2f} before, {load1:.2f} after"
        )
        header = "".join(f"  vs {ref:>21s}" for ref in refs)
        print(f"  {'version':18s} {'best':>7s} {'median':>7s} {'CPU':>7s}{header}")
        for name in steps:
            tw, tc = wall[name], cpu[name]
            ratios = ""
            for ref in refs:
                rb = min(wall[ref]) / min(tw)
                rm = statistics.median(wall[ref]) / statistics.median(tw)
                rc = statistics.median(cpu[ref]) / statistics.median(tc)
                ratios += f"  {rb:5.2f}x {rm:5.2f}x {rc:5.2f}x"
            print(
                f"  {name:18s} {n_tokens / min(tw):7.1f} {n_tokens / statistics.median(tw):7.1f} "
                f"{n_tokens / statistics.median(tc):7.1f}{ratios}"
            )
        print(
            "  tokens/s of the best and the median step (wall clock), and tokens per CPU second "
            "of the median step\n  (the process's CPU time, all threads: what load from other "
            "processes inflates least;\n  at 1 thread, the wall-clock rate of an idle core)"
        )


if __name__ == "__main__":
    main()
