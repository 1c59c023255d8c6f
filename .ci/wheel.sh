#!/usr/bin/env bash
# Packaging check: `python -m build` makes a wheel and an sdist, each installs
# into a clean virtual environment and passes a smoke import there.
#
# Run inside the CI venv (.ci/run does). The clean venvs get the package with
# --no-deps; its dependencies (jax, flax, ...) come from the CI venv through a
# .pth line, so the check needs no download beyond the build backend. The CI
# venv's own editable rmsnorm_jax is not visible there: a path added by a .pth
# line is not a site dir, so the editable install's finder never loads, and
# the clean venv's site-packages comes first on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# (pip show, not an import: the docs build's output folder build/ would
# import as an empty namespace package from the repository root.)
python -m pip show -q build >/dev/null 2>&1 || python -m pip install -q build
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log"; exit 1; }
# setuptools' deprecation blocks (license classifiers, license tables, ...)
# are what a user sees on every install: none is allowed.
if grep -iE "deprecat" "$work/build.log"; then
  echo "wheel: the build printed deprecation warnings (above)"; exit 1
fi
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist") (${SECONDS}s)"

# What the sdist must carry besides the package.
name=$(basename "$sdist" .tar.gz)
listing=$(tar tzf "$sdist")
for f in LICENSE README.md CHANGELOG.md setup.cfg pyproject.toml \
    rmsnorm_jax/py.typed rmsnorm_jax/kernels/tuning/nvidia_h200.json; do
  grep -qx "$name/$f" <<<"$listing" || { echo "sdist lacks $f"; exit 1; }
done
# The wheel carries the package data the kernels read at run time.
wheel_listing=$(python -m zipfile -l "$wheel")
grep -q "rmsnorm_jax/kernels/tuning/nvidia_h200.json" <<<"$wheel_listing" \
  || { echo "wheel lacks the GPU tuning data"; exit 1; }

deps_site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for artifact in "$wheel" "$sdist"; do
  kind=$([ "$artifact" = "$wheel" ] && echo wheel || echo sdist)
  venv="$work/venv_$kind"
  python -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "$artifact" >"$work/install_$kind.log" 2>&1 || {
    tail -n 60 "$work/install_$kind.log"; exit 1; }
  if grep -iE "deprecat" "$work/install_$kind.log"; then
    echo "wheel: installing the $kind printed deprecation warnings"; exit 1
  fi
  site=$("$venv/bin/python" -c \
    "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$deps_site" >"$site/ci_dependencies.pth"
  # From an empty directory, so that the checkout is not on sys.path.
  # JAX_PLATFORMS=cpu: the smoke check computes on the host wherever it runs.
  (cd "$work" && JAX_PLATFORMS=cpu RMSNORM_JAX_EXPECT_SITE="$site" \
    "$venv/bin/python" "$repo/.ci/wheel_smoke.py") || {
    echo "wheel: smoke import of the $kind failed"; exit 1; }
  echo "$kind: installed and imported (${SECONDS}s)"
done
echo "wheel: ok (${SECONDS}s)"
