"""What the GPU kernel test modules share: run modes, seeds, the XLA tolerance.

``XLA_TOL``: kernel against the XLA implementation on ``||got - want|| /
||want||``. Both compute the same float32 expressions; a 16-bit result may
round the other way where the float32 value sits near a rounding boundary,
so the bound is one ulp relative of the output dtype; float32 results differ
by summation order only.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu

XLA_TOL = {
    np.dtype(jnp.float32): 1e-5,
    np.dtype(jnp.bfloat16): 2.0**-7,
    np.dtype(jnp.float16): 2.0**-10,
}


def xla_tol(*dtypes) -> float:
  """The loosest ``XLA_TOL`` among the dtypes a result passed through."""
  return max(XLA_TOL[np.dtype(d)] for d in dtypes)


def rng_for(*key):
  """A generator seeded from ``key``: fresh inputs per case, reproducible."""
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def impl_for(mode, **config):
  """PallasGpu in ``mode`` ("interpret" or "compiled"), outputs poisoned."""
  return PallasGpu(config=gpu_tiling.Config(**config),
                   interpret=(mode == "interpret"), poison_outputs=True)


def has_cuda() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


# Interpret mode everywhere; compiled (marker gpu) on a CUDA GPU only.
MODES = [
    pytest.param("interpret", id="interpret"),
    pytest.param("compiled", id="compiled", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not has_cuda(),
                           reason="compiled Pallas GPU kernels need a CUDA "
                                  "GPU; the interpret variant covers CPU")]),
]
