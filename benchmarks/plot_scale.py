"""The table and the log-log plot of docs/scale.md from bench_scale.py's JSON lines.

    .venv/bin/python benchmarks/plot_scale.py data/bench-scale/*.json \\
        [--table docs/scale-table.md] [--plot docs/img/scale-costs.png]

Each input file holds one JSON object (``bench_scale.py --json``), one N each.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import arg_parser

#: (field, label, format) of the table's rows; the bare-USearch peers follow their figure.
ROWS = [
    ("build_s", "build, s", "{:.1f}"),
    ("index_rate", "index, chunks/s", "{:,.0f}"),
    ("index_rate_usearch", "  bare USearch `add` into 10 indexes, chunks/s", "{:,.0f}"),
    ("open_s", "open, s", "{:.3f}"),
    ("first_query_s", "first query, s", "{:.3f}"),
    ("rss_anon_open_mb", "RssAnon after open, MB", "{:.0f}"),
    ("rss_anon_queries_mb", "RssAnon after 1,000 queries, MB", "{:.0f}"),
    ("disk_bytes_per_chunk", "segment bytes on disk per chunk", "{:,.0f}"),
    ("search_p50_ms_cold", "search p50 right after open, ms", "{:.3f}"),
    ("search_p50_ms", "search p50, ms (k = 10)", "{:.3f}"),
    ("search_p50_ms_usearch", "  bare USearch p50, ms", "{:.3f}"),
    ("search_p50_ms_loaded", "  indexes loaded into memory, p50, ms", "{:.3f}"),
    ("search_p99_ms", "search p99, ms", "{:.3f}"),
    ("search_p99_ms_usearch", "  bare USearch p99, ms", "{:.3f}"),
    ("search_p99_ms_loaded", "  indexes loaded, p99, ms", "{:.3f}"),
    ("recall_at_10", "recall@10 (vs exact)", "{:.4f}"),
    ("batch_qps", "batched queries/s", "{:,.0f}"),
    ("batch_qps_usearch", "  bare USearch, queries/s", "{:,.0f}"),
    ("batch_qps_loaded", "  indexes loaded, queries/s", "{:,.0f}"),
    ("load_indexes_s", "loading the indexes (first query), s", "{:.2f}"),
    ("rss_anon_loaded_mb", "  RssAnon with them loaded, MB", "{:.0f}"),
    ("gather_ms", "`retrieve` of 2,048 keys, ms", "{:.2f}"),
    ("gather_memmap_ms", "  numpy.memmap gather as int64, ms", "{:.2f}"),
    ("gather_memmap_raw_ms", "  numpy.memmap gather, stored dtype, ms", "{:.2f}"),
    ("add_1pct_s", "add 1 % of N, s", "{:.2f}"),
    ("add_10k_s", "add 10k chunks, s", "{:.2f}"),
    ("add_10k_s_small_db", "  the same add to a 10k database, s", "{:.2f}"),
    ("add_peak_rss_mb", "add, peak RSS MB", "{:.0f}"),
    ("neighbours_rate_local", "neighbours (k = 2), chunks/s", "{:,.0f}"),
    ("neighbours_rate_ray", "  Ray, 2 workers, chunks/s", "{:,.0f}"),
    ("compact_s", "compact 10 segments into 1, s", "{:.1f}"),
    ("compact_rate", "  chunks/s", "{:,.0f}"),
    ("index_rate_usearch_single", "  bare USearch `add` into 1 index, chunks/s", "{:,.0f}"),
    ("compact_peak_rss_mb", "  peak RSS MB", "{:.0f}"),
    ("verify_s", "verify, s", "{:.1f}"),
    ("verify_peak_rss_mb", "  peak RSS MB", "{:.0f}"),
]

#: What the plot shows: costs in seconds (or ms) against N.
PLOT = [
    ("build_s", "build (s)"),
    ("compact_s", "compact 10 -> 1 (s)"),
    ("verify_s", "verify (s)"),
    ("add_10k_s", "add 10k chunks (s)"),
    ("open_s", "open (s)"),
    ("search_p50_ms", "search p50 (ms)"),
    ("search_p50_ms_usearch", "bare USearch p50 (ms)"),
    ("search_p50_ms_loaded", "search p50, indexes loaded (ms)"),
    ("gather_ms", "retrieve 2,048 keys (ms)"),
    ("rss_anon_open_mb", "RssAnon after open (MB)"),
]


def table(results: list[dict]) -> str:
    head = "| | " + " | ".join(f"N = {r['chunks']:,}" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for key, name, fmt in ROWS:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["chunks"] for r in results]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, name in PLOT:
        ys = [r.get(key) for r in results]
        if all(y is not None for y in ys):
            style = "--" if "usearch" in key else "-"
            ax.plot(n, ys, style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("chunks in the database (N)")
    ax.set_ylabel("cost (unit in the legend)")
    ax.set_title("retrodb costs against database size (2-core CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--table", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    results = sorted(
        (json.loads(p.read_text().strip().splitlines()[-1]) for p in args.results),
        key=lambda r: r["chunks"],
    )
    for r in results:  # runs from before the warm pass measured the first pass only
        if "search_p50_ms_cold" not in r:
            r["search_p50_ms_cold"] = r.pop("search_p50_ms")
            r["search_p99_ms"] = None
    text = table(results)
    if args.table:
        args.table.write_text(text)
    print(text, end="")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
