#!/usr/bin/env bash
# One run on a GPU machine: compiled GPU tests, the full benchmark, the tiling sweep
# and the auto crossover, each under its own time limit so that one part
# running long cannot cost the others. Results go to $OUT (default ./out).
#
#   bash benchmarks/h100_run.sh [parts...]
#   parts: tests bench sweep sweep2 ... sweep5 profile cross
#
# Time limits (seconds) come from T_TESTS, T_BENCH, T_SWEEP, T_PROFILE,
# T_CROSS.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Test workers share the GPU: no process may grab most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/run.log"
parts=${*:-tests bench sweep cross}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  python -c "import jax, jaxlib, sys; d = jax.devices()[0]; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'python', sys.version.split()[0]); print('device', d.device_kind, 'SMs', getattr(d, 'core_count', None))"
} 2>&1 | tee "$OUT/device.txt" | tee -a "$LOG"

# Largest shapes first: they decide the targets, and a cut-short run keeps
# what it finished.
BENCH_CASES=8192x4096:bfloat16,4096x16384:bfloat16,32768x128:bfloat16,8192x4096:float16,2048x8192:float16,2048x4096:float16,1024x4096:float32,64x4096:float32,64x768:float32,1x4096:float32,1x768:float32
CROSS_CASES=${CROSS_CASES:-1x4096:bfloat16,8x4096:bfloat16,32x4096:bfloat16,128x4096:bfloat16,512x4096:bfloat16,8x768:bfloat16,32x768:bfloat16,128x768:bfloat16,512x768:bfloat16,2048x768:bfloat16,16x4096:float32,32x4096:float32,128x4096:float32,256x4096:float32}

for part in $parts; do
  echo "=== $part $(date +%T)" | tee -a "$LOG"
  case $part in
    tests)
      timeout "${T_TESTS:-150}" python -m pytest -p no:cacheprovider -m gpu \
        tests/test_gpu_kernels.py -q -n 8 -rfEs --durations=5 2>&1 \
        | grep -v "^W0000\|^I0000" >> "$LOG"; tail -n 15 "$LOG" ;;
    bench)
      timeout "${T_BENCH:-250}" python -m rmsnorm_jax.bench \
        --cases "$BENCH_CASES" --reps 5 --json "$OUT/bench.json" \
        --markdown "$OUT/bench.md" --plot "$OUT/bench.png" 2>&1 \
        | grep -v "^WARNING\|^W0000\|^I0000" | tee -a "$LOG" ;;
    sweep|sweep[2-9])
      round=${part#sweep}
      timeout "${T_SWEEP:-100}" python benchmarks/gpu_sweep.py \
        --round "${round:-1}" --json "$OUT/$part.json" 2>&1 \
        | grep -v "^W0000\|^I0000" | tee -a "$LOG" ;;
    profile)
      # Resource use of the default kernels; --clock-control none leaves the
      # card's clocks as found.
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
      timeout "${T_PROFILE:-90}" "$NCU" --clock-control none \
        --kernel-name regex:rmsnorm --csv --metrics \
launch__registers_per_thread,launch__block_size,launch__grid_size,launch__occupancy_limit_registers,launch__shared_mem_per_block_dynamic,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum \
        python benchmarks/profile_kernels.py > "$OUT/ncu.csv" 2>> "$LOG"
      tail -n 5 "$OUT/ncu.csv" | tee -a "$LOG" ;;
    cross)
      timeout "${T_CROSS:-60}" python -m rmsnorm_jax.bench \
        --cases "$CROSS_CASES" --ops fwd,bwd \
        --impls xla,rmsnorm_jax --reps 5 --json "$OUT/cross.json" 2>&1 \
        | grep -v "^W0000\|^I0000" | tail -n 60 | tee -a "$LOG" ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$LOG"
