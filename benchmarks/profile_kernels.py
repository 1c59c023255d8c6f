"""Runs benchmark calls once each for Nsight Compute (why a kernel is slow).

    ncu --clock-control none --profile-from-start off --csv --page raw \
        --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section LaunchStats --section Occupancy \
        python benchmarks/profile_kernels.py [--cases NAME,...] > ncu.csv

Each case is the benchmark's own jitted call (``rmsnorm_jax.bench.cases``:
same inputs, same backend argument), compiled and run once, then run once
more between ``cudaProfilerStart`` and ``cudaProfilerStop`` (through torch or
cupy), so the report holds only the timed call's kernels: the kernel(s) of
``rmsnorm_jax`` and, as the rate the card reaches for the same bytes, the
benchmark's "roofline" XLA elementwise op. The order of the cases and of
their kernels is printed on stderr (``case <n> <label>``) to read the CSV by.

``--peer quack`` profiles a peer's kernels instead (``PEER_CASES``), called
as the benchmark's peer worker calls them, on the same inputs.
"""

import argparse
import sys

import jax

from rmsnorm_jax.bench import cases as bench_cases
from rmsnorm_jax.bench import peer_worker
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

# (label, op, rows, hidden, dtype, impl): the misses named in
# docs/gpu_perf_notes.md and docs/bench_h200_features.md, and the calls they
# are compared with ("rmsnorm_jax_auto": the default call, where it runs a
# Mosaic GPU kernel).
CASES = [
    ("fwd_8192x4096_bf16", "fwd", 8192, 4096, "bfloat16", "rmsnorm_jax"),
    ("fwd_8192x4096_bf16_mosaic", "fwd", 8192, 4096, "bfloat16", "mosaic"),
    ("fwd_2048x8192_f16", "fwd", 2048, 8192, "float16", "rmsnorm_jax"),
    ("fwd_2048x32768_bf16", "fwd", 2048, 32768, "bfloat16", "rmsnorm_jax"),
    ("fwd_2048x32768_bf16_auto", "fwd", 2048, 32768, "bfloat16",
     "rmsnorm_jax_auto"),
    ("bwd_8192x4096_bf16", "bwd", 8192, 4096, "bfloat16", "rmsnorm_jax"),
    ("bwd_4096x16384_bf16", "bwd", 4096, 16384, "bfloat16", "rmsnorm_jax"),
    ("bwd_2048x8192_f16", "bwd", 2048, 8192, "float16", "rmsnorm_jax"),
    ("bwd_2048x4096_f16", "bwd", 2048, 4096, "float16", "rmsnorm_jax"),
    ("bwd_2048x32768_bf16", "bwd", 2048, 32768, "bfloat16", "rmsnorm_jax"),
    ("fused_fwd_4096x16384_bf16", "fused_fwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax"),
    ("fused_fwd_2048x8192_f16", "fused_fwd", 2048, 8192, "float16",
     "rmsnorm_jax"),
    ("fused_fwd_8192x4096_bf16", "fused_fwd", 8192, 4096, "bfloat16",
     "rmsnorm_jax"),
    ("fwd_8192x4096_f16", "fwd", 8192, 4096, "float16", "rmsnorm_jax"),
    ("fused_bwd_4096x16384_bf16", "fused_bwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax"),
    ("fused_bwd_4096x16384_bf16_auto", "fused_bwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax_auto"),
    ("bwd_4096x16384_bf16_auto", "bwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax_auto"),
    ("quant_fwd_4096x8192_bf16", "quant_fwd", 4096, 8192, "bfloat16",
     "rmsnorm_jax"),
    ("quant_fp8_fwd_4096x8192_bf16", "quant_fp8_fwd", 4096, 8192,
     "bfloat16", "rmsnorm_jax"),
    ("quant_fused_fwd_2048x8192_f16", "quant_fused_fwd", 2048, 8192,
     "float16", "rmsnorm_jax"),
    ("bias_fwd_4096x8192_bf16", "bias_fwd", 4096, 8192, "bfloat16",
     "rmsnorm_jax"),
    ("bias_bwd_4096x8192_bf16", "bias_bwd", 4096, 8192, "bfloat16",
     "rmsnorm_jax"),
    ("bias_bwd_2048x8192_f16", "bias_bwd", 2048, 8192, "float16",
     "rmsnorm_jax"),
    ("head_bwd_2048x64x128_f16", "head_bwd", 2048, 8192, "float16",
     "rmsnorm_jax"),
    # The default calls of rows split over a cluster (Mosaic GPU) and of a
    # model width the Triton kernel serves.
    ("bwd_2048x32768_bf16_auto", "bwd", 2048, 32768, "bfloat16",
     "rmsnorm_jax_auto"),
    ("bwd_1024x65536_bf16_auto", "bwd", 1024, 65536, "bfloat16",
     "rmsnorm_jax_auto"),
    ("bwd_512x32768_bf16_auto", "bwd", 512, 32768, "bfloat16",
     "rmsnorm_jax_auto"),
    ("bwd_384x32768_bf16_auto", "bwd", 384, 32768, "bfloat16",
     "rmsnorm_jax_auto"),
    ("fused_bwd_1024x65536_bf16_auto", "fused_bwd", 1024, 65536,
     "bfloat16", "rmsnorm_jax_auto"),
    ("fwd_1024x65536_bf16_auto", "fwd", 1024, 65536, "bfloat16",
     "rmsnorm_jax_auto"),
    ("fwd_4096x16384_bf16_auto", "fwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax_auto"),
    ("fused_fwd_2048x32768_bf16_auto", "fused_fwd", 2048, 32768,
     "bfloat16", "rmsnorm_jax_auto"),
    ("fused_fwd_1024x65536_bf16_auto", "fused_fwd", 1024, 65536,
     "bfloat16", "rmsnorm_jax_auto"),
    ("bwd_8192x5376_bf16_auto", "bwd", 8192, 5376, "bfloat16",
     "rmsnorm_jax_auto"),
    # Few rows (one program a row, a grid of half the SMs), where Liger's
    # launch is ahead.
    ("fused_fwd_64x4096_f32_auto", "fused_fwd", 64, 4096, "float32",
     "rmsnorm_jax_auto"),
    # The layers with float32 parameters on wide rows: flax's default dtypes
    # (a float32 y from bfloat16 x, run by XLA from 32768 columns) and the
    # mixed-precision backward (float32 scale, dy in bfloat16).
    ("linen_fwd_default_2048x32768_bf16", "linen_fwd_default", 2048, 32768,
     "bfloat16", "rmsnorm_jax_linen"),
    ("linen_bwd_default_2048x32768_bf16", "linen_bwd_default", 2048, 32768,
     "bfloat16", "rmsnorm_jax_linen"),
    ("linen_bwd_mixed_4096x16384_bf16", "linen_bwd_mixed", 4096, 16384,
     "bfloat16", "rmsnorm_jax_linen"),
    ("linen_bwd_4096x16384_bf16", "linen_bwd", 4096, 16384, "bfloat16",
     "rmsnorm_jax_linen"),
]

# (label, op, rows, hidden, dtype) for ``--peer``: where a peer is ahead.
PEER_CASES = [
    ("fwd_4096x16384_bf16", "fwd", 4096, 16384, "bfloat16"),
    ("fwd_2048x32768_bf16", "fwd", 2048, 32768, "bfloat16"),
    ("fwd_1024x65536_bf16", "fwd", 1024, 65536, "bfloat16"),
    ("fused_fwd_2048x32768_bf16", "fused_fwd", 2048, 32768, "bfloat16"),
    ("fused_fwd_1024x65536_bf16", "fused_fwd", 1024, 65536, "bfloat16"),
    ("fused_fwd_64x4096_f32", "fused_fwd", 64, 4096, "float32"),
]


def _profiler():
  """(start, stop) of the CUDA profiler API, through torch or cupy."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return torch.cuda.profiler.start, torch.cuda.profiler.stop
  except ImportError:
    from cupy.cuda import profiler  # pylint: disable=import-outside-toplevel
    return profiler.start, profiler.stop


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="",
                  help="comma-separated labels (default: all)")
  ap.add_argument("--roofline", action=argparse.BooleanOptionalAction,
                  default=True, help="also profile the roofline op")
  ap.add_argument("--peer", choices=peer_worker.PEERS,
                  help="profile this peer's kernels (PEER_CASES) instead")
  args = ap.parse_args(argv)
  wanted = set(filter(None, args.cases.split(",")))
  start, stop = _profiler()
  if args.peer:
    _profile_peer(args.peer, wanted, start, stop)
    return
  n = 0
  for label, op, rows, hidden, dtype, impl in CASES:
    if wanted and label not in wanted:
      continue
    impls = [("mosaic_gpu", MosaicGpu()) if impl == "mosaic" else impl]
    if args.roofline:
      impls.append("roofline")
    dt = bench_cases.op_dtype(op, dtype)
    for cand in bench_cases.build_candidates(op, impls, rows, hidden, dt, 1):
      if isinstance(cand, Exception):
        print(f"case {label}: {cand!r}", file=sys.stderr, flush=True)
        continue
      call = lambda: jax.block_until_ready(cand.fn(*cand.arg_sets[0]))
      call()
      start()
      call()
      stop()
      print(f"case {n} {label} {cand.impl}", file=sys.stderr, flush=True)
      n += 1


def _profile_peer(peer, wanted, start, stop):
  import torch  # pylint: disable=import-outside-toplevel
  found, missing = peer_worker._load_peers(torch)  # pylint: disable=protected-access
  if peer not in found:
    sys.exit(f"{peer} is not importable: {missing.get(peer)}")
  gen = torch.Generator(device="cuda").manual_seed(0)
  cases = [c for c in PEER_CASES if not wanted or c[0] in wanted]
  # n counts the profiled calls, as in main: the CSV's order.
  for n, (label, op, rows, hidden, dtype) in enumerate(cases):
    d = peer_worker._inputs(  # pylint: disable=protected-access
        torch, op, rows, hidden, getattr(torch, dtype), gen, "cuda", 128)
    fn = peer_worker._call(  # pylint: disable=protected-access
        torch, peer, found[peer], op, d, 1e-6)
    fn()
    torch.cuda.synchronize()
    start()
    fn()
    torch.cuda.synchronize()
    stop()
    print(f"case {n} {label} {peer}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
