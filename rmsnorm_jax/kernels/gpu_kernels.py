"""Pallas kernel bodies for RMSNorm on GPUs (Triton lowering).

Every kernel sees whole-array refs (no BlockSpecs) and addresses them with
``pl.ds`` windows of power-of-two size plus masks: the Triton lowering needs
power-of-two tensors, and explicit masks let one kernel cover ragged row
counts and hidden sizes that are not a power of two. All arithmetic is in
float32; inputs are upcast on load and outputs rounded once on store.

Two tilings (chosen by ``gpu_tiling.py``):

* resident: a tile of ``block_rows`` whole rows, ``block_cols =
  next_pow2(hidden)``; one read of each input, one write of each output.
* chunked (wide rows): ``block_rows`` rows are walked in ``block_cols``-wide
  chunks twice, a first loop for the row statistic and a second for the
  outputs. The second loop re-reads its inputs, which the first loop just
  left in L2.

The backward of the resident tiling runs on a persistent grid: each program
walks the row blocks ``pid, pid + grid, ...`` and keeps its share of dscale in
registers, so the partial sums written are ``grid x hidden`` floats however
many rows there are, and a small XLA reduction finishes dscale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from rmsnorm_jax.kernels import common

# The Triton compiler-parameter class was renamed across JAX releases.
_CompilerParams = (getattr(pltriton, "CompilerParams", None)
                   or getattr(pltriton, "TritonCompilerParams"))

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Launch:
  """A static launch configuration for one kernel call.

  Attributes:
    rows, hidden: the 2-D problem.
    block_rows: rows per tile (power of two).
    block_cols: columns per tile (power of two); ``>= hidden`` when resident.
    resident: the whole (padded) row is one tile.
    num_warps: warps per program.
    grid: number of programs.
    steps: row blocks each program walks (persistent backward only; else 1).
    prefetch: persistent backward loads the next row block before working on
      the current one, so a block's loads are in flight during the previous
      block's reduction and stores.
    cache_scale: keep the scale tile in registers across row blocks (else
      reload it per block, from L1/L2; saves registers on wide rows).
    reload: backward only: read x and dy (and the scale) a second time, from
      L2, after the row reduction instead of keeping them in registers
      across it. On 16384-wide rows the kept values did not fit (128
      registers per thread and ~350 MB of local-memory spill traffic for
      4096 rows, measured with Nsight Compute).
    num_stages: Triton software-pipelining depth for loops.
    interpret: run the kernel with the Pallas interpreter (any platform).
  """

  rows: int
  hidden: int
  block_rows: int
  block_cols: int
  resident: bool
  num_warps: int
  grid: int
  steps: int = 1
  prefetch: bool = False
  cache_scale: bool = True
  reload: bool = False
  num_stages: int = 1
  interpret: bool = False

  @property
  def row_blocks(self) -> int:
    return pl.cdiv(self.rows, self.block_rows)

  @property
  def rows_ragged(self) -> bool:
    # Rows past the end can occur in some tile: the row mask is needed.
    return self.grid * self.steps * self.block_rows != self.rows

  @property
  def cols_ragged(self) -> bool:
    if self.resident:
      return self.block_cols != self.hidden
    return self.hidden % self.block_cols != 0

  @property
  def num_chunks(self) -> int:
    return 1 if self.resident else pl.cdiv(self.hidden, self.block_cols)


class _Tile:
  """Masks and windows of one ``block_rows x block_cols`` tile."""

  def __init__(self, launch: Launch, r0, c0, mask_rows: bool = False):
    self.launch = launch
    self.r0, self.c0 = r0, c0
    br, bc = launch.block_rows, launch.block_cols
    self.rmask = ((r0 + jnp.arange(br)) < launch.rows
                  if launch.rows_ragged or mask_rows else None)
    self.cmask = ((c0 + jnp.arange(bc)) < launch.hidden
                  if launch.cols_ragged else None)
    if self.rmask is None:
      self.mask = None if self.cmask is None else jnp.broadcast_to(
          self.cmask[None, :], (br, bc))
    elif self.cmask is None:
      self.mask = jnp.broadcast_to(self.rmask[:, None], (br, bc))
    else:
      self.mask = self.rmask[:, None] & self.cmask[None, :]

  def _window(self, ref):
    return ref.at[pl.ds(self.r0, self.launch.block_rows),
                  pl.ds(self.c0, self.launch.block_cols)]

  def load(self, ref, eviction_policy=None):
    """The tile of ``ref`` as float32; masked-off elements read 0."""
    kw = {} if eviction_policy is None else {"eviction_policy": eviction_policy}
    if self.mask is None:
      v = pltriton.load(self._window(ref), **kw)
    else:
      v = pltriton.load(self._window(ref), mask=self.mask, other=0.0, **kw)
    return v

  def store(self, ref, value):
    value = value.astype(ref.dtype)
    if self.mask is None:
      pltriton.store(self._window(ref), value)
    else:
      pltriton.store(self._window(ref), value, mask=self.mask)

  def load_row_stat(self, ref):
    """``ref[r0:r0+block_rows]`` of a per-row float32 vector."""
    win = ref.at[pl.ds(self.r0, self.launch.block_rows)]
    if self.rmask is None:
      return pltriton.load(win).astype(_F32)
    return pltriton.load(win, mask=self.rmask, other=0.0).astype(_F32)

  def store_row_stat(self, ref, value):
    win = ref.at[pl.ds(self.r0, self.launch.block_rows)]
    if self.rmask is None:
      pltriton.store(win, value.astype(ref.dtype))
    else:
      pltriton.store(win, value.astype(ref.dtype), mask=self.rmask)

  def load_weight(self, ref, offset, eviction_policy=None):
    """``scale[c0:c0+block_cols] + offset`` in float32 (0 where masked)."""
    win = ref.at[pl.ds(self.c0, self.launch.block_cols)]
    kw = {} if eviction_policy is None else {"eviction_policy": eviction_policy}
    if self.cmask is None:
      w = pltriton.load(win, **kw).astype(_F32)
    else:
      w = pltriton.load(win, mask=self.cmask, other=0.0, **kw).astype(_F32)
    return w + _F32(offset) if offset else w

  def store_cols(self, ref, row, value):
    """Stores a ``(block_cols,)`` vector into row ``row`` of a 2-D ref."""
    win = ref.at[pl.ds(row, 1), pl.ds(self.c0, self.launch.block_cols)]
    value = value[None, :].astype(ref.dtype)
    if self.cmask is None:
      pltriton.store(win, value)
    else:
      pltriton.store(win, value, mask=self.cmask[None, :])


def _multiple_of(x, n):
  # Tells the compiler a chunk start is aligned, so masks and loads vectorize.
  try:
    return pl.multiple_of(x, n)
  except Exception:  # pylint: disable=broad-except
    return x


def _take(it, flag):
  return next(it) if flag else None


def _walk(L: Launch, load_block, work, carry):
  """Runs ``work(k, load_block(k), carry)`` over a program's row blocks.

  With ``L.prefetch`` the loads of block k+1 are issued before the work on
  block k, so they are in flight during its reduction and stores (the block
  after the last one is fully masked and reads nothing).
  """
  if L.steps == 1:
    return work(0, load_block(0), carry)
  if L.prefetch:
    def step(k, state):
      c, block = state
      following = load_block(k + 1)
      return work(k, block, c), following
    return lax.fori_loop(0, L.steps, step, (carry, load_block(0)))[0]
  return lax.fori_loop(0, L.steps,
                       lambda k, c: work(k, load_block(k), c), carry)


# ---------------------------------------------------------------- forward --

def _forward_kernel(*refs, launch: Launch, eps: float, offset: float,
                    has_scale: bool, has_res: bool, n_alias: int):
  """y = h * rstd * w with h = x (+ residual, rounded to residual's dtype)."""
  it = iter(refs)
  x_ref = next(it)
  r_ref = _take(it, has_res)
  w_ref = _take(it, has_scale)
  for _ in range(n_alias):  # poison buffers, aliased to the outputs below
    next(it)
  y_ref = next(it)
  h_ref = _take(it, has_res)
  rstd_ref = next(it)

  L = launch
  r0 = pl.program_id(0) * L.block_rows
  inv_n = 1.0 / L.hidden

  def normed_input(tile, store_h, policy=None):
    x = tile.load(x_ref, policy).astype(_F32)
    if not has_res:
      return x
    # h is rounded to residual's dtype: the caller gets exactly what the
    # norm saw.
    h = (x + tile.load(r_ref, policy).astype(_F32)).astype(h_ref.dtype)
    if store_h:
      tile.store(h_ref, h)
    return h.astype(_F32)

  def output(tile, h, rstd):
    y = h * rstd[:, None]
    if has_scale:
      y = y * tile.load_weight(w_ref, offset)[None, :]
    tile.store(y_ref, y)

  if L.resident:
    w_cached = None
    if has_scale and L.cache_scale:
      w_cached = _Tile(L, 0, 0).load_weight(w_ref, offset)
    pid = pl.program_id(0)

    def block_tile(k):
      return _Tile(L, (pid + k * L.grid) * L.block_rows, 0,
                   mask_rows=L.prefetch)

    def load_block(k):
      tile = block_tile(k)
      return tile.load(x_ref), tile.load(r_ref) if has_res else None

    def work(k, block, carry):
      tile = block_tile(k)
      x, r = block
      h = x.astype(_F32)
      if has_res:
        # h is rounded to residual's dtype: the caller gets exactly what the
        # norm saw.
        h = (h + r.astype(_F32)).astype(h_ref.dtype)
        tile.store(h_ref, h)
        h = h.astype(_F32)
      rstd = lax.rsqrt(jnp.sum(h * h, axis=1) * _F32(inv_n) + _F32(eps))
      y = h * rstd[:, None]
      if has_scale:
        w = w_cached if w_cached is not None else tile.load_weight(
            w_ref, offset)
        y = y * w[None, :]
      tile.store(y_ref, y)
      tile.store_row_stat(rstd_ref, rstd)
      return carry

    _walk(L, load_block, work, 0)
    return

  def chunk(i):
    return _Tile(L, r0, _multiple_of(i * L.block_cols, L.block_cols))

  def sum_squares(i, acc):
    h = normed_input(chunk(i), store_h=True, policy="evict_last")
    return acc + h * h

  acc = lax.fori_loop(0, L.num_chunks, sum_squares,
                      jnp.zeros((L.block_rows, L.block_cols), _F32))
  rstd = lax.rsqrt(jnp.sum(acc, axis=1) * _F32(inv_n) + _F32(eps))

  def write(i, carry):
    tile = chunk(i)
    # Recomputed from x and residual (L2 hits) rather than read back from
    # h_ref, which other threads of this program wrote.
    output(tile, normed_input(tile, store_h=False, policy="evict_first"), rstd)
    return carry

  lax.fori_loop(0, L.num_chunks, write, 0)
  _Tile(L, r0, 0).store_row_stat(rstd_ref, rstd)


def forward(x, residual, scale, *, launch: Launch, eps: float, offset: float,
            out_dtype, res_dtype=None, poison: bool = False):
  """Runs the forward kernel.

  Args:
    x: (rows, hidden) float32/bfloat16/float16.
    residual: None, or (rows, hidden) array added to x first.
    scale: None or (hidden,) array, any float dtype.
    launch: tiling from ``gpu_tiling``.
    poison: start every output from NaN (through input/output aliasing) so
      tests see any element the kernel failed to write.

  Returns:
    ``(y, rstd)`` or, with a residual, ``(y, h, rstd)``; rstd float32 (rows,).
  """
  rows, hidden = x.shape
  has_res, has_scale = residual is not None, scale is not None
  out_shapes = [jax.ShapeDtypeStruct((rows, hidden), out_dtype)]
  if has_res:
    out_shapes.append(jax.ShapeDtypeStruct((rows, hidden), residual.dtype))
  out_shapes.append(jax.ShapeDtypeStruct((rows,), _F32))
  inputs = [x] + ([residual] if has_res else []) + (
      [scale] if has_scale else [])
  return _call(_forward_kernel, inputs, out_shapes, launch, poison,
               name="rmsnorm_fwd" + ("_residual" if has_res else ""),
               eps=eps, offset=offset, has_scale=has_scale, has_res=has_res)


# --------------------------------------------------------------- backward --

def _backward_kernel(*refs, launch: Launch, offset: float, has_scale: bool,
                     has_dh: bool, n_alias: int):
  """dx = rstd * (g - xhat * mean(g * xhat)) (+ dh), g = dy * w."""
  it = iter(refs)
  x_ref = next(it)
  w_ref = _take(it, has_scale)
  rstd_ref = next(it)
  dy_ref = next(it)
  dh_ref = _take(it, has_dh)
  for _ in range(n_alias):
    next(it)
  dx_ref = next(it)
  part_ref = _take(it, has_scale)

  L = launch
  pid = pl.program_id(0)
  inv_n = _F32(1.0 / L.hidden)

  def load_xg(tile, w, policy=None):
    x = tile.load(x_ref, policy).astype(_F32)
    dy = tile.load(dy_ref, policy).astype(_F32)
    g = dy * w[None, :] if has_scale else dy
    return x, dy, g

  def write_dx(tile, xhat, g, rstd, c, dh=None):
    dx = rstd[:, None] * (g - xhat * c[:, None])
    if has_dh:
      dx = dx + dh.astype(_F32)
    tile.store(dx_ref, dx)

  if L.resident:
    w_cached = None
    if has_scale and L.cache_scale:
      w_cached = _Tile(L, 0, 0).load_weight(w_ref, offset)

    def block_tile(k):
      # Prefetching reads one block past the last: its rows are masked off.
      return _Tile(L, (pid + k * L.grid) * L.block_rows, 0,
                   mask_rows=L.prefetch)

    # With reload, the first reads of x and dy ask L2 to keep their lines
    # for the second. The two reads of each input carry different eviction
    # policies, which also keeps the compiler from merging them into one;
    # the scale, shared by every program, is never marked evict_first.
    first = "evict_last" if L.reload else None

    def load_block(k):
      # Every input of the block is requested up front (dh too, unless it
      # is read after the reduction), so its loads are in flight together.
      tile = block_tile(k)
      return (tile.load(x_ref, first), tile.load(dy_ref, first),
              tile.load_row_stat(rstd_ref),
              tile.load(dh_ref) if has_dh and not L.reload else None)

    def weight(tile, policy=None):
      if not has_scale:
        return None
      if w_cached is not None:
        return w_cached
      return tile.load_weight(w_ref, offset, policy)

    def grad_in(x, dy, w, rstd):
      x, dy = x.astype(_F32), dy.astype(_F32)
      g = dy * w[None, :] if has_scale else dy
      return dy, g, x * rstd[:, None]

    def work(k, block, acc):
      tile = block_tile(k)
      x, dy, rstd, dh = block
      dy, g, xhat = grad_in(x, dy, weight(tile), rstd)
      c = jnp.sum(g * xhat, axis=1) * inv_n
      if L.reload:
        dy, g, xhat = grad_in(tile.load(x_ref, "evict_first"),
                              tile.load(dy_ref, "evict_first"),
                              weight(tile, "evict_last"), rstd)
        dh = tile.load(dh_ref, "evict_first") if has_dh else None
      write_dx(tile, xhat, g, rstd, c, dh)
      if has_scale:
        # Rows past the end loaded zeros, so they add nothing here.
        acc = acc + jnp.sum(dy * xhat, axis=0)
      return acc

    acc = _walk(L, load_block, work, jnp.zeros((L.block_cols,), _F32))
    if has_scale:
      _Tile(L, 0, 0).store_cols(part_ref, pid, acc)
    return

  r0 = pid * L.block_rows

  def chunk(i):
    return _Tile(L, r0, _multiple_of(i * L.block_cols, L.block_cols))

  def weight(tile):
    return tile.load_weight(w_ref, offset) if has_scale else None

  def dot_gx(i, acc):
    tile = chunk(i)
    x, _, g = load_xg(tile, weight(tile), "evict_last")
    return acc + g * x

  rstd = _Tile(L, r0, 0).load_row_stat(rstd_ref)
  acc = lax.fori_loop(0, L.num_chunks, dot_gx,
                      jnp.zeros((L.block_rows, L.block_cols), _F32))
  # mean(g * xhat) = rstd * mean(g * x)
  c = jnp.sum(acc, axis=1) * inv_n * rstd

  def write(i, carry):
    tile = chunk(i)
    dh = tile.load(dh_ref, "evict_first") if has_dh else None
    x, dy, g = load_xg(tile, weight(tile), "evict_first")
    xhat = x * rstd[:, None]
    write_dx(tile, xhat, g, rstd, c, dh)
    if has_scale:
      tile.store_cols(part_ref, pid, jnp.sum(dy * xhat, axis=0))
    return carry

  lax.fori_loop(0, L.num_chunks, write, 0)


def backward(x, scale, rstd, dy, dh, *, launch: Launch, offset: float,
             poison: bool = False):
  """Runs the backward kernel.

  Args:
    x: (rows, hidden) the normalized input (the updated residual h for the
      fused variant); dy: cotangent of y, (rows, hidden), any float dtype.
    scale: None or (hidden,); rstd: float32 (rows,) from the forward.
    dh: None, or the cotangent of h (fused variant), added to dx.

  Returns:
    ``(dx in x.dtype, dscale float32 (hidden,) or None)``.
  """
  rows, hidden = x.shape
  has_scale, has_dh = scale is not None, dh is not None
  out_shapes = [jax.ShapeDtypeStruct((rows, hidden), x.dtype)]
  if has_scale:
    out_shapes.append(jax.ShapeDtypeStruct((launch.grid, hidden), _F32))
  inputs = [x] + ([scale] if has_scale else []) + [rstd, dy] + (
      [dh] if has_dh else [])
  outs = _call(_backward_kernel, inputs, out_shapes, launch, poison,
               name="rmsnorm_bwd" + ("_residual" if has_dh else ""),
               offset=offset, has_scale=has_scale, has_dh=has_dh)
  if not has_scale:
    return outs[0], None
  dx, partials = outs
  # The second step: a (grid, hidden) column sum, small next to the inputs.
  dscale = partials[0] if launch.grid == 1 else jnp.sum(partials, axis=0)
  return dx, dscale


# ------------------------------------------------------------------ common --

def _call(kernel, inputs, out_shapes, launch: Launch, poison: bool, *, name,
          **kernel_kwargs):
  n_alias = len(out_shapes) if poison else 0
  aliases = {}
  if poison:
    # Outputs start as NaN: an element the kernel never writes stays NaN.
    poison_bufs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
    aliases = {len(inputs) + i: i for i in range(n_alias)}
    inputs = list(inputs) + poison_bufs
  body = functools.partial(kernel, launch=launch, n_alias=n_alias,
                           **kernel_kwargs)
  call = pl.pallas_call(
      body,
      out_shape=common.vary_like(tuple(out_shapes), inputs),
      grid=(launch.grid,),
      input_output_aliases=aliases,
      compiler_params=_CompilerParams(num_warps=launch.num_warps,
                                      num_stages=launch.num_stages),
      interpret=launch.interpret,
      name=name,
  )
  return call(*common.match_varying(inputs))
