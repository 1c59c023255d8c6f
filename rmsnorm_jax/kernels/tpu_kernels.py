"""Pallas TPU (Mosaic) kernel bodies and the ``pallas_call`` wrappers.

Layout: arrays are ``(rows, hidden)`` with hidden on the 128-lane axis. A grid
step holds a ``(block_rows, hidden)`` block of every streamed operand in VMEM
(one-pass kernels) or a ``(block_rows, hidden_block)`` block (two-pass
kernels, for rows too wide for VMEM, see ``tpu_config``).

Per-row float32 statistics (rstd) travel between HBM and the kernels as a
``(num_blocks, 1, block_rows)`` array: lane-dense, so HBM holds 4 bytes per
row (a ``(rows, 1)`` float32 array would be padded to 128 lanes, 512 bytes
per row). Inside the kernel they are a ``(block_rows, 1)`` column that
broadcasts along lanes; one 2-D transpose per grid step converts between the
two (Mosaic's reshape between them needs a sublane gather, absent on v4).
The wrapper's reshape to ``(rows,)`` is a bitcast or an O(rows) copy.

float16 has no vector loads in Mosaic on any generation, so float16 operands
enter and leave the kernels as their uint16 bit patterns (a free bitcast in
the wrapper) and the kernels convert to and from float32 with integer
arithmetic, rounding to nearest even like a hardware conversion.

dscale and dbias are reduced in float32 per grid slice: the backward grid
is ``(BACKWARD_SPLITS, steps)`` with the first axis "parallel" (megacore
chips give each TensorCore a slice of row blocks) and the second
"arbitrary", each slice accumulating into an ``(8, hidden)`` VMEM scratch
and writing one ``(1, hidden)`` partial at its end; the wrapper adds the
partials in a fixed order, so the sums are bitwise reproducible. Rows past
the end of the array in a ragged last block hold garbage and are excluded
from the sums with a select, never a multiply (garbage may be NaN).

A per-head scale ``(heads, hidden)`` (row r uses ``scale[r % heads]``)
enters as one tile of ``lcm(sublane tile, heads)`` rows; row blocks and row
groups are multiples of that tile, so row i of a group takes tile row i
(``_times_w``), and its dscale accumulator has the tile's rows, folded to
heads by the wrapper.

The "llama" cast mode rounds x_hat to the input's dtype and each product
and sum to the product dtype (``Affine``), with integer arithmetic
(``round_to``); the backward applies the same roundings to the cotangent.

The quantized forward computes a row's y twice from VMEM (once for its
maximum, once to quantize it) rather than storing it: HBM sees x (and
residual) read once and q, the per-row scale (and h) written once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmsnorm_jax import base
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import tpu_config as cfg

F32 = np.dtype(jnp.float32)
F16 = np.dtype(jnp.float16)
KERNEL_DTYPES = (F32, np.dtype(jnp.bfloat16), F16)
# Float32 copies of a whole row group that the quantized forward keeps live
# in VMEM (tpu_config.footprint's group_copies): most likely the group's y,
# which its two passes compute alike, and conversion temporaries (measured,
# not traced to single values). Compiled for every generation (libtpu
# 0.0.42.1), 2048 rows of 32768 and 65536 columns failed on v5e, v5p, v6e
# and tpu7x with the blocks alone and 4 MiB of headroom: the scoped VMEM
# needed beyond the blocks was 1.0-2.06 copies of the group (32 rows x the
# width x 4 bytes; float16 with a residual at 65536 columns the most).
QUANTIZED_GROUP_COPIES = 2

# float16 <-> float32 bit manipulation constants (IEEE 754 binary16/32).
_F16_SIGN = 0x8000
_F16_EXP_MASK = 0x1F
_F16_MANT_MASK = 0x3FF
_F16_MANT_BITS = 10
# The block index maps' constant block index. An int32, not a Python 0:
# under jax_enable_x64 a literal becomes an int64 result beside the int32
# grid indices, which Mosaic does not compile ("func.return (i32, i64)").
_ZERO = np.int32(0)
_F32_MANT_BITS = 23
_MANT_SHIFT = _F32_MANT_BITS - _F16_MANT_BITS
_EXP_REBIAS = 127 - 15
_F16_EXP_INF = 31
_F32_EXP_INF_BITS = 0xFF << _F32_MANT_BITS
_F32_ABS_MASK = 0x7FFFFFFF
_F16_SUBNORMAL_UNIT = 2.0**-24
# |x| at or above 2**16 (f32 bits) overflows float16 after rounding.
_F32_F16_OVERFLOW_BITS = (127 + 16) << _F32_MANT_BITS
# |x| below 2**-14 (f32 bits) is a float16 subnormal.
_F32_F16_MIN_NORMAL_BITS = (127 - 14) << _F32_MANT_BITS
# Adding 0.5 makes the float32 unit in the last place 2**-24, the float16
# subnormal step, so the hardware add rounds to it (nearest even).
_SUBNORMAL_MAGIC = 0.5
_SUBNORMAL_MAGIC_BITS = 126 << _F32_MANT_BITS
_F16_INF_BITS = 0x7C00
_F16_QNAN_BITS = 0x7E00
_ROUND_HALF_MINUS_ONE = (1 << (_MANT_SHIFT - 1)) - 1
# bfloat16 is the upper half of a float32.
_BF16_DROPPED_BITS = 16
_BF16_ROUND_HALF_MINUS_ONE = (1 << (_BF16_DROPPED_BITS - 1)) - 1
_BF16_KEPT_MASK = 0xFFFF0000


# ------------------------------------------------------------ conversions --

def f16_bits_to_f32(bits):
  """uint16 float16 bit patterns -> float32 values (exact)."""
  h = bits.astype(jnp.int32)
  exp = (h >> _F16_MANT_BITS) & _F16_EXP_MASK
  mant = h & _F16_MANT_MASK
  normal = ((exp + _EXP_REBIAS) << _F32_MANT_BITS) | (mant << _MANT_SHIFT)
  special = _F32_EXP_INF_BITS | (mant << _MANT_SHIFT)
  mag = jax.lax.bitcast_convert_type(
      jnp.where(exp == _F16_EXP_INF, special, normal), jnp.float32)
  # Subnormals via an int->float conversion: TPUs flush float32 denormals,
  # so the usual bit trick through a denormal float32 would lose them.
  mag = jnp.where(exp == 0, mant.astype(jnp.float32) * _F16_SUBNORMAL_UNIT,
                  mag)
  return jnp.where((h & _F16_SIGN) != 0, -mag, mag)


def f32_to_f16_bits(v):
  """float32 values -> uint16 float16 bit patterns, round to nearest even."""
  x = jax.lax.bitcast_convert_type(v, jnp.int32)
  sign = (x >> 16) & _F16_SIGN
  a = x & _F32_ABS_MASK
  # int32 branches: two Python ints would select an int64 under x64.
  big = jnp.where(a > _F32_EXP_INF_BITS, jnp.int32(_F16_QNAN_BITS),
                  jnp.int32(_F16_INF_BITS))
  small = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(a, jnp.float32) + _SUBNORMAL_MAGIC,
      jnp.int32) - _SUBNORMAL_MAGIC_BITS
  odd = (a >> _MANT_SHIFT) & 1
  normal = (a - (_EXP_REBIAS << _F32_MANT_BITS) + _ROUND_HALF_MINUS_ONE
            + odd) >> _MANT_SHIFT
  out = jnp.where(a >= _F32_F16_OVERFLOW_BITS, big,
                  jnp.where(a < _F32_F16_MIN_NORMAL_BITS, small, normal))
  return (out | sign).astype(jnp.uint16)


def to_kernel(a):
  """The array as the kernel sees it (float16 as uint16 bits)."""
  if np.dtype(a.dtype) == F16:
    return jax.lax.bitcast_convert_type(a, jnp.uint16)
  return a


def kernel_dtype(dtype):
  return np.dtype(jnp.uint16) if np.dtype(dtype) == F16 else np.dtype(dtype)


def from_kernel(a, dtype):
  if np.dtype(dtype) == F16:
    return jax.lax.bitcast_convert_type(a, jnp.float16)
  return a


def _load(value, dtype):
  """A loaded block (kernel dtype) as float32; dtype is the logical one."""
  if np.dtype(dtype) == F16:
    return f16_bits_to_f32(value)
  return value.astype(jnp.float32)


def _encode(value_f32, dtype):
  """float32 -> the kernel dtype holding logical dtype ``dtype``."""
  if np.dtype(dtype) == F16:
    return f32_to_f16_bits(value_f32)
  return value_f32.astype(dtype)


def round_to(v, dtype):
  """float32 values rounded to ``dtype`` (nearest even), still float32.

  With integer arithmetic rather than a pair of conversions: XLA may drop
  a float32 -> bfloat16 -> float32 round trip as excess precision (it does
  so in the TPU interpreter on CPU), and these roundings are the semantics.
  """
  dt = np.dtype(dtype)
  if dt == F32:
    return v
  if dt == F16:
    return f16_bits_to_f32(f32_to_f16_bits(v))
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  odd = (bits >> _BF16_DROPPED_BITS) & 1
  rounded = (bits + _BF16_ROUND_HALF_MINUS_ONE + odd) & jnp.uint32(
      _BF16_KEPT_MASK)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  return jnp.where(jnp.isnan(v), v, out)


# ------------------------------------------------------- static arguments --

@dataclasses.dataclass(frozen=True)
class Affine:
  """How the normalized row becomes y, and what the backward sums (static).

  Attributes:
    llama: cast_mode "llama": x_hat is rounded to the normalized input's
      dtype, products and sums to ``pdt`` (each computed in float32).
    pdt: ``norm.product_dtype`` of the call (float32 in "float32" mode).
    w_rows: 0 without scale; 1 for a ``(hidden,)`` scale; for a per-head
      scale, the rows of its tile (a multiple of the head count and of 8), as
      the wrapper passes it tiled.
    has_b: a bias is added (and, backward, dbias is summed).
  """

  llama: bool
  pdt: np.dtype
  w_rows: int
  has_b: bool

  @property
  def has_w(self) -> bool:
    return self.w_rows > 0

  @property
  def acc_rows(self) -> int:
    """Rows of the VMEM accumulators of dscale and dbias."""
    return max(8, self.w_rows)


@dataclasses.dataclass(frozen=True)
class Quant:
  """The quantized output (static): its dtype, bound and scaling mode."""

  dtype: np.dtype
  qmax: float
  static: bool


# ---------------------------------------------------------------- helpers --

def _for_row_groups(nrows: int, group: int, fn):
  """Calls ``fn(r0, n)`` over row groups; n static, r0 static or traced."""
  full, rem = divmod(nrows, group)
  if full == 1:
    fn(0, group)
  elif full > 1:
    def body(g, carry):
      fn(pl.multiple_of(g * group, group), group)
      return carry
    # int32 bounds: under jax_enable_x64 Python ints would give an int64
    # index, which Mosaic cannot multiply with the int32 program ids.
    jax.lax.fori_loop(jnp.int32(0), jnp.int32(full), body, 0)
  if rem:
    fn(full * group, rem)


def _lane_chunks(width: int, chunk: int):
  return [(c0, min(chunk, width - c0)) for c0 in range(0, width, chunk)]


def _times_w(v, w_ref, ls, w_rows):
  """``v`` (n, cw) times the scale's lanes ``ls``.

  A per-head scale arrives tiled to ``w_rows`` rows; row groups start at a
  multiple of the tile and hold whole tiles, so row i of a group takes row
  ``i % w_rows`` of the tile.
  """
  if w_rows == 1:
    return v * w_ref[:, ls]
  n, cw = v.shape
  return (v.reshape(n // w_rows, w_rows, cw) * w_ref[:, ls][None]
          ).reshape(n, cw)


def _fold_into(acc_ref, lanes, contrib):
  """acc[:, lanes] += contrib summed to the accumulator's rows.

  Row i of ``contrib`` lands in accumulator row ``i % acc_rows`` (what a
  per-head dscale needs: the tile is a multiple of the head count); a group
  of fewer rows than that (all rows of a small array) is summed whole into
  row 0.
  """
  n, cw = contrib.shape
  k = acc_ref.shape[0]
  if n % k == 0:
    acc_ref[:, lanes] += contrib.reshape(n // k, k, cw).sum(axis=0)
  else:
    acc_ref[0:1, lanes] += contrib.sum(axis=0, keepdims=True)


def _row_mask(n, r0, valid):
  return jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0) + r0 < valid


def _lane_mask(cw, c0, valid):
  return jax.lax.broadcasted_iota(jnp.int32, (1, cw), 1) + c0 < valid


def _y(xhat, src_dt, aff, w_ref, b_ref, ls):
  """y's float32 value from x_hat = x * rstd (float32) for lanes ``ls``."""
  y = round_to(xhat, src_dt) if aff.llama else xhat
  if aff.has_w:
    y = round_to(_times_w(y, w_ref, ls, aff.w_rows), aff.pdt)
  if aff.has_b:
    y = round_to(y + b_ref[:, ls], aff.pdt)
  return y


def _dy_and_g(dy_raw, dy_dt, x_dt, aff, w_ref, ls):
  """(dy in the product dtype, g = the cotangent reaching x_hat), float32.

  Llama: g = dy * w rounded to the product dtype, then to x's dtype, as
  autodiff of the forward's roundings gives.
  """
  dyp = _load(dy_raw, dy_dt)
  if aff.llama:
    dyp = round_to(dyp, aff.pdt)
  g = dyp
  if aff.has_w:
    g = round_to(_times_w(dyp, w_ref, ls, aff.w_rows), aff.pdt)
  if aff.llama:
    g = round_to(g, x_dt)
  return dyp, g


def _interpret(interpret):
  """pallas_call's ``interpret``: False, True (generic) or "tpu"."""
  if interpret == "tpu":
    return pltpu.InterpretParams()
  return bool(interpret)


def _nbytes(*arrays):
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in arrays if a is not None))


def _cost(n_elements, rows, *arrays_and_outs):
  return pl.CostEstimate(flops=int(6 * n_elements), transcendentals=int(rows),
                         bytes_accessed=_nbytes(*arrays_and_outs))


def _call(kernel, ins, out_shape, *, grid, in_specs, out_specs, scratch,
          semantics, blocking, rsqrts, interpret, name):
  """``pl.pallas_call`` with this module's settings, applied to ``ins``.

  ``out_shape`` is one ShapeDtypeStruct or a tuple (then a tuple returns).
  The outputs are typed to vary over the mesh axes the inputs vary over, so
  the kernels also lower inside a user's ``shard_map`` (see common.py).
  ``rsqrts`` is the cost estimate's transcendental count.
  """
  outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
  return pl.pallas_call(
      kernel, out_shape=common.vary_like(out_shape, ins), grid=grid,
      in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=semantics,
          vmem_limit_bytes=blocking.vmem_limit_bytes),
      cost_estimate=_cost(math.prod(ins[0].shape), rsqrts, *ins, *outs),
      interpret=_interpret(interpret), name=name)(*common.match_varying(ins))


def _stats_out(rows, block_rows):
  nb = cfg.num_blocks(rows, block_rows)
  return jax.ShapeDtypeStruct((nb, 1, block_rows), jnp.float32)


def _stats_to_rows(stats, rows):
  return stats.reshape(-1)[:rows]


def _rows_to_stats(v, rows, block_rows):
  nb = cfg.num_blocks(rows, block_rows)
  pad = nb * block_rows - rows
  if pad:
    v = jnp.pad(v, (0, pad))
  return v.reshape(nb, 1, block_rows)


def _check_tiles(aff, blocking):
  """A per-head scale needs blocks and groups of whole scale tiles."""
  if aff.w_rows > 1 and (blocking.block_rows % aff.w_rows
                         or blocking.group_rows % aff.w_rows):
    raise ValueError(
        f"per-head scale tiled to {aff.w_rows} rows needs row blocks and "
        f"groups of multiples of it; got {blocking}")


def _vector_specs(aff, width, index_map):
  """BlockSpecs of the scale tile and bias, in the kernels' operand order."""
  specs = []
  if aff.has_w:
    specs.append(pl.BlockSpec((aff.w_rows, width), index_map))
  if aff.has_b:
    specs.append(pl.BlockSpec((1, width), index_map))
  return specs


def _vectors(aff, w, b):
  return ([w] if aff.has_w else []) + ([b] if aff.has_b else [])


# --------------------------------------------------------------- forward --

def _forward_kernel(*refs, hidden, eps, has_res, aff, quant, dtypes,
                    blocking):
  """One-pass forward, optionally fused with the residual add or quantized.

  Refs: x, [residual], [w], [b], [quant_scale (SMEM)], y or q, [h],
  [rstd or q_scale], [col scratch]. A static quantization has no per-row
  output.
  """
  refs = list(refs)
  x_ref = refs.pop(0)
  res_ref = refs.pop(0) if has_res else None
  w_ref = refs.pop(0) if aff.has_w else None
  b_ref = refs.pop(0) if aff.has_b else None
  qs_ref = refs.pop(0) if quant is not None and quant.static else None
  y_ref = refs.pop(0)
  h_ref = refs.pop(0) if has_res else None
  r_ref, col_ref = refs if refs else (None, None)
  x_dt, res_dt, y_dt = dtypes
  chunks = _lane_chunks(hidden, blocking.lane_chunk)
  src, src_dt = (h_ref, res_dt) if has_res else (x_ref, x_dt)

  def group(r0, n):
    rs = pl.ds(r0, n)
    ss = jnp.zeros((n, 1), jnp.float32)
    for c0, cw in chunks:
      ls = pl.ds(c0, cw)
      v = _load(x_ref[rs, ls], x_dt)
      if has_res:
        # The norm sees h rounded to the residual dtype, as the caller does.
        enc = _encode(v + _load(res_ref[rs, ls], res_dt), res_dt)
        h_ref[rs, ls] = enc
        v = _load(enc, res_dt)
      ss = ss + jnp.sum(v * v, axis=1, keepdims=True)
    r = jax.lax.rsqrt(ss / hidden + eps)

    def y_of(ls):
      return _y(_load(src[rs, ls], src_dt) * r, src_dt, aff, w_ref, b_ref,
                ls)

    if quant is None:
      col_ref[rs, :] = r
      for c0, cw in chunks:
        ls = pl.ds(c0, cw)
        y_ref[rs, ls] = _encode(y_of(ls), y_dt)
      return
    qmax = jnp.float32(quant.qmax)
    if quant.static:
      qs = qs_ref[0, 0]
    else:
      # The row maximum first (y recomputed from VMEM, not stored), so HBM
      # sees each input once and q once.
      amax = jnp.zeros((n, 1), jnp.float32)
      for c0, cw in chunks:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(y_of(pl.ds(c0, cw))),
                                         axis=1, keepdims=True))
      # base.quantize's rounding: products with float32 reciprocals.
      qs = jnp.where(amax > 0, amax * jnp.float32(base.inverse_qmax(
          quant.dtype)), jnp.float32(1.0))
      col_ref[rs, :] = qs
    inv = jnp.float32(1.0) / qs
    for c0, cw in chunks:
      ls = pl.ds(c0, cw)
      v = jnp.clip(y_of(ls) * inv, -qmax, qmax)
      if quant.dtype == np.dtype(jnp.int8):
        v = jnp.round(v)  # half to even
      y_ref[rs, ls] = v.astype(quant.dtype)

  _for_row_groups(x_ref.shape[0], blocking.group_rows, group)
  if r_ref is not None:
    r_ref[...] = col_ref[...].T


def forward(x, res, w, b, *, eps, aff, out_dtype, quant, quant_scale,
            blocking, interpret):
  """One-pass forward.

  ``w``: None, ``(1, hidden)`` float32, or a per-head scale tiled to
  ``(aff.w_rows, hidden)``; ``b``: None or ``(1, hidden)`` float32 (both
  holding product-dtype values). Returns ``(y or q, h or None, per-row
  float32 (rows,) or None)``: rstd, or with ``quant`` the dynamic
  quantization scale (None for a static one).
  """
  _check_tiles(aff, blocking)
  rows, hidden = x.shape
  br = blocking.block_rows
  nb = cfg.num_blocks(rows, br)
  has_res = res is not None
  res_dt = np.dtype(res.dtype if has_res else x.dtype)
  row_spec = pl.BlockSpec((br, hidden), lambda i: (i, _ZERO))
  ins = [to_kernel(x)] + ([to_kernel(res)] if has_res else [])
  in_specs = [row_spec] * len(ins)
  ins += _vectors(aff, w, b)
  in_specs += _vector_specs(aff, hidden, lambda i: (_ZERO, _ZERO))
  if quant is not None and quant.static:
    ins.append(jnp.asarray(quant_scale, jnp.float32).reshape(1, 1))
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  y_dt = quant.dtype if quant is not None else np.dtype(out_dtype)
  outs = [jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(y_dt))]
  out_specs = [row_spec]
  if has_res:
    outs.append(jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(res_dt)))
    out_specs.append(row_spec)
  scratch = []
  per_row = quant is None or not quant.static
  if per_row:
    outs.append(_stats_out(rows, br))
    out_specs.append(pl.BlockSpec((None, 1, br), lambda i: (i, _ZERO, _ZERO)))
    scratch.append(pltpu.VMEM((br, 1), jnp.float32))
  kernel = functools.partial(
      _forward_kernel, hidden=hidden, eps=eps, has_res=has_res, aff=aff,
      quant=quant, dtypes=(np.dtype(x.dtype), res_dt, y_dt),
      blocking=blocking)
  result = _call(
      kernel, ins, tuple(outs), grid=(nb,), in_specs=in_specs,
      out_specs=tuple(out_specs), scratch=scratch, semantics=("parallel",),
      blocking=blocking, rsqrts=rows, interpret=interpret,
      name="rmsnorm_forward" if quant is None else "rmsnorm_quantized")
  y = from_kernel(result[0], y_dt)
  h = from_kernel(result[1], res_dt) if has_res else None
  stats = _stats_to_rows(result[-1], rows) if per_row else None
  return y, h, stats


# --------------------------------------------------------------- backward --

def _write_dx(rs, r, c, keep, chunks, in_refs, out_refs, dtypes, aff):
  """dx = rstd * (g - xhat * c) for rows ``rs``, chunk by chunk of lanes.

  ``r`` is the rows' rstd and ``c`` their mean(g * xhat), both (n, 1). It
  also folds dy * xhat into the dscale accumulator and dy into the dbias
  one (where present), with rows past the end of the array (``keep``
  False; they hold garbage, maybe NaN) selected away, never multiplied.
  """
  x_ref, dy_ref, w_ref, dh_ref = in_refs
  dx_ref, accw_ref, accb_ref = out_refs
  x_dt, dy_dt, dh_dt = dtypes
  for c0, cw in chunks:
    ls = pl.ds(c0, cw)
    dyp, g = _dy_and_g(dy_ref[rs, ls], dy_dt, x_dt, aff, w_ref, ls)
    xhat = _load(x_ref[rs, ls], x_dt) * r
    dx = r * (g - xhat * c)
    if dh_ref is not None:
      dx = dx + _load(dh_ref[rs, ls], dh_dt)
    dx_ref[rs, ls] = _encode(dx, x_dt)
    for acc_ref, contrib in (
        (accw_ref, lambda: dyp * (round_to(xhat, x_dt) if aff.llama
                                  else xhat)),
        (accb_ref, lambda: dyp)):
      if acc_ref is None:
        continue
      v = contrib()
      if keep is not None:
        v = jnp.where(keep, v, 0.0)
      _fold_into(acc_ref, ls, v)


def _acc_out(acc_ref, out_ref):
  """Writes an accumulator's partial: summed to one row unless per-head."""
  if out_ref.shape[-2] == 1:
    out_ref[...] = jnp.sum(acc_ref[...], axis=0, keepdims=True)
  else:
    out_ref[...] = acc_ref[...]


def _split_sums(refs, aff):
  """Pops (dw out, db out) then later (acc_w, acc_b) from ``refs``."""
  dw = refs.pop(0) if aff.has_w else None
  db = refs.pop(0) if aff.has_b else None
  return dw, db


def _backward_kernel(*refs, rows, hidden, has_dh, aff, dtypes, blocking,
                     steps, nb):
  """One-pass backward.

  Refs: x, dy, rstd, [w], [dh], dx, [dw], [db], col, [acc_w], [acc_b].
  """
  refs = list(refs)
  x_ref, dy_ref, r_ref = refs[:3]
  del refs[:3]
  w_ref = refs.pop(0) if aff.has_w else None
  dh_ref = refs.pop(0) if has_dh else None
  dx_ref = refs.pop(0)
  dw_ref, db_ref = _split_sums(refs, aff)
  col_ref = refs.pop(0)
  accw_ref, accb_ref = _split_sums(refs, aff)
  accs = [(a, o) for a, o in ((accw_ref, dw_ref), (accb_ref, db_ref))
          if a is not None]
  x_dt = dtypes[0]
  chunks = _lane_chunks(hidden, blocking.lane_chunk)
  br = x_ref.shape[0]
  j = pl.program_id(1)
  b = pl.program_id(0) * steps + j
  ragged = rows % br != 0

  if accs:
    @pl.when(j == 0)
    def _():
      for a, _ in accs:
        a[...] = jnp.zeros_like(a)

  def block():
    col_ref[...] = r_ref[...].T
    valid = rows - b * br

    def group(r0, n):
      rs = pl.ds(r0, n)
      r = col_ref[rs, :]
      dot = jnp.zeros((n, 1), jnp.float32)
      for c0, cw in chunks:
        ls = pl.ds(c0, cw)
        _, g = _dy_and_g(dy_ref[rs, ls], dtypes[1], x_dt, aff, w_ref, ls)
        dot = dot + jnp.sum(g * _load(x_ref[rs, ls], x_dt), axis=1,
                            keepdims=True)
      # mean(g * xhat) with xhat = x * rstd: the component the norm removes.
      c = dot * r / hidden
      keep = _row_mask(n, r0, valid) if (accs and ragged) else None
      _write_dx(rs, r, c, keep, chunks, (x_ref, dy_ref, w_ref, dh_ref),
                (dx_ref, accw_ref, accb_ref), dtypes, aff)

    _for_row_groups(br, blocking.group_rows, group)

  if cfg.BACKWARD_SPLITS * steps > nb:
    pl.when(b < nb)(block)
  else:
    block()

  if accs:
    @pl.when(j == steps - 1)
    def _():
      for a, o in accs:
        _acc_out(a, o)


def _partial_rows(aff):
  """Rows of each written dscale/dbias partial: 1, or the per-head tile."""
  return aff.w_rows if aff.w_rows > 1 else 1


def _sum_outputs(aff, lead, width, hidden, index_map):
  """(ShapeDtypeStructs, BlockSpecs, scratch) of the dscale/dbias partials."""
  outs, specs, scratch = [], [], []
  for present, rows in ((aff.has_w, _partial_rows(aff)), (aff.has_b, 1)):
    if present:
      outs.append(jax.ShapeDtypeStruct(lead + (rows, hidden), jnp.float32))
      specs.append(pl.BlockSpec((None,) * len(lead) + (rows, width),
                                index_map))
      scratch.append(pltpu.VMEM((aff.acc_rows, width), jnp.float32))
  return outs, specs, scratch


def _finish_sums(result, aff, heads):
  """(dscale or None, dbias or None) from the kernel's partial outputs."""
  result = list(result)
  if aff.has_w and aff.has_b and not heads:
    # Partials of the same shape: one reduction for both.
    return common.leading_sums([p.reshape(-1, p.shape[-1]) for p in result])
  dw = common.head_sums(result.pop(0), heads) if aff.has_w else None
  db = common.head_sums(result.pop(0), 0) if aff.has_b else None
  return dw, db


def backward(x, w, rstd, dy, dh, *, aff, heads, blocking, interpret):
  """One-pass backward.

  ``w`` as for :func:`forward`; ``heads`` 0 for a ``(hidden,)`` scale.
  Returns (dx (+ dh) in x.dtype, dscale f32 or None, dbias f32 or None).
  """
  _check_tiles(aff, blocking)
  rows, hidden = x.shape
  br = blocking.block_rows
  nb = cfg.num_blocks(rows, br)
  splits = cfg.BACKWARD_SPLITS if nb > 1 else 1
  steps = cfg.num_blocks(nb, splits)
  has_dh = dh is not None

  def blk(s, j):
    return jnp.minimum(s * steps + j, nb - 1)

  row_spec = pl.BlockSpec((br, hidden), lambda s, j: (blk(s, j), _ZERO))
  ins = [to_kernel(x), to_kernel(dy), _rows_to_stats(rstd, rows, br)]
  in_specs = [row_spec, row_spec,
              pl.BlockSpec((None, 1, br),
                           lambda s, j: (blk(s, j), _ZERO, _ZERO))]
  if aff.has_w:
    ins.append(w)
    in_specs.append(pl.BlockSpec((aff.w_rows, hidden),
                                 lambda s, j: (_ZERO, _ZERO)))
  if has_dh:
    ins.append(to_kernel(dh))
    in_specs.append(row_spec)
  sums, sum_specs, acc_scratch = _sum_outputs(
      aff, (splits,), hidden, hidden, lambda s, j: (s, _ZERO, _ZERO))
  outs = [jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(x.dtype))] + sums
  out_specs = [row_spec] + sum_specs
  scratch = [pltpu.VMEM((br, 1), jnp.float32)] + acc_scratch
  kernel = functools.partial(
      _backward_kernel, rows=rows, hidden=hidden, has_dh=has_dh, aff=aff,
      dtypes=(np.dtype(x.dtype), np.dtype(dy.dtype),
              np.dtype(dh.dtype) if has_dh else None),
      blocking=blocking, steps=steps, nb=nb)
  result = _call(
      kernel, ins, tuple(outs), grid=(splits, steps), in_specs=in_specs,
      out_specs=tuple(out_specs), scratch=scratch,
      semantics=("parallel", "arbitrary"), blocking=blocking, rsqrts=0,
      interpret=interpret, name="rmsnorm_backward")
  dx = from_kernel(result[0], x.dtype)
  return (dx,) + _finish_sums(result[1:], aff, heads)


# ------------------------------------------------- two-pass (wide rows) --

def _wide_stats_kernel(*refs, hidden, eps, has_res, aff, dtypes, blocking,
                       nd, mode):
  """Pass 1 over hidden chunks; the last chunk writes the per-row result.

  mode "forward": refs x, [res], [h out], rstd out, acc; result rstd.
  mode "backward": refs x, dy, [w], dot out, acc; result sum(g * x).
  """
  refs = list(refs)
  x_ref = refs.pop(0)
  if mode == "forward":
    res_ref = refs.pop(0) if has_res else None
    h_ref = refs.pop(0) if has_res else None
  else:
    dy_ref = refs.pop(0)
    w_ref = refs.pop(0) if aff.has_w else None
  out_ref, acc_ref = refs
  x_dt, other_dt = dtypes
  bd = x_ref.shape[1]
  chunks = _lane_chunks(bd, blocking.lane_chunk)
  j = pl.program_id(1)
  valid = hidden - j * bd
  ragged = hidden % bd != 0

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def group(r0, n):
    rs = pl.ds(r0, n)
    s = jnp.zeros((n, 1), jnp.float32)
    for c0, cw in chunks:
      ls = pl.ds(c0, cw)
      v = _load(x_ref[rs, ls], x_dt)
      if mode == "forward":
        if has_res:
          enc = _encode(v + _load(res_ref[rs, ls], other_dt), other_dt)
          h_ref[rs, ls] = enc
          v = _load(enc, other_dt)
        term = v * v
      else:
        _, g = _dy_and_g(dy_ref[rs, ls], other_dt, x_dt, aff, w_ref, ls)
        term = g * v
      if ragged:
        # Lanes past hidden in the last chunk hold garbage.
        term = jnp.where(_lane_mask(cw, c0, valid), term, 0.0)
      s = s + jnp.sum(term, axis=1, keepdims=True)
    acc_ref[rs, :] += s

  _for_row_groups(x_ref.shape[0], blocking.group_rows, group)

  @pl.when(j == nd - 1)
  def _():
    total = acc_ref[...]
    if mode == "forward":
      total = jax.lax.rsqrt(total / hidden + eps)
    out_ref[...] = total.T


def _wide_apply_kernel(*refs, rows, hidden, mode, has_dh, aff, dtypes,
                       blocking):
  """Pass 2: the elementwise output (and, backward, the sums over rows).

  mode "forward": refs src, rstd, [w], [b], y, col.
  mode "backward": refs x, dy, rstd, dot, [w], [dh], dx, [dw], [db], col,
  dcol, [acc_w], [acc_b]; grid (hidden chunks, row blocks), the sums
  accumulated over row blocks.
  """
  refs = list(refs)
  if mode == "forward":
    src_ref, r_ref = refs[:2]
    del refs[:2]
    w_ref = refs.pop(0) if aff.has_w else None
    b_ref = refs.pop(0) if aff.has_b else None
    y_ref, col_ref = refs
    src_dt, y_dt = dtypes
    chunks = _lane_chunks(src_ref.shape[1], blocking.lane_chunk)
    col_ref[...] = r_ref[...].T

    def group(r0, n):
      rs = pl.ds(r0, n)
      r = col_ref[rs, :]
      for c0, cw in chunks:
        ls = pl.ds(c0, cw)
        y = _y(_load(src_ref[rs, ls], src_dt) * r, src_dt, aff, w_ref, b_ref,
               ls)
        y_ref[rs, ls] = _encode(y, y_dt)

    _for_row_groups(src_ref.shape[0], blocking.group_rows, group)
    return

  x_ref, dy_ref, r_ref, d_ref = refs[:4]
  del refs[:4]
  w_ref = refs.pop(0) if aff.has_w else None
  dh_ref = refs.pop(0) if has_dh else None
  dx_ref = refs.pop(0)
  dw_ref, db_ref = _split_sums(refs, aff)
  col_ref, dcol_ref = refs[:2]
  del refs[:2]
  accw_ref, accb_ref = _split_sums(refs, aff)
  accs = [(a, o) for a, o in ((accw_ref, dw_ref), (accb_ref, db_ref))
          if a is not None]
  br, bd = x_ref.shape
  chunks = _lane_chunks(bd, blocking.lane_chunk)
  i = pl.program_id(1)
  nb = pl.num_programs(1)
  valid = rows - i * br
  ragged = rows % br != 0
  col_ref[...] = r_ref[...].T
  dcol_ref[...] = d_ref[...].T

  if accs:
    @pl.when(i == 0)
    def _():
      for a, _ in accs:
        a[...] = jnp.zeros_like(a)

  def group(r0, n):
    rs = pl.ds(r0, n)
    r = col_ref[rs, :]
    c = dcol_ref[rs, :] * r / hidden
    keep = _row_mask(n, r0, valid) if (accs and ragged) else None
    _write_dx(rs, r, c, keep, chunks, (x_ref, dy_ref, w_ref, dh_ref),
              (dx_ref, accw_ref, accb_ref), dtypes, aff)

  _for_row_groups(br, blocking.group_rows, group)

  if accs:
    @pl.when(i == nb - 1)
    def _():
      for a, o in accs:
        _acc_out(a, o)


def wide_forward(x, res, w, b, *, eps, aff, out_dtype, blocking, interpret):
  """Two-pass forward for rows too wide for VMEM (reads x, or h, twice).

  Arguments and results as :func:`forward` without quantization.
  """
  _check_tiles(aff, blocking)
  rows, hidden = x.shape
  br, bd = blocking.block_rows, blocking.hidden_block
  nb, nd = cfg.num_blocks(rows, br), cfg.num_blocks(hidden, bd)
  has_res = res is not None
  res_dt = np.dtype(res.dtype if has_res else x.dtype)
  tile = pl.BlockSpec((br, bd), lambda i, j: (i, j))
  stats_spec = pl.BlockSpec((None, 1, br), lambda i, j: (i, _ZERO, _ZERO))
  ins = [to_kernel(x)] + ([to_kernel(res)] if has_res else [])
  outs = ([jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(res_dt))]
          if has_res else []) + [_stats_out(rows, br)]
  stats_kernel = functools.partial(
      _wide_stats_kernel, hidden=hidden, eps=eps, has_res=has_res, aff=aff,
      dtypes=(np.dtype(x.dtype), res_dt), blocking=blocking, nd=nd,
      mode="forward")
  first = _call(
      stats_kernel, ins, tuple(outs), grid=(nb, nd),
      in_specs=[tile] * len(ins),
      out_specs=tuple([tile] * has_res + [stats_spec]),
      scratch=[pltpu.VMEM((br, 1), jnp.float32)],
      semantics=("parallel", "arbitrary"), blocking=blocking, rsqrts=rows,
      interpret=interpret, name="rmsnorm_forward_stats")
  stats = first[-1]
  src = first[0] if has_res else ins[0]
  src_dt = res_dt if has_res else np.dtype(x.dtype)
  ins2 = [src, stats] + _vectors(aff, w, b)
  specs2 = [tile, stats_spec] + _vector_specs(aff, bd, lambda i, j: (_ZERO, j))
  out2 = jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(out_dtype))
  apply_kernel = functools.partial(
      _wide_apply_kernel, rows=rows, hidden=hidden, mode="forward",
      has_dh=False, aff=aff, dtypes=(src_dt, np.dtype(out_dtype)),
      blocking=blocking)
  y = _call(
      apply_kernel, ins2, out2, grid=(nb, nd), in_specs=specs2,
      out_specs=tile, scratch=[pltpu.VMEM((br, 1), jnp.float32)],
      semantics=("parallel", "parallel"), blocking=blocking, rsqrts=0,
      interpret=interpret, name="rmsnorm_forward_apply")
  y = from_kernel(y, out_dtype)
  h = from_kernel(first[0], res_dt) if has_res else None
  return y, h, _stats_to_rows(stats, rows)


def wide_backward(x, w, rstd, dy, dh, *, aff, heads, blocking, interpret):
  """Two-pass backward for rows too wide for VMEM (reads x and dy twice).

  Arguments and results as :func:`backward`.
  """
  _check_tiles(aff, blocking)
  rows, hidden = x.shape
  br, bd = blocking.block_rows, blocking.hidden_block
  nb, nd = cfg.num_blocks(rows, br), cfg.num_blocks(hidden, bd)
  has_dh = dh is not None
  xk, dyk = to_kernel(x), to_kernel(dy)
  tile = pl.BlockSpec((br, bd), lambda i, j: (i, j))
  stats_spec = pl.BlockSpec((None, 1, br), lambda i, j: (i, _ZERO, _ZERO))
  ins = [xk, dyk] + ([w] if aff.has_w else [])
  specs = [tile, tile] + ([pl.BlockSpec((aff.w_rows, bd),
                                        lambda i, j: (_ZERO, j))]
                          if aff.has_w else [])
  dot_kernel = functools.partial(
      _wide_stats_kernel, hidden=hidden, eps=0.0, has_res=False, aff=aff,
      dtypes=(np.dtype(x.dtype), np.dtype(dy.dtype)), blocking=blocking,
      nd=nd, mode="backward")
  dot = _call(
      dot_kernel, ins, _stats_out(rows, br), grid=(nb, nd), in_specs=specs,
      out_specs=stats_spec, scratch=[pltpu.VMEM((br, 1), jnp.float32)],
      semantics=("parallel", "arbitrary"), blocking=blocking, rsqrts=0,
      interpret=interpret, name="rmsnorm_backward_dot")

  # Pass 2 runs hidden chunks on the parallel axis and row blocks on the
  # arbitrary one, so each chunk's sums accumulate in VMEM.
  tile_t = pl.BlockSpec((br, bd), lambda j, i: (i, j))
  stats_t = pl.BlockSpec((None, 1, br), lambda j, i: (i, _ZERO, _ZERO))
  ins2 = [xk, dyk, _rows_to_stats(rstd, rows, br), dot]
  specs2 = [tile_t, tile_t, stats_t, stats_t]
  if aff.has_w:
    ins2.append(w)
    specs2.append(pl.BlockSpec((aff.w_rows, bd), lambda j, i: (_ZERO, j)))
  if has_dh:
    ins2.append(to_kernel(dh))
    specs2.append(tile_t)
  sums, sum_specs, acc_scratch = _sum_outputs(
      aff, (), bd, hidden, lambda j, i: (_ZERO, j))
  outs = [jax.ShapeDtypeStruct((rows, hidden), kernel_dtype(x.dtype))] + sums
  out_specs = [tile_t] + sum_specs
  scratch = [pltpu.VMEM((br, 1), jnp.float32)] * 2 + acc_scratch
  apply_kernel = functools.partial(
      _wide_apply_kernel, rows=rows, hidden=hidden, mode="backward",
      has_dh=has_dh, aff=aff,
      dtypes=(np.dtype(x.dtype), np.dtype(dy.dtype),
              np.dtype(dh.dtype) if has_dh else None),
      blocking=blocking)
  result = _call(
      apply_kernel, ins2, tuple(outs), grid=(nd, nb), in_specs=specs2,
      out_specs=tuple(out_specs), scratch=scratch,
      semantics=("parallel", "arbitrary"), blocking=blocking, rsqrts=0,
      interpret=interpret, name="rmsnorm_backward_apply")
  dx = from_kernel(result[0], x.dtype)
  return (dx,) + _finish_sums(result[1:], aff, heads)
