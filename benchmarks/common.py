"""Shared helpers for the benchmarks: the Python documentation corpus and timing."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pydocs(sub: str | None = None) -> Path:
    """The _sources folder of Debian's python3.11-doc (fetched on first use), or one subfolder."""
    out = (
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "get-pydocs.sh"), str(ROOT / "data" / "pydocs")],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    src = Path(out)
    if not src.is_absolute():
        src = ROOT / src
    return src / sub if sub else src


def arg_parser(doc: str | None, *, db: bool = False) -> argparse.ArgumentParser:
    """A benchmark's parser, with its docstring as the help; ``db``: the benchmark measures
    an existing database, the positional argument DB."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if db:
        ap.add_argument("db")
    return ap


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model and batch of the training-step benchmarks: preset, vocabulary, batch,
    sequence length and neighbours per chunk."""
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("-k", type=int, default=2, help="neighbours per chunk")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_s) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0
