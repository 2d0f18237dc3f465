"""Encoder speed and int8 quality: ONNX Runtime fp32 against per-channel dynamic int8.

Run: ``python benchmarks/bench_encoder.py [--n 500] [--threads 2]``. Texts are windows of
about 26 words (about 64 WordPiece tokens) cut from Python's standard library sources, so
the numbers need no download. Prints export time, chunks/s (ONNX Runtime alone, and the
whole encode path with tokenization), and int8's cosine and top-10 overlap to fp32.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (load before usearch, which retrodb imports)

from retrodb.config import EncoderConfig
from retrodb.encoder import Encoder
from retrodb.encoder_prepare import prepare_encoder


def stdlib_texts(n: int, *, words: int = 26) -> list[str]:
    """``n`` windows of ``words`` words from the standard library's .py files."""
    out: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        tokens = path.read_text(encoding="utf-8", errors="replace").split()
        for start in range(0, len(tokens) - words, words * 7):
            out.append(" ".join(tokens[start : start + words]))
            if len(out) == n:
                return out
    return out


def timed(fn, *args, repeat: int = 2):  # noqa: ANN001, ANN201
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    texts = stdlib_texts(args.n)
    with tempfile.TemporaryDirectory() as td:
        encoders = {}
        for quantize in ("none", "int8"):
            t = time.perf_counter()
            d = Path(td) / quantize
            prepare_encoder(None, d, config=EncoderConfig(quantize=quantize))
            enc = Encoder.open(d, threads=args.threads)
            encoders[quantize] = enc
            mb = (d / "model.onnx").stat().st_size / 1e6
            print(f"prepare {quantize}: {time.perf_counter() - t:.1f} s, model.onnx {mb:.0f} MB")
        fp32 = encoders["none"]
        lengths = fp32.tokenize(texts)["attention_mask"].sum(axis=1)
        print(f"{len(texts)} texts, WordPiece tokens mean {lengths.mean():.0f} max {lengths.max()}")
        vectors = {}
        for name, enc in encoders.items():
            batches = [
                enc.tokenize(texts[i : i + args.batch_size])
                for i in range(0, len(texts), args.batch_size)
            ]
            ort_s, _ = timed(lambda b=batches, e=enc: [e.run(x) for x in b])
            enc_s, vectors[name] = timed(enc.encode, texts)
            print(
                f"{name:5s}: ONNX Runtime alone {len(texts) / ort_s:6.0f} chunks/s, "
                f"encode() {len(texts) / enc_s:6.0f} chunks/s ({args.threads} threads)"
            )
        a, b = vectors["none"], vectors["int8"]
        cos = (a * b).sum(axis=1)
        print(f"int8 vs fp32 cosine: mean {cos.mean():.4f} min {cos.min():.4f}")
        queries = slice(0, min(100, len(texts)))
        top_a = np.argsort(-(a[queries] @ a.T), axis=1)[:, 1:11]
        top_b = np.argsort(-(b[queries] @ b.T), axis=1)[:, 1:11]
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b, strict=True)])
        print(f"int8 vs fp32 top-10 overlap: {overlap:.3f}")


if __name__ == "__main__":
    main()
