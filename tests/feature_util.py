"""Helpers for the public-API feature tests (tests/test_features.py).

A kernel serves the features of issue 11 as they are implemented; until then
its ``cannot_serve`` names the missing one and the public functions raise a
ValueError with that reason when the kernel is requested explicitly.
``unserved`` asks the kernel about exactly the calls the public function
will route, so a test either runs its real check or asserts that error.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rmsnorm_jax import base
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.tpu import PallasTpu

F32, BF16, F16 = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                  np.dtype(jnp.float16))
I8, E4M3, E5M2 = (np.dtype(jnp.int8), np.dtype(jnp.float8_e4m3fn),
                  np.dtype(jnp.float8_e5m2))

# Every backend that runs on CPU, as passed to ``backend=``.
BACKENDS = {
    "xla": lambda: "xla",
    "pallas_gpu_interpret": lambda: PallasGpu(interpret=True),
    "pallas_tpu_interpret": lambda: PallasTpu(interpret=True),
}

# The ops each public function routes (both routes are resolved when it is
# called, so a backward the kernel cannot serve raises at the forward).
OPS = {
    "rms_norm": ("forward", "backward"),
    "rms_norm_residual": ("residual_forward", "residual_backward"),
    "rms_norm_quantized": ("quantized_forward",),
}


def backend_param():
  return pytest.mark.parametrize("backend_id", list(BACKENDS))


def make_backend(backend_id):
  return BACKENDS[backend_id]()


def default_out_dtype(dtype, scale_dtype, cast_mode):
  """The documented default: x's dtype, or result_type(scale, x) for llama."""
  if cast_mode == "llama" and scale_dtype is not None:
    return np.dtype(jnp.result_type(dtype, scale_dtype))
  return np.dtype(dtype)


def unserved(backend, fn, x_shape, dtype, *, scale_shape=(), has_bias=False,
             eps=1e-6, scale_offset=0.0, cast_mode="float32", out_dtype=None,
             quant_dtype=None, scale_dtype=None):
  """The kernel's reason for declining ``fn``'s call, or None if it serves.

  ``fn``: "rms_norm", "rms_norm_residual" or "rms_norm_quantized";
  ``dtype``: x's dtype (the residual's for the fused ops). XLA serves all.
  """
  if isinstance(backend, str):
    assert backend == "xla"
    return None
  if fn == "rms_norm_quantized":
    out_dtype = F32
  elif out_dtype is None:
    out_dtype = default_out_dtype(dtype, scale_dtype, cast_mode)
  norm = base.Norm(eps=eps, scale_offset=scale_offset, cast_mode=cast_mode,
                   out_dtype=np.dtype(out_dtype),
                   quant_dtype=None if quant_dtype is None
                   else np.dtype(quant_dtype))
  rows = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
  for op in OPS[fn]:
    reason = backend.cannot_serve(base.Call(
        op, rows, x_shape[-1], np.dtype(dtype), tuple(scale_shape), has_bias,
        norm))
    if reason is not None:
      return reason
  return None


def assert_unserved_error(backend, reason, run):
  """``run()`` must raise ValueError naming the kernel and its reason."""
  with pytest.raises(ValueError) as e:
    run()
  msg = str(e.value)
  assert backend.name in msg and reason in msg, msg


def float8_ulp(q) -> np.ndarray:
  """The spacing of a float8 array's values at each element (float64)."""
  fi = jnp.finfo(q.dtype)
  v = np.abs(np.asarray(q).astype(np.float64))
  tiny = float(fi.smallest_normal)
  e = np.floor(np.log2(np.maximum(v, tiny)))
  return np.exp2(e - fi.nmant)
