"""Test-wide setup of the devices the suite runs on and of XLA's CPU backend,
made in ``pytest_configure``, before any test module starts a backend.

* Which devices. The tests not marked ``gpu`` describe the CPU behaviour
  that CI checks (interpret-mode kernels, XLA's CPU numerics, 8 host
  devices). On a machine with a GPU, jax would run them there instead, and
  tests written for the CPU backend failed (69 in a run on an H200 with
  jax 0.11.2, e.g. a benchmark test expecting wall-clock timing where a
  GPU gives profiler timing). So the GPU is hidden (``JAX_PLATFORMS=cpu``)
  unless the run's ``-m`` expression selects the ``gpu`` tests (``-m gpu``,
  the device suite), and the same command gives the same results on every
  machine.
  A ``JAX_PLATFORMS`` set by the caller is kept as it is (e.g.
  ``JAX_PLATFORMS=cuda,cpu`` runs tests/test_sharding.py on GPUs).
* Eight host CPU devices, so sharding tests have a mesh.
* Where no GPU is in use, cheaper CPU code generation. On CPU
  the suite's time is mostly XLA compiling small programs (interpret-mode
  kernels, references): optimization level 0 skips LLVM's optimization
  passes, and XLA's older CPU fusion emitters
  (``--xla_cpu_use_fusion_emitters=false``) compile faster than its
  MLIR-based ones (the suite with ``-n 2`` on 2 cores: 311 s at level 0,
  197 s with both, against well over 500 s with neither). XLA's own passes
  (fusion, algebraic simplification, the order of reductions) run either
  way; a result may still differ in its last bit from the default
  settings' where LLVM would have contracted a multiply and an add. Every
  check here is against a reference within a stated tolerance or between
  programs compiled with the same settings. With a GPU in use the
  optimization level would reach the GPU backend too, whose compiled
  programs the GPU tests check, so both are left off there. Settings
  already in the caller's ``XLA_FLAGS`` win.
* No YNNPACK fusions on CPU (jaxlib 0.10 and 0.11.2): a reduction that XLA
  hands to YNNPACK skips a float32 -> 16-bit -> float32 rounding of its input,
  so ``jnp.max(v.astype(jnp.bfloat16).astype(jnp.float32))`` came out as the
  max of the unrounded ``v``. The interpreted GPU kernel's quantized forward
  (chunked tiling, no scale or with a residual) then gave a q_scale one
  bfloat16 ulp from the rounded y's, where the compiled kernel rounds;
  ``test_numerics.py::test_cpu_reductions_keep_roundings`` checks this setting
  holds.
"""

import os
import pkgutil
import sys

import jaxlib.version
import pytest

_FUSION_FLAG_CHECKED = ("0.10.",)
_YNN_FLAG_CHECKED = ("0.10.", "0.11.2")


def _add_flag(flag: str) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if flag.split("=")[0] not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def _has_gpu_plugin() -> bool:
  # jax's CUDA and ROCm plugins register under the jax_plugins namespace.
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(m.name.startswith(("xla_cuda", "xla_rocm"))
             for m in pkgutil.iter_modules(jax_plugins.__path__))


def selects_gpu_tests(markexpr: str) -> bool:
  """Whether ``-m markexpr`` selects a test marked ``gpu`` alone."""
  if not markexpr:
    return False
  # pylint: disable-next=import-outside-toplevel
  from _pytest.mark.expression import Expression
  return bool(Expression.compile(markexpr).evaluate(
      lambda name, **kwargs: name == "gpu"))


# Set by pytest_configure: this run hid a GPU (tests/test_suite_setup.py).
GPU_HIDDEN = False


def _hide_gpu() -> None:
  global GPU_HIDDEN
  GPU_HIDDEN = True
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported by a plugin; no backend started yet
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _gpu_in_use() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS")
  if platforms is not None:
    return any(p in platforms for p in ("cuda", "gpu", "rocm"))
  return _has_gpu_plugin()


def pytest_configure(config) -> None:
  if ("JAX_PLATFORMS" not in os.environ and _has_gpu_plugin()
      and not selects_gpu_tests(config.getoption("markexpr", ""))):
    _hide_gpu()
  _add_flag("--xla_force_host_platform_device_count=8")
  if not _gpu_in_use():
    _add_flag("--xla_backend_optimization_level=0")
    # XLA aborts on a flag it does not know, so these are set only for the
    # jaxlib releases they were checked with (0.11.2 knows the YNNPACK one
    # and no longer the fusion emitters').
    if jaxlib.version.__version__.startswith(_FUSION_FLAG_CHECKED):
      _add_flag("--xla_cpu_use_fusion_emitters=false")
    if jaxlib.version.__version__.startswith(_YNN_FLAG_CHECKED):
      _add_flag("--xla_cpu_experimental_ynn_fusion_type=")


@pytest.fixture
def cuda_target():
  """Lowering for ``cuda`` works in the test whatever the host has
  (``gpu_test_util.cuda_target``)."""
  # pylint: disable-next=import-outside-toplevel
  from gpu_test_util import cuda_target as target
  with target():
    yield
