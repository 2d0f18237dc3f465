"""The tables of scripts/results_retrofit.sh, written into docs/results-retrofit.md between
its ``<!-- results:begin -->`` and ``<!-- results:end -->`` markers (the text around them
is kept), and the bpb(alpha) plot docs/img/retrofit-alpha.png. When the run calibrated the
retrofit (calibrate.json), every (floor, boost, copy floor) setting it tried is listed
too, and the held-out set as trained (floor 0, boost 0, copy floor 0) beside the recorded
setting.

    .venv/bin/python scripts/results_retrofit_table.py WORKDIR [DOC.md]

The rules of the retrofit issue: (1) held-out: on <= off, and in every bpb(alpha) bucket up
to 50 %, on <= off + 0.003; (2) new documents after the add: on <= 0.7 x off; (3) shuffled
>= off - 0.002 on every set; (4) off = the base alone to 1e-4.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

BUCKET, COPY, SHUFFLED, SAME = 0.003, 0.7, 0.002, 1e-4
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SETS = (
    ("heldout", "held-out documents (in the database; own document excluded)"),
    ("new-before", "new documents, before the add"),
    ("new-after", "new documents, after `retrodb add`"),
)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def worst_bucket(r: dict[str, Any]) -> float | None:
    t = r.get("bpb_alpha") or {}
    gaps = [
        on - off
        for a, on, off in zip(
            t.get("alpha", []), t.get("retrieval", []), t.get("no_retrieval", []), strict=True
        )
        if a <= 50 and on is not None and off is not None
    ]
    return max(gaps) if gaps else None


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def results(w: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    evals = {
        "heldout": load(w / "eval-retrofit-heldout.json"),
        "new-before": load(w / "eval-retrofit-new-before.json"),
        "new-after": load(w / "eval-retrofit-new-after.json"),
    }
    base = {
        "heldout": load(w / "eval-base-heldout.json"),
        "new-before": load(w / "eval-base-new.json"),
        "new-after": load(w / "eval-base-new.json"),
    }
    out = [
        "| set | documents | tokens | base alone | retrofit on | shuffled | off | on - off "
        "| worst bucket <= 50 % (on - off) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in SETS:
        r, b = evals[key], base[key]
        on, sh, off = (r["bpb"][m] for m in ("retrieval", "shuffled", "no_retrieval"))
        out.append(
            f"| {label} | {r['documents']} | {r['tokens']:,} | {b['bpb']['no_retrieval']:.4f} "
            f"| {on:.4f} | {sh:.4f} | {off:.4f} | {on - off:+.4f} "
            f"| {fmt(worst_bucket(r), '+.4f')} |"
        )
    rules = []
    h, a = evals["heldout"], evals["new-after"]
    wb = worst_bucket(h)
    ok1 = h["bpb"]["retrieval"] <= h["bpb"]["no_retrieval"] and (wb is None or wb <= BUCKET)
    rules.append(
        f"1. held-out: on - off {h['bpb']['retrieval'] - h['bpb']['no_retrieval']:+.4f}, worst "
        f"bucket up to 50 % {fmt(wb, '+.4f')} (<= +{BUCKET}): {'**met**' if ok1 else 'not met'}"
    )
    ratio = a["bpb"]["retrieval"] / a["bpb"]["no_retrieval"]
    rules.append(
        f"2. new documents after the add: on / off {ratio:.3f} (<= {COPY}): "
        f"{'**met**' if ratio <= COPY else 'not met'}"
    )
    gaps = {k: r["bpb"]["shuffled"] - r["bpb"]["no_retrieval"] for k, r in evals.items()}
    ok3 = all(g >= -SHUFFLED for g in gaps.values())
    donors = (
        "donors from any other chunk"
        if any(r.get("shuffle_any_chunk", True) for r in evals.values())
        else "donors from another document"
    )
    rules.append(
        f"3. shuffled - off ({donors}): "
        + ", ".join(f"{k} {g:+.4f}" for k, g in gaps.items())
        + f" (>= -{SHUFFLED}): {'**met**' if ok3 else 'not met'}"
    )
    anyc = w / "eval-retrofit-new-after-any-chunk.json"
    if anyc.exists():
        r = load(anyc)
        rules.append(
            "   - beside it, new documents after the add with donors from any other chunk, "
            "the same document's too (`--shuffle-any-chunk`): shuffled "
            f"{r['bpb']['shuffled']:.4f}, shuffled - off "
            f"{r['bpb']['shuffled'] - r['bpb']['no_retrieval']:+.4f}"
        )
    diffs = {
        k: abs(evals[k]["bpb"]["no_retrieval"] - base[k]["bpb"]["no_retrieval"]) for k in evals
    }
    ok4 = all(d <= SAME for d in diffs.values())
    rules.append(
        "4. |off - base alone|: "
        + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items())
        + f" (<= {SAME:g}): {'**met**' if ok4 else 'not met'}"
    )
    return out + [""] + rules, evals


def alpha_table(evals: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for key, label in SETS:
        t = evals[key].get("bpb_alpha")
        if not t:
            continue
        out += [
            f"bpb(alpha), {label}:",
            "",
            "| alpha | chunks | share | on | shuffled | off | on - off |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, a in enumerate(t["alpha"]):
            on, sh, off = t["retrieval"][i], t["shuffled"][i], t["no_retrieval"][i]
            gap = None if on is None or off is None else on - off
            out.append(
                f"| {a:g} % | {t['chunks'][i]} | {100 * t['fraction'][i]:.1f} % | {fmt(on)} "
                f"| {fmt(sh)} | {fmt(off)} | {fmt(gap, '+.4f')} |"
            )
        out.append("")
    return out


def calibration(w: Path) -> list[str]:
    """The settings ``retrodb calibrate`` tried on the held-out documents, and which it
    chose."""
    path = w / "calibrate.json"
    if not path.exists():
        return []
    c = load(path)
    copy_check = bool(c.get("copy_check"))
    out = [
        "### Calibration: overlap floor, null boost and copy floor, held-out documents",
        "",
        f"`retrodb calibrate` recorded floor {c['min_overlap']:g}, boost {c['null_boost']:g}, "
        f"copy floor {c.get('min_run', 0)} "
        + (
            "(the lowest bpb on among the settings that meet"
            if any(f["meets"] for f in c["floors"])
            else "(no setting meets the rules, so the most cautious one:"
        )
        + f" on <= off + {c['rules']['overall']}, every bucket up to 50 % <= off + "
        f"{c['rules']['bucket']}, shuffled >= off - {c['rules']['shuffled']}"
        + (
            ", the last also with the documents' own chunks retrievable, `--copy-check`"
            if copy_check
            else ""
        )
        + "); every row above uses it.",
        "",
        "| floor A | boost B | copy floor N | on | shuffled | off | on - off | worst bucket "
        "| shuffled - off "
        + ("| copying: on / off | copying: shuffled - off " if copy_check else "")
        + "| meets |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if copy_check else ""),
    ]
    for f in c["floors"]:
        b, h = f["bpb"], f["hurt"]
        keys = ("min_overlap", "null_boost", "min_run")
        chosen = all(f.get(key, 0) == c.get(key, 0) for key in keys)
        copy = ""
        if copy_check:
            cb = f["copy"]["bpb"]
            copy = (
                f"| {cb['retrieval'] / cb['no_retrieval']:.3f} "
                f"| {cb['shuffled'] - cb['no_retrieval']:+.4f} "
            )
        out.append(
            f"| {f['min_overlap']:g} | {f['null_boost']:g} "
            f"| {f.get('min_run', 0)}{' (recorded)' if chosen else ''} "
            f"| {b['retrieval']:.4f} | {b['shuffled']:.4f} | {b['no_retrieval']:.4f} "
            f"| {h['overall']:+.4f} | {h['bucket']:+.4f} | {-h['shuffled']:+.4f} "
            f"{copy}| {'**yes**' if f['meets'] else 'no'} |"
        )
    trained = w / "eval-retrofit-heldout-as-trained.json"
    if trained.exists():
        r = load(trained)
        on, off = r["bpb"]["retrieval"], r["bpb"]["no_retrieval"]
        out += [
            "",
            f"As trained (floor 0, boost 0, copy floor 0), held-out: on {on:.4f}, shuffled "
            f"{r['bpb']['shuffled']:.4f}, off {off:.4f} (on - off {on - off:+.4f}, worst "
            f"bucket {fmt(worst_bucket(r), '+.4f')}).",
        ]
    return out + [""]


def speed(w: Path) -> list[str]:
    s = load(w / "speed.json")
    records = [
        json.loads(line)
        for line in (w / "retrofit" / "log.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    out = [
        f"Same batch ({s['batch']} x {s['seq_len']} tokens, k = 2), {s['threads']} threads, "
        f"median of timed steps; trainable {s['trainable_parameters'] / 1e6:.2f} M of "
        f"{s['total_parameters'] / 1e6:.1f} M parameters (CCA after layers "
        f"{s['retro_layers']}, encoder width {s['enc_dim']}):",
        "",
        "| what | dtype | s / step | tokens/s |",
        "|---|---|---|---|",
    ]
    for r in s["rows"]:
        out.append(
            f"| {r['what']} | {r['dtype']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} |"
        )
    if rates:
        out += [
            "",
            f"The training run itself: median {statistics.median(rates):,.0f} tokens/s over "
            f"{len(records)} log records ({records[-1]['step']} steps, "
            f"{records[-1]['elapsed_s'] / 60:.0f} min).",
        ]
    return out


def generations(w: Path) -> list[str]:
    out: list[str] = []
    for path in sorted((w / "gen").glob("*.retrofit.json")):
        name = path.name.removesuffix(".retrofit.json")
        rf, base = load(path), load(w / "gen" / f"{name}.base.json")
        used = sum(1 for r in rf["retrievals"] for d in r["docs"] if d == name)
        out += [
            f"**{name}**: the prompt (its first 300 characters) ends "
            f"`…{_one_line(rf['prompt'][-80:])}`",
            "",
            f"- base alone: `{_one_line(base['text'])}`",
            f"- retrofit, retrieval on: `{_one_line(rf['text'])}`",
            f"- neighbours from {name} itself: {used} of "
            f"{sum(len(r['docs']) for r in rf['retrievals'])}",
            "",
        ]
    return out


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("`", "'")


def plot(evals: dict[str, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(SETS), figsize=(13, 3.8), sharey=False)
    for ax, (key, label) in zip(axes, SETS, strict=True):
        t = evals[key].get("bpb_alpha")
        if not t:
            continue
        for mode, style in (("retrieval", "o-"), ("shuffled", "s--"), ("no_retrieval", "^:")):
            ax.plot(t["alpha"], t[mode], style, label=mode.replace("_", " "))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("alpha (% of the chunk in a neighbour)")
        ax.set_ylabel("bits per byte")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    w = Path(sys.argv[1])
    doc = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results-retrofit.md")
    table, evals = results(w)
    body = ["## Results (written by scripts/results_retrofit_table.py)", "", *table, ""]
    body += calibration(w)
    body += alpha_table(evals)
    if plot(evals, doc.parent / "img" / "retrofit-alpha.png"):
        body += ["![bpb(alpha)](img/retrofit-alpha.png)", ""]
    body += ["### Training speed", "", *speed(w), "", "### Generations after the add", ""]
    body += generations(w)
    text = doc.read_text() if doc.exists() else f"# RETRO-fit\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + BEGIN + "\n" + "\n".join(body) + "\n" + END + tail)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
