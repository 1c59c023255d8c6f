"""The Triton kernels of a call lowered for CUDA, read on any host.

Pallas' Triton backend lowers each kernel to an XLA custom call
(``gpu.TRITON_CALL_TARGET``) whose backend config carries the kernel's Triton
IR (MLIR bytecode) and its launch settings. :func:`triton_kernels` lowers a
function for CUDA without a GPU (with jax 0.10; jax 0.11 lowers the Triton
kernels only where it can name a GPU, ``gpu.triton_target_reason``) and
returns them with the IR as text, so that a Triton install (its CPU wheel
ships ptxas) can compile each kernel for a GPU and report its registers and
spills: ``benchmarks/triton_registers.py``.
"""

from __future__ import annotations

import dataclasses

import jax
# Private: jaxlib's MLIR bindings and its Triton dialect, which parse the
# IR that the custom call carries. Nothing public exposes it.
from jax._src.lib import triton as _triton_lib
from jax._src.lib.mlir import ir

from rmsnorm_jax.kernels import gpu


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One Pallas Triton kernel of a lowered call.

  Attributes:
    name: the kernel's name (e.g. ``"rmsnorm_backward"``).
    num_warps: warps per program it launches with.
    num_stages: Triton's software-pipelining depth.
    grid: programs along x, y and z.
    ir: the kernel's Triton IR (``tt`` dialect) as MLIR text, which is the
      same for every ``num_warps``: Triton assigns layouts when compiling.
  """

  name: str
  num_warps: int
  num_stages: int
  grid: tuple[int, int, int]
  ir: str


def _int(config, key) -> int:
  return int(ir.IntegerAttr(config[key]).value)


def _ir_text(bytecode: bytes) -> str:
  ctx = ir.Context()
  _triton_lib.dialect.register_dialect(ctx)
  with ctx:
    return ir.Module.parse(bytecode).operation.get_asm()


def triton_kernels(fn, *args) -> list[TritonKernel]:
  """The Pallas Triton kernels of ``jax.jit(fn)(*args)`` lowered for CUDA.

  Args:
    fn: a function of JAX arrays.
    *args: its arguments, arrays or ``jax.ShapeDtypeStruct``s (no device is
      needed: the lowering is for CUDA whatever the host has).

  Returns:
    The kernels in the order the lowered module holds them (nested
    functions included); empty when the call runs no Triton kernel.
  """
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  found = []

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          op = op.operation
          if (op.name == "stablehlo.custom_call" and
              ir.StringAttr(op.attributes["call_target_name"]).value
              == gpu.TRITON_CALL_TARGET):
            config = op.attributes["mhlo.backend_config"]
            found.append(TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                num_warps=_int(config, "num_warps"),
                num_stages=_int(config, "num_stages"),
                grid=tuple(_int(config, f"grid_{a}") for a in "xyz"),
                ir=_ir_text(ir.StringAttr(config["ir"]).value_bytes)))
          walk(op)

  walk(lowered.compiler_ir().operation)
  return found
