"""Times the bias backward with float32 and with 16-bit parameters.

The benchmark's feature op ``bias_bwd`` gives the scale and the bias x's
dtype; flax's layers keep float32 parameters by default, whose gradients
stay float32. This times both beside each other (run on a CUDA GPU, from
the repository root):

    python benchmarks/bias_backward_params.py [--shapes 8192x4096:bfloat16,...]
        [--backends auto,pallas_gpu,mosaic_gpu] [--json out.json]

Each call is the backward of ``rms_norm(x, scale, bias, backend=...)`` from
the forward's saved residuals (the benchmark's ``_vjp_runner``), on the
backends "auto", "pallas_gpu" and "mosaic_gpu", with inputs rotated past L2
(``tune.n_sets``); device kernel time per call from the profiler, median of
5 passes, and the time of each kernel of the call (``breakdown``).
"""

import argparse
import json

import jax
import jax.numpy as jnp

import rmsnorm_jax as rj
from rmsnorm_jax import tune
from rmsnorm_jax.bench import timing
from rmsnorm_jax.bench.cases import Candidate, _call_vjp, _vjp_runner

SHAPES = ((8192, 4096, jnp.bfloat16), (2048, 8192, jnp.float16),
          (4096, 8192, jnp.bfloat16), (16384, 2048, jnp.bfloat16),
          (16384, 4096, jnp.bfloat16))
BACKENDS = ("auto", "pallas_gpu", "mosaic_gpu")


def _candidates(uid, rows, hidden, dtype, backends):
  n = tune.n_sets("backward", rows, hidden, dtype)
  cands = []
  for param_dtype in (jnp.dtype(jnp.float32), dtype):
    # One draw of the inputs for every backend (each saves its own
    # residuals from them).
    inputs = []
    for i in range(n):
      k = jax.random.split(jax.random.key(1000 * uid + i), 4)
      inputs.append((
          (jax.random.normal(k[0], (rows, hidden)) + 0.3).astype(dtype),
          (1 + 0.1 * jax.random.normal(k[2], (hidden,))).astype(param_dtype),
          (0.1 * jax.random.normal(k[3], (hidden,))).astype(param_dtype),
          jax.random.normal(k[1], (rows, hidden)).astype(dtype)))
    for backend in backends:
      f = lambda x, w, b, be=backend: rj.rms_norm(x, w, b, backend=be)
      sets = [_vjp_runner(f, (x, w, b), dy) for x, w, b, dy in inputs]
      label = f"{param_dtype.name}:{backend}"
      name = f"bias_bwd_{uid}_{param_dtype.name}_{backend}"
      cands.append(Candidate("bias_bwd", label,
                             tune._named_jit(_call_vjp, name), sets, backend))
  return cands


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", default="", help="write the records here")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--shapes", default=",".join(
      f"{r}x{h}:{jnp.dtype(d).name}" for r, h, d in SHAPES),
                 help="comma-separated ROWSxHIDDEN:DTYPE")
  p.add_argument("--backends", default=",".join(BACKENDS))
  args = p.parse_args()
  shapes = []
  for item in filter(None, args.shapes.split(",")):
    size, dtype = item.split(":")
    rows, hidden = map(int, size.split("x"))
    shapes.append((rows, hidden, jnp.dtype(dtype)))
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "cases": {}}
  for uid, (rows, hidden, dtype) in enumerate(shapes):
    cands = _candidates(uid, rows, hidden, dtype, args.backends.split(","))
    res = timing.time_candidates(cands, reps=args.reps)
    key = f"{rows}x{hidden}:{dtype.name}"
    out["cases"][key] = {c.impl: {k: res[c.fn.__name__].get(k)
                                  for k in ("time_us", "breakdown")}
                         for c in cands}
    print(key, {lab: round(r["time_us"], 2)
                for lab, r in out["cases"][key].items()}, flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
