#!/usr/bin/env bash
# One run on any CUDA GPU machine: the compiled GPU tests, the benchmark with
# the device-copy and PyTorch peer columns, and optionally the feature ops'
# benchmark, the tiling sweep, the Nsight Compute profile and the auto
# crossover, each under its own time limit so that one part running long
# cannot cost the others. Results go to $OUT (default ./out): device.txt,
# run.log, tests.log, bench.json, bench.md, bench.png (and features.json,
# features.md, sweep*.json, ncu.csv, cross.json when run).
#
#   bash benchmarks/gpu_run.sh [parts...]     (default: tests bench)
#   parts: tests bench features sweep sweep2 ... sweep5 profile cross
#
# Python wheels in ./.whl (e.g. liger-kernel for the peer column) are
# installed into /tmp/site first, without touching the machine's packages.
# Settings (environment): T_TESTS, T_BENCH, T_FEATURES, T_SWEEP, T_PROFILE,
# T_CROSS
# (seconds per part), TEST_WORKERS (pytest-xdist workers, default: the
# CPU count less two; compiling the kernels is what the tests spend their
# time on: with 14 workers on a 16-core H200 machine, 2026-12-01,
# tests/test_mosaic_gpu.py took 355 s and the rest 140 s, so give the whole
# suite T_TESTS=560 or more), TEST_PATHS (what
# pytest collects, default "tests": e.g. "tests/test_mosaic_gpu.py" and
# "tests --ignore=tests/test_mosaic_gpu.py" split the suite over two
# runs of a shorter limit),
# FEATURE_CASES (default tag:bench_features),
# BENCH_CASES (default: the benchmark set of rmsnorm_jax/shapes.py, largest
# first), BENCH_OPS, BENCH_IMPLS, BENCH_PEERS (default: all), BENCH_REPS,
# BENCH_RESUME (the bench.json of a run cut short by T_BENCH, e.g. carried
# from an earlier machine session: its cases are kept and the rest timed,
# python -m rmsnorm_jax.bench --resume).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Test workers and the peer process share the GPU: no process may grab most
# of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Never NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
parts=${*:-tests bench}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -n 3 | tee -a "$LOG"
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  # quack's CUTLASS DSL finds its packages through a .pth file, which
  # --target installs do not read.
  if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  fi
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  "$PY" -c "import jax, jaxlib, sys; d = jax.devices()[0]; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'python', sys.version.split()[0]); print('device', d.device_kind, 'SMs', getattr(d, 'core_count', None))"
  "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "cupy", "liger_kernel", "quack", "flax"):
  try:
    mod = importlib.import_module(name)
    print(name, getattr(mod, "__version__", "?"))
  except Exception as e:  # a missing peer is a note
    print(name, "missing:", type(e).__name__, str(e)[:120])
EOF
} 2>&1 | tee "$OUT/device.txt" | tee -a "$LOG"
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
echo "device: ${DEVICE:-unknown}" | tee -a "$LOG"

CASES_ARG=()
[ -n "${BENCH_CASES:-}" ] && CASES_ARG=(--cases "$BENCH_CASES")
CROSS_CASES=${CROSS_CASES:-1x4096:bfloat16,8x4096:bfloat16,32x4096:bfloat16,128x4096:bfloat16,512x4096:bfloat16,8x768:bfloat16,32x768:bfloat16,128x768:bfloat16,512x768:bfloat16,2048x768:bfloat16,16x4096:float32,32x4096:float32,128x4096:float32,256x4096:float32}
quiet() { grep -v "^WARNING\|^W0000\|^I0000\|DeprecationWarning\|warnings.warn"; }

for part in $parts; do
  echo "=== $part $(date +%T) on ${DEVICE:-unknown}" | tee -a "$LOG"
  case $part in
    tests)
      workers=${TEST_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
      # shellcheck disable=SC2086  # TEST_PATHS holds several arguments
      timeout "${T_TESTS:-480}" "$PY" -m pytest -p no:cacheprovider -m gpu \
        ${TEST_PATHS:-tests} -q -n "$workers" -rfEs --durations=5 2>&1 \
        | quiet > "$OUT/tests.log"
      tail -n 15 "$OUT/tests.log" | tee -a "$LOG" ;;
    bench)
      RESUME_ARG=()
      if [ -n "${BENCH_RESUME:-}" ]; then
        cp "$BENCH_RESUME" "$OUT/bench.json" && RESUME_ARG=(--resume)
      fi
      timeout "${T_BENCH:-540}" "$PY" -m rmsnorm_jax.bench "${CASES_ARG[@]}" \
        ${BENCH_OPS:+--ops "$BENCH_OPS"} ${BENCH_IMPLS:+--impls "$BENCH_IMPLS"} \
        ${BENCH_PEERS:+--peers "$BENCH_PEERS"} --reps "${BENCH_REPS:-5}" \
        --json "$OUT/bench.json" "${RESUME_ARG[@]}" --markdown "$OUT/bench.md" \
        --plot "$OUT/bench.png" 2>&1 | quiet | tee -a "$LOG" ;;
    features)
      # The feature ops (bias, per-head scale, quantized output) at their
      # shapes; about 35 s a shape on an H200, compiles included.
      timeout "${T_FEATURES:-300}" "$PY" -m rmsnorm_jax.bench \
        --cases "${FEATURE_CASES:-tag:bench_features}" --ops features \
        --reps "${BENCH_REPS:-5}" --json "$OUT/features.json" \
        --markdown "$OUT/features.md" 2>&1 | quiet | tee -a "$LOG" ;;
    sweep|sweep[2-9])
      round=${part#sweep}
      timeout "${T_SWEEP:-100}" "$PY" benchmarks/gpu_sweep.py \
        --round "${round:-1}" --json "$OUT/$part.json" 2>&1 \
        | quiet | tee -a "$LOG" ;;
    profile)
      # Resource use of the default kernels; --clock-control none leaves the
      # card's clocks as found.
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
      timeout "${T_PROFILE:-90}" "$NCU" --clock-control none \
        --kernel-name regex:rmsnorm --csv --metrics \
launch__registers_per_thread,launch__block_size,launch__grid_size,launch__occupancy_limit_registers,launch__shared_mem_per_block_dynamic,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum \
        "$PY" benchmarks/profile_kernels.py > "$OUT/ncu.csv" 2>> "$LOG"
      tail -n 5 "$OUT/ncu.csv" | tee -a "$LOG" ;;
    cross)
      timeout "${T_CROSS:-60}" "$PY" -m rmsnorm_jax.bench \
        --cases "$CROSS_CASES" --ops fwd,bwd --impls xla,rmsnorm_jax \
        --peers none --copy off --reps 5 --json "$OUT/cross.json" 2>&1 \
        | quiet | tail -n 60 | tee -a "$LOG" ;;
    *)
      echo "unknown part $part (expected tests bench features sweep sweep2..5 profile cross)" | tee -a "$LOG" ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$LOG"
