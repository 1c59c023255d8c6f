"""rmsnorm_jax: RMSNorm for JAX with Pallas kernels for TPU and GPU.

Public API:
  rms_norm, rms_norm_residual: pure, differentiable functions.
  rms_norm_quantized: the norm with its output quantized (forward only).
  linen.RMSNorm, linen.RMSNormResidual: drop-ins for flax.linen.
  nnx.RMSNorm, nnx.RMSNormResidual: drop-ins for flax.nnx.
  force_backend, backend_names: backend selection helpers.
"""

from rmsnorm_jax.api import rms_norm
from rmsnorm_jax.api import rms_norm_quantized
from rmsnorm_jax.api import rms_norm_residual
from rmsnorm_jax.dispatch import backend_names
from rmsnorm_jax.dispatch import force_backend
from rmsnorm_jax import sharding

__version__ = "0.1.0"

__all__ = ["rms_norm", "rms_norm_residual", "rms_norm_quantized",
           "backend_names", "force_backend",
           "sharding", "linen", "nnx"]


def __getattr__(name):
  # The flax layers load on first use so that the functional API does not
  # pay for importing flax.
  if name in ("linen", "nnx"):
    import importlib
    return importlib.import_module(f"rmsnorm_jax.{name}")
  raise AttributeError(f"module 'rmsnorm_jax' has no attribute {name!r}")
