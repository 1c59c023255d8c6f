"""Times MosaicGpu against PallasGpu (Triton) and XLA on one GPU.

Each timed program applies one primitive (forward, or backward from saved
rstd) to K different input sets in a row (K sets of >= 256 MB in total, so
nothing is served from the 50-60 MB L2); the time per call is the median
over repeats of the cuda-synchronized wall time of the program divided by
K. A device-to-device copy of the same minimum bytes (``copy``) is timed the
same way. Usage: ``python benchmarks/mosaic_gpu_timing.py [--quick]``.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

SHAPES = [((8192, 4096), jnp.bfloat16), ((4096, 16384), jnp.bfloat16),
          ((32768, 128), jnp.bfloat16), ((1024, 4096), jnp.float32),
          ((2048, 8192), jnp.float16)]


def _time(fn, args, k, reps):
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) / k * 1e6)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args()
  impls = {"mosaic": MosaicGpu(), "triton": PallasGpu(), "xla": base.Xla()}
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  rows_out = []
  for (rows, hidden), dt in SHAPES:
    isz = np.dtype(dt).itemsize
    n_bytes = rows * hidden * isz
    k = 32  # distinct input sets per program: amortizes dispatch, defeats L2
    key = jax.random.key(0)
    xs = [jax.random.normal(jax.random.fold_in(key, i), (rows, hidden),
                            jnp.float32).astype(dt) + 0.3 for i in range(k)]
    dys = [jax.random.normal(jax.random.fold_in(key, 100 + i),
                             (rows, hidden), jnp.float32).astype(dt)
           for i in range(k)]
    w = (jax.random.normal(key, (hidden,), jnp.float32) * 0.1 + 1).astype(dt)
    rstd = base.Xla().forward(xs[0], w, None, norm=base.Norm(
        eps=1e-6, out_dtype=np.dtype(dt)))[1]
    res = {}
    copy = jax.jit(lambda xs: [x + jnp.asarray(1, x.dtype) for x in xs])
    res["copy2N"] = _time(copy, (xs,), k, args.reps)
    for name, impl in impls.items():
      norm = base.Norm(eps=1e-6, out_dtype=np.dtype(dt))
      fwd = jax.jit(lambda xs, w, impl=impl, norm=norm: [
          impl.forward(x, w, None, norm=norm) for x in xs])
      bwd = jax.jit(lambda xs, dys, w, r, impl=impl, norm=norm: [
          impl.backward(x, w, None, r, dy, norm=norm)
          for x, dy in zip(xs, dys)])
      for op, fn, a in (("fwd", fwd, (xs, w)), ("bwd", bwd, (xs, dys, w, rstd))):
        if name == "mosaic" and impl.shape_reason(
            rows, hidden, dt, op) is not None:
          res[f"{name}_{op}"] = None
          continue
        try:
          res[f"{name}_{op}"] = _time(fn, a, k, args.reps)
        except Exception as e:  # report and go on
          print(f"{name} {op} {rows}x{hidden}: {type(e).__name__}: "
                f"{str(e)[:300]}")
          res[f"{name}_{op}"] = None
    rows_out.append(((rows, hidden, np.dtype(dt).name, k), res))
    print(rows, hidden, np.dtype(dt).name, k,
          {a: (None if b is None else round(b, 1)) for a, b in res.items()},
          flush=True)
  print("\nus per call (sync wall time / K calls per program, inputs rotated)")
  print("shape | copy 2N | fwd mosaic | fwd triton | fwd xla | bwd mosaic | "
        "bwd triton | bwd xla")
  f = lambda v: "-" if v is None else f"{v:.1f}"
  for (r, h, d, _), res in rows_out:
    print(f"{r}x{h} {d} | {f(res['copy2N'])} | {f(res['mosaic_fwd'])} | "
          f"{f(res['triton_fwd'])} | {f(res['xla_fwd'])} | "
          f"{f(res['mosaic_bwd'])} | {f(res['triton_bwd'])} | "
          f"{f(res['xla_bwd'])}")


if __name__ == "__main__":
  main()
