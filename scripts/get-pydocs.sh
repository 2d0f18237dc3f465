#!/usr/bin/env bash
# Fetch the reStructuredText sources of the Python 3.11 documentation (Debian's
# python3.11-doc package) into DIR (default: data/pydocs). Prints the _sources path.
set -euo pipefail
DIR=${1:-data/pydocs}
SRC="$DIR/x/usr/share/doc/python3.11/html/_sources"
if [ ! -d "$SRC" ]; then
  mkdir -p "$DIR"
  ( cd "$DIR"
    if ! ls python3.11-doc_*.deb >/dev/null 2>&1; then
      apt-get download -q python3.11-doc >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download -q python3.11-doc >/dev/null; }
    fi
    dpkg -x python3.11-doc_*.deb x )
fi
echo "$SRC"
