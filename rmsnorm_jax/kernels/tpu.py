"""``PallasTpu``: the Pallas (Mosaic) implementation for TPUs.

One kernel per primitive, each a single pass over HBM when a block of full
rows fits VMEM (every shape in ``shapes.TPU_AOT`` on v5e and later):

* forward: reads x (and scale), writes y and the float32 rstd (2N bytes);
* backward: reads x, dy, rstd (and scale), writes dx and one float32
  partial dscale per grid slice, summed by a tiny XLA reduction (3N);
* fused residual forward: reads x and residual, writes y, h and rstd (4N);
* fused residual backward: reads h, dy, dh and rstd, writes the gradient of
  h (dx + dh) and the dscale partials (4N).

Rows too wide for VMEM use two passes over hidden chunks (see
``tpu_config``). Kernel bodies are in ``tpu_kernels.py``, the block-size rule
in ``tpu_config.py``; ``python -m rmsnorm_jax.tpu_aot`` compiles them for
every TPU generation without a TPU (docs/tpu_aot.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import tpu_config as cfg
from rmsnorm_jax.kernels import tpu_kernels as tk

ALL_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _check_config_int(name: str, value, *, minimum: int, multiple: int = 1,
                      what: str):
  """``PallasTpu(name=value)`` must be None or an int >= minimum."""
  if value is None:
    return
  # bool is an int subclass; True as a block size is a mistake, not 1.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"PallasTpu({name}=...) must be an int ({what}) or None; got "
        f"{value!r} of type {type(value).__name__}.")
  if value < minimum or value % multiple:
    kind = (f"a positive multiple of {multiple}" if multiple > 1
            else f"an int >= {minimum}")
    raise ValueError(
        f"PallasTpu({name}=...) must be {kind} ({what}); got {value}.")


def _check_dtype(name: str, a):
  if np.dtype(a.dtype) not in tk.KERNEL_DTYPES:
    raise TypeError(
        f"pallas_tpu supports {name} of dtype float32, bfloat16 or float16; "
        f"got {name} of shape {tuple(a.shape)} and dtype {a.dtype}. Use "
        f"backend='xla' (or 'auto', which does) for other dtypes.")


def _kernel_dtype(dtype):
  """Output dtypes the kernels cannot store (float64) are made in float32."""
  dt = np.dtype(dtype)
  return dt if dt in tk.KERNEL_DTYPES else tk.F32


def _as_kernel_operand(a):
  """Cotangents in other dtypes (float64 under x64) enter as float32."""
  if a is None or np.dtype(a.dtype) in tk.KERNEL_DTYPES:
    return a
  return a.astype(jnp.float32)


def _weights(scale, scale_offset, hidden):
  """``(1, hidden)`` float32 ``scale + offset``; None without scale (O(D))."""
  if scale is None:
    return None
  w = scale.astype(jnp.float32)
  if scale_offset:
    w = w + jnp.float32(scale_offset)
  return w.reshape(1, hidden)


@dataclasses.dataclass(frozen=True)
class PallasTpu(base.Implementation):
  """Pallas kernels lowered through Mosaic, for TPUs (v4 and later).

  Inputs: x (and residual) 2-D ``(rows, hidden)`` of dtype float32, bfloat16
  or float16, any rows and hidden; scale ``None`` or ``(hidden,)`` in any
  float dtype (applied in float32). float64 x/residual raise TypeError naming
  the argument; ``preferred_for`` is False for them, so "auto" uses XLA.

  Attributes (all optional; None means the rule in ``tpu_config``; a value
  of the wrong type or range raises when the config is made):
    block_rows: rows per grid step; rounded up to the sublane tile (8 rows,
      16 for 16-bit data) unless it covers all rows. Blocks that do not fit
      the target TPU's VMEM raise ValueError when traced for it.
    hidden_block: lane width (a multiple of 128) of the two-pass path; set, it
      forces that path (tests use it to cover wide rows on small shapes).
    vmem_limit_bytes: Mosaic's scoped VMEM limit for the kernels.
    interpret: run the kernels with a Pallas interpreter instead of Mosaic;
      then every platform, CPU included, may lower it, which is how CI checks
      the numerics without a TPU.
    tpu_interpreter: with ``interpret``, use Pallas's TPU interpreter
      (``pltpu.InterpretParams()``: TPU memory semantics, outputs start as
      NaN so unwritten elements show, out-of-bounds reads raise) rather than
      the generic one (the kernel discharged to plain XLA ops). The TPU
      interpreter synchronizes through ordered host callbacks, which
      ``custom_partitioning`` cannot lower, and ``rms_norm`` wraps
      implementations in it for inputs of rank >= 2 (see sharding.py); so it
      is for calling the methods directly (as tests/test_tpu_kernels.py
      does), and the default generic interpreter is what works through the
      public API.
  """

  name: ClassVar[str] = "pallas_tpu"
  platforms: ClassVar[tuple[str, ...]] = ("tpu",)

  block_rows: int | None = None
  hidden_block: int | None = None
  vmem_limit_bytes: int | None = None
  interpret: bool = False
  tpu_interpreter: bool = False

  def __post_init__(self):
    """Rejects bad overrides when the config is made, not when traced.

    Raises:
      TypeError: block_rows, hidden_block or vmem_limit_bytes not an int.
      ValueError: block_rows < 1, hidden_block not a positive multiple of
        128, vmem_limit_bytes < 1 MiB.
    """
    _check_config_int("block_rows", self.block_rows, minimum=1,
                      what="rows per grid step")
    _check_config_int("hidden_block", self.hidden_block, minimum=cfg.LANES,
                      multiple=cfg.LANES, what="lanes per two-pass block")
    _check_config_int("vmem_limit_bytes", self.vmem_limit_bytes,
                      minimum=cfg.MIB, what="Mosaic's scoped VMEM limit")

  def lowering_platforms(self) -> tuple[str, ...]:
    return ALL_PLATFORMS if self.interpret else self.platforms

  def preferred_for(self, rows: int, hidden: int, dtype) -> bool:
    """False for dtypes the kernels reject (float64); True otherwise."""
    del rows, hidden
    return np.dtype(dtype) in tk.KERNEL_DTYPES

  # ------------------------------------------------------------- plumbing --

  def _interpret_mode(self):
    if not self.interpret:
      return False
    return "tpu" if self.tpu_interpreter else True

  def blocking(self, op: str, rows: int, hidden: int, dtypes,
               chip: cfg.Chip | None = None) -> cfg.Blocking:
    """The schedule for ``op`` ("fwd", "bwd", "res_fwd", "res_bwd").

    ``dtypes`` are the streamed operands' dtypes, inputs then outputs, in
    the order the kernel streams them; ``chip`` overrides detection.
    """
    row_stats = {"fwd": 1, "res_fwd": 1, "bwd": 1, "res_bwd": 1}[op]
    hidden_acc = 2 if op in ("bwd", "res_bwd") else 1
    return cfg.choose(
        rows=rows, hidden=hidden,
        streams=tuple(cfg.itemsize(d) for d in dtypes),
        row_stats=row_stats, hidden_accumulators=hidden_acc,
        block_rows=self.block_rows, hidden_block=self.hidden_block,
        vmem_limit_bytes=self.vmem_limit_bytes, chip=chip)

  def _forward(self, x, residual, scale, eps, scale_offset, out_dtype):
    rows, hidden = x.shape
    kdt = _kernel_dtype(out_dtype)
    dtypes = [x.dtype] + ([residual.dtype] * 2 if residual is not None
                          else []) + [kdt]
    op = "fwd" if residual is None else "res_fwd"
    blocking = self.blocking(op, rows, hidden, dtypes)
    fn = tk.forward if blocking.hidden_block is None else tk.wide_forward
    out = fn(x, residual, _weights(scale, scale_offset, hidden), eps=eps,
             out_dtype=kdt, blocking=blocking,
             interpret=self._interpret_mode())
    return (out[0].astype(out_dtype),) + tuple(out[1:])

  def _backward(self, x, scale, rstd, dy, dh, scale_offset):
    rows, hidden = x.shape
    dy, dh = _as_kernel_operand(dy), _as_kernel_operand(dh)
    dtypes = [x.dtype, dy.dtype] + ([dh.dtype] if dh is not None else []) + [
        x.dtype]
    op = "bwd" if dh is None else "res_bwd"
    blocking = self.blocking(op, rows, hidden, dtypes)
    fn = tk.backward if blocking.hidden_block is None else tk.wide_backward
    return fn(x, _weights(scale, scale_offset, hidden),
              rstd.astype(jnp.float32), dy, dh, blocking=blocking,
              interpret=self._interpret_mode())

  # ------------------------------------------------------------ interface --

  def forward(self, x, scale, *, eps, scale_offset, out_dtype):
    """x (rows, hidden) -> (y in out_dtype, rstd float32 (rows,)).

    Raises:
      TypeError: x not float32/bfloat16/float16.
    """
    _check_dtype("x", x)
    return self._forward(x, None, scale, eps, scale_offset, out_dtype)

  def backward(self, x, scale, rstd, dy, *, scale_offset):
    """-> (dx in x.dtype, dscale float32 (hidden,) or None).

    Raises:
      TypeError: x not float32/bfloat16/float16.
    """
    _check_dtype("x", x)
    return self._backward(x, scale, rstd, dy, None, scale_offset)

  def residual_forward(self, x, residual, scale, *, eps, scale_offset,
                       out_dtype):
    """-> (y in out_dtype, h = x + residual in residual.dtype, rstd).

    Raises:
      TypeError: x or residual not float32/bfloat16/float16.
    """
    _check_dtype("x", x)
    _check_dtype("residual", residual)
    return self._forward(x, residual, scale, eps, scale_offset, out_dtype)

  def residual_backward(self, h, scale, rstd, dy, dh, *, scale_offset):
    """-> (gradient of h = dx + dh in h.dtype, dscale float32 or None).

    Raises:
      TypeError: h not float32/bfloat16/float16.
    """
    _check_dtype("h", h)
    return self._backward(h, scale, rstd, dy, dh, scale_offset)
