"""Where a fused quantized forward's q differs from the quantization rule
applied to a separate forward's float32 y, on a GPU.

For each case and seed, q of ``rms_norm_quantized`` is compared with
``reference.emulate_quantize`` of ``rms_norm`` (or ``rms_norm_residual``)
with a float32 output, both on one implementation; each differing element
is printed with y / q_scale and its distance, in float32 ulps, from the
midpoint between the two values. Used for docs/mosaic_gpu.md (run 3).

  python benchmarks/quantized_vs_forward.py [--impl mosaic_gpu|pallas_gpu]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import reference
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

CASES = [((300, 1024), jnp.float16, True), ((300, 1024), jnp.float16, False),
         ((4096, 4096), jnp.bfloat16, False),
         ((4096, 4096), jnp.bfloat16, True)]


def differences(impl, shape, dtype, with_residual, seed, with_bias):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0.3, 1, shape), dtype)
  res = jnp.asarray(rng.normal(0.5, 1, shape), dtype) \
      if with_residual else None
  scale = jnp.asarray(rng.normal(1, 0.5, shape[1:]), jnp.float32)
  bias = jnp.asarray(rng.normal(0.1, 0.5, shape[1:]), dtype) \
      if with_bias else None
  kw = dict(eps=1e-6, backend=impl)
  q, q_scale = jax.jit(lambda x, r, s, b: rj.rms_norm_quantized(
      x, s, residual=r, bias=b, **kw)[:2])(x, res, scale, bias)
  if res is None:
    y = jax.jit(lambda x, s, b: rj.rms_norm(
        x, s, b, out_dtype=jnp.float32, **kw))(x, scale, bias)
  else:
    y = jax.jit(lambda x, r, s, b: rj.rms_norm_residual(
        x, r, s, b, out_dtype=jnp.float32, **kw)[0])(x, res, scale, bias)
  y = np.asarray(y)
  q_want, s_want = reference.emulate_quantize(y, jnp.int8)
  assert np.array_equal(np.asarray(q_scale), s_want), "q_scale"
  q = np.asarray(q)
  inv = (np.float32(1) / s_want).astype(np.float32)
  out = []
  for i, j in np.argwhere(q != q_want):
    t = float(y[i, j]) * float(inv[i, 0])
    mid = (float(q[i, j]) + float(q_want[i, j])) / 2
    ulp = float(np.spacing(np.float32(abs(t))))
    out.append((i, j, int(q[i, j]), int(q_want[i, j]), t,
                abs(t - mid) / ulp))
  return q.size, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--impl", default="mosaic_gpu",
                      choices=["mosaic_gpu", "pallas_gpu"])
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  impl = MosaicGpu() if args.impl == "mosaic_gpu" else PallasGpu()
  for shape, dtype, with_residual in CASES:
    total, diffs = 0, []
    for seed in range(args.seeds):
      for with_bias in (False, True):
        try:
          n, d = differences(impl, shape, dtype, with_residual, seed,
                             with_bias)
        except ValueError as e:  # a shape the implementation does not serve
          print("  not served:", str(e)[:120])
          continue
        total += n
        diffs += [(seed, with_bias) + e for e in d]
    print(f"{args.impl} {shape} {np.dtype(dtype).name} "
          f"{'residual' if with_residual else 'plain'}: "
          f"{len(diffs)} of {total} elements differ", flush=True)
    for seed, with_bias, i, j, got, want, t, dist in diffs:
      print(f"  seed {seed} bias {with_bias} [{i},{j}] q {got} rule {want} "
            f"y/q_scale {t:.9f} ({dist:.2f} ulps from the midpoint)")


if __name__ == "__main__":
  main()
