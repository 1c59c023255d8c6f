"""``PallasTpu``: the Pallas (Mosaic) implementation for TPUs.

One kernel per op, each a single pass over HBM when a block of full rows
fits VMEM (every shape in ``shapes.TPU_AOT`` on v5e and later):

* forward: reads x (and scale, bias), writes y and the float32 rstd (2N
  bytes);
* backward: reads x, dy, rstd (and scale), writes dx and one float32
  partial dscale (and dbias) per grid slice, summed by a tiny XLA reduction
  (3N);
* fused residual forward: reads x and residual, writes y, h and rstd (4N);
* fused residual backward: reads h, dy, dh and rstd, writes the gradient of
  h (dx + dh) and the partial sums (4N);
* quantized forward: reads x (and residual), writes q (int8 or float8), the
  per-row float32 scale (and h); y never reaches HBM.

Every op takes both cast modes, a bias, and a per-head scale ``(heads,
hidden)``. Rows too wide for VMEM use two passes over hidden chunks (see
``tpu_config``); the quantized forward needs whole rows and declines those.
Kernel bodies are in ``tpu_kernels.py``, the block-size rule in
``tpu_config.py``; the TPU AOT tool compiles them for every TPU generation
without a TPU (docs/tpu_aot.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import tpu_config as cfg
from rmsnorm_jax.kernels import tpu_kernels as tk

# Streamed (rows, hidden) operands of each op, inputs then outputs, as the
# dtype roles they take: "x", "res" (the residual stream), "dy", "dh",
# "out" (y's dtype) and "q" (the quantized dtype).
_STREAMS = {
    "forward": ("x", "out"),
    "backward": ("x", "dy", "x"),
    "residual_forward": ("x", "res", "res", "out"),
    "residual_backward": ("x", "dy", "dh", "x"),
    "quantized_forward": ("x", "res", "res", "q"),  # "res": with residual
}
_BACKWARD_OPS = ("backward", "residual_backward")


def _kernel_dtype(dtype):
  """Output dtypes the kernels cannot store (float64) are made in float32."""
  dt = np.dtype(dtype)
  return dt if dt in tk.KERNEL_DTYPES else tk.F32


def _as_kernel_operand(a):
  """Cotangents in other dtypes (float64 under x64) enter as float32."""
  if a is None or np.dtype(a.dtype) in tk.KERNEL_DTYPES:
    return a
  return a.astype(jnp.float32)


def _stream_roles(op, has_res):
  roles = _STREAMS[op]
  if op == "quantized_forward" and not has_res:
    return ("x", "q")
  return roles


@dataclasses.dataclass(frozen=True)
class PallasTpu(cfg.Config, base.Implementation):
  """Pallas kernels lowered through Mosaic, for TPUs (v2 and later).

  Compiled without a TPU for v2, v3, v4, v5e, v5p, v6e and tpu7x.

  Inputs: x (and residual) 2-D ``(rows, hidden)`` of dtype float32, bfloat16
  or float16, any rows and hidden; scale ``None``, ``(hidden,)`` or per-head
  ``(heads, hidden)`` and bias ``None`` or ``(hidden,)`` in any float dtype;
  both cast modes; quantized output int8, float8_e4m3fn or float8_e5m2 (the
  TPU compiler takes all three for every generation from v2 to tpu7x).
  ``cannot_serve`` names what it does not take (float64 x, symbolic row
  counts, quantizing rows too wide for VMEM), so "auto" uses XLA there.

  Attributes: the :class:`tpu_config.Config` knobs ``block_rows``,
  ``hidden_block`` and ``vmem_limit_bytes`` (None: the rule in
  ``tpu_config``; a value of the wrong type or range raises when the
  config is made), and
    interpret: run the kernels with a Pallas interpreter instead of Mosaic;
      then every platform, CPU included, may lower it, which is how CI checks
      the numerics without a TPU.
    tpu_interpreter: with ``interpret``, use Pallas's TPU interpreter
      (``pltpu.InterpretParams()``: TPU memory semantics, outputs start as
      NaN so unwritten elements show, out-of-bounds reads raise) rather than
      the generic one (the kernel discharged to plain XLA ops). The TPU
      interpreter synchronizes through ordered host callbacks, which
      ``custom_partitioning`` cannot lower; it is for calling the methods
      directly (as the kernel tests do), and the default generic interpreter
      is what works through the public API.
  """

  name: ClassVar[str] = "pallas_tpu"
  platforms: ClassVar[tuple[str, ...]] = ("tpu",)
  folds_weight_cast: ClassVar[bool] = True

  interpret: bool = False
  tpu_interpreter: bool = False

  def lowering_platforms(self) -> tuple[str, ...]:
    return base.PLATFORMS if self.interpret else self.platforms

  def cannot_serve(self, call: base.Call) -> str | None:
    """Why the kernels cannot compute ``call`` (None when they can)."""
    reason = common.not_implemented(self.name, call, tk.KERNEL_DTYPES,
                                    implemented=common.FEATURES)
    if reason is not None:
      return reason
    if call.op == "quantized_forward":
      dt = np.dtype(call.dtype)
      heads = call.scale_shape[0] if len(call.scale_shape) == 2 else 0
      # A residual may come with it: count its streams, to be safe.
      blk = self.blocking("quantized_forward", call.rows, call.hidden,
                          [dt] * 3 + [call.norm.quant_dtype], heads=heads,
                          has_bias=call.has_bias)
      if blk.hidden_block is not None:
        return (f"{self.name} quantizes whole rows in VMEM; rows of "
                f"{call.hidden} do not fit {blk.chip}'s")
    return None

  # ------------------------------------------------------------- plumbing --

  def _interpret_mode(self):
    if not self.interpret:
      return False
    return "tpu" if self.tpu_interpreter else True

  def blocking(self, op: str, rows: int, hidden: int, dtypes,
               chip: cfg.Chip | None = None, *, heads: int = 0,
               has_bias: bool = False) -> cfg.Blocking:
    """This config resolved for ``op`` (one of ``ops.SIGNATURES``).

    ``dtypes`` are the streamed ``(rows, hidden)`` operands' dtypes, inputs
    then outputs, in the order the kernel streams them; ``heads`` the rows
    of a per-head scale (0 for none); ``chip`` overrides detection.
    """
    backward = op in _BACKWARD_OPS
    return cfg.choose(
        self, rows=rows, hidden=hidden,
        streams=tuple(cfg.itemsize(d) for d in dtypes),
        # The scale (and its partial sums backward) and the bias (its sums).
        vectors=(2 if backward else 1) + bool(has_bias),
        accumulators=(1 + bool(has_bias)) if backward else 0,
        group_copies=(tk.QUANTIZED_GROUP_COPIES
                      if op == "quantized_forward" else 0),
        heads=max(heads, 1), chip=chip)

  def _schedule(self, op, x, roles, scale, bias, has_res):
    """(Blocking, heads, scale tile rows) for ``op`` on ``x``; ``roles``
    maps the stream roles of ``_STREAMS`` to dtypes."""
    rows, hidden = x.shape
    # One head is a plain scale: row r uses scale[0].
    heads = scale.shape[0] if scale is not None and scale.ndim == 2 else 0
    heads = heads if heads > 1 else 0
    dtypes = [roles[r] for r in _stream_roles(op, has_res)]
    blk = self.blocking(op, rows, hidden, dtypes, heads=heads,
                        has_bias=bias is not None)
    tile = cfg.row_tile([cfg.itemsize(d) for d in dtypes], max(heads, 1))
    return blk, heads, tile

  def _operands(self, src_dtype, scale, bias, norm, heads, tile):
    """(Affine, w, b): the scale and bias as the kernels take them (O(D)).

    Both hold product-dtype values in float32: ``w = scale + offset``
    computed in that dtype (as the XLA implementation does), a per-head
    scale tiled to ``tile`` rows. The roundings to that dtype are explicit
    integer arithmetic (``tk.round_to``): as a pair of conversions feeding
    float32, XLA may drop them as excess precision.
    """
    pdt = np.dtype(norm.product_dtype(
        src_dtype, None if scale is None else scale.dtype))
    kpdt = _kernel_dtype(pdt)  # float64 products are computed in float32.
    w = b = None
    w_rows = 0
    if scale is not None:
      # Exact: scale is never wider than pdt (float64 apart, see kpdt).
      w = self._rounded_vector(scale, norm)
      if norm.scale_offset:
        w = tk.round_to(w + jnp.asarray(norm.scale_offset, kpdt).astype(
            jnp.float32), kpdt)
      if heads:
        w = jnp.tile(w, (tile // heads, 1))
        w_rows = tile
      else:
        w = w.reshape(1, -1)
        w_rows = 1
    if bias is not None:
      b = tk.round_to(self._rounded_vector(bias, norm), kpdt).reshape(1, -1)
    aff = tk.Affine(llama=norm.cast_mode == "llama", pdt=kpdt, w_rows=w_rows,
                    has_b=bias is not None)
    return aff, w, b

  @staticmethod
  def _rounded_vector(a, norm):
    """A scale or bias in float32, rounded to a 16-bit
    ``norm.weight_dtype`` (from float64: XLA's conversion to it,
    ``base.from_float64``)."""
    if np.dtype(a.dtype) == np.dtype(np.float64):
      return base.from_float64(a, norm.weight_rounding)
    a = a.astype(jnp.float32)
    if norm.weight_rounding is None:
      return a
    return tk.round_to(a, norm.weight_rounding)

  def _forward(self, x, res, scale, bias, norm, quant_scale=None):
    """(y or q, h or None, rstd or q_scale or None) from the kernels."""
    quantized = norm.quant_dtype is not None
    op = ("quantized_forward" if quantized else
          "residual_forward" if res is not None else "forward")
    src_dt = np.dtype(res.dtype if res is not None else x.dtype)
    out_dt = _kernel_dtype(norm.out_dtype)
    roles = dict(x=x.dtype, res=src_dt, out=out_dt, q=norm.quant_dtype)
    blk, heads, tile = self._schedule(op, x, roles, scale, bias,
                                      res is not None)
    aff, w, b = self._operands(src_dt, scale, bias, norm, heads, tile)
    if blk.hidden_block is not None:
      out = tk.wide_forward(x, res, w, b, eps=norm.eps, aff=aff,
                            out_dtype=tk.F32 if quantized else out_dt,
                            blocking=blk, interpret=self._interpret_mode())
      if quantized:
        # cannot_serve declines these rows; called anyway, XLA quantizes.
        q, q_scale = base.quantize(out[0], norm.quant_dtype, quant_scale)
        return q, out[1], q_scale[:, 0]
    else:
      quant = None
      if quantized:
        qdt = np.dtype(norm.quant_dtype)
        quant = tk.Quant(qdt, base.QUANT_MAX[qdt], quant_scale is not None)
      out = tk.forward(x, res, w, b, eps=norm.eps, aff=aff, out_dtype=out_dt,
                       quant=quant, quant_scale=quant_scale, blocking=blk,
                       interpret=self._interpret_mode())
    if not quantized:
      return (out[0].astype(norm.out_dtype),) + out[1:]
    return out

  def _backward(self, x, scale, bias, rstd, dy, dh, norm):
    dy, dh = _as_kernel_operand(dy), _as_kernel_operand(dh)
    op = "backward" if dh is None else "residual_backward"
    roles = dict(x=x.dtype, dy=dy.dtype, dh=None if dh is None else dh.dtype)
    blk, heads, tile = self._schedule(op, x, roles, scale, bias, False)
    aff, w, _ = self._operands(x.dtype, scale, bias, norm, heads, tile)
    fn = tk.backward if blk.hidden_block is None else tk.wide_backward
    dx, dscale, dbias = fn(x, w, rstd.astype(jnp.float32), dy, dh, aff=aff,
                           heads=heads, blocking=blk,
                           interpret=self._interpret_mode())
    if dscale is not None:
      dscale = dscale.reshape(scale.shape)
    return dx, dscale, dbias

  # ------------------------------------------------------------ interface --

  def forward(self, x, scale, bias, *, norm):
    """x (rows, hidden) -> (y in norm.out_dtype, rstd float32 (rows,))."""
    y, _, rstd = self._forward(x, None, scale, bias, norm)
    return y, rstd

  def backward(self, x, scale, bias, rstd, dy, *, norm):
    """-> (dx in x.dtype, dscale float32 of scale's shape or None, dbias
    float32 (hidden,) or None)."""
    return self._backward(x, scale, bias, rstd, dy, None, norm)

  def residual_forward(self, x, residual, scale, bias, *, norm):
    """-> (y in norm.out_dtype, h = x + residual in residual.dtype, rstd)."""
    return self._forward(x, residual, scale, bias, norm)

  def residual_backward(self, h, scale, bias, rstd, dy, dh, *, norm):
    """-> (gradient of h = dx + dh in h.dtype, dscale or None, dbias or
    None)."""
    return self._backward(h, scale, bias, rstd, dy, dh, norm)

  def quantized_forward(self, x, residual, scale, bias, quant_scale, *,
                        norm):
    """-> (q in norm.quant_dtype (rows, hidden), q_scale float32 (rows, 1),
    h in residual.dtype or None), in one pass over HBM.

    ``quant_scale``: None (per-row dynamic scale) or a float32 scalar.
    Rows too wide for one VMEM block (``cannot_serve`` declines them) are
    normalized by the two-pass kernels and quantized by XLA.
    """
    rows = x.shape[0]
    if norm.quant_dtype is None:
      raise ValueError("quantized_forward needs norm.quant_dtype (int8, "
                       "float8_e4m3fn or float8_e5m2); got None.")
    q, h, qs = self._forward(x, residual, scale, bias, norm, quant_scale)
    if quant_scale is not None:
      qs = jnp.broadcast_to(jnp.asarray(quant_scale, jnp.float32
                                        ).reshape(1, 1), (rows, 1))
    else:
      qs = qs.reshape(rows, 1)
    return q, qs, h
