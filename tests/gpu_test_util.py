"""What the GPU kernel test modules share: run modes and the XLA tolerance.

``XLA_TOL``: kernel against the XLA implementation on ``||got - want|| /
||want||``. Both compute the same float32 expressions; a 16-bit result may
round the other way where the float32 value sits near a rounding boundary,
so the bound is one ulp relative of the output dtype; float32 results differ
by summation order only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

XLA_TOL = {
    np.dtype(jnp.float32): 1e-5,
    np.dtype(jnp.bfloat16): 2.0**-7,
    np.dtype(jnp.float16): 2.0**-10,
}


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
