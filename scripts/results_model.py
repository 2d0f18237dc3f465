# ruff: noqa: E501  (the report is one long Markdown template)
"""Turn the outputs of scripts/results.sh into docs/results-model.md and its plots.

.venv/bin/python scripts/results_model.py WORKDIR docs/results-model.md docs/img
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def history(run: Path) -> list[dict[str, Any]]:
    state = load(run / "state.json") or {}
    return list(state.get("history", []))


def fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def plot_curves(w: Path, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label, color in (("retro", "RETRO (k=2)", "C0"), ("plain", "--no-retrieval", "C1")):
        h = history(w / name)
        if not h:
            continue
        ax.plot([r["step"] for r in h], [r["bpb"] for r in h], color=color, alpha=0.6,
                label=f"{label}: train")  # fmt: skip
        val = [(r["step"], r["val_bpb"]) for r in h if r.get("val_bpb") is not None]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color=color, label=f"{label}: validation")
    ax.set_xlabel("step (4 x 256 tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Training curves, small preset, Python library docs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_alpha(evals: dict[str, dict[str, Any] | None], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {
        "held-out, retrieval": ("heldout", "retrieval", "o-", "C0"),
        "held-out, retrieval off": ("heldout", "no_retrieval", "s--", "C0"),
        "new docs after add, retrieval": ("after", "retrieval", "o-", "C2"),
        "new docs after add, retrieval off": ("after", "no_retrieval", "s--", "C2"),
    }
    for label, (key, mode, style, color) in styles.items():
        e = evals.get(key)
        if e and e.get("bpb_alpha"):
            t = e["bpb_alpha"]
            ax.plot(t["alpha"], t[mode], style, color=color, label=label)
    ax.set_xlabel("alpha: max overlap of a chunk with its neighbours (% of the chunk)")
    ax.set_ylabel("bits per byte of chunks with overlap <= alpha")
    ax.set_xticks([0, 12.5, 25, 50, 75, 100])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def alpha_table(e: dict[str, Any] | None) -> str:
    if not e or not e.get("bpb_alpha"):
        return "(not run)\n"
    t = e["bpb_alpha"]
    rows = [
        "| alpha | chunks | share | bpb retrieval | bpb retrieval off | gain |",
        "|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(t["alpha"]):
        on, off = t["retrieval"][i], t["no_retrieval"][i]
        gain = None if on is None or off is None else off - on
        rows.append(
            f"| {a:g}% | {t['chunks'][i]} | {100 * t['fraction'][i]:.1f}% | {fmt(on)} | "
            f"{fmt(off)} | {fmt(gain)} |"
        )
    return "\n".join(rows) + "\n"


def gap(e: dict[str, Any] | None) -> str:
    """|bpb with retrieval - bpb without| of one evaluation."""
    if not e or e["bpb"].get("retrieval") is None:
        return "n/a"
    return fmt(abs(e["bpb"]["retrieval"] - e["bpb"]["no_retrieval"]), ".4f")


def rf_summary(evals: dict[str, dict[str, Any] | None]) -> str:
    """The retrofit's result 2 in words, from the numbers."""
    before, after, held = evals["rf_before"], evals["rf_after"], evals["rf_heldout"]
    if not (before and after and held):
        return ""
    b, a = before["bpb"]["retrieval"], after["bpb"]["retrieval"]
    off = after["bpb"]["no_retrieval"]
    h_on, h_off = held["bpb"]["retrieval"], held["bpb"]["no_retrieval"]
    text = (
        f"After `retrodb add`, with no retraining, the bpb of the new documents with retrieval "
        f"goes from {b:.3f} to **{a:.3f}** ({a - b:+.3f}), against {off:.3f} with retrieval off "
        f"({100 * (a - off) / off:+.1f} %)."
    )
    if b > off or h_on > h_off:
        text += (
            f" The price: trained only on neighbours that continue the text exactly, the model "
            f"trusts whatever it retrieves, so where no such neighbour exists retrieval hurts "
            f"(new documents before the add: {b:.3f} on vs {before['bpb']['no_retrieval']:.3f} off; "
            f"held-out documents: {h_on:.3f} on vs {h_off:.3f} off). Training on a mix of "
            f"copyable and ordinary neighbours should teach it when to copy; that is not run here."
        )
    return text


def read_text(p: Path) -> str:
    return p.read_text().strip() if p.is_file() else "(not run)"


def main() -> None:
    w, md, img = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    img.mkdir(parents=True, exist_ok=True)
    plot_curves(w, img / "model-training-curves.png")
    evals = {
        "heldout": load(w / "eval-heldout-retro.json"),
        "heldout_plain": load(w / "eval-heldout-plain.json"),
        "before": load(w / "eval-new-before.json"),
        "after": load(w / "eval-new-after.json"),
        "new_plain": load(w / "eval-new-plain.json"),
        "rf_before": load(w / "eval-retrofit-new-before.json"),
        "rf_after": load(w / "eval-retrofit-new-after.json"),
        "rf_heldout": load(w / "eval-retrofit-heldout.json"),
    }
    plot_alpha(evals, img / "model-bpb-alpha.png")
    hr, hp = history(w / "retro"), history(w / "plain")
    sr, sp = load(w / "retro" / "state.json") or {}, load(w / "plain" / "state.json") or {}
    cfg = (load(w / "retro" / "config.json") or {}).get("train", {})

    def b(key: str, mode: str) -> str:
        e = evals.get(key)
        return fmt(e["bpb"].get(mode)) if e else "n/a"

    def last_val(h: list[dict[str, Any]]) -> str:
        vals = [r["val_bpb"] for r in h if r.get("val_bpb") is not None]
        return fmt(vals[-1]) if vals else "n/a"

    def speed(h: list[dict[str, Any]]) -> str:
        if not h:
            return "n/a"
        tps = sorted(r["tokens_per_s"] for r in h)
        return f"{tps[len(tps) // 2]:,.0f}"

    held = evals["heldout"] or {}
    srf = load(w / "retrofit" / "state.json") or {}
    hrf = history(w / "retrofit")

    longer = ""
    e1000 = {k: load(w / f"eval-1000-{k}.json") for k in ("heldout", "new-before", "new-after")}
    if all(e1000.values()):
        h1000 = history(w / "retro-1000")
        longer = (
            f"A longer run (not part of `scripts/results.sh`: the same RETRO configuration for "
            f"{h1000[-1]['step'] if h1000 else '?'} steps, `--out {w}/retro-1000`) reaches held-out bpb "
            f"{fmt(e1000['heldout']['bpb']['retrieval'])} with retrieval and "
            f"{fmt(e1000['heldout']['bpb']['no_retrieval'], '.5f')} without (retrieval on: "
            f"{fmt(e1000['heldout']['bpb']['retrieval'], '.5f')}); on the new documents "
            f"{fmt(e1000['new-before']['bpb']['retrieval'], '.5f')} before `retrodb add` and "
            f"{fmt(e1000['new-after']['bpb']['retrieval'], '.5f')} after: still no use of the neighbours.\n"
        )

    def overlap(key: str) -> str:
        return fmt((evals[key] or {}).get("bpb_alpha", {}).get("mean_overlap"), ".2f")

    new_b = evals["before"] or {}
    text = f"""# RETRO model results: the Python library documentation, small preset, CPU

Reproduce with one command (about an hour on 2 loaded cores; every step resumes):

```
bash scripts/results.sh            # STEPS=300 SEQ_LEN=256 BATCH=4 DTYPE=bf16 by default
```

## Setup and budget

- Corpus: the `library/` folder of the Python 3.11 documentation sources (Debian's
  python3.11-doc, 317 files, 6.8 MB). 21 files (a stable hash of the file name, seed 1,
  5 %) are **new documents**: kept out of training and out of the database. The other
  296 files form the database (SentencePiece vocabulary 8,192, chunks of 64,
  all-MiniLM-L6-v2 encoder with per-channel int8 weights) and its neighbour set `train`
  (k = 2, own document excluded). The neighbour set's validation split (5 % of documents
  by hash, seed 0: {held.get("documents", "?")} files) is never trained on: the **held-out** set.
- Model: the `small` preset (6 layers of width 384, CCA at layers 3 and 6, 2-layer
  encoder of width 384; 19.7M parameters with the 8k vocabulary).
- Training budget: **{cfg.get("steps", "?")} steps of {cfg.get("batch_size", "?")} x {cfg.get("seq_len", "?")} tokens**
  ({sr.get("tokens", 0):,} tokens, about {sr.get("tokens", 0) / 1.57e6:.2f} epochs of the training split), AdamW
  lr {cfg.get("lr", "?")} with {cfg.get("warmup", "?")} warm-up steps and cosine decay to 10 %, weight decay 0.1,
  clipping at 1.0, bf16 autocast, seed 0. Both models see the same batches in the same
  order. Wall time: RETRO {sr.get("elapsed_s", 0) / 60:.1f} min, no-retrieval {sp.get("elapsed_s", 0) / 60:.1f} min.
- Machine: {platform.processor() or platform.machine()}, 2 cores (AMX bf16), no GPU, at times shared
  with other jobs; the RETRO and no-retrieval runs shared the cores (one torch thread
  each). Median training throughput: RETRO {speed(hr)} tokens/s,
  no-retrieval {speed(hp)} tokens/s. Timings are noisy; the bpb numbers are not.
- Evaluation: windows of {held.get("seq_len", "?")} tokens, the first {held.get("max_tokens_per_document", "?")} tokens of each document,
  neighbours retrieved live from the database (k = {held.get("k", "?")}); bits per byte = total
  NLL / ln 2 / UTF-8 bytes of the target text. These are very short training runs:
  the absolute numbers are far from a converged model.

## 1. Held-out documents: retrieval on, off, and a model trained without it

Neighbours come from other documents only (`--exclude-self`: the held-out documents are
in the database, so without it a chunk would retrieve its own continuation).

| model | bpb | validation bpb at the last step (training split's val loader) |
|---|---|---|
| RETRO, retrieval on | {b("heldout", "retrieval")} | {last_val(hr)} |
| RETRO, retrieval off (same weights, plain decoder) | {b("heldout", "no_retrieval")} | |
| trained with `--no-retrieval`, same steps | {b("heldout_plain", "no_retrieval")} | {last_val(hp)} |

![training curves](img/model-training-curves.png)

## 2. Knowledge without retraining: new documents added with `retrodb add`

The 21 new documents ({new_b.get("tokens", 0):,} scored tokens) are evaluated with the database as
trained (they are not in it), then added with `retrodb add` (no retraining, no new
neighbour set) and evaluated again. Neighbours may now come from the document itself:
this is the paper's leakage setting, made on purpose.

| | bpb retrieval on | bpb retrieval off |
|---|---|---|
| before `retrodb add` | {b("before", "retrieval")} | {b("before", "no_retrieval")} |
| after `retrodb add` | {b("after", "retrieval")} | {b("after", "no_retrieval")} |
| `--no-retrieval` model | | {b("new_plain", "no_retrieval")} |

Mean overlap of a chunk with its neighbours: before {fmt((evals["before"] or {}).get("bpb_alpha", {}).get("mean_overlap"), ".2f")},
after {fmt((evals["after"] or {}).get("bpb_alpha", {}).get("mean_overlap"), ".2f")}.

## 3. bpb(alpha)

For each chunk j >= 1 of a window, alpha is the longest common contiguous token run
between the chunk and the neighbours (neighbour + continuation) of chunk j-1 - the
neighbours its tokens attend to - as a share of the chunk; bpb(alpha) covers the chunks
with overlap <= alpha (the first chunk of each window attends to none and is left out).

Held-out documents (other documents' neighbours only):

{alpha_table(evals["heldout"])}
New documents after `retrodb add` (their own chunks retrievable):

{alpha_table(evals["after"])}
![bpb(alpha)](img/model-bpb-alpha.png)

## 4. Generation from one prompt (greedy, 96 new tokens, database with the added documents)

Retrieval on (`--show-neighbours` lists each retrieval):

```
{read_text(w / "gen-retrieval.txt")}
```

Retrieval off (same RETRO weights):

```
{read_text(w / "gen-no-retrieval.txt")}
```

The `--no-retrieval` model:

```
{read_text(w / "gen-plain.txt")}
```

## 5. RETRO-fitting on copyable neighbours: knowledge without retraining, shown

Trained with the paper's rule (a chunk never gets neighbours from its own document), the
RETRO model above has not learned to use its neighbours in {cfg.get("steps", "?")} steps: retrieval
on and off differ by {gap(evals["heldout"])} bpb on the held-out documents, and by
{gap(evals["after"])} on the new documents even once their own text is retrievable. The signal
that teaches copying (a neighbour that contains what comes next) is rare in a corpus of
300 documents with few near-duplicates; the paper's models see billions of tokens of a
web corpus full of them. The CCA position bias (see [model.md](model.md)) makes copying
learnable when that signal is there, as below, but does not create the signal.

{longer}
To show the database side at work, the `--no-retrieval` decoder is RETRO-fitted
(`--retrofit`: decoder frozen, {100 * srf.get("trainable_fraction", 0):.1f}% of the parameters trained: CCA and the
encoder) for {len(hrf) and hrf[-1]["step"]} steps on a neighbour set `leak` computed for the training documents under
other ids (`retrodb neighbours DB leak --input copy-of-training-docs/`), so each chunk's
own text is retrievable, as in the paper's leakage analysis. The 21 new documents are in
neither the training data nor the database; they are evaluated, added with `retrodb add`
(no retraining), and evaluated again:

| retrofit model | bpb retrieval on | bpb retrieval off | mean overlap |
|---|---|---|---|
| new documents, before `retrodb add` | {b("rf_before", "retrieval")} | {b("rf_before", "no_retrieval")} | {overlap("rf_before")} |
| new documents, after `retrodb add` | {b("rf_after", "retrieval")} | {b("rf_after", "no_retrieval")} | {overlap("rf_after")} |
| held-out documents, own document excluded | {b("rf_heldout", "retrieval")} | {b("rf_heldout", "no_retrieval")} | {overlap("rf_heldout")} |

{rf_summary(evals)}

bpb(alpha) of the new documents after `retrodb add`:

{alpha_table(evals["rf_after"])}
The same prompt with the retrofit model, after `retrodb add` (retrieval on):

```
{read_text(w / "gen-retrofit.txt")}
```

and before it (the sqlite3 documentation is not in the database yet):

```
{read_text(w / "gen-retrofit-before-add.txt")}
```

## Generation speed (`benchmarks/bench_generate.py`, the RETRO checkpoint, 1 thread)

```
{read_text(w / "bench-generate.txt")}
```
"""
    md.write_text(text)


if __name__ == "__main__":
    main()
