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

Everything is computed in float32 and rounded once on store. Rows are read
twice from shared memory (the statistic, then the outputs), which keeps the
registers per thread bounded by the chunk, not by the row width.

The global arrays are viewed as ``(rows, hidden // k, k)`` with ``k <= 256``
columns: tiled TMA boxes have at most 256 elements per dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_F32 = jnp.float32


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


def _params(plan: Plan):
  # One warpgroup; reductions across its four warps go through this scratch.
  return plgpu.CompilerParams(unsafe_no_auto_barriers=True,
                              reduction_scratch_bytes=2048)


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


def _scale_chunk(cast, w_s, cols, offset, shape, row_scale=False):
  if w_s is None:
    return None
  if row_scale:
    # w_s is (1, hidden): read straight into the full layout of one row.
    w = plgpu.load(w_s, (slice(None), cols), layout=cast.full,
                   optimized=False).astype(_F32)
    return w + offset if offset else w
  # A float32 scale beside 16-bit rows makes 32-byte vectors, which only
  # the unoptimized transfer path takes.
  w = plgpu.load(w_s, (cols,), layout=cast.col, optimized=False).astype(_F32)
  if offset:
    w = w + offset
  return cast.cols_b(w, shape)


# ---------------------------------------------------------------- forward --

def forward(x, residual, scale, *, plan: Plan, eps: float, offset: float,
            out_dtype):
  """Runs the forward kernel.

  Args:
    x: (rows, hidden) float32/bfloat16/float16.
    residual: None or (rows, hidden); h = x + residual in residual.dtype is
      normalized and returned.
    scale: None or (hidden,) float32/bfloat16/float16.
    plan: from ``mosaic_gpu.plan``.

  Returns:
    ``(y, rstd)`` or ``(y, h, rstd)``; rstd float32 (rows,).
  """
  rows, hidden = x.shape
  has_res, has_scale = residual is not None, scale is not None
  k = plan.k
  # Each CTA stores its rows' rstd as one piece at the end; the pieces are
  # 16-byte multiples, so the array is padded to a multiple of 4 rows.
  rows_pad = -(-rows // 4) * 4
  out_types = [jax.ShapeDtypeStruct((rows, hidden // k, k), out_dtype)]
  if has_res:
    out_types.append(
        jax.ShapeDtypeStruct((rows, hidden // k, k), residual.dtype))
  out_types.append(jax.ShapeDtypeStruct((rows_pad,), _F32))
  inputs = [_view3(x, k)] + ([_view3(residual, k)] if has_res else [])
  n_in = len(inputs)
  scratch = [plgpu.SMEM((hidden,) if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier(),
             plgpu.SMEM((plan.cta_rows,), _F32)]
  g_rows, C = plan.group_rows, plan.chunk
  nch = hidden // C
  inv_h = 1.0 / hidden
  res_dtype = residual.dtype if has_res else None
  n_out_blk = 1 + has_res

  def kernel(*refs):
    cast = _Cast(plan)
    in_g = refs[:n_in]
    w_g = refs[n_in] if has_scale else None
    o_g = refs[n_in + has_scale:n_in + has_scale + n_out_blk]
    rstd_g = refs[n_in + has_scale + n_out_blk]
    w_s, bar, rst_s = refs[-3:]
    _load_scale(w_g, w_s, bar, has_scale)
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
        rst_s[pl.ds(idx[0] * br + g * g_rows, g_rows)] = rstd
        rb = cast.rows_b(rstd, shape)
        for c in range(nch):
          cols = pl.ds(c * C, C)
          # h was stored by this same thread in the first loop.
          xc = cast.load(h2 if has_res else x2, rows_, cols)
          y = xc * rb
          w = _scale_chunk(cast, w_s if has_scale else None, cols, offset,
                           shape)
          if w is not None:
            y = y * w
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

  args = inputs + ([scale] if has_scale else [])
  outs = plgpu.kernel(
      kernel, out_type=tuple(out_types), scratch_types=scratch,
      grid=(plan.grid,), grid_names=("cta",),
      compiler_params=_params(plan))(*args)
  outs = list(outs)
  outs[0] = outs[0].reshape(rows, hidden)
  if has_res:
    outs[1] = outs[1].reshape(rows, hidden)
  if rows_pad != rows:
    outs[-1] = outs[-1][:rows]
  return tuple(outs)


# --------------------------------------------------------------- backward --

def backward(x, scale, rstd, dy, dh, *, plan: Plan, offset: float):
  """Runs the backward kernel.

  Args:
    x: (rows, hidden), the normalized input (h for the fused variant).
    scale: None or (hidden,); rstd: float32 (rows,) from the forward.
    dy: (rows, hidden) cotangent of y; dh: None or the cotangent of h, added
      to dx.

  Returns:
    ``(dx in x.dtype, dscale float32 (hidden,) or None)``; dscale is the sum
    of per-CTA float32 partials in a fixed order (deterministic).
  """
  rows, hidden = x.shape
  has_scale, has_dh = scale is not None, dh is not None
  k = plan.k
  tr = plan.tile_rows
  if rows % 4:
    # The rstd pieces read into shared memory are 16-byte multiples.
    rstd = jnp.pad(rstd, (0, 4 - rows % 4))
  out_types = [jax.ShapeDtypeStruct((rows, hidden // k, k), x.dtype)]
  if has_scale:
    out_types.append(jax.ShapeDtypeStruct((plan.grid * tr, hidden), _F32))
  blocks_in = [_view3(x, k), _view3(dy, k)] + (
      [_view3(dh, k)] if has_dh else [])
  n_blk = len(blocks_in)
  inputs = blocks_in + [rstd]
  n_in = len(inputs)
  # dscale accumulates per column (wide) or per element of a (tr, hidden)
  # tile (narrow, and one-row groups: Plan.row_scale).
  acc2d = plan.kind == "narrow" or plan.row_scale
  acc_shape = (tr, hidden) if acc2d else (hidden,)
  w_shape = (1, hidden) if plan.row_scale else (hidden,)
  scratch = [plgpu.SMEM(w_shape if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier(),
             plgpu.SMEM(acc_shape if has_scale else (128,), _F32),
             plgpu.SMEM((plan.rstd_load_rows,), _F32),
             plgpu.Barrier()]
  g_rows, C = plan.group_rows, plan.chunk
  nch = hidden // C
  inv_h = 1.0 / hidden
  if plan.kind == "narrow" and has_scale and g_rows != tr:
    raise ValueError("narrow backward plans hold one layout tile of rows.")

  def load_acc(cast, acc_s, cols):
    if not acc2d:
      return plgpu.load(acc_s, (cols,), layout=cast.col, optimized=False)
    return plgpu.load(acc_s, (slice(None), cols), layout=cast.full,
                      optimized=False)

  def kernel(*refs):
    cast = _Cast(plan)
    in_g = refs[:n_blk]
    rstd_g = refs[n_blk]
    w_g = refs[n_in] if has_scale else None
    dx_g = refs[n_in + has_scale]
    part_g = refs[n_in + has_scale + 1] if has_scale else None
    w_s, bar, acc_s, rst_s, rbar = refs[-5:]
    cta = lax.axis_index("cta")
    # Rows past the array end keep rstd = 0 (their x and dy are zero-filled
    # too), so they add nothing to dscale; zeros go in before the copy
    # engine writes the same buffer (commit_smem orders the two).
    for c0 in range(0, plan.rstd_load_rows, 128):
      rst_s[pl.ds(c0, 128)] = jnp.zeros((128,), _F32)
    if has_scale:
      # Each thread zeroes exactly the elements it accumulates into later.
      for c in range(nch):
        cols = pl.ds(c * C, C)
        if not acc2d:
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
        acc = None
        for c in range(nch):
          cols = pl.ds(c * C, C)
          gc = cast.load(dy2, rows_, cols)
          w = _scale_chunk(cast, w_s if has_scale else None, cols, offset,
                           shape, plan.row_scale)
          if w is not None:
            gc = gc * w
          t = gc * cast.load(x2, rows_, cols)
          acc = t if acc is None else acc + t
        # mean(g * xhat) = rstd * mean(g * x): the projection the norm removes.
        proj = cast.rows_b(jnp.sum(acc, axis=1) * r * inv_h, shape)
        for c in range(nch):
          cols = pl.ds(c * C, C)
          dyc = cast.load(dy2, rows_, cols)
          xhat = cast.load(x2, rows_, cols) * rb
          w = _scale_chunk(cast, w_s if has_scale else None, cols, offset,
                           shape, plan.row_scale)
          gc = dyc if w is None else dyc * w
          dx = rb * (gc - xhat * proj)
          if has_dh:
            dx = dx + cast.load(dh2, rows_, cols)
          dx2[rows_, cols] = dx.astype(dx2.dtype)
          if has_scale:
            p = dyc * xhat
            if not acc2d:
              acc_s[cols] = load_acc(cast, acc_s, cols) + jnp.sum(p, axis=0)
            else:
              acc_s[:, cols] = load_acc(cast, acc_s, cols) + p

    plgpu.emit_pipeline(body, grid=(n,),
                        in_specs=[_block_spec(plan, b0)] * n_blk,
                        out_specs=[_block_spec(plan, b0)],
                        max_concurrent_steps=plan.stages)(*in_g, dx_g)
    if has_scale:
      plgpu.commit_smem()
      if not acc2d:
        plgpu.copy_smem_to_gmem(acc_s, part_g.at[cta])
      else:
        plgpu.copy_smem_to_gmem(acc_s, part_g.at[pl.ds(cta * tr, tr)])
      plgpu.wait_smem_to_gmem(0)

  args = inputs + ([scale.reshape(w_shape)] if has_scale else [])
  outs = plgpu.kernel(
      kernel, out_type=tuple(out_types), scratch_types=scratch,
      grid=(plan.grid,), grid_names=("cta",),
      compiler_params=_params(plan))(*args)
  dx = outs[0].reshape(rows, hidden)
  if not has_scale:
    return dx, None
  partials = outs[1]
  dscale = partials[0] if partials.shape[0] == 1 else jnp.sum(partials, axis=0)
  return dx, dscale
