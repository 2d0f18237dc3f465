"""Build throughput: the whole `build` pipeline in chunks/s against ONNX Runtime alone on
the same chunks, in the same run. Target: the pipeline reaches >= 0.85 of the encoder alone.

    .venv/bin/python benchmarks/bench_build.py [--sub library] [--docs N] [--quantize none|int8]

The tokenizer is trained and the encoder exported once beforehand (both also timed), then
`RetroDB.build` is timed with them given, so the ratio compares ingest (read, tokenize,
chunk, detokenize, WordPiece, encode, index, write, fsync, commit) with encoding alone.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Timer, arg_parser, machine, pydocs

from retrodb import DBConfig, EncoderConfig, RetroDB
from retrodb.corpus import scan
from retrodb.encoder import Encoder
from retrodb.encoder_prepare import prepare_encoder
from retrodb.tokenizer import Tokenizer


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument(
        "--sub", default="library", help="subfolder of the Python docs (default library)"
    )
    ap.add_argument("--docs", type=int, default=60, help="use the first N documents (0 = all)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    args = ap.parse_args()

    src = pydocs(args.sub)
    work = Path(tempfile.mkdtemp(prefix="retrodb-bench-"))
    files = sorted(p for p in src.rglob("*.txt"))
    if args.docs:
        files = files[: args.docs]
    corpus_dir = work / "corpus"
    for f in files:
        dst = corpus_dir / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    config = DBConfig(encoder=EncoderConfig(quantize=args.quantize))

    with Timer() as t_tok:
        tok = Tokenizer.train(
            (t for _, t in scan([corpus_dir]).iter_documents()), config=config.tokenizer
        )
    tok.save(work / "tok.model")
    with Timer() as t_exp:
        prepare_encoder(None, work / "enc", config=config.encoder)

    with Timer() as t_build:
        db = RetroDB.build(
            work / "db",
            [corpus_dir],
            config=config,
            tokenizer=work / "tok.model",
            encoder=work / "enc",
        )
    n = db.manifest.chunks

    # ONNX Runtime alone on the same chunk texts, batched the same way (sorted by length).
    enc = Encoder.open(work / "enc")
    keys = np.arange(n)
    texts = db.decode(keys)
    order = np.argsort([len(t) for t in texts], kind="stable")
    bs = config.encoder.batch_size
    batches = [enc.tokenize([texts[i] for i in order[s : s + bs]]) for s in range(0, n, bs)]
    t0 = time.perf_counter()
    for b in batches:
        enc.run(b)
    t_ort = time.perf_counter() - t0

    pipe = n / t_build.s
    ort = n / t_ort
    print(f"machine: {machine()}")
    print(
        f"corpus: {len(files)} documents from {args.sub}/, {db.info()['tokens']:,} tokens, {n:,} chunks of 64"
    )
    print(f"tokenizer training: {t_tok.s:.1f} s; encoder export ({args.quantize}): {t_exp.s:.1f} s")
    print(f"build (tokenizer and encoder given): {t_build.s:.1f} s = {pipe:.1f} chunks/s")
    print(f"ONNX Runtime alone, same chunks:   {t_ort:.1f} s = {ort:.1f} chunks/s")
    print(f"ratio pipeline / encoder alone: {pipe / ort:.3f}  (target >= 0.85)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
