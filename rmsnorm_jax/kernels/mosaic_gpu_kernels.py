"""Pallas Mosaic GPU kernel bodies for RMSNorm on Hopper (sm_90).

Each kernel is persistent: ``grid`` CTAs of one warpgroup each, CTA ``c``
walking the contiguous row blocks ``[c * steps, (c + 1) * steps)`` (the last
CTA fewer). ``plgpu.emit_pipeline`` streams the blocks through shared memory
with TMA, ``stages`` blocks deep, and writes the outputs back with TMA while
the next blocks load. Row blocks past the end of the array are zero-filled on
load and dropped on store by the copy engine, so any row count works.

Inside a block, rows are read from shared memory into registers in column
chunks of a ``TiledLayout`` with 16-byte (or narrower) vectors per lane:

* ``wide``: the four warps split a chunk's columns (``128 * vec`` per tile
  row); a row sum needs a cross-warp reduction (Mosaic's, through a small
  shared-memory scratch), a column sum (dscale) is per thread.
* ``narrow``: the warps split rows and the 32 lanes of a warp share a row
  (rows of 128 bf16 columns: 4-element vectors); a row sum is a few
  shuffles, and the dscale accumulator keeps one row per warp, summed by XLA
  afterwards.

Everything is computed in float32 and rounded once on store, except where
cast_mode "llama" prescribes intermediate roundings (``Arith``). Rows are
read twice from shared memory (the statistic, then the outputs; three times
for a dynamically quantized output: the row's max comes first), which keeps
the registers per thread bounded by the chunk, not by the row width.

The bias and a static quantization scale are copied into shared memory once
per CTA, like the scale; dbias accumulates beside dscale (same layout, same
fixed-order sum of per-CTA partials). The quantized forward follows
``base.quantize``: per-row ``q_scale = max|y| * float32(1 / qmax)`` (1 for
a zero row), ``q = y * (1 / q_scale)`` with the reciprocal a correctly
rounded float32 division, saturated to +-qmax; int8 then rounded half to
even, float8 converted with round to nearest even.

The global arrays are viewed as ``(rows, hidden // k, k)`` with ``k <= 256``
columns: tiled TMA boxes have at most 256 elements per dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from rmsnorm_jax.kernels import common

_F32 = jnp.float32

# jax 0.11 takes a load's index on the reference (``ref.at[idx]``) and
# warns when it is passed apart; jax 0.10 requires it apart.
_LOAD_INDEX_APART = (inspect.signature(plgpu.load).parameters["idx"].default
                     is inspect.Parameter.empty)


def load(ref, idx, **kwargs):
  """``plgpu.load`` of ``ref[idx]``, in the form the installed jax takes
  without a deprecation warning."""
  if _LOAD_INDEX_APART:
    return plgpu.load(ref, idx, **kwargs)
  return plgpu.load(ref.at[idx], **kwargs)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A static launch plan for one kernel call (see ``mosaic_gpu.plan``).

  Attributes:
    rows, hidden: the 2-D problem.
    block_rows: rows per pipeline step.
    group_rows: rows held in registers at a time (divides block_rows).
    chunk: columns held in registers at a time (divides hidden).
    vec: elements per lane access.
    kind: "wide" or "narrow" register layout (module docstring).
    lanes: lanes per row (32: a row is never split over fewer lanes).
    stages: pipeline depth (row blocks in shared memory at once).
    grid: CTAs; steps: row blocks per CTA (``steps * block_rows`` is a
      multiple of 4: each CTA's rstd moves as one piece of 16-byte units).
    k: minor dimension of the 3-D global view (<= 256).
    head_rows: rows of a per-head scale tiled so that row group ``g`` of
      every block uses rows ``[(g * group_rows) % head_rows, ...)`` of it
      (a multiple of the heads and of ``group_rows``; ``block_rows`` is a
      multiple of it); 1 without a per-head scale.
    split: CTAs (one thread-block cluster) sharing each row, each holding
      ``hidden // split`` columns of it (``mosaic_gpu_wide``); ``grid``
      then counts clusters. ``chunk``, ``vec`` and ``k`` are those of one
      CTA's columns.
  """

  rows: int
  hidden: int
  block_rows: int
  group_rows: int
  chunk: int
  vec: int
  kind: str
  lanes: int
  stages: int
  grid: int
  steps: int
  k: int
  head_rows: int = 1
  split: int = 1

  @property
  def row_blocks(self) -> int:
    return -(-self.rows // self.block_rows)

  @property
  def cta_rows(self) -> int:
    return self.steps * self.block_rows

  @property
  def rstd_load_rows(self) -> int:
    # Rounded up to whole 128-element stores (zeroed before the copy).
    return -(-self.cta_rows // 128) * 128

  @property
  def tile_rows(self) -> int:
    """Rows of one layout tile (the dscale partial rows per CTA)."""
    return 1 if self.kind == "wide" else 4

  @property
  def row_scale(self) -> bool:
    """Whether a one-row group reads the scale and accumulates dscale as
    ``(1, hidden)`` arrays in the full layout: broadcasting a column vector
    to one row, or summing one row over axis 0, fails Mosaic's layout
    inference in jax 0.11 (seen on an H200)."""
    return self.group_rows == 1

  def layout(self):
    v = self.vec
    if self.kind == "wide":
      return plgpu.Layout.TILED(
          plgpu.Tiling(((1, 128 * v), (32 * v,), (v,))),
          warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)
    return plgpu.Layout.TILED(
        plgpu.Tiling(((4, 32 * v), (v,))),
        warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)


# Elements per dimension of a tiled TMA box.
MAX_BOX = 256


def box_cols(hidden: int, step: int = 8) -> int:
  """Minor dimension ``k`` of the ``(rows, hidden // k, k)`` global view:
  ``hidden`` itself up to ``MAX_BOX``, else its largest divisor of at most
  ``MAX_BOX`` that is a multiple of ``step``."""
  if hidden <= MAX_BOX:
    return hidden
  return max(d for d in range(step, MAX_BOX + 1, step) if hidden % d == 0)


def _view3(a, k):
  rows, hidden = a.shape
  return a.reshape(rows, hidden // k, k)


class _Cast:
  """Layout hints (``plgpu.layout_cast``) for one plan."""

  def __init__(self, plan: Plan):
    self.full = plan.layout()
    self.row = self.full.reduce(1)   # per-row values, (rows,)
    self.col = self.full.reduce(0)   # per-column values, (cols,)

  def load(self, ref, rows, cols):
    return plgpu.layout_cast(ref[rows, cols], self.full).astype(_F32)

  def rows_b(self, v, shape):
    return plgpu.layout_cast(lax.broadcast_in_dim(v, shape, (0,)), self.full)

  def cols_b(self, v, shape):
    return plgpu.layout_cast(lax.broadcast_in_dim(v, shape, (1,)), self.full)


# Reductions across a warpgroup's four warps go through this scratch.
REDUCTION_SCRATCH = 2048


def run_kernel(kernel, args, *, out_types, scratch, grid: int,
               reduction_scratch: int = REDUCTION_SCRATCH, cluster: int = 1):
  """``kernel`` on a persistent grid of ``grid`` one-warpgroup CTAs (axis
  "cta"), applied to ``args``; returns its outputs (``out_types``). With
  ``cluster`` > 1 each of the ``grid`` entries is a cluster of that many
  CTAs (axis "cluster", their rank in it).

  Traced with 32-bit types even where ``jax_enable_x64`` is on: in 64-bit
  mode ``plgpu.emit_pipeline`` compares its Python step count, traced as
  int64, with the int32 step index and fails to trace. The kernels' inputs
  and outputs are float32, 16-bit or 8-bit either way.
  """
  with jax.enable_x64(False):
    clusters = dict(cluster=(cluster,), cluster_names=("cluster",)) if (
        cluster > 1) else {}
    return plgpu.kernel(
        kernel, out_type=tuple(out_types), scratch_types=scratch,
        grid=(grid,), grid_names=("cta",), **clusters,
        compiler_params=plgpu.CompilerParams(
            unsafe_no_auto_barriers=True,
            reduction_scratch_bytes=reduction_scratch))(*args)


def _block_spec(plan: Plan, b0, n3: bool = True):
  if n3:
    return pl.BlockSpec((plan.block_rows, plan.hidden // plan.k, plan.k),
                        lambda s: (b0 + s, 0, 0))
  return pl.BlockSpec((plan.block_rows,), lambda s: (b0 + s,))


def _load_scale(w_g, w_s, bar, has_scale):
  if has_scale:
    plgpu.copy_gmem_to_smem(w_g, w_s, bar,
                            oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    plgpu.barrier_wait(bar)


@dataclasses.dataclass(frozen=True)
class Arith:
  """The static arithmetic of one call beyond the plain float32 norm.

  Attributes:
    llama: cast_mode "llama": x_hat rounded to ``xdt``, products and the
      bias sum rounded to ``pdt`` (``base.Norm.product_dtype``), the
      backward per ``base.Xla.backward_f32``.
    xdt: the normalized input's dtype (x, or h with a residual).
    pdt: the product dtype (float32 outside llama mode).
    quant_dtype: None, or the dtype of the quantized output.
    q_static: a static quantization scale is passed (its float32
      reciprocal, computed by XLA as ``base.quantize`` does).
  """

  llama: bool = False
  xdt: object = None
  pdt: object = None
  quant_dtype: object = None
  q_static: bool = False

  def round(self, v, dtype):
    """float32 ``v`` rounded to ``dtype`` and back (nothing for float32)."""
    if dtype is None or jnp.dtype(dtype).itemsize >= 4:
      return v
    return v.astype(dtype).astype(_F32)

  def weight(self, w, offset):
    """``scale + offset`` as the cast mode computes it (float32 values);
    in llama mode ``offset`` is already rounded to pdt."""
    if not offset:
      return w
    w = w + offset
    return self.round(w, self.pdt) if self.llama else w

  def bias(self, b):
    return self.round(b, self.pdt) if self.llama else b

  @property
  def qmax(self) -> float:
    return _QUANT_MAX[jnp.dtype(self.quant_dtype).name]

  @property
  def inverse_qmax(self) -> float:
    """float32 ``1 / qmax``: the dynamic scale's multiplier."""
    return float(np.float32(1.0) / np.float32(self.qmax))

  def quantize(self, y, inv):
    """q from float32 ``y`` and the row's float32 reciprocal scale:
    ``y * inv`` saturated to +-qmax (int8: then rounded half to even), in
    quant_dtype (the float8 cast rounds to nearest even)."""
    q = self.qmax
    v = jnp.minimum(jnp.maximum(y * inv, -q), q)
    if jnp.dtype(self.quant_dtype) == jnp.dtype(jnp.int8):
      # Adding 1.5 * 2**23 rounds |v| <= 127 to an integer, half to even
      # (float32 addition rounds to nearest even, and the sum's ulp is 1);
      # the sum's low byte is that integer in two's complement. A round
      # and a float to int8 conversion took 2.5x the time of the Triton
      # kernel's int8 forward on an H200 (8192x4096 bf16: 76.1 us against
      # 29.7).
      bits = lax.bitcast_convert_type(v + _ROUND_INT, jnp.int32)
      return bits.astype(jnp.int8)
    return v.astype(self.quant_dtype)


FLOAT32 = Arith()
_ROUND_INT = 1.5 * 2.0**23
# The static quantization reciprocal is copied in as this many float32
# copies: a copy moves a multiple of 128 bytes (one per thread).
_QI_LEN = 32

# Largest finite magnitude of each quantized dtype (base.QUANT_MAX).
_QUANT_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _scale_chunk(cast, w_s, cols, offset, shape, row_scale=False,
                 arith=FLOAT32, rows=None):
  """The scale (+ offset) of columns ``cols``, broadcast to ``shape``.

  ``rows``: a per-head scale's rows for the group (``Plan.head_rows``).
  """
  if w_s is None:
    return None
  if row_scale or rows is not None:
    # w_s is (1, hidden), or a per-head (head_rows, hidden): read straight
    # into the full layout of the group's rows.
    sel = slice(None) if rows is None else rows
    w = load(w_s, (sel, cols), layout=cast.full,
             optimized=False).astype(_F32)
    return arith.weight(w, offset)
  # A float32 scale beside 16-bit rows makes 32-byte vectors, which only
  # the unoptimized transfer path takes.
  w = load(w_s, (cols,), layout=cast.col, optimized=False).astype(_F32)
  return cast.cols_b(arith.weight(w, offset), shape)


def _unfused(v, inf):
  """``v`` unchanged (``min(v, inf)``, ``inf`` a +inf the compiler cannot
  see as a constant), kept apart from the operation that consumes it.

  The bias is added to the rounded product ``x_hat * w``. The compiler may
  contract the product and the sum into one fused multiply-add, which skips
  the product's rounding, and need not do so alike in two kernels. On an
  H200, llama mode with a bfloat16 or float16 product dtype and a bias had
  28% of its outputs one ulp off Hugging Face's order, exactly the outputs
  of the order without the product's rounding; and a fused quantized
  forward with a bias gave one element of 307200 another q than the
  quantization of the fused forward's float32 y. Mosaic emits float32
  ``min`` as inline PTX; with a literal +inf the llama outputs stayed the
  same (the min was presumably folded away), so ``inf`` is computed per row
  from rstd.
  """
  return jnp.minimum(v, inf)


def _take(it, flag):
  return next(it) if flag else None


# ---------------------------------------------------------------- forward --

def forward(x, residual, scale, *, plan: Plan, eps: float, offset: float,
            out_dtype, bias=None, arith: Arith = FLOAT32,
            quant_inverse=None):
  """Runs the forward kernel (plain, fused residual, quantized).

  Args:
    x: (rows, hidden) float32/bfloat16/float16.
    residual: None or (rows, hidden); h = x + residual in residual.dtype is
      normalized and returned.
    scale: None or (hidden,) float32/bfloat16/float16.
    plan: from ``mosaic_gpu.plan``.
    bias: None or (hidden,), added after the scale.
    arith: the cast mode and quantization (``Arith``); with
      ``arith.quant_dtype`` set the output is quantized and ``out_dtype``
      is ignored.
    quant_inverse: static quantization only: the float32 reciprocal of the
      static scale (a scalar).

  Returns:
    ``(y, rstd)`` or ``(y, h, rstd)``; rstd float32 (rows,). Quantized, y
    is q in ``arith.quant_dtype`` and rstd is replaced by the per-row
    float32 quantization scale (dynamic; with a static scale, rstd).
  """
  rows, hidden = x.shape
  has_res, has_scale = residual is not None, scale is not None
  has_bias = bias is not None
  quant = arith.quant_dtype is not None
  q_static = quant and arith.q_static
  if q_static and quant_inverse is None:
    raise ValueError("a static quantization needs quant_inverse.")
  k = plan.k
  # Each CTA stores its rows' rstd as one piece at the end; the pieces are
  # 16-byte multiples, so the array is padded to a multiple of 4 rows.
  rows_pad = -(-rows // 4) * 4
  y_dtype = arith.quant_dtype if quant else out_dtype
  out_types = [jax.ShapeDtypeStruct((rows, hidden // k, k), y_dtype)]
  if has_res:
    out_types.append(
        jax.ShapeDtypeStruct((rows, hidden // k, k), residual.dtype))
  out_types.append(jax.ShapeDtypeStruct((rows_pad,), _F32))
  inputs = [_view3(x, k)] + ([_view3(residual, k)] if has_res else [])
  n_in = len(inputs)
  per_head = plan.head_rows > 1
  if per_head and (not has_scale or scale.shape != (plan.head_rows, hidden)):
    raise ValueError(
        f"a per-head plan takes the scale tiled to ({plan.head_rows}, "
        f"{hidden}); got {None if scale is None else scale.shape}.")
  w_shape = (plan.head_rows, hidden) if per_head else (hidden,)
  scratch = [plgpu.SMEM(w_shape if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier()]
  if has_bias:
    scratch += [plgpu.SMEM((hidden,), bias.dtype), plgpu.Barrier()]
  if q_static:
    scratch += [plgpu.SMEM((_QI_LEN,), _F32), plgpu.Barrier()]
  scratch.append(plgpu.SMEM((plan.cta_rows,), _F32))
  g_rows, C = plan.group_rows, plan.chunk
  nch = hidden // C
  inv_h = 1.0 / hidden
  res_dtype = residual.dtype if has_res else None
  n_out_blk = 1 + has_res
  llama = arith.llama

  def kernel(*refs):
    cast = _Cast(plan)
    it = iter(refs)
    in_g = [next(it) for _ in range(n_in)]
    w_g = _take(it, has_scale)
    b_g = _take(it, has_bias)
    qi_g = _take(it, q_static)
    o_g = [next(it) for _ in range(n_out_blk)]
    rstd_g = next(it)
    w_s, bar = next(it), next(it)
    b_s, bbar = (next(it), next(it)) if has_bias else (None, None)
    qi_s, qbar = (next(it), next(it)) if q_static else (None, None)
    rst_s = next(it)
    _load_scale(w_g, w_s, bar, has_scale)
    _load_scale(b_g, b_s, bbar, has_bias)
    _load_scale(qi_g, qi_s, qbar, q_static)
    cta = lax.axis_index("cta")
    b0 = cta * plan.steps
    n = jnp.minimum(plan.steps, plan.row_blocks - b0)

    def body(idx, *blocks):
      br = plan.block_rows
      x2 = blocks[0].reshape(br, hidden)
      r2 = blocks[1].reshape(br, hidden) if has_res else None
      y2 = blocks[n_in].reshape(br, hidden)
      h2 = blocks[n_in + 1].reshape(br, hidden) if has_res else None
      for g in range(br // g_rows):
        rows_ = pl.ds(g * g_rows, g_rows)
        shape = (g_rows, C)
        acc = None
        for c in range(nch):
          cols = pl.ds(c * C, C)
          xc = cast.load(x2, rows_, cols)
          if has_res:
            hc = (xc + cast.load(r2, rows_, cols)).astype(res_dtype)
            h2[rows_, cols] = hc
            xc = hc.astype(_F32)
          acc = xc * xc if acc is None else acc + xc * xc
        rstd = lax.rsqrt(jnp.sum(acc, axis=1) * inv_h + eps)
        rb = cast.rows_b(rstd, shape)
        # +inf (rstd > 0) that the compiler cannot fold: see _unfused.
        row_inf = cast.rows_b(rstd * jnp.inf, shape) if has_bias else None
        # Blocks start at head 0 (Plan.head_rows).
        head_sel = pl.ds((g * g_rows) % plan.head_rows, g_rows) \
            if per_head else None

        def output(c):
          cols = pl.ds(c * C, C)
          # h was stored by this same thread in the first loop.
          y = cast.load(h2 if has_res else x2, rows_, cols) * rb
          if llama:
            y = arith.round(y, arith.xdt)
          w = _scale_chunk(cast, w_s if has_scale else None, cols, offset,
                           shape, arith=arith, rows=head_sel)
          if w is not None:
            y = y * w
            if llama:
              y = arith.round(y, arith.pdt)
          if has_bias:
            y = _unfused(y, row_inf)
            y = y + arith.bias(_scale_chunk(cast, b_s, cols, 0.0, shape))
            if llama:
              y = arith.round(y, arith.pdt)
          return cols, y

        stat = rstd
        if quant:
          if q_static:
            inv = plgpu.layout_cast(jnp.broadcast_to(qi_s[0], (g_rows,)),
                                    cast.row)
          else:
            # The row's y is computed twice (max, then q) rather than held.
            amax = None
            for c in range(nch):
              m = jnp.max(jnp.abs(output(c)[1]), axis=1)
              amax = m if amax is None else jnp.maximum(amax, m)
            stat = jnp.where(amax > 0, amax * arith.inverse_qmax, 1.0)
            inv = 1.0 / stat
          ib = cast.rows_b(inv, shape)
        rst_s[pl.ds(idx[0] * br + g * g_rows, g_rows)] = stat
        for c in range(nch):
          cols, y = output(c)
          if quant:
            y2[rows_, cols] = arith.quantize(y, ib)
          else:
            y2[rows_, cols] = y.astype(y2.dtype)

    plgpu.emit_pipeline(body, grid=(n,),
                        in_specs=[_block_spec(plan, b0)] * n_in,
                        out_specs=[_block_spec(plan, b0)] * n_out_blk,
                        max_concurrent_steps=plan.stages)(*in_g, *o_g)
    # The last CTA's piece is cut at the end of the array by the copy.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        rst_s, rstd_g.at[pl.ds(cta * plan.cta_rows, plan.cta_rows)])
    plgpu.wait_smem_to_gmem(0)

  args = inputs + ([scale] if has_scale else []) + (
      [bias] if has_bias else []) + (
          [jnp.broadcast_to(jnp.asarray(quant_inverse, _F32).reshape(-1)[:1],
                            (_QI_LEN,))] if q_static else [])
  outs = run_kernel(kernel, args, out_types=out_types, scratch=scratch,
                    grid=plan.grid)
  outs = list(outs)
  outs[0] = outs[0].reshape(rows, hidden)
  if has_res:
    outs[1] = outs[1].reshape(rows, hidden)
  if rows_pad != rows:
    outs[-1] = outs[-1][:rows]
  return tuple(outs)


# --------------------------------------------------------------- backward --

def backward(x, scale, rstd, dy, dh, *, plan: Plan, offset: float,
             has_bias: bool = False, arith: Arith = FLOAT32, heads: int = 1):
  """Runs the backward kernel.

  Args:
    x: (rows, hidden), the normalized input (h for the fused variant).
    scale: None or (hidden,); rstd: float32 (rows,) from the forward.
    dy: (rows, hidden) cotangent of y; dh: None or the cotangent of h, added
      to dx.
    has_bias: also return dbias (the float32 column sums of dy, rounded to
      the product dtype first in llama mode).
    arith: the cast mode (``Arith``; its quantization fields unused).
    heads: with a per-head plan (``Plan.head_rows`` > 1), scale is the
      ``(heads, hidden)`` scale tiled to ``(head_rows, hidden)``, and
      dscale is returned folded to ``(heads, hidden)``.

  Returns:
    ``(dx in x.dtype, dscale float32 (hidden,) or None)``, with
    ``has_bias`` ``(dx, dscale, dbias float32 (hidden,))``; dscale and dbias
    are sums of per-CTA float32 partials in a fixed order (deterministic).
  """
  rows, hidden = x.shape
  has_scale, has_dh = scale is not None, dh is not None
  n_acc = int(has_scale) + int(has_bias)
  k = plan.k
  tr = plan.tile_rows
  if rows % 4:
    # The rstd pieces read into shared memory are 16-byte multiples.
    rstd = jnp.pad(rstd, (0, 4 - rows % 4))
  out_types = [jax.ShapeDtypeStruct((rows, hidden // k, k), x.dtype)]
  if n_acc:
    # dscale's and dbias' partials in one array, summed below
    # (common.leading_sums).
    out_types.append(jax.ShapeDtypeStruct(
        (n_acc, plan.grid * (plan.head_rows if plan.head_rows > 1 else tr),
         hidden), _F32))
  blocks_in = [_view3(x, k), _view3(dy, k)] + (
      [_view3(dh, k)] if has_dh else [])
  n_blk = len(blocks_in)
  inputs = blocks_in + [rstd]
  n_in = len(inputs)
  # dscale (dbias) accumulates per column (wide) or per element of a
  # (tr, hidden) tile (narrow, and one-row groups: Plan.row_scale).
  acc2d = plan.kind == "narrow" or plan.row_scale
  per_head = plan.head_rows > 1
  # Partial rows per CTA: a tile's, or the tiled per-head scale's.
  acc_rows = plan.head_rows if per_head else tr
  acc_shape = (acc_rows, hidden) if acc2d or per_head else (hidden,)
  w_shape = ((plan.head_rows, hidden) if per_head
             else (1, hidden) if plan.row_scale else (hidden,))
  if per_head and (not has_scale or scale.shape != w_shape):
    raise ValueError(
        f"a per-head plan takes the scale tiled to {w_shape}; got "
        f"{None if scale is None else scale.shape}.")
  scratch = [plgpu.SMEM(w_shape if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier()]
  scratch += [plgpu.SMEM(acc_shape, _F32)] * n_acc
  scratch += [plgpu.SMEM((plan.rstd_load_rows,), _F32), plgpu.Barrier()]
  g_rows, C = plan.group_rows, plan.chunk
  nch = hidden // C
  inv_h = 1.0 / hidden
  llama = arith.llama
  if plan.kind == "narrow" and n_acc and g_rows != tr:
    raise ValueError("narrow backward plans hold one layout tile of rows.")

  def load_acc(cast, acc_s, cols, sel=None):
    if sel is not None:
      return load(acc_s, (sel, cols), layout=cast.full, optimized=False)
    if not acc2d:
      return load(acc_s, (cols,), layout=cast.col, optimized=False)
    return load(acc_s, (slice(None), cols), layout=cast.full,
                optimized=False)

  def add_to(cast, acc_s, cols, p, sel=None):
    if sel is not None:
      # Per-head: the group's rows of the (head_rows, hidden) tile.
      acc_s[sel, cols] = load_acc(cast, acc_s, cols, sel) + p
    elif not acc2d:
      acc_s[cols] = load_acc(cast, acc_s, cols) + jnp.sum(p, axis=0)
    else:
      acc_s[:, cols] = load_acc(cast, acc_s, cols) + p

  def kernel(*refs):
    cast = _Cast(plan)
    it = iter(refs)
    in_g = [next(it) for _ in range(n_blk)]
    rstd_g = next(it)
    w_g = _take(it, has_scale)
    dx_g = next(it)
    part_g = _take(it, n_acc)
    w_s, bar = next(it), next(it)
    accs = [next(it) for _ in range(n_acc)]
    rst_s, rbar = next(it), next(it)
    acc_w = accs[0] if has_scale else None
    acc_b = accs[-1] if has_bias else None
    cta = lax.axis_index("cta")
    # Rows past the array end keep rstd = 0 (their x and dy are zero-filled
    # too), so they add nothing to dscale or dbias; zeros go in before the
    # copy engine writes the same buffer (commit_smem orders the two).
    for c0 in range(0, plan.rstd_load_rows, 128):
      rst_s[pl.ds(c0, 128)] = jnp.zeros((128,), _F32)
    # Each thread zeroes exactly the elements it accumulates into later.
    for acc_s in accs:
      for c in range(nch):
        cols = pl.ds(c * C, C)
        if per_head:
          for h in range(0, plan.head_rows, g_rows):
            acc_s[pl.ds(h, g_rows), cols] = plgpu.layout_cast(
                jnp.zeros((g_rows, C), _F32), cast.full)
        elif not acc2d:
          acc_s[cols] = plgpu.layout_cast(jnp.zeros((C,), _F32), cast.col)
        else:
          acc_s[:, cols] = plgpu.layout_cast(jnp.zeros((tr, C), _F32),
                                             cast.full)
    plgpu.commit_smem()
    plgpu.copy_gmem_to_smem(
        rstd_g.at[pl.ds(cta * plan.cta_rows, plan.rstd_load_rows)], rst_s,
        rbar, oob_mode=plgpu.OOBFillMode.UNDEFINED)
    _load_scale(w_g, w_s, bar, has_scale)
    plgpu.barrier_wait(rbar)
    b0 = cta * plan.steps
    n = jnp.minimum(plan.steps, plan.row_blocks - b0)

    def body(idx, *blocks):
      br = plan.block_rows
      x2 = blocks[0].reshape(br, hidden)
      dy2 = blocks[1].reshape(br, hidden)
      dh2 = blocks[2].reshape(br, hidden) if has_dh else None
      dx2 = blocks[n_blk].reshape(br, hidden)
      for g in range(br // g_rows):
        rows_ = pl.ds(g * g_rows, g_rows)
        shape = (g_rows, C)
        r0 = idx[0] * br + g * g_rows
        if g_rows == 1:
          # A one-element vector load has no tiled transfer; a scalar does.
          r = plgpu.layout_cast(jnp.broadcast_to(rst_s[r0], (1,)), cast.row)
        else:
          r = plgpu.layout_cast(rst_s[pl.ds(r0, g_rows)], cast.row)
        rb = cast.rows_b(r, shape)
        # Blocks start at head 0 (Plan.head_rows).
        head_sel = pl.ds((g * g_rows) % plan.head_rows, g_rows) \
            if per_head else None

        def grads(cols):
          """(dy in the product dtype, g = dy * w as dx sees it)."""
          dyc = cast.load(dy2, rows_, cols)
          if llama:
            dyc = arith.round(dyc, arith.pdt)
          w = _scale_chunk(cast, w_s if has_scale else None, cols, offset,
                           shape, plan.row_scale, arith, rows=head_sel)
          gc = dyc if w is None else dyc * w
          if llama:
            # The cotangent passes back through x_hat's rounding to xdt.
            gc = arith.round(arith.round(gc, arith.pdt), arith.xdt)
          return dyc, gc

        acc = None
        for c in range(nch):
          cols = pl.ds(c * C, C)
          t = grads(cols)[1] * cast.load(x2, rows_, cols)
          acc = t if acc is None else acc + t
        # mean(g * xhat) = rstd * mean(g * x): the projection the norm removes.
        proj = cast.rows_b(jnp.sum(acc, axis=1) * r * inv_h, shape)
        for c in range(nch):
          cols = pl.ds(c * C, C)
          dyc, gc = grads(cols)
          xhat = cast.load(x2, rows_, cols) * rb
          dx = rb * (gc - xhat * proj)
          if has_dh:
            dx = dx + cast.load(dh2, rows_, cols)
          dx2[rows_, cols] = dx.astype(dx2.dtype)
          if has_scale:
            xs = arith.round(xhat, arith.xdt) if llama else xhat
            add_to(cast, acc_w, cols, dyc * xs, head_sel)
          if has_bias:
            add_to(cast, acc_b, cols, dyc, head_sel)

    plgpu.emit_pipeline(body, grid=(n,),
                        in_specs=[_block_spec(plan, b0)] * n_blk,
                        out_specs=[_block_spec(plan, b0)],
                        max_concurrent_steps=plan.stages)(*in_g, dx_g)
    if n_acc:
      plgpu.commit_smem()
      for i, acc_s in enumerate(accs):
        if per_head or acc2d:
          plgpu.copy_smem_to_gmem(
              acc_s, part_g.at[i, pl.ds(cta * acc_rows, acc_rows)])
        else:
          plgpu.copy_smem_to_gmem(acc_s, part_g.at[i, cta])
      plgpu.wait_smem_to_gmem(0)

  args = inputs + ([scale.reshape(w_shape)] if has_scale else [])
  outs = run_kernel(kernel, args, out_types=out_types, scratch=scratch,
                    grid=plan.grid)
  dx = outs[0].reshape(rows, hidden)
  dscale = None
  if not n_acc:
    return dx, None
  part = outs[1]
  if per_head:
    # Each CTA's head_rows partial rows hold whole copies of the heads.
    dscale = common.head_sums(part[0], heads)
    if not has_bias:
      return dx, dscale
    return dx, dscale, common.head_sums(part[-1], 0)
  if part.shape[1] == 1:
    sums = part[:, 0]
  else:
    sums = common.leading_sums(list(part),
                               _F32 if scale is None else scale.dtype)
  if has_scale:
    dscale = sums[0]
  if not has_bias:
    return dx, dscale
  return dx, dscale, sums[-1]
