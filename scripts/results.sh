#!/usr/bin/env bash
# Reproduce docs/results-model.md: the RETRO model on the Python 3.11 library docs.
#   bash scripts/results.sh [WORKDIR]     (default: data/results; about 3 hours on 2 cores)
# Every step is skipped when its output exists, so an interrupted run resumes.
# Budget knobs (environment): STEPS (default 300), SEQ_LEN (256), BATCH (4), DTYPE (bf16),
# MAX_TOKENS (2048 scored tokens per evaluated document).
# The recipe (README): neighbours with --self-share 0.25 (SELF_SHARE), then `retrodb train`
# with the model's defaults (RMSNorm encoder input, CCA null key and shift overlap gate,
# learning rate by width: 1e-3 for the small preset).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-data/results}
PY=${PY:-.venv/bin/python}
RETRODB=${RETRODB:-.venv/bin/retrodb}
STEPS=${STEPS:-300}
SEQ_LEN=${SEQ_LEN:-256}
BATCH=${BATCH:-4}
DTYPE=${DTYPE:-bf16}
SELF_SHARE=${SELF_SHARE:-0.25}
SRC=$(bash scripts/get-pydocs.sh data/pydocs)/library
mkdir -p "$W" docs/img

# 1. Split library/ by a stable hash of the file name: ~5% "new" documents are left out of
#    both training and the database (result 2); the rest form the database, and the
#    neighbour set's own 5% validation split (seed 0) is the held-out set of result 1.
if [ ! -d "$W/db-corpus" ]; then
  "$PY" - "$SRC" "$W" <<'PYEOF'
import shutil, sys
from pathlib import Path
from retrodb.split import is_validation
src, w = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.iterdir()):
    if not f.is_file():
        continue
    dest = w / ("new" if is_validation(f.name, 0.05, seed=1) else "db-corpus")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, dest / f.name)
PYEOF
fi
ls "$W/new" > "$W/new-ids.txt"

# 2. The database (8k SentencePiece vocabulary, int8 MiniLM encoder) and its neighbour set:
#    the paper's rule (no neighbour from the chunk's own document) except for a stable-hashed
#    share of the documents whose chunks may retrieve themselves (then the continuation is
#    the text that follows): the data that teaches when to copy and when not to.
if [ ! -e "$W/db/CURRENT" ]; then
  rm -rf "$W/db" "$W/db.pristine"
  "$RETRODB" build "$W/db" "$W/db-corpus" --vocab-size 8192 --quantize int8 --quiet
  "$RETRODB" neighbours "$W/db" train -k 2 --self-share "$SELF_SHARE" --quiet
  cp -a "$W/db" "$W/db.pristine"   # result 2 adds to a copy; reruns start from here
fi

# 3. Train, one torch thread per process (two processes share the 2 cores; on a loaded
#    machine 2 threads per process spin and crawl), same steps, data order and seed:
#    the recommended RETRO from scratch; the plain decoder (--no-retrieval), then its
#    RETRO-fit (frozen decoder, CCA and encoder trained on the same neighbour set).
TRAIN=(--steps "$STEPS" --seq-len "$SEQ_LEN" --batch-size "$BATCH"
       --warmup 30 --dtype "$DTYPE" --eval-every 50 --eval-batches 10 --log-every 10
       --save-every 100 --threads 1 --resume)
"$RETRODB" train "$W/db.pristine" --neighbours train "${TRAIN[@]}" --preset small --out "$W/retro" >> "$W/train-retro.log" 2>&1 &
( "$RETRODB" train "$W/db.pristine" --neighbours train "${TRAIN[@]}" --preset small --out "$W/plain" --no-retrieval >> "$W/train-plain.log" 2>&1
  "$RETRODB" train "$W/db.pristine" --neighbours train "${TRAIN[@]}" --retrofit "$W/plain" --out "$W/retrofit" >> "$W/train-retrofit.log" 2>&1 ) &
wait
tail -n 1 "$W/train-retro.log" "$W/train-plain.log" "$W/train-retrofit.log"
[ -z "${TRAIN_ONLY:-}" ] || exit 0

# 4. The evaluation sets. Held-out: the neighbour set's validation documents (in the
#    database, never trained on), neighbours from other documents only (--exclude-self).
#    New: documents in neither the training data nor the database, evaluated before and
#    after `retrodb add` puts them in (no retraining). Every evaluation of a RETRO model
#    scores retrieval on, shuffled (each chunk gets another chunk's neighbours) and off;
#    each is repeated with --rerank overlap.
EVAL=(--max-tokens "${MAX_TOKENS:-2048}" --threads 1 --quiet)
if [ ! -d "$W/heldout" ]; then
  "$PY" - "$W" <<'PYEOF'
import shutil, sys
from pathlib import Path
from retrodb.split import is_validation
w = Path(sys.argv[1])
(w / "heldout").mkdir()
for f in sorted((w / "db-corpus").iterdir()):
    if is_validation(f.name, 0.05, seed=0):   # the neighbour set's validation split
        shutil.copyfile(f, w / "heldout" / f.name)
PYEOF
fi
if [ ! -e "$W/db.added/CURRENT" ]; then
  rm -rf "$W/db.added"; cp -a "$W/db.pristine" "$W/db.added"
  "$RETRODB" add "$W/db.added" "$W/new" --quiet
fi
ev() { local out=$1; shift; [ -f "$out" ] || "$RETRODB" evaluate "$@" "${EVAL[@]}" -o "$out"; }
ev "$W/eval-heldout-plain.json" "$W/plain" "$W/db.pristine" "$W/heldout" --no-retrieval
ev "$W/eval-new-plain.json" "$W/plain" "$W/db.pristine" "$W/new" --no-retrieval
evals() {  # one model's six evaluations, two at a time
  local run=$1
  for rr in none overlap; do
    local tag=""; [ "$rr" = none ] || tag="-rerank"
    ev "$W/eval-$run-heldout$tag.json" "$W/$run" "$W/db.pristine" "$W/heldout" --exclude-self --rerank "$rr" &
    ev "$W/eval-$run-new-before$tag.json" "$W/$run" "$W/db.pristine" "$W/new" --rerank "$rr" &
    wait
    ev "$W/eval-$run-new-after$tag.json" "$W/$run" "$W/db.added" "$W/new" --rerank "$rr"
  done
}
evals retro
evals retrofit

# 4b. What each lever does (ABLATIONS=0 skips): the recipe without the self-share (the
#     paper's rule), with the "aligned" gate instead of "shift" (neighbours not shifted
#     onto their longest common run), and without the null key and overlap gate; same
#     steps and data order.
if [ "${ABLATIONS:-1}" = 1 ]; then
  [ -e "$W/db.pristine/neighbours/paper/CURRENT" ] ||
    "$RETRODB" neighbours "$W/db.pristine" paper -k 2 --quiet
  "$RETRODB" train "$W/db.pristine" --neighbours paper "${TRAIN[@]}" --preset small --out "$W/retro-paper" >> "$W/train-retro-paper.log" 2>&1 &
  "$RETRODB" train "$W/db.pristine" --neighbours train "${TRAIN[@]}" --preset small --out "$W/retro-nogate" \
    --model cca_null=false --model cca_overlap_gate=none --model cca_copy_bias=false >> "$W/train-retro-nogate.log" 2>&1 &
  "$RETRODB" train "$W/db.pristine" --neighbours train "${TRAIN[@]}" --preset small --out "$W/retro-aligned" \
    --model cca_overlap_gate=aligned >> "$W/train-retro-aligned.log" 2>&1 &
  wait
  for run in retro-paper retro-aligned retro-nogate; do
    ev "$W/eval-$run-heldout.json" "$W/$run" "$W/db.pristine" "$W/heldout" --exclude-self &
    ev "$W/eval-$run-new-before.json" "$W/$run" "$W/db.pristine" "$W/new" &
    wait
    ev "$W/eval-$run-new-after.json" "$W/$run" "$W/db.added" "$W/new"
  done
fi

# 5. One prompt, greedy: the first lines of a new document (sqlite3.rst.txt), so that
#    after `retrodb add` its first chunk retrieves itself and the text that follows is in
#    the neighbours' continuation; from the database with the added documents (and the
#    RETRO-fit before the add).
PROMPT=${PROMPT:-$(head -n 12 "$W/new/sqlite3.rst.txt")}
gen() { local out=$1; shift; [ -f "$out" ] || "$RETRODB" generate "$@" "$PROMPT" -n 96 -t 0 --threads 1 > "$out" 2>&1; }
gen "$W/gen-retrieval.txt" "$W/retro" "$W/db.added" --show-neighbours
gen "$W/gen-no-retrieval.txt" "$W/retro" "$W/db.added" --no-retrieval
gen "$W/gen-plain.txt" "$W/plain" "$W/db.added" --no-retrieval
gen "$W/gen-retrofit.txt" "$W/retrofit" "$W/db.added" --show-neighbours
gen "$W/gen-retrofit-before-add.txt" "$W/retrofit" "$W/db.pristine"
[ -f "$W/bench-generate.txt" ] ||
  "$PY" -m benchmarks.bench_generate --db "$W/db.added" --checkpoint "$W/retro" --threads 1 > "$W/bench-generate.txt"

# 6. Training speed beside the public implementation (RETRO-pytorch from PyPI, installed
#    into the work directory without its dependencies: not a dependency of this project).
if [ ! -f "$W/bench-vs-public.txt" ]; then
  [ -d "$W/retro-public/retro_pytorch" ] ||
    "$PY" -m pip install -q --no-deps --target "$W/retro-public" retro-pytorch==0.3.9 einops
  "$PY" benchmarks/bench_vs_public.py --public-path "$W/retro-public" --threads 1 2 > "$W/bench-vs-public.txt"
fi

"$PY" scripts/results_model.py "$W" docs/results-model.md docs/img
echo "wrote docs/results-model.md"
