#!/usr/bin/env bash
# Runs the //:main binary (`python -m rmsnorm_jax`) as Bazel builds it:
# checks the launcher, the package's runfiles and the main job end to end.
set -euo pipefail
"$1" --repeats 1 | tee "${TEST_UNDECLARED_OUTPUTS_DIR:-/tmp}/main_job.txt"
grep -q "all results within tolerance" "${TEST_UNDECLARED_OUTPUTS_DIR:-/tmp}/main_job.txt"
