#!/usr/bin/env bash
# Builds the documentation (docs/: Sphinx, autodoc + napoleon for the API
# reference, myst-parser for the Markdown pages) with warnings as errors, so a
# docstring or page that does not render fails CI.
#
# Run inside the CI venv (.ci/run does); installs the docs extra if missing.
# Output: build/docs/html (build/ is ignored by git and Bazel), or $1.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
out=${1:-build/docs/html}

if ! python -c "import sphinx, myst_parser" 2>/dev/null; then
  python -m pip install -q -e ".[docs]"
fi
# JAX_PLATFORMS=cpu: autodoc imports the package; no accelerator is needed.
JAX_PLATFORMS=cpu python -m sphinx -W --keep-going -q -b html docs "$out"
echo "docs: built $out with no warnings (${SECONDS}s)"
