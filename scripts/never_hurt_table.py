"""The tables of scripts/never_hurt.sh: bpb on / shuffled / off per model, overlap floor A,
null boost B and set,
and whether each meets the rules of "retrieval must never hurt".

    .venv/bin/python scripts/never_hurt_table.py WORKDIR [OUT.md]

Rules (on the held-out and cross-domain sets): on <= off + 0.002 overall; in every
bpb(alpha) bucket up to 50 %, on <= off + 0.003; shuffled >= off - 0.002. After the add:
on <= 0.35 x off.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OVERALL, BUCKET, SHUFFLED, COPY = 0.002, 0.003, 0.002, 0.35
NAME = re.compile(
    r"eval-(?P<model>(?:ss|rf)[\d.]+)-A(?P<floor>[\d.]+)(?:-B(?P<boost>[\d.]+))?"
    r"-(?P<set>heldout|git|git-added)\.json"
)
#: Model names of the workdir: ``ssS`` from scratch with self-share S, ``rfS`` the RETRO-fit
#: of the plain decoder on the set of self-share S.
KINDS = {"ss": "from scratch, self-share", "rf": "RETRO-fit of the plain decoder, self-share"}


def label(model: str) -> str:
    return f"{KINDS[model[:2]]} {model[2:]}"


def worst_bucket(result: dict) -> float | None:
    """The largest on - off over the bpb(alpha) buckets up to 50 % (None without alpha)."""
    table = result.get("bpb_alpha")
    if not table:
        return None
    gaps = [
        on - off
        for a, on, off in zip(
            table["alpha"], table["retrieval"], table["no_retrieval"], strict=True
        )
        if a <= 50 and on is not None and off is not None
    ]
    return max(gaps) if gaps else None


def row(model: str, floor: str, boost: str, kind: str, r: dict) -> str:
    on, sh, off = (r["bpb"].get(m) for m in ("retrieval", "shuffled", "no_retrieval"))
    if kind == "git-added":
        ok = on <= COPY * off
        rule = f"on/off {on / off:.2f} {'<=' if ok else '>'} {COPY}"
    else:
        wb = worst_bucket(r)
        ok = on <= off + OVERALL and (wb is None or wb <= BUCKET) and sh >= off - SHUFFLED
        rule = f"worst bucket {wb:+.4f}" if wb is not None else ""
    dropped = r.get("dropped", 0)
    return (
        f"| {label(model)} | {floor} | {boost} | {kind} | {on:.4f} | {sh:.4f} | {off:.4f} "
        f"| {on - off:+.4f} "
        f"| {dropped} | {rule} | {'**yes**' if ok else 'no'} |"
    )


def calibration_rows(work: Path) -> list[str]:
    """The held-out figures of each floor and boost ``retrodb calibrate`` tried, and its
    choice."""
    out = []
    for path in sorted(work.glob("calibrate-*.json")):
        model = path.stem.removeprefix("calibrate-")
        settings = json.loads(path.read_text())
        for t in settings["floors"]:
            on, sh, off = (t["bpb"].get(m) for m in ("retrieval", "shuffled", "no_retrieval"))
            b, b_rec = t.get("null_boost", 0.0), settings.get("null_boost", 0.0)
            chosen = t["min_overlap"] == settings["min_overlap"] and b == b_rec
            wb = t["hurt"]["bucket"]
            out.append(
                f"| {label(model)} | {t['min_overlap']:g} | {b:g}{' (recorded)' if chosen else ''} "
                f"| heldout | {on:.4f} | {sh:.4f} "
                f"| {off:.4f} | {on - off:+.4f} | | worst bucket "
                f"{'-' if wb is None else format(wb, '+.4f')} "
                f"| {'**yes**' if t['meets'] else 'no'} |"
            )
    return out


def main() -> None:
    work = Path(sys.argv[1])
    rows = []
    for path in sorted(work.glob("eval-*.json")):
        m = NAME.fullmatch(path.name)
        if m:
            r = json.loads(path.read_text())
            boost = m["boost"] or "0"
            key = (m["model"], m["set"], float(m["floor"]), float(boost))
            rows.append((*key, m["floor"], boost, r))
    rows.sort(key=lambda t: t[:4])
    lines = [
        "| model | floor A | boost B | set | on | shuffled | off | on - off "
        "| neighbours dropped | | rules met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *calibration_rows(work),
        *(row(model, a, b, kind, r) for model, kind, _, _, a, b, r in rows),
    ]
    text = "\n".join(lines) + "\n"
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
