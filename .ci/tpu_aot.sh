#!/usr/bin/env bash
# Deviceless TPU compilation, the last step of .ci/run (inside its venv).
# What it checks and why: docs/tpu_aot.md, "What CI checks".
# Fails if libtpu is missing after the install or anything does not compile.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
say() { echo "--- tpu_aot: $* ($(( $(date +%s) - start ))s)"; }

jax_version=$(python -c "import jax; print(jax.__version__)")
say "installing jax[tpu]==${jax_version}"
python -m pip install -q "jax[tpu]==${jax_version}"
python -c "import jax; assert jax.__version__ == '${jax_version}', jax.__version__"

# The host computes on CPU; TPU programs are compiled for topologies that
# jax.experimental.topologies describes, which needs libtpu but no TPU
# backend. JAX_PLATFORMS=cpu keeps jax from initializing one (it would look
# for TPU hardware and log errors). The other settings are the defaults
# rmsnorm_jax.tpu_aot sets on import; exported here so that every process of
# this step has them before libtpu loads.
export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1
export ALLOW_MULTIPLE_LIBTPU_LOAD=1
python -c "from rmsnorm_jax import tpu_aot; assert tpu_aot.libtpu_available()"

say "tests marked tpu_aot"
python -m pytest -p no:cacheprovider -q -rs -n 2 -m tpu_aot tests

say "kernel sweep: every program on every generation (--quick)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
python -m rmsnorm_jax.tpu_aot --quick --no-xla --jobs 2 --out "" >"$log" 2>&1 \
  || status=$?
# The count line and any failures; on failure, the log's end without
# libtpu's own log lines.
grep -E "compiled in|^FAILED" "$log" || status=1
if [ "$status" != 0 ]; then
  grep -vE "^[WIE][0-9]{4} " "$log" | tail -n 40
fi
say "done (exit ${status})"
exit "$status"
