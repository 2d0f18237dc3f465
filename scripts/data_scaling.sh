#!/usr/bin/env bash
# Reproduce docs/results-data-scaling.md: one trained model, fixed held-out documents, and
# a retrieval database that grows by `retrodb add` (never rebuilt) from about 1 % of the
# Python library docs to all of the Python 3.11 docs, evaluated with retrieval on,
# shuffled and off at every size.
#   bash scripts/data_scaling.sh [WORKDIR]     (default: data/data-scaling)
# Every step is skipped when its output exists, so an interrupted run resumes.
#
# Models (environment), each NAME=CHECKPOINT:TOKENIZER, space-separated, in MODELS:
#   scratch   the recipe model of scripts/never_hurt.sh (self-share 0.25), with the
#             tokenizer of the database it was trained on (default:
#             data/never-hurt/retro-ss0.25 and data/never-hurt/db/tokenizer.model)
#   retrofit  a RETRO-fit of SmolLM2 (scripts/results_retrofit.sh) with its .gguf as the
#             tokenizer, when RETROFIT=CHECKPOINT:GGUF is set
# Each model gets its own database chain (its tokenizer's chunks) over the same text.
# HELDOUT (data/never-hurt/heldout: never_hurt.sh's held-out Python docs) are never added.
# Knobs: MAX_TOKENS (2048 scored tokens per document), THREADS (2), FRACTIONS (the
# cumulative shares of library/ at each step: "0.01 0.0316 0.1 0.316 1"; a last step adds
# the rest of the Python docs), GEN_TOKENS (96, the --compare generations).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-data/data-scaling}
PY=${PY:-.venv/bin/python}
RETRODB=${RETRODB:-.venv/bin/retrodb}
MAX_TOKENS=${MAX_TOKENS:-2048}
THREADS=${THREADS:-2}
FRACTIONS=${FRACTIONS:-0.01 0.0316 0.1 0.316 1}
GEN_TOKENS=${GEN_TOKENS:-96}
HELDOUT=${HELDOUT:-data/never-hurt/heldout}
MODELS=${MODELS:-scratch=data/never-hurt/retro-ss0.25:data/never-hurt/db/tokenizer.model}
[ -z "${RETROFIT:-}" ] || MODELS="$MODELS retrofit=$RETROFIT"
SOURCES=$(bash scripts/get-pydocs.sh data/pydocs)
mkdir -p "$W"
[ -d "$HELDOUT" ] || { echo "data_scaling.sh: $HELDOUT not found (run scripts/never_hurt.sh)" >&2; exit 1; }

# 1. The steps' text: library/ less the held-out documents, in a stable hashed order, cut
#    where the cumulative bytes reach each fraction; then the rest of the Python docs
#    (tutorial, reference, howto, c-api, whatsnew, ...). step-N/ holds what step N adds.
if [ ! -e "$W/steps/DONE" ]; then
  rm -rf "$W/steps"
  "$PY" - "$SOURCES" "$HELDOUT" "$W/steps" $FRACTIONS <<'PYEOF'
import hashlib, shutil, sys
from pathlib import Path
src, heldout, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
fractions = [float(f) for f in sys.argv[4:]]
held = {f.name for f in heldout.iterdir()}
lib = sorted((f for f in (src / "library").iterdir() if f.is_file() and f.name not in held),
             key=lambda f: hashlib.sha256(f.name.encode()).hexdigest())
total = sum(f.stat().st_size for f in lib)
step, done = 1, 0
for f in lib:
    while step <= len(fractions) and done >= fractions[step - 1] * total:
        step += 1
    out = dest / f"step-{step}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, out / f.name)
    done += f.stat().st_size
rest = dest / f"step-{len(fractions) + 1}"
for f in sorted(src.rglob("*.txt")):
    if f.is_file() and f.relative_to(src).parts[0] != "library":
        (rest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, rest / f.relative_to(src))
(dest / "DONE").write_text("")
PYEOF
fi
STEPS=$(cd "$W/steps" && ls -d step-* | sort -t- -k2 -n)

# 2. Per model: build the database from step 1, then after each evaluation add the next
#    step's text to the same database.
EVAL=(--max-tokens "$MAX_TOKENS" --threads "$THREADS" --quiet)
for spec in $MODELS; do
  name=${spec%%=*}; rest=${spec#*=}; ckpt=${rest%%:*}; tok=${rest#*:}
  [ -e "$ckpt" ] || { echo "data_scaling.sh: $name: checkpoint $ckpt not found" >&2; exit 1; }
  D="$W/$name"; mkdir -p "$D"
  for s in $STEPS; do
    n=${s#step-}
    if [ ! -e "$D/added-$n" ]; then
      if [ "$n" = 1 ]; then
        rm -rf "$D/db"
        "$RETRODB" build "$D/db" "$W/steps/$s" --tokenizer "$tok" --quantize int8 --quiet
      else
        "$RETRODB" add "$D/db" "$W/steps/$s" --quiet
      fi
      "$RETRODB" info "$D/db" --json > "$D/info-$n.json"
      touch "$D/added-$n"
    fi
    [ -f "$D/eval-$n.json" ] || "$RETRODB" evaluate "$ckpt" "$D/db" "$HELDOUT" "${EVAL[@]}" -o "$D/eval-$n.json"
  done
  # 3. Five greedy generations, retrieval off and on, from held-out documents' openings
  #    (their first 400 characters), on the largest database.
  if [ ! -f "$D/compare.jsonl" ]; then
    : > "$D/compare.tmp"
    for f in $(ls "$HELDOUT" | sort | head -5); do
      prompt=$("$PY" -c "import sys; print(open(sys.argv[1]).read()[:400])" "$HELDOUT/$f")
      "$RETRODB" generate "$ckpt" "$D/db" "$prompt" --compare --json -n "$GEN_TOKENS" \
        --threads "$THREADS" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d['document']=sys.argv[1]; print(json.dumps(d))" "$f" >> "$D/compare.tmp"
    done
    mv "$D/compare.tmp" "$D/compare.jsonl"
  fi
done
"$PY" scripts/data_scaling_table.py "$W" docs/results-data-scaling.md
