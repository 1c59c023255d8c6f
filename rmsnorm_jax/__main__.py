"""Main job: ``python -m rmsnorm_jax``.

Runs rms_norm and rms_norm_residual on LLaMA-sized inputs on whatever backend
is present, checks each against the float64 NumPy reference and prints a table
with the time per call next to the XLA path and ``flax.linen.RMSNorm``.

Times here are wall-clock medians of jitted calls (dispatch included), a quick
health check; ``python -m rmsnorm_jax.bench`` measures device kernel time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import reference

# (rows, hidden): LLaMA-7B hidden size, a 2048-token batch and one decode step.
CASES = (
    ("rms_norm", (2048, 4096), jnp.float32),
    ("rms_norm", (2048, 4096), jnp.bfloat16),
    ("rms_norm", (1, 4096), jnp.bfloat16),
    ("rms_norm_residual", (2048, 4096), jnp.bfloat16),
)
# Error bounds on ||y - ref|| / ||ref||: the result's own rounding (see
# tests/numerics_util.py for the reasoning).
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}


def _median_seconds(fns, args, repeats):
  """Median wall-clock seconds per call of each fn, timed round-robin.

  Interleaving the calls keeps the order of measurement out of the
  comparison: timed one after another, whichever ran first read ~15% slower
  on a 2-core CPU although auto and xla compile to the same program there.
  """
  for fn in fns:
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
  return [statistics.median(ts) for ts in times]


def _row(op, shape, dtype, repeats, rng):
  x = jnp.asarray(rng.normal(0.1, 1.0, shape), dtype)
  scale = jnp.asarray(rng.normal(1.0, 0.2, shape[-1:]), jnp.float32)
  flax_layer = fnn.RMSNorm(dtype=dtype)
  flax_params = {"params": {"scale": scale}}
  if op == "rms_norm":
    ours = jax.jit(lambda x, s: rj.rms_norm(x, s))
    xla = jax.jit(lambda x, s: rj.rms_norm(x, s, backend="xla"))
    args = (x, scale)
    y = ours(*args)
    want, _ = reference.rms_norm(x, scale)
    flax_fn = jax.jit(lambda x, s: flax_layer.apply(flax_params, x))
  else:
    res = jnp.asarray(rng.normal(0.0, 1.0, shape), dtype)
    ours = jax.jit(lambda x, r, s: rj.rms_norm_residual(x, r, s))
    xla = jax.jit(lambda x, r, s: rj.rms_norm_residual(x, r, s,
                                                       backend="xla"))
    args = (x, res, scale)
    y, h = ours(*args)
    want, _ = reference.rms_norm(h, scale)
    flax_fn = jax.jit(lambda x, r, s: (flax_layer.apply(flax_params, x + r),
                                       x + r))
  err = reference.rel_error(y, want)
  t_ours, t_xla, t_flax = _median_seconds((ours, xla, flax_fn), args,
                                          repeats)
  name = np.dtype(dtype).name
  return dict(op=op, shape=shape, dtype=name, err=err,
              ok=err <= TOLERANCE[name], ours=t_ours, xla=t_xla, flax=t_flax)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rmsnorm_jax",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed calls per implementation (median reported)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1; got {args.repeats}")

  device = jax.devices()[0]
  print(f"rmsnorm_jax {rj.__version__} | jax {jax.__version__} | "
        f"backend {jax.default_backend()} | device {device.device_kind}")
  print("time: wall-clock median per jitted call (python -m rmsnorm_jax.bench "
        "gives device kernel time)\n")
  header = (f"{'op':<18} {'shape':<13} {'dtype':<9} {'rel err':>9} "
            f"{'ok':>3} {'auto us':>9} {'xla us':>9} {'flax us':>9} "
            f"{'vs xla':>7} {'vs flax':>7}")
  print(header)
  print("-" * len(header))
  rng = np.random.default_rng(0)
  all_ok = True
  for op, shape, dtype in CASES:
    r = _row(op, shape, dtype, args.repeats, rng)
    all_ok &= r["ok"]
    print(f"{r['op']:<18} {'x'.join(map(str, r['shape'])):<13} "
          f"{r['dtype']:<9} {r['err']:>9.2e} {'yes' if r['ok'] else 'NO':>3} "
          f"{r['ours'] * 1e6:>9.1f} {r['xla'] * 1e6:>9.1f} "
          f"{r['flax'] * 1e6:>9.1f} {r['xla'] / r['ours']:>6.2f}x "
          f"{r['flax'] / r['ours']:>6.2f}x")
  print("\nall results within tolerance" if all_ok else
        "\nSOME RESULTS EXCEED TOLERANCE")
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main())
