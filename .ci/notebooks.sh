#!/usr/bin/env bash
# Executes every notebook in notebooks/ top to bottom on this machine's device
# (CPU in CI) through tests/test_notebooks.py (nbclient + ipykernel).
#
# This is the only CI step that executes them: the main pytest run collects
# tests/test_notebooks.py too, but there its notebook runs skip unless
# RMSNORM_JAX_NOTEBOOKS=1, which is set here.
set -euo pipefail
cd "$(dirname "$0")/.."

deps="import nbclient, nbformat, ipykernel, matplotlib, optax"
if ! python -c "$deps" 2>/dev/null; then
  python -m pip install -q -e ".[notebooks]"
fi
# Fail rather than skip if the extra still does not import.
python -c "$deps"

RMSNORM_JAX_NOTEBOOKS=1 python -m pytest -p no:cacheprovider -q -rs \
  --durations=0 tests/test_notebooks.py
