"""Shared helpers for the benchmarks: the Python documentation corpus and timing."""

from __future__ import annotations

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
