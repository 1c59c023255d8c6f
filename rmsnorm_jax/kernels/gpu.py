"""``PallasGpu``: the Pallas (Triton) implementation for NVIDIA GPUs.

One kernel per primitive, each one pass over its inputs:

* forward: reads x (and scale), writes y and the float32 rstd;
* backward: reads x, dy, rstd (and scale), writes dx and per-program float32
  partial sums of dscale, which a small XLA reduction finishes;
* fused residual forward: reads x and residual, writes y, h and rstd;
* fused residual backward: reads h, dy, dh, rstd, writes the gradient of h
  and the dscale partials.

Kernel bodies are in ``gpu_kernels.py``, launch heuristics in
``gpu_tiling.py``; the measurements behind the constants are in
docs/gpu_perf_notes.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import gpu_kernels
from rmsnorm_jax.kernels import gpu_tiling

SUPPORTED_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                    np.dtype(jnp.float16))

# backend="auto" and the crossover with XLA, measured on an H100
# (docs/gpu_perf_notes.md, device time per call). At small shapes both are
# launch-bound; the kernel's single launch beat or tied XLA's one or two
# fusions in the forward at every shape up to 8192 columns tried (1x128 ..
# 512x4096: 1.2-3.8 us against 1.2-4.3), and in the backward from 4 rows up
# (kernel + dscale reduction against XLA's two to four fusions; at one row
# of 4096 bf16 it lost 3.0 to 2.7 while the forward won 1.4 to 2.3, so the
# kernel is kept there too). Few rows of 16384 columns lose overall: each
# row is one program on one SM (1, 2 and 4 rows of 16384 bf16: forward
# 2.3-2.4 us against 2.7, 1.8, 1.8; backward 6.4, 6.2, 6.3 against 4.1,
# 5.5, 5.9), so "auto" keeps XLA below AUTO_WIDE_MIN_ROWS rows of 16384
# padded columns or more. The kernel wins again at 4096 such rows; 8 to
# 4096 rows of that width, and wider rows (walked in chunks), were not
# measured: the boundary sits just above the rows where XLA was seen ahead.
AUTO_WIDE_COLS = 16384
AUTO_WIDE_MIN_ROWS = 8
# Element offsets past 2**31 would need 64-bit pointer arithmetic in every
# tile; such inputs (8 GiB of float32) stay on XLA under "auto".
AUTO_MAX_ELEMENTS = 2**31 - 1
# Interpret mode on CPU: a few "SMs" so that tests exercise the persistent
# backward loop (several row blocks per program) on small shapes.
INTERPRET_NUM_SMS = 4


def _check_dtype(name: str, a):
  if np.dtype(a.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(
        f"pallas_gpu supports {name} of dtype float32, bfloat16 or float16; "
        f"got {name} of shape {tuple(a.shape)} and dtype {a.dtype}. Use "
        f"backend='xla' (or 'auto') for other dtypes.")


def _f32_if_wide(a):
  # A float64 scale (x64 mode) is applied in float32 anyway.
  if a is not None and np.dtype(a.dtype) == np.dtype(np.float64):
    return a.astype(jnp.float32)
  return a


@dataclasses.dataclass(frozen=True)
class PallasGpu(base.Implementation):
  """Pallas kernels lowered through Triton, for CUDA GPUs.

  Inputs: x (and residual) of dtype float32, bfloat16 or float16, 2-D
  ``(rows, hidden)`` with any rows and hidden (hidden up to 65536 and beyond;
  rows past 16384 columns are processed in chunks); scale ``None`` or
  ``(hidden,)`` in any float dtype. float64 raises TypeError (naming the
  argument); ``preferred_for`` is False for it, so "auto" uses XLA.

  Attributes (all optional; None means the measured heuristic):
    block_rows: rows per tile (rounded up to a power of two).
    block_cols: columns per chunk; below the padded hidden size it forces the
      chunked (two-loop) tiling.
    num_warps: warps per program.
    programs_per_sm: programs per SM of a persistent grid.
    persistent: forward on a persistent grid (programs walk row blocks and
      load the scale once); the backward always is.
    prefetch: persistent backward loads the next row block while working on
      the current one.
    cache_scale: keep the scale in registers across the backward's row
      blocks (else reload it from cache per block).
    reload: backward reads x and dy again (from L2) after the row reduction
      rather than holding them in registers across it (default: rows of
      16384 padded columns and more, where holding them spilled).
    num_stages: Triton software-pipelining depth of the kernels' loops.
    num_sms: SM count used to size grids (default: read off the device).
    interpret: run with the Pallas interpreter; then every platform
      (including CPU) may lower it, which is how CI tests the kernels.
    poison_outputs: testing aid; outputs start as NaN so that an element the
      kernel never writes shows up (costs an extra fill per output).
  """

  name: ClassVar[str] = "pallas_gpu"
  platforms: ClassVar[tuple[str, ...]] = ("cuda",)

  block_rows: int | None = None
  block_cols: int | None = None
  num_warps: int | None = None
  programs_per_sm: int | None = None
  persistent: bool | None = None
  prefetch: bool | None = None
  cache_scale: bool | None = None
  reload: bool | None = None
  num_stages: int | None = None
  num_sms: int | None = None
  interpret: bool = False
  poison_outputs: bool = False

  def lowering_platforms(self) -> tuple[str, ...]:
    if self.interpret:
      return ("cpu", "cuda", "rocm", "tpu")
    return self.platforms

  def preferred_for(self, rows: int, hidden: int, dtype) -> bool:
    """True where the kernel measured faster than XLA (see constants)."""
    if np.dtype(dtype) not in SUPPORTED_DTYPES:
      return False
    rows, hidden = int(rows), int(hidden)
    if rows * hidden > AUTO_MAX_ELEMENTS:
      return False
    if gpu_tiling.next_pow2(hidden) >= AUTO_WIDE_COLS:
      return rows >= AUTO_WIDE_MIN_ROWS
    return True

  # ------------------------------------------------------------- plumbing --

  def _launch(self, kind: str, x):
    rows, hidden = x.shape
    sms = self.num_sms or (INTERPRET_NUM_SMS if self.interpret
                           else gpu_tiling.num_sms())
    return gpu_tiling.plan(
        kind, rows, hidden, sms=sms, itemsize=np.dtype(x.dtype).itemsize,
        persistent=self.persistent, block_rows=self.block_rows,
        block_cols=self.block_cols, num_warps=self.num_warps,
        programs_per_sm=self.programs_per_sm, prefetch=self.prefetch,
        cache_scale=self.cache_scale, reload=self.reload,
        num_stages=self.num_stages,
        interpret=self.interpret)

  @staticmethod
  def _kernel_out_dtype(out_dtype):
    # float64 outputs are computed in float32 and widened afterwards.
    dt = np.dtype(out_dtype)
    return np.dtype(jnp.float32) if dt == np.dtype(np.float64) else dt

  # ------------------------------------------------------------ interface --

  def forward(self, x, scale, *, eps, scale_offset, out_dtype):
    """x (rows, hidden) -> (y in out_dtype, rstd float32 (rows,))."""
    _check_dtype("x", x)
    y, rstd = gpu_kernels.forward(
        x, None, _f32_if_wide(scale), launch=self._launch("fwd", x),
        eps=eps, offset=scale_offset,
        out_dtype=self._kernel_out_dtype(out_dtype),
        poison=self.poison_outputs)
    return y.astype(out_dtype), rstd

  def backward(self, x, scale, rstd, dy, *, scale_offset):
    """-> (dx in x.dtype, dscale float32 (hidden,) or None)."""
    _check_dtype("x", x)
    return gpu_kernels.backward(
        x, _f32_if_wide(scale), rstd, _f32_if_wide(dy), None,
        launch=self._launch("bwd", x), offset=scale_offset,
        poison=self.poison_outputs)

  def residual_forward(self, x, residual, scale, *, eps, scale_offset,
                       out_dtype):
    """-> (y in out_dtype, h = x + residual in residual.dtype, rstd)."""
    _check_dtype("x", x)
    _check_dtype("residual", residual)
    y, h, rstd = gpu_kernels.forward(
        x, residual, _f32_if_wide(scale),
        launch=self._launch("fwd", x if x.dtype.itemsize >= residual.dtype.itemsize
                            else residual), eps=eps,
        offset=scale_offset, out_dtype=self._kernel_out_dtype(out_dtype),
        poison=self.poison_outputs)
    return y.astype(out_dtype), h, rstd

  def residual_backward(self, h, scale, rstd, dy, dh, *, scale_offset):
    """-> (gradient of h in h.dtype, dscale float32 or None)."""
    _check_dtype("h", h)
    return gpu_kernels.backward(
        h, _f32_if_wide(scale), rstd, _f32_if_wide(dy), _f32_if_wide(dh),
        launch=self._launch("bwd_residual", h), offset=scale_offset,
        poison=self.poison_outputs)
