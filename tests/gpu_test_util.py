"""What the GPU kernel test modules share: run modes and the implementation
under test (seeds and tolerances are numerics_util's)."""

import jax
import pytest

from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu


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
# Compiled only: checks whose interpret-mode run would repeat, for the
# default configuration, what the public-API tests (tests/test_numerics.py,
# tests/test_features.py) already run on PallasGpu(interpret=True).
COMPILED = [m for m in MODES if m.id == "compiled"]


def hopper_reason() -> str | None:
  """Why the Mosaic GPU kernels cannot run here (None on a Hopper GPU)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return "no CUDA GPU: the Mosaic GPU kernels run on Hopper (sm_90) only"
  cc = str(getattr(gpus[0], "compute_capability", ""))
  if not cc.startswith("9"):
    return f"GPU is compute capability {cc or 'unknown'}, not Hopper (9.x)"
  return None


HOPPER_REASON = hopper_reason()


def hopper(test):
  """Marks a Mosaic GPU device test: selected by ``-m gpu``, skipped off
  Hopper with the reason."""
  return pytest.mark.gpu(pytest.mark.skipif(
      HOPPER_REASON is not None, reason=HOPPER_REASON or "")(test))
