#!/usr/bin/env bash
# Peer benchmark (issue #7): prepares benchmarks/peers/.venv, then runs run.py with all options passed through.
#   bash benchmarks/peers/run.sh [--sizes 2048 4096] [--pairs ref_sharper sci_sharper]
#                                [--methods oracle diffim hotpants stdpipe sfft properimage] [--all] [--timeout 1500]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = 0 ]; then
  missing=""
  command -v source-extractor >/dev/null 2>&1 || command -v sex >/dev/null 2>&1 || missing="$missing source-extractor"
  command -v psfex >/dev/null 2>&1 || missing="$missing psfex"
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
  fi
else
  for exe in psfex source-extractor; do
    command -v "$exe" >/dev/null 2>&1 || echo "not root: cannot apt-get install $exe; stdpipe and sfft need it and will fail" >&2
  done
fi

if [ ! -f "$VENV/.installed" ]; then
  echo "creating the benchmark virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q -e "$REPO" >&2
  # properimage needs tinynpydb, which builds only with setuptools<81 and no build isolation.
  "$VENV/bin/pip" install -q 'setuptools<81' wheel >&2
  "$VENV/bin/pip" install -q --no-build-isolation tinynpydb >&2 || echo "could not install tinynpydb (properimage will be absent)" >&2
  for pkg in stdpipe sfft properimage; do
    "$VENV/bin/pip" install -q "$pkg" >&2 || echo "could not install $pkg (it will be reported as failed)" >&2
  done
  touch "$VENV/.installed"
fi

exec nice -n "${PEERS_NICE:-10}" "$VENV/bin/python" "$HERE/run.py" "$@"
