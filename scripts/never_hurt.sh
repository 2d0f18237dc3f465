#!/usr/bin/env bash
# Does retrieval ever make held-out text worse, and what the overlap floor (--min-overlap)
# and the null boost (--null-boost) change: models trained from scratch by the recipe with
# --self-share 0.25 and 0.5 on the Python library docs, and the RETRO-fit of the plain
# decoder on the 0.25 set, evaluated on the docs' held-out documents and, cross-domain, on
# git's documentation (Debian's git-doc, AsciiDoc), before and after `retrodb add` of it.
#   bash scripts/never_hurt.sh [WORKDIR]     (default: data/never-hurt; ~2.5 h on 2 cores)
# Every step is skipped when its output exists, so an interrupted run resumes.
# Knobs (environment): STEPS (300), SEQ_LEN (256), BATCH (4), DTYPE (bf16), MAX_TOKENS
# (2048 scored tokens per document), FLOORS ("0,0.25") and BOOSTS ("0,1,2,3,4": calibrate
# tries every pair), SHARES ("0.25 0.5"; empty: only the RETRO-fit), RF_STEPS (the
# RETRO-fit's steps; 3 x STEPS: at 300 it copies too little after the add), RF_SHARE
# (0.25: the set the RETRO-fit trains on), MODEL (extra --model KEY=VALUE options of every
# model trained, e.g. "cca_copy_bias=false" for the models before the copy bias).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-data/never-hurt}
PY=${PY:-.venv/bin/python}
RETRODB=${RETRODB:-.venv/bin/retrodb}
STEPS=${STEPS:-300}
RF_STEPS=${RF_STEPS:-$((3 * STEPS))}
SEQ_LEN=${SEQ_LEN:-256}
BATCH=${BATCH:-4}
DTYPE=${DTYPE:-bf16}
FLOORS=${FLOORS:-0,0.25}
BOOSTS=${BOOSTS:-0,1,2,3,4}
SHARES=${SHARES-0.25 0.5}
RF_SHARE=${RF_SHARE:-0.25}
MODEL_OPTS=()
for kv in ${MODEL:-}; do MODEL_OPTS+=(--model "$kv"); done
SRC=$(bash scripts/get-pydocs.sh data/pydocs)/library
mkdir -p "$W"

# 1. The cross-domain documents: git's manual pages and guides (AsciiDoc .txt), a stable
#    hashed ~7 % of them (about 20 files), never in the database or the training data.
if [ ! -d "$W/git" ]; then
  mkdir -p "$W/gitdoc"
  ( cd "$W/gitdoc" && { ls git-doc_*.deb >/dev/null 2>&1 || apt-get download -q git-doc >/dev/null; } &&
    dpkg -x git-doc_*.deb x )
  "$PY" - "$W/gitdoc/x/usr/share/doc/git-doc" "$W/git" <<'PYEOF'
import shutil, sys
from pathlib import Path
from retrodb.split import is_validation
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir()
for f in sorted(src.glob("*.txt")):
    if is_validation(f.name, 0.07, seed=2):
        shutil.copyfile(f, dest / f.name)
PYEOF
fi

# 2. The database: all of library/ (8k vocabulary, int8 MiniLM), two neighbour sets that
#    differ only in the self-share; the held-out set is their validation split (seed 0).
if [ ! -e "$W/db/CURRENT" ]; then
  rm -rf "$W/db"
  "$RETRODB" build "$W/db" "$SRC" --vocab-size 8192 --quantize int8 --quiet
fi
for s in $SHARES; do
  [ -e "$W/db/neighbours/ss$s/CURRENT" ] || "$RETRODB" neighbours "$W/db" "ss$s" -k 2 --self-share "$s" --quiet
done
if [ ! -d "$W/heldout" ]; then
  "$PY" - "$SRC" "$W/heldout" <<'PYEOF'
import shutil, sys
from pathlib import Path
from retrodb.split import is_validation
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir()
for f in sorted(src.iterdir()):
    if f.is_file() and is_validation(f.name, 0.05, seed=0):  # the sets' validation split
        shutil.copyfile(f, dest / f.name)
PYEOF
fi
if [ ! -e "$W/db.added/CURRENT" ]; then
  rm -rf "$W/db.added"; cp -a "$W/db" "$W/db.added"
  "$RETRODB" add "$W/db.added" "$W/git" --quiet
fi

# 3. Train, the recipe's defaults, one torch thread per process, the models side by side.
TRAIN=(--steps "$STEPS" --seq-len "$SEQ_LEN" --batch-size "$BATCH" --warmup 30 --dtype "$DTYPE"
       --eval-every 50 --eval-batches 10 --log-every 10 --save-every 100 --threads 1 --resume
       ${MODEL_OPTS[@]+"${MODEL_OPTS[@]}"})
for s in $SHARES; do
  "$RETRODB" train "$W/db" --neighbours "ss$s" "${TRAIN[@]}" --preset small --out "$W/retro-ss$s" \
    >> "$W/train-ss$s.log" 2>&1 &
done
wait
# The plain decoder (--no-retrieval), then its RETRO-fit (frozen decoder; CCA and the
# neighbour encoder trained) on the RF_SHARE set, one after the other, two threads each.
"$RETRODB" train "$W/db" --neighbours "ss$RF_SHARE" "${TRAIN[@]}" --threads 2 --preset small \
  --no-retrieval --out "$W/retro-plain" >> "$W/train-plain.log" 2>&1
"$RETRODB" train "$W/db" --neighbours "ss$RF_SHARE" "${TRAIN[@]}" --threads 2 --steps "$RF_STEPS" \
  --retrofit "$W/retro-plain" --out "$W/retro-rf$RF_SHARE" >> "$W/train-rf$RF_SHARE.log" 2>&1
MODELS="$(for s in $SHARES; do printf 'ss%s ' "$s"; done)rf$RF_SHARE"

# 4. Choose each model's overlap floor and null boost on the held-out set (the neighbour
#    sets' validation split; neighbours from other documents only) and record them in the
#    checkpoint (retrodb calibrate). Then evaluate on git's documentation, never seen by
#    the choice: before the add (every neighbour is another project's text) and after it
#    (each chunk can retrieve itself: the copy gain), as trained (floor 0, boost 0) and
#    with the recorded settings.
EVAL=(--max-tokens "${MAX_TOKENS:-2048}" --threads 1 --quiet)
ev() { local out=$1; shift; [ -f "$out" ] || "$RETRODB" evaluate "$@" "${EVAL[@]}" -o "$out"; }
for m in $MODELS; do
  [ -f "$W/calibrate-$m.json" ] ||
    "$RETRODB" calibrate "$W/retro-$m" "$W/db" "$W/heldout" --exclude-self --floors "$FLOORS" \
      --boosts "$BOOSTS" \
      --max-tokens "${MAX_TOKENS:-2048}" --threads 1 --json > "$W/calibrate-$m.json" &
done
wait
for m in $MODELS; do
  ab=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(format(d['min_overlap'], 'g') + '-B' + format(d.get('null_boost', 0), 'g'))" "$W/calibrate-$m.json")
  ev "$W/eval-$m-A0-B0-git.json" "$W/retro-$m" "$W/db" "$W/git" --min-overlap 0 --null-boost 0 &
  ev "$W/eval-$m-A$ab-git.json" "$W/retro-$m" "$W/db" "$W/git" &
  wait
  ev "$W/eval-$m-A0-B0-git-added.json" "$W/retro-$m" "$W/db.added" "$W/git" --min-overlap 0 --null-boost 0 &
  ev "$W/eval-$m-A$ab-git-added.json" "$W/retro-$m" "$W/db.added" "$W/git" &
  wait
done
"$PY" scripts/never_hurt_table.py "$W" "$W/never-hurt.md"
