"""Shapes kept as data, shared by the tests, the benchmark and the TPU AOT check."""

from __future__ import annotations

import jax.numpy as jnp

# (rows, hidden), dtype: the benchmark set (LLaMA/Qwen-sized rows, QK-norm,
# single-token decode).
BENCHMARK = (
    ((1, 768), jnp.float32),
    ((1, 4096), jnp.float32),
    ((64, 768), jnp.float32),
    ((64, 4096), jnp.float32),
    ((1024, 4096), jnp.float32),
    ((2048, 4096), jnp.float16),
    ((2048, 8192), jnp.float16),
    ((8192, 4096), jnp.float16),
    ((8192, 4096), jnp.bfloat16),
    ((32768, 128), jnp.bfloat16),
    ((4096, 16384), jnp.bfloat16),
)

# Compiled for every TPU generation, in bfloat16 and float32.
TPU_AOT = ((1, 768), (1, 4096), (64, 768), (64, 4096), (1024, 4096),
           (2048, 4096), (8192, 4096), (32768, 128), (4096, 16384),
           (16, 65536))
TPU_GENERATIONS = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2",
                   "tpu7x:2x2x1")

# Small shapes for correctness: ragged row counts, hidden sizes that are not
# multiples of 128, tiny and wide rows, extra leading dims.
CORRECTNESS = (
    (1, 1), (3, 8), (7, 100), (17, 128), (33, 129), (5, 2880),
    (2, 3, 256), (4, 5, 6, 64), (9, 5184), (1000, 128),
)
# Wide rows that exceed a single VMEM block on TPU (two-pass path).
WIDE = ((3, 65536),)

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
