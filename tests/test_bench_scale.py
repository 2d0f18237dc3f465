"""The scale benchmark at a small N: it runs end to end through the real write path and its
JSON has every field docs/scale.md reports, with exact-search recall. Times are not checked
(they belong to benchmarks/, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOPICS, pristine_db, write_corpus

ROOT = Path(__file__).resolve().parents[1]

FIELDS = """chunks build_s index_rate index_rate_usearch open_s first_query_s rss_anon_open_mb
rss_anon_queries_mb disk_bytes_per_chunk search_p50_ms search_p99_ms search_p50_ms_usearch
recall_at_10 batch_qps gather_ratio_memmap add_1pct_s add_10k_s add_peak_rss_mb
neighbours_rate_local neighbours_rate_ray compact_s verify_s""".split()

centres = pristine_db("centres", lambda root: write_corpus(root / "corpus", TOPICS, repeat=12))


@pytest.mark.slow
def test_bench_scale_json_has_every_field_and_exact_recall(centres: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--chunks", "3000",
         "--add-chunks", "500", "--centres-db", str(centres), "--workdir", str(tmp_path),
         "--skip", "ray", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    missing = [f for f in FIELDS if f not in res]
    assert not missing, missing
    assert res["chunks"] == 3000
    assert res["neighbours_rate_ray"] is None  # skipped, and said so
    assert res["neighbours_rate_local"] > 0 and res["verify_ok"] is True
    assert res["recall_at_10"] >= 0.95
    assert not list(tmp_path.glob("db-*"))  # the databases are removed afterwards
