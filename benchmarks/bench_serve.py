"""`retrodb serve` against in-process search, measured in one run.

For 1, 4 and 16 concurrent clients (threads, each with its own HTTP connection), every
client sends ``--requests`` text queries (lines of the database's own documents, k = 4)
to ``/search``, against a server started with micro-batching and one without; the same
queries run in-process on one shared ``RetroDB`` (the same number of threads). Then
``retrodb generate`` tokens/s of a checkpoint with the database in-process and through the
server. Prints a table (``--json``: the figures).

    .venv/bin/python benchmarks/bench_serve.py --db data/never-hurt/db \\
        --checkpoint data/never-hurt/retro-ss0.25

The servers are child processes on a free loopback port (``retrodb serve --port 0
--port-file``); every one is stopped before the script ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import retrodb
from retrodb import RetroDB


def query_texts(db: RetroDB, n: int, seed: int = 0) -> list[str]:
    """``n`` chunk texts of the database (random keys), as queries."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, db.manifest.next_key, n)
    return [t.strip()[:300] or "python" for t in db.decode(keys)]


def percentiles(lat: list[float]) -> dict[str, float]:
    ms = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def load(
    search: Callable[[Any, str], None],
    make_client: Callable[[], Any],
    texts: list[str],
    clients: int,
    requests: int,
) -> dict[str, float]:
    """``clients`` threads, each ``requests`` searches; latency percentiles and queries/s."""
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        client = make_client()
        mine = []
        start.wait()
        for i in range(requests):
            t0 = time.perf_counter()
            search(client, texts[(c * requests + i) % len(texts)])
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)
        close = getattr(client, "close", None)
        if close is not None and client is not None:
            close()

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run, c) for c in range(clients)]
        start.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    return {**percentiles(lat), "qps": clients * requests / wall}


class Server:
    """`retrodb serve` in a child process on a free loopback port."""

    def __init__(self, db: Path, *options: str) -> None:
        self.dir = tempfile.TemporaryDirectory()
        port_file = Path(self.dir.name) / "port"
        cmd = [
            sys.executable, "-m", "retrodb_cli.main", "serve", str(db), "--port", "0",
            "--port-file", str(port_file), *options,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # handshake: the server says when it listens
            if line.startswith("listening on port"):
                break
        else:
            raise RuntimeError(f"retrodb serve exited with {self.proc.wait()}")
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        # keep draining stderr so that the child never blocks on a full pipe
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.dir.cleanup()


def encoder_rates(
    db: RetroDB, texts: list[str], sizes: tuple[int, ...] = (1, 4, 16, 64)
) -> dict[str, float]:
    """Texts/s of the database's encoder when given batches of each size (the same 128
    texts): what micro-batching can buy on this device."""
    enc = db.encoder
    out = {}
    for b in sizes:
        t0 = time.perf_counter()
        for i in range(0, 128, b):
            enc.encode(texts[i : i + b])
        out[str(b)] = 128 / (time.perf_counter() - t0)
    return out


def generate_rate(checkpoint: Path, db: Any, tokens: int) -> float:
    from retrodb_model.checkpoint import load_model
    from retrodb_model.generate import generate

    model, _ = load_model(checkpoint, db=db)
    prompt = "The with statement closes a file when the block ends. To read a file,"
    generate(model, db, prompt, max_tokens=8)  # warm-up
    t0 = time.perf_counter()
    res = generate(model, db, prompt, max_tokens=tokens, stop_at_eos=False)
    return len(res.tokens) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=Path("data/never-hurt/db"))
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=100, help="per client")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2, help="encoder threads, both sides")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RETRODB_THREADS", str(args.threads))

    local = RetroDB.open(args.db, threads=args.threads)
    counts = [int(c) for c in args.clients.split(",")]
    texts = query_texts(local, max(counts) * args.requests)
    local.search(texts[:4], k=4)  # warm: the encoder and the index are open

    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "db": str(args.db),
        "chunks": int(local.info()["chunks"]),
        "requests_per_client": args.requests,
        "threads": args.threads,
    }
    out["encoder_texts_per_s_by_batch"] = encoder_rates(local, texts)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    rows["in-process"] = {
        c: load(lambda db, t: db.search(t, k=4), lambda: local, texts, c, args.requests)
        for c in counts
    }
    for name, options in (
        ("served, batching", ["--batching"]),
        ("served, no batching", ["--no-batching"]),
    ):
        server = Server(args.db, "--threads", str(args.threads), *options)
        try:
            remote = retrodb.connect(server.url)
            remote.search(texts[:4], k=4)
            url = server.url
            rows[name] = {
                c: load(
                    lambda db, t: db.search(t, k=4),
                    lambda url=url: retrodb.connect(url),
                    texts,
                    c,
                    args.requests,
                )
                for c in counts
            }
            if name == "served, batching":
                out["batching_stats"] = remote.info().get("server")
                if args.checkpoint is not None:
                    out["generate_tps_served"] = generate_rate(
                        args.checkpoint, remote, args.gen_tokens
                    )
            remote.close()
        finally:
            server.stop()
    if args.checkpoint is not None:
        out["generate_tps_local"] = generate_rate(args.checkpoint, local, args.gen_tokens)
    out["search"] = {name: {str(c): v for c, v in r.items()} for name, r in rows.items()}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['machine']}; {out['db']} ({out['chunks']:,} chunks); /search of one text, k = 4")
    print("| clients | " + " | ".join(f"{n}: p50 ms / p99 ms / q/s" for n in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for c in counts:
        cells = [
            f"{r[c]['p50_ms']:.1f} / {r[c]['p99_ms']:.1f} / {r[c]['qps']:.0f}"
            for r in rows.values()
        ]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(
        "encoder texts/s by batch size:",
        {b: round(r) for b, r in out["encoder_texts_per_s_by_batch"].items()},
    )
    if "batching_stats" in out:
        print("batching:", out["batching_stats"])
    if args.checkpoint is not None:
        print(
            f"generate: {out['generate_tps_local']:.1f} tokens/s in-process, "
            f"{out['generate_tps_served']:.1f} through the server"
        )


if __name__ == "__main__":
    main()
