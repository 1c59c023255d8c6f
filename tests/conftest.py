"""Test-wide setup of XLA's CPU backend, read when it starts (at the first use
of a device, after this module is imported).

* Eight host CPU devices, so sharding tests have a mesh.
* On a machine without a GPU plugin, cheaper CPU code generation. On CPU
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
  programs compiled with the same settings. Under a GPU plugin the
  optimization level would reach the GPU backend too, whose compiled
  programs the GPU tests check, so both are left off there. Settings
  already in the caller's ``XLA_FLAGS`` win.
* No YNNPACK fusions on CPU (jaxlib 0.10): a reduction that XLA hands to
  YNNPACK skips a float32 -> 16-bit -> float32 rounding of its input, so
  ``jnp.max(v.astype(jnp.bfloat16).astype(jnp.float32))`` came out as the
  max of the unrounded ``v``. The interpreted GPU kernel's quantized forward
  (chunked tiling, no scale or with a residual) then gave a q_scale one
  bfloat16 ulp from the rounded y's, where the compiled kernel rounds;
  ``test_numerics.py::test_cpu_reductions_keep_roundings`` checks this
  setting holds.
"""

import os
import pkgutil

import jaxlib.version

_FUSION_FLAG_CHECKED = ("0.10.", "0.11.")
_YNN_FLAG_CHECKED = ("0.10.",)


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


_add_flag("--xla_force_host_platform_device_count=8")
if not _has_gpu_plugin():
  _add_flag("--xla_backend_optimization_level=0")
  # XLA aborts on a flag it does not know, so this one is set only for the
  # jaxlib releases it was checked with.
  if jaxlib.version.__version__.startswith(_FUSION_FLAG_CHECKED):
    _add_flag("--xla_cpu_use_fusion_emitters=false")
  if jaxlib.version.__version__.startswith(_YNN_FLAG_CHECKED):
    _add_flag("--xla_cpu_experimental_ynn_fusion_type=")
