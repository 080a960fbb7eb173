#!/usr/bin/env bash
# Baton through aiperf (bench/aiperf_bench.py). aiperf is not a Baton dependency: it goes into a
# throwaway virtualenv (AIPERF_VENV, default /tmp/aiperf-venv), made on first use from PyPI.
#   bench/aiperf.sh [aiperf_bench.py options]      e.g. --engines mocker --repeats 1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
AIPERF_VENV="${AIPERF_VENV:-/tmp/aiperf-venv}"
AIPERF_VERSION="${AIPERF_VERSION:-0.13.0}"
if [ ! -x "$AIPERF_VENV/bin/aiperf" ]; then
    python3 -m venv "$AIPERF_VENV"
    "$AIPERF_VENV/bin/pip" install -q "aiperf==$AIPERF_VERSION"
fi
exec "$PYTHON" bench/aiperf_bench.py --aiperf "$AIPERF_VENV/bin/aiperf" "$@"
