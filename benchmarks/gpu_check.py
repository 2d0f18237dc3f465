"""The GPU checks of issue 12, run by benchmarks/gpu_check.sh (read that file first).

Prints, in one run on one machine:

1. the encoder (all-MiniLM-L6-v2) in chunks/s: ONNX Runtime on the CPU (fp32, every core)
   and on CUDA (fp16, IO binding) at several batch sizes, over the same texts;
2. how far the CUDA keys are from the CPU keys: cosine per chunk (min, 0.1st percentile,
   mean) and the overlap of each chunk's top-10 neighbours among all the texts;
3. the RETRO model's training speed on CUDA in bf16 (autocast; weights and AdamW in fp32):
   the `small` preset with a 32k vocabulary, sequences of 512 tokens, k = 2 neighbours,
   batches of 4, 8 and 16 random token sequences, tokens/s of forward + backward + step.

Texts are windows of ``--words`` words (26: about 71 WordPiece tokens, as a database chunk of
64 SentencePiece tokens of the Python docs) cut from the Python standard library's .py files
(present wherever Python is), so no corpus is needed; keys of the same texts are compared.

``--cpu-only`` runs every step with tiny sizes on the CPU (the "CUDA" encoder is then a
second CPU encoder, the model runs in fp32 on the CPU): it checks the script, not speed.

The retrodb package is imported from this checkout. Where zarr or usearch are missing (the
GPU machine's image has neither), only the modules the encoder needs are loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def say(line: str = "") -> None:
    print(line, flush=True)


def import_encoder() -> tuple[types.ModuleType, types.ModuleType]:
    """retrodb.encoder and retrodb.encoder_prepare; without running retrodb/__init__.py when
    its imports are missing."""
    names = ("retrodb.encoder", "retrodb.encoder_prepare")
    try:
        run, prepare = (importlib.import_module(n) for n in names)
    except ImportError as e:
        say(f"(retrodb imports {e.name!r}, absent here: loading the encoder modules on their own)")
        for name in [m for m in sys.modules if m == "retrodb" or m.startswith("retrodb.")]:
            del sys.modules[name]
        package = types.ModuleType("retrodb")
        package.__path__ = [str(ROOT / "retrodb")]
        sys.modules["retrodb"] = package
        run, prepare = (importlib.import_module(n) for n in names)
    return run, prepare


def stdlib_texts(n: int, *, words: int) -> list[str]:
    """``n`` distinct windows of ``words`` words from the standard library's .py files."""
    out: list[str] = []
    seen: set[str] = set()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        tokens = path.read_text(encoding="utf-8", errors="replace").split()
        for start in range(0, len(tokens) - words, words):
            text = " ".join(tokens[start : start + words])
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    return out
    if not out:
        raise SystemExit(f"no .py files under {stdlib}")
    return out


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def environment(cpu_only: bool) -> None:
    import onnxruntime as ort

    say(f"machine: {platform.machine()}, {CORES} cores, Python {platform.python_version()}")
    say(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
    say(f"  providers: {ort.get_available_providers()}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if cuda else "none"
        say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {name}")
    except ImportError:
        say("torch: not installed")
    with contextlib.suppress(OSError):
        say(f"load average: {os.getloadavg()[0]:.2f}")
    if cpu_only:
        say("--cpu-only: tiny sizes, CPU only; the figures below check the script, not speed")


def check_encoder(args: argparse.Namespace) -> bool:
    """Part 1 and 2; returns whether the keys agree (cosine >= 0.999 for every chunk)."""
    enc_mod, prepare_mod = import_encoder()
    Encoder = enc_mod.Encoder
    say("\n== encoder: all-MiniLM-L6-v2, CPU fp32 vs CUDA fp16 ==")
    if args.encoder_dir:
        enc_dir = Path(args.encoder_dir)
    else:
        enc_dir = Path(tempfile.mkdtemp(prefix="retrodb-gpu-check-")) / "minilm"
        from retrodb.config import EncoderConfig

        t, _ = timed(prepare_mod.prepare_encoder, None, enc_dir, config=EncoderConfig())
        say(f"exported the bundled MiniLM to ONNX in {t:.1f} s")
    n_total = max(args.n_gpu, args.n_cpu, args.n_agree)
    texts = stdlib_texts(n_total, words=args.words)
    if len(texts) < n_total:  # a small stdlib: repeat (throughput only; agreement uses distinct)
        texts = (texts * (n_total // len(texts) + 1))[:n_total]
    cpu = Encoder.open(enc_dir, threads=CORES, device="cpu")
    lengths = cpu.tokenize(texts[: args.n_cpu])["attention_mask"].sum(axis=1)
    say(
        f"texts: {args.words}-word windows of the stdlib's .py files; WordPiece tokens per "
        f"text: mean {lengths.mean():.0f}, max {lengths.max()} (a database chunk of the Python "
        f"docs: 71)"
    )
    cpu.encode(texts[: cpu.batch_size])  # warm up
    cpu_s, _ = timed(cpu.encode, texts[: args.n_cpu])
    cpu_rate = args.n_cpu / cpu_s
    say(
        f"CPU  fp32: {cpu_rate:8.0f} chunks/s  ({args.n_cpu} texts, batch {cpu.batch_size}, "
        f"{CORES} threads)"
    )

    device = "cpu" if args.cpu_only else "cuda"
    cache = Path(tempfile.mkdtemp(prefix="retrodb-fp16-cache-"))
    t_open, gpu = timed(Encoder.open, enc_dir, device=device, cache=cache)
    say(
        f"opened on {gpu.device} ({gpu.precision}, providers {gpu.providers}) in {t_open:.1f} s"
        f"{' including the fp16 conversion' if gpu.precision == 'fp16' else ''}"
    )
    if gpu.precision == "fp16":
        t_again, _ = timed(Encoder.open, enc_dir, device=device, cache=cache)
        say(f"opened again from the fp16 cache in {t_again:.1f} s")
    gpu.encode(texts[: min(len(texts), max(args.batches))])  # warm up (kernels, arena)
    best = (0.0, 0)
    for size in args.batches:
        runs = []
        for _ in range(args.repeat):
            s, _ = timed(gpu.encode, texts[: args.n_gpu], batch_size=size)
            runs.append(s)
        rate = args.n_gpu / min(runs)
        best = max(best, (rate, size))
        say(
            f"{gpu.device:5s}{gpu.precision}: {rate:8.0f} chunks/s  ({args.n_gpu} texts, "
            f"batch {size}, best of {args.repeat}; encode() with tokenization)"
        )
    size = best[1]
    order = np.argsort([-len(t) for t in texts[: args.n_gpu]], kind="stable")
    batches = [
        gpu.tokenize([texts[i] for i in order[j : j + size]]) for j in range(0, args.n_gpu, size)
    ]
    run_s, _ = timed(lambda: [gpu.run(b) for b in batches])
    tok_s, _ = timed(
        lambda: [
            gpu.tokenize([texts[i] for i in order[j : j + size]])
            for j in range(0, args.n_gpu, size)
        ]
    )
    say(
        f"  at batch {size}: the model alone {args.n_gpu / run_s:8.0f} chunks/s ({gpu.device}, "
        f"inputs pre-tokenized); WordPiece alone {args.n_gpu / tok_s:8.0f} texts/s"
    )
    say(f"speed-up, whole encode(): {best[0] / cpu_rate:.1f}x one GPU over {CORES} CPU cores")

    distinct = list(dict.fromkeys(texts[: args.n_agree]))
    a = cpu.encode(distinct)
    b = gpu.encode(distinct)
    cos = (a * b).sum(axis=1)
    queries = min(500, len(distinct))
    sim_a, sim_b = a[:queries] @ a.T, b[:queries] @ b.T
    for sim in (sim_a, sim_b):
        sim[np.arange(queries), np.arange(queries)] = -np.inf  # not its own neighbour
    top_a = np.argsort(-sim_a, axis=1)[:, :10]
    top_b = np.argsort(-sim_b, axis=1)[:, :10]
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b, strict=True)])
    ok = bool(cos.min() >= 0.999)
    say(
        f"key agreement over {len(distinct)} texts: cosine min {cos.min():.6f}, "
        f"0.1st pct {np.percentile(cos, 0.1):.6f}, mean {cos.mean():.6f}; top-10 overlap "
        f"{overlap:.4f} ({queries} queries) -> {'PASS' if ok else 'FAIL'} (min >= 0.999)"
    )
    return ok


def check_model(args: argparse.Namespace) -> None:
    """Part 3: RETRO training tokens/s (bf16 autocast on CUDA)."""
    import torch

    from retrodb_model.config import RetroConfig
    from retrodb_model.model import RetroModel

    cuda = not args.cpu_only
    device = torch.device("cuda" if cuda else "cpu")
    say("\n== RETRO model: training step (forward + backward + AdamW) ==")
    torch.manual_seed(0)
    cfg = RetroConfig.preset("small", 32000)
    model = RetroModel(cfg).to(device)
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    model.train()
    seq, k = (args.seq_len, 2)
    n_chunks = seq // cfg.chunk_size
    say(
        f"preset small: {cfg.n_layers} layers x {cfg.dim}, CCA at {cfg.retro_layers}, vocab "
        f"{cfg.vocab_size}, {model.num_parameters() / 1e6:.1f}M params; L = {seq}, k = {k}, "
        f"{'bf16 autocast on ' + torch.cuda.get_device_name(0) if cuda else 'fp32 on the CPU'}"
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for batch in args.train_batches:
        for retrieval in (True, False) if batch == args.train_batches[-1] else (True,):
            g = torch.Generator().manual_seed(batch)
            tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
            targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
            retrieved = (
                torch.randint(
                    0, cfg.vocab_size, (batch, n_chunks, k, cfg.neighbour_len), generator=g
                ).to(device)
                if retrieval
                else None
            )  # (B, n, k, r)
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def step(
                tokens: torch.Tensor = tokens,
                retrieved: torch.Tensor | None = retrieved,
                targets: torch.Tensor = targets,
            ) -> None:
                ctx = (
                    torch.autocast("cuda", dtype=torch.bfloat16)
                    if cuda
                    else contextlib.nullcontext()
                )
                with ctx:
                    _, loss = model(tokens, retrieved, targets=targets)
                assert loss is not None
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            sync()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
            n_tokens = batch * seq
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            say(
                f"B = {batch:2d} {'with' if retrieval else 'without'} retrieval: median "
                f"{n_tokens / statistics.median(times):9.0f} tokens/s, best "
                f"{n_tokens / min(times):9.0f} ({statistics.median(times) * 1000:.1f} ms/step"
                f"{f', peak {peak:.1f} GiB' if cuda else ''})"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--encoder-dir", help="a prepared MiniLM encoder directory")
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--words", type=int, default=26)
    parser.add_argument("--n-gpu", type=int, default=65536)
    parser.add_argument("--n-cpu", type=int, default=4096)
    parser.add_argument("--n-agree", type=int, default=4096)
    parser.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 4096]
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--train-batches", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16]
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.cpu_only:
        args.n_gpu, args.n_cpu, args.n_agree = 96, 64, 64
        args.batches, args.repeat = [16, 32], 1
        args.seq_len, args.train_batches, args.steps, args.warmup = 128, [1, 2], 1, 1
    # torch first: its CUDA wheels load the CUDA and cuDNN libraries that ONNX Runtime's CUDA
    # provider then finds already in the process.
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    environment(args.cpu_only)
    ok = True
    if not args.skip_encoder:
        ok = check_encoder(args)
    if not args.skip_model:
        check_model(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
