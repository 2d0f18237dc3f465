#!/usr/bin/env bash
# Fetch the reStructuredText sources of the Python 3.11 documentation (Debian's
# python3.11-doc package) into DIR (default: data/pydocs). Prints the _sources path.
#
# The figures in README.md and docs/ were measured on python3.11-doc $PYDOCS_VERSION: another
# version of the package holds other text, so the same commands give other counts (chunks,
# tokens, vocabulary, keys). The pinned version is downloaded when the archive still has it;
# otherwise the available one is, with a warning on stderr. (Debian drops superseded
# versions from its mirrors; snapshot.debian.org keeps them all.)
set -euo pipefail
DIR=${1:-data/pydocs}
PYDOCS_VERSION=${PYDOCS_VERSION:-3.11.2-6+deb12u8}
SRC="$DIR/x/usr/share/doc/python3.11/html/_sources"
warn() { echo "get-pydocs.sh: warning: $*" >&2; }
deb_version() { dpkg-deb -f "$1" Version; }
if [ ! -d "$SRC" ]; then
  mkdir -p "$DIR"
  ( cd "$DIR"
    if ! ls python3.11-doc_*.deb >/dev/null 2>&1; then
      get() { apt-get download -q "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download -q "$1" >/dev/null; }; }
      if ! get "python3.11-doc=$PYDOCS_VERSION" 2>/dev/null; then
        warn "python3.11-doc $PYDOCS_VERSION is not in the apt archive; downloading the available version"
        get python3.11-doc
      fi
    fi
    debs=(python3.11-doc_*.deb)
    [ ${#debs[@]} = 1 ] || { echo "get-pydocs.sh: several python3.11-doc packages in $DIR: ${debs[*]}; keep one" >&2; exit 1; }
    dpkg -x "${debs[0]}" x
    deb_version "${debs[0]}" > x/VERSION )
fi
got=$(cat "$DIR/x/VERSION" 2>/dev/null || { ls "$DIR"/python3.11-doc_*.deb >/dev/null 2>&1 && deb_version "$(ls "$DIR"/python3.11-doc_*.deb | head -1)"; } || echo unknown)
if [ "$got" != "$PYDOCS_VERSION" ]; then
  warn "$DIR holds python3.11-doc $got, not $PYDOCS_VERSION: counts and keys will differ from README.md"
fi
echo "$SRC"
