#!/usr/bin/env bash
# A simulated multi-node run on one machine: a Ray head and a second node started with
# `ray start --address` (two raylets on one host, 1 CPU each), then `retrodb build`, `add`
# and `neighbours` with --engine ray --ray-address across both, a local neighbour set to
# compare with, `retrodb verify`, and both nodes stopped at the end (by the pids this
# script started, whatever happens). The CLI runs with the engine's INFO log on, which says
# how much work each node did.
#
#   bash benchmarks/ray_two_nodes.sh [KB of library/ docs to build from, default 120]
#
# Needs `pip install -e '.[ray]'` and the Python docs (scripts/get-pydocs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
KB=${1:-120}
PY=.venv/bin/python
RAY=.venv/bin/ray
PORT=${RAY_PORT:-6391}
ADDR=127.0.0.1:$PORT
# Short: Ray's socket paths under it must stay below 108 bytes. Its own temp dir also keeps
# this cluster out of reach of a plain ray.init() elsewhere on the machine.
WORK=$(mktemp -d /tmp/rtn-XXXX)
# `ray start --head` turns token authentication on; nodes and drivers read ~/.ray/auth_token.
export RAY_AUTH_MODE=token
PIDS=()

stop_nodes() {
  # The second node first, then the head; each `ray start --block` stops its processes on
  # SIGTERM (the head drains for up to 30 s).
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
  echo "== nodes stopped; Ray processes of this cluster left: $(pgrep -f -c "$WORK/ray" || true)"
  rm -rf "$WORK"
}
trap stop_nodes EXIT

wait_nodes() {  # wait until $1 nodes are alive
  $PY - "$ADDR" "$1" <<'EOF'
import logging, sys, time
import ray
want = int(sys.argv[2])
for _ in range(120):
    try:
        ray.init(address=sys.argv[1], logging_level=logging.ERROR)
        alive = [n for n in ray.nodes() if n["Alive"]]
        ray.shutdown()
        if len(alive) >= want:
            break
    except Exception:
        pass
    time.sleep(1)
else:
    sys.exit(f"the cluster did not reach {want} nodes")
EOF
}

retrodb() {  # the CLI, with the Ray engine's INFO log (work per node) on stderr
  $PY -c "
import logging, sys
logging.basicConfig(level=logging.WARNING, format='  log: %(message)s')
logging.getLogger('retrodb.ray_engine').setLevel(logging.INFO)
from retrodb_cli.main import app
sys.argv[0] = 'retrodb'
app()
" "$@"
}

echo "== $(date -u +%FT%TZ)  $(uptime)"
SRC=$(bash scripts/get-pydocs.sh data/pydocs)/library
mkdir -p "$WORK/corpus" "$WORK/more"
size=0
for f in "$SRC"/*.txt; do
  n=$(stat -c %s "$f")
  if ((size < KB * 1024)); then cp "$f" "$WORK/corpus/"; size=$((size + n))
  elif [ "$(ls "$WORK/more" | wc -l)" -lt 3 ]; then cp "$f" "$WORK/more/"
  else break; fi
done
echo "== input: $(ls "$WORK/corpus" | wc -l) files, $((size / 1024)) KB; add: $(ls "$WORK/more" | wc -l) files"

echo "== head: ray start --head --port=$PORT --num-cpus=1"
$RAY start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=1 \
  --include-dashboard=false --temp-dir="$WORK/ray" --object-store-memory=300000000 \
  --block >"$WORK/head.log" 2>&1 &
PIDS+=($!)
wait_nodes 1
echo "== second node: ray start --address=$ADDR --num-cpus=1"
$RAY start --address="$ADDR" --node-ip-address=127.0.0.1 --num-cpus=1 \
  --object-store-memory=300000000 --block >"$WORK/node2.log" 2>&1 &
PIDS+=($!)
wait_nodes 2
$PY - "$ADDR" <<'EOF'
import logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
for n in ray.nodes():
    print(f"   node {n['NodeID'][:8]}  alive={n['Alive']}  CPU={n['Resources'].get('CPU')}  "
          f"head={'node:__internal_head__' in n['Resources']}")
ray.shutdown()
EOF

t0=$SECONDS
echo "== retrodb build --engine ray --ray-address $ADDR --quantize int8"
retrodb build "$WORK/db" "$WORK/corpus" --engine ray --ray-address "$ADDR" \
  --quantize int8 --vocab-size 4000 --quiet
t1=$SECONDS
retrodb info "$WORK/db" | sed -n '2,6p'
echo "   build took $((t1 - t0)) s (the int8 encoder export included)"

echo "== retrodb add --engine ray --ray-address $ADDR"
retrodb add "$WORK/db" "$WORK/more" --engine ray --ray-address "$ADDR"

echo "== retrodb neighbours --engine ray --ray-address $ADDR (and the same set locally)"
retrodb neighbours "$WORK/db" ray --engine ray --ray-address "$ADDR" -k 2
retrodb neighbours "$WORK/db" local -k 2 --threads 1
$PY - "$WORK/db" <<'EOF'
import sys
import numpy as np
from retrodb import RetroDB
from retrodb.neighbours import NeighbourSet
db = RetroDB.open(sys.argv[1])
a, b = NeighbourSet.open(db, "ray"), NeighbourSet.open(db, "local")
same = (np.asarray(a.keys) == np.asarray(b.keys)).all(axis=1)
print(f"   ray set == local set: {same.mean():.4f} of {same.size} rows identical")
EOF

echo "== retrodb verify"
retrodb verify "$WORK/db" --quiet
echo "== $(uptime)"
