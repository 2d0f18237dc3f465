"""The tables, plot and generations of scripts/data_scaling.sh, written into
docs/results-data-scaling.md between its ``<!-- results:begin -->`` and
``<!-- results:end -->`` markers (the text around them is kept), and the plot
docs/img/data-scaling.png.

    .venv/bin/python scripts/data_scaling_table.py WORKDIR [DOC.md]

WORKDIR holds one folder per model, each with info-N.json (`retrodb info --json` after
step N), eval-N.json (`retrodb evaluate` of the held-out documents on that database) and
compare.jsonl (`retrodb generate --compare --json` on the largest database).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NAMES = {"scratch": "from scratch (recipe, self-share 0.25)", "retrofit": "RETRO-fit of SmolLM2"}


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def steps(model: Path) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(step, info, evaluation) of every evaluated step, in step order."""
    out = []
    for ev in model.glob("eval-*.json"):
        n = int(ev.stem.split("-")[1])
        info = model / f"info-{n}.json"
        if info.exists():
            out.append((n, load(info), load(ev)))
    return sorted(out, key=lambda t: t[0])


def share_over(ev: dict[str, Any], alpha: float = 50) -> float:
    """The share of the scored held-out tokens whose chunk's longest common run with a
    neighbour is over alpha % of the chunk (by chunk count, for evaluations without
    token counts)."""
    t = ev["bpb_alpha"]
    i = t["alpha"].index(alpha)
    if "tokens" in t:
        return 1.0 - t["tokens"][i] / t["tokens"][-1]
    return 1.0 - t["fraction"][i]


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def model_table(name: str, rows: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> list[str]:
    out = [
        f"**{NAMES.get(name, name)}** (`{rows[0][2].get('checkpoint', '')}`)",
        "",
        "| step | documents | chunks | tokens | held-out tokens with > 50 % overlap | on "
        "| shuffled | off | on - off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, info, ev in rows:
        b = ev["bpb"]
        gain = b["retrieval"] - b["no_retrieval"]
        out.append(
            f"| {n} | {info['documents']:,} | {info['chunks']:,} | {info['tokens']:,} "
            f"| {share_over(ev):.1%} | {fmt(b['retrieval'])} | {fmt(b['shuffled'])} "
            f"| {fmt(b['no_retrieval'])} | {gain:+.4f} |"
        )
    alphas = rows[0][2]["bpb_alpha"]["alpha"]
    out += [
        "",
        "bpb(alpha) with retrieval on (off in brackets); alpha is the chunk's longest common "
        "run with a neighbour, in % of the chunk; the last row is the share of scored "
        "tokens in chunks at or under alpha on the largest database:",
        "",
        "| tokens | " + " | ".join(f"<= {a:g} %" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
    ]
    for _, info, ev in rows:
        t = ev["bpb_alpha"]
        cells = [
            f"{fmt(on)} ({fmt(off)})"
            for on, off in zip(t["retrieval"], t["no_retrieval"], strict=True)
        ]
        out.append(f"| {info['tokens']:,} | " + " | ".join(cells) + " |")
    last = rows[-1][2]["bpb_alpha"]
    shares = (
        [n / last["tokens"][-1] for n in last["tokens"]] if "tokens" in last else last["fraction"]
    )
    out.append("| share | " + " | ".join(f"{f:.1%}" for f in shares) + " |")
    return out


def falls(rows: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Say plainly where retrieval-on does not fall as the database grows."""
    on = [ev["bpb"]["retrieval"] for _, _, ev in rows]
    off = [ev["bpb"]["no_retrieval"] for _, _, ev in rows]
    bad = [
        f"{rows[i][1]['tokens']:,} -> {rows[i + 1][1]['tokens']:,} tokens "
        f"({on[i]:.4f} -> {on[i + 1]:.4f})"
        for i in range(len(on) - 1)
        if on[i + 1] > on[i]
    ]
    lines = [
        f"- On falls from {on[0]:.4f} to {on[-1]:.4f} ({on[-1] - on[0]:+.4f}) while off "
        f"stays at {min(off):.4f}..{max(off):.4f}."
    ]
    lines.append(
        "- It falls at every step."
        if not bad
        else "- It does **not** fall at every step: it rises from " + "; ".join(bad) + "."
    )
    return lines


def compare(model: Path) -> list[str]:
    path = model / "compare.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        out += [f"`{d['document']}`, prompt (its first 400 characters):", "", "```text"]
        out += [d["prompt"].rstrip(), "```", ""]
        for mode in ("off", "on"):
            g = d[mode]
            out += [f"retrieval {mode}:", "", "```text", g["text"].rstrip(), "```", ""]
            if mode == "on":  # each chunk's nearest neighbour, as in the paper's example
                for r in g["retrievals"]:
                    if r["keys"] and r["keys"][0] >= 0:
                        snippet = " ".join(r["texts"][0].split())[:140]
                        out.append(f"- chunk {r['chunk']}: `{r['docs'][0]}`: {snippet}")
                out.append("")
    return out


def plot(results: dict[str, list[tuple[int, dict[str, Any], dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, rows), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
        x = [info["tokens"] for _, info, _ in rows]
        for mode, style in (("retrieval", "o-"), ("shuffled", "s--"), ("no_retrieval", ":")):
            y = [ev["bpb"][mode] for _, _, ev in rows]
            label = f"{name}: {mode.replace('no_retrieval', 'off').replace('retrieval', 'on')}"
            ax.plot(
                x, y, style, color=color, label=label, alpha=1.0 if mode == "retrieval" else 0.6
            )
    ax.set_xscale("log")
    ax.set_xlabel("tokens in the retrieval database (log)")
    ax.set_ylabel("bits per byte, held-out Python docs")
    ax.set_title("The same model as its database grows (retrodb add)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    w = Path(argv[0])
    doc = Path(argv[1] if len(argv) > 1 else "docs/results-data-scaling.md")
    results = {m.name: steps(m) for m in sorted(w.iterdir()) if m.is_dir() and steps(m)}
    results = dict(
        sorted(
            results.items(),
            key=lambda kv: list(NAMES).index(kv[0]) if kv[0] in NAMES else len(NAMES),
        )
    )
    body: list[str] = []
    for name, rows in results.items():
        body += model_table(name, rows) + [""] + falls(rows) + [""]
    img = doc.parent / "img" / "data-scaling.png"
    plot(results, img)
    body += [f"![bpb against database tokens](img/{img.name})", ""]
    for name in results:
        gens = compare(w / name)
        if gens:
            body += [f"### Generations, {NAMES.get(name, name)}, largest database", ""] + gens
    text = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + BEGIN + "\n" + "\n".join(body).rstrip() + "\n" + END + tail)
    print(f"wrote {doc} and {img}")


if __name__ == "__main__":
    main(sys.argv[1:])
