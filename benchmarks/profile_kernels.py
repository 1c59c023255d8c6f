"""Runs a few kernel calls for Nsight Compute (resource use and DRAM rate).

    ncu --clock-control none --kernel-name regex:rmsnorm --csv \
        --metrics launch__registers_per_thread,... \
        python benchmarks/profile_kernels.py

Each case is compiled and run once before the call that is looked at, so
every kernel appears twice in the report; the second is the one to read.
"""

import jax
import jax.numpy as jnp

import rmsnorm_jax as rj
from rmsnorm_jax.kernels.gpu import PallasGpu

CASES = [
    ("bwd", (4096, 16384), jnp.bfloat16),
    ("bwd", (8192, 4096), jnp.bfloat16),
    ("bwd", (32768, 128), jnp.bfloat16),
    ("bwd", (2048, 4096), jnp.float16),
    ("fwd", (1024, 4096), jnp.float32),
]


def main():
  impl = PallasGpu()
  key = jax.random.key(0)
  for op, (rows, hidden), dtype in CASES:
    k1, k2, k3, key = jax.random.split(key, 4)
    x = jax.random.normal(k1, (rows, hidden), jnp.float32).astype(dtype)
    s = (1.0 + 0.5 * jax.random.normal(k2, (hidden,))).astype(dtype)
    dy = jax.random.normal(k3, (rows, hidden), jnp.float32).astype(dtype)
    fwd = jax.jit(lambda x, s: rj.rms_norm(x, s, backend=impl))
    if op == "fwd":
      fn, args = fwd, (x, s)
    else:
      _, vjp = jax.vjp(fwd, x, s)
      fn, args = jax.jit(lambda v, d: v(d)), (vjp, dy)
    for _ in range(2):
      jax.block_until_ready(fn(*args))
    print(op, rows, hidden, jnp.dtype(dtype).name, "done", flush=True)


if __name__ == "__main__":
  main()
