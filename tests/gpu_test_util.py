"""What the GPU kernel test modules share: run modes and the implementation
under test (seeds and tolerances are numerics_util's)."""

import contextlib

import jax
import pytest

from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu, triton_target_reason


def impl_for(mode, **config):
  """PallasGpu in ``mode`` ("interpret" or "compiled"), outputs poisoned."""
  return PallasGpu(config=gpu_tiling.Config(**config),
                   interpret=(mode == "interpret"), poison_outputs=True)


# Why a GPU test is skipped on a machine that has a GPU: tests/conftest.py
# hides it from runs that do not select the gpu marker.
GPU_HINT = " (where a GPU is installed, select these tests with -m gpu)"


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
                                  "GPU; the interpret variant covers CPU"
                                  + GPU_HINT)]),
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
    return ("no CUDA GPU: the Mosaic GPU kernels run on Hopper (sm_90) "
            "only" + GPU_HINT)
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


# What cuda_target puts in context where no GPU is visible: the model jax
# 0.10 compiled Triton kernels for in that case (compute capability 9.0).
ABSTRACT_GPU = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100", num_cores=None, platform="cuda")


def cuda_target():
  """A context in which Pallas Triton kernels lower for ``cuda`` on any host.

  From jax 0.11 that lowering compiles for a GPU model jax can name: the
  visible GPU, or the abstract device of the abstract mesh in context.
  Where there is none (``gpu.triton_target_reason``), an abstract H100 is
  put in context; elsewhere (jax 0.10, or a GPU in sight) nothing changes.
  For the kernels called directly: jax 0.11 refuses an abstract mesh around
  the public functions (``needs_triton_target``).
  """
  if triton_target_reason() is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("gpu",), abstract_device=ABSTRACT_GPU))


# Tests of the public functions lowered (or routed) for cuda with the Triton
# kernels in the route: from jax 0.11 they need a GPU jax can name, and an
# abstract one cannot stand in (gpu.triton_target_reason). jaxlib 0.10.2,
# which CI runs, needs none.
TRITON_TARGET_REASON = triton_target_reason()
needs_triton_target = pytest.mark.skipif(
    TRITON_TARGET_REASON is not None,
    reason=f"the Triton kernels cannot lower here: {TRITON_TARGET_REASON}")
