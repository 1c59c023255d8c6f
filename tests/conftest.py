"""Test-wide setup of XLA's CPU backend, read when it starts (at the first use
of a device, after this module is imported).

* Eight host CPU devices, so sharding tests have a mesh.
* On a machine without a GPU plugin, CPU code generation at optimization
  level 0. On CPU the suite's time is mostly XLA compiling small programs
  (interpret-mode kernels, references); level 0 skips LLVM's optimization
  passes, which roughly halves it. XLA's own passes (fusion, algebraic
  simplification, the order of reductions) run at every level; a result
  may still differ in its last bit from the default level's where LLVM
  would have contracted a multiply and an add. Every check here is either
  against a reference within a stated tolerance or between programs
  compiled at one level, so the whole suite runs at one level. Under a GPU
  plugin the flag would reach the GPU backend too, whose compiled programs
  the GPU tests check, so it is left off there. An optimization level in
  the caller's ``XLA_FLAGS`` wins.
"""

import os
import pkgutil


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
