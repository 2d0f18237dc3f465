#!/usr/bin/env bash
# The main job on the embedded default: fetch the Python 3.11 documentation sources
# (Debian's python3.11-doc), build a retrodb database from them with the bundled
# all-MiniLM-L6-v2 encoder, and query it.
#   bash scripts/demo.sh [SUBFOLDER|all] [DB]     (default: library, pydocs.retrodb)
set -euo pipefail
cd "$(dirname "$0")/.."
SUB=${1:-library}
DB=${2:-pydocs.retrodb}
RETRODB=${RETRODB:-.venv/bin/retrodb}
SRC=$(bash scripts/get-pydocs.sh data/pydocs)
[ "$SUB" = all ] || SRC="$SRC/$SUB"
if [ ! -e "$DB" ]; then
  echo "building $DB from $SRC"
  time "$RETRODB" build "$DB" "$SRC"
fi
"$RETRODB" info "$DB"
"$RETRODB" query "$DB" "How do I read a file line by line?" -k 2
