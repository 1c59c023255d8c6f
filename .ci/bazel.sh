#!/usr/bin/env bash
# `bazel build //...` and a few quick test targets, offline, with Debian's
# Bazel 4.2.3 and this repo's .bazelrc (third_party/bazel/README.md explains).
#
# Python targets run the python3 found on PATH, with its installed packages:
# run this with the environment that has the package's dependencies and
# pytest active (.ci/run calls it from inside its virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."

debian_paths=(/usr/share/bazel/rules/java /usr/share/bazel/tools/platforms)
missing=0
command -v bazel >/dev/null || missing=1
for p in "${debian_paths[@]}"; do [ -d "$p" ] || missing=1; done
if [ "$missing" = 1 ]; then
  echo "installing Debian's bazel-bootstrap, bazel-rules-java, bazel-platforms"
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq bazel-bootstrap bazel-rules-java \
    bazel-platforms >/dev/null
fi

python3 -c "import sys, jax, flax, pytest; print('bazel tests use', sys.executable)"

log=$(mktemp)
status=0
SECONDS=0
# pytest (the README's command) already ran the whole suite; here Bazel
# builds every target and runs a few quick test modules through its own
# runner, which is what the BUILD files need checked. `bazel test //...`
# runs everything.
flags=(--curses=no --color=no --noshow_progress)
{ bazel build //... "${flags[@]}" && bazel test "${flags[@]}" \
    //tests:test_api_errors //tests:test_dispatch //tests:test_shapes \
    //tests:test_readme; } 2>&1 | tee "$log" || status=$?
# A summary line in the form CI reads ("N passed, N failed").
passed=$(grep -cE '^//\S+\s+(\(cached\) )?PASSED' "$log" || true)
failed=$(grep -cE '^//\S+\s+(\(cached\) )?(FAILED|TIMEOUT|NO STATUS|INCOMPLETE)' "$log" || true)
rm -f "$log"
# Leave no Bazel server running after CI.
bazel shutdown >/dev/null 2>&1 || true
echo "bazel: ${passed} passed, ${failed} failed (${SECONDS}s)"
exit "$status"
