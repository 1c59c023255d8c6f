"""Pallas kernel bodies for RMSNorm on GPUs (Triton lowering).

Every kernel sees whole-array refs (no BlockSpecs) and addresses them with
``pl.ds`` windows of power-of-two size plus masks: the Triton lowering needs
power-of-two tensors, and explicit masks let one kernel cover ragged row
counts and hidden sizes that are not a power of two. Statistics and
products are float32; inputs are upcast on load and outputs rounded once on
store, except where cast_mode "llama" prescribes intermediate roundings
(``_round``).

Two tilings (chosen by ``gpu_tiling.resolve``):

* resident: a tile of ``block_rows`` whole rows, ``block_cols =
  next_pow2(hidden)``; one read of each input, one write of each output.
* chunked (wide rows): ``block_rows`` rows are walked in ``block_cols``-wide
  chunks, a first loop for the row statistic and later ones for the
  outputs. Later loops re-read their inputs, which the first loop just left
  in L2.

The backward of the resident tiling runs on a persistent grid: each program
walks the row blocks ``pid, pid + grid, ...`` and keeps its share of dscale
(and dbias) in registers, so the partial sums written are ``grid x hidden``
floats however many rows there are, and a small XLA reduction in a fixed
order finishes them (no atomics: results are bitwise reproducible). Whole
rows wider than ``gpu_tiling.BWD_PIECE_COLS`` are walked in static pieces
of that width, each with its own dscale accumulator, so that one piece of
x and dy is live at a time (``_backward_pieces``).

A per-head scale ``(heads, head_dim)`` applies to rows ``(tokens, heads)``
flattened. Where a token's heads fit one resident tile (``Geometry.fold``,
the default), the kernels view x as ``(tokens, heads, head_dim)`` (a free
reshape) and tile whole tokens: a ``(block_rows, heads, head_dim)`` tile
reduces over its last axis, so a per-head norm reads and writes whole
contiguous rows like the plain norm of ``heads * head_dim`` columns, and the
dscale partial of a program is its ``(heads, head_dim)`` column sum. A
second grid axis over heads, each program reading its head's
``head_dim``-wide column window (256-byte pieces of every row), was slower
(H200, bf16, us, backward with heads apart against folded: 8192x32x128
60.2 against 56.3, the plain 8192x4096 backward taking 57.3; 16384x32x128
116.5 against 107.1; forward 8192x32x128 36.2 against 35.6). Otherwise (a
token too wide for one tile, or a user ``block_cols`` below it) program
``(p, h)`` handles head ``h``'s column window of its row blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu_tiling import Config

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What a resolved ``Config`` implies for one call (derived, no knobs).

  Attributes:
    config: the resolved configuration (``gpu_tiling.resolve``).
    rows: rows of one head (all rows without a per-head scale).
    hidden: normalized width (head_dim with a per-head scale).
    heads: scale rows (1 without a per-head scale); the second grid axis
      unless folded into the tile (``fold``).
    row_itemsize: bytes of an element of the widest row array the kernel
      reads or writes, or None to leave each array its own layout; see
      ``_Tile._window``.
  """

  config: Config
  rows: int
  hidden: int
  heads: int = 1
  row_itemsize: int | None = None

  @property
  def block_rows(self) -> int:
    return self.config.block_rows

  @property
  def heads_padded(self) -> int:
    """Heads a folded tile spans (a power of two; 1 if not folded)."""
    return gpu_tiling.next_pow2(self.heads) if self.fold else 1

  @property
  def fold(self) -> bool:
    """Whole tokens (all heads) per tile; ``gpu_tiling.resolve`` asks for
    it with ``block_cols`` covering every padded head."""
    return self.heads > 1 and self.config.block_cols >= (
        gpu_tiling.fold_cols(self.hidden, self.heads))

  @property
  def head_programs(self) -> int:
    """Programs along the second grid axis (one per head unless folded)."""
    return 1 if self.fold else self.heads

  @property
  def block_cols(self) -> int:
    """Columns of one head's window (of every head's, when folded)."""
    if self.fold:
      return self.config.block_cols // self.heads_padded
    return self.config.block_cols

  @property
  def tile_shape(self) -> tuple[int, ...]:
    if self.fold:
      return (self.block_rows, self.heads_padded, self.block_cols)
    return (self.block_rows, self.block_cols)

  @property
  def vector_shape(self) -> tuple[int, ...]:
    """A per-feature vector of the tile (per head when folded)."""
    return self.tile_shape[1:]

  @property
  def stat_shape(self) -> tuple[int, ...]:
    """The per-row statistics of a tile (per token and head when folded)."""
    return self.tile_shape[:-1]

  @property
  def resident(self) -> bool:
    """The whole (padded) row is one tile."""
    return self.block_cols >= self.hidden

  @functools.cached_property
  def _grid_steps(self) -> tuple[int, int]:
    blocks = pl.cdiv(self.rows, self.block_rows)
    if not (self.resident and self.config.persistent):
      return blocks, 1
    slots = self.config.num_sms * self.config.programs_per_sm
    grid = max(1, min(blocks, slots // self.head_programs))
    steps = pl.cdiv(blocks, grid)
    # Same steps per program, no program left with only empty blocks.
    return pl.cdiv(blocks, steps), steps

  @property
  def grid(self) -> int:
    """Programs along the rows (per head)."""
    return self._grid_steps[0]

  @property
  def steps(self) -> int:
    """Row blocks each program walks (1 unless persistent)."""
    return self._grid_steps[1]

  @property
  def prefetch(self) -> bool:
    return self.config.prefetch and self.steps > 1

  @property
  def cache_bias(self) -> bool:
    """The forward keeps the bias in registers beside the scale
    (``cache_scale``) while each thread holds at most
    ``gpu_tiling.FWD_CACHE_BIAS_MAX_PER_THREAD`` of its columns; past that
    it reloads it per row block (L1 hits)."""
    per_thread = self.config.block_cols // (32 * self.config.num_warps)
    return (self.config.cache_scale
            and per_thread <= gpu_tiling.FWD_CACHE_BIAS_MAX_PER_THREAD)

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


def _ptx(asm, args, constraints, dtype=_F32, pack=1):
  """PTX ``asm`` applied elementwise to ``args`` (arrays of one shape):
  one ``dtype`` array of that shape (``pack`` elements per instance)."""
  return pltriton.elementwise_inline_asm(
      asm, args=list(args), constraints=constraints, pack=pack,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, dtype)])[0]


@dataclasses.dataclass(frozen=True)
class _Math:
  """The static arithmetic of one call (cast order, operands, quantization).

  ``xdt`` is the dtype x_hat is rounded to under "llama" (the normalized
  input's), ``pdt`` the dtype of the products (``Norm.product_dtype``);
  ``offset`` is already rounded to ``pdt``. ``wdt`` is the 16-bit dtype the
  loaded scale and bias are rounded to first (``Norm.weight_dtype``), or
  None. ``qmax`` is None unless the output is quantized. ``factor_max``:
  y is ``rstd * (h * w)`` and a dynamic scale's row max is taken from
  ``h * w`` (``forward`` decides, see ``can_factor_max``).
  """

  eps: float = 0.0
  offset: float = 0.0
  llama: bool = False
  xdt: np.dtype = np.dtype(np.float32)
  pdt: np.dtype = np.dtype(np.float32)
  wdt: np.dtype | None = None
  has_scale: bool = False
  has_bias: bool = False
  qmax: float | None = None
  inverse_qmax: float | None = None
  q_int: bool = False
  q_static: bool = False
  factor_max: bool = False
  interpret: bool = False

  def round(self, v, dtype):
    """float32 ``v`` rounded to ``dtype`` and back (a no-op for float32)."""
    if np.dtype(dtype) == np.dtype(np.float32):
      return v
    return v.astype(dtype).astype(_F32)

  def weight(self, w):
    """``scale + offset`` as the cast mode computes it (float32 values)."""
    if self.wdt is not None:
      w = self.round_weight(w)
    if self.llama:
      return self.round(w + _F32(self.offset), self.pdt) if self.offset else w
    return w + _F32(self.offset) if self.offset else w

  def bias(self, b):
    if self.wdt is not None:
      b = self.round_weight(b)
    return self.round(b, self.pdt) if self.llama else b

  # PTX of float32 -> wdt -> float32, one value in and out: as a pair of
  # casts, Triton gives the 16-bit values a layout of their own, and the
  # conversion back went through shared memory behind a barrier before the
  # row's loads (H200, the forward of 64x4096 bfloat16 rows with a float32
  # scale rounded to bfloat16: 1.92 us that way, 1.70 with this).
  _ROUND_ASM = {
      np.dtype(jnp.bfloat16): ("{ .reg .b16 t, z; cvt.rn.bf16.f32 t, $1; "
                               "mov.b16 z, 0; mov.b32 $0, {z, t}; }"),
      np.dtype(jnp.float16): ("{ .reg .b16 t; cvt.rn.f16.f32 t, $1; "
                              "cvt.f32.f16 $0, t; }"),
  }

  def round_weight(self, v):
    """float32 ``v`` rounded to ``wdt`` (nearest even), in float32's layout."""
    if self.interpret:
      return self.round(v, self.wdt)
    return _ptx(self._ROUND_ASM[np.dtype(self.wdt)], [v], "=f,f")

  def output(self, h, rstd, w, b):
    """y (float32 values) from the normalized input h and its rstd."""
    if self.factor_max:
      return rstd[..., None] * self.weighted(h, w)
    y = h * rstd[..., None]
    if self.llama:
      y = self.round(y, self.xdt)
      if w is not None:
        y = self.round(y * w[None], self.pdt)
      if b is not None:
        y = self.round(y + b[None], self.pdt)
      return y
    if w is not None:
      y = y * w[None]
    if b is not None:
      y = y + b[None]
    return y

  @property
  def can_factor_max(self) -> bool:
    """Whether a dynamic scale's ``max|y|`` can be ``rstd * max|h * w|``.

    With y computed as ``rstd * (h * w)`` (one float32 rounding each),
    rounding a product with the positive rstd is monotonic, so the row's
    largest ``|y|`` is rstd times the largest ``|h * w|``, bit for bit, and
    the max can be reduced beside the sum of squares, before rstd is known,
    instead of in a second block reduction after it. Not with a bias
    (added after the scale) or under "llama" (x_hat rounded in between).
    """
    return (self.qmax is not None and not self.q_static and not self.llama
            and not self.has_bias)

  def weighted(self, h, w):
    """``h * w``, or h without a scale."""
    return h if w is None else h * w[None]

  def grad_terms(self, x, dy, w, rstd):
    """``(dy in the product dtype, g, x_hat, x_hat as dscale sees it)``."""
    x, dy = x.astype(_F32), dy.astype(_F32)
    xhat = x * rstd[..., None]
    if not self.llama:
      g = dy * w[None] if w is not None else dy
      return dy, g, xhat, xhat
    dyp = self.round(dy, self.pdt)
    g = self.round(dyp * w[None], self.pdt) if w is not None else dyp
    # The cotangent passes back through x_hat's rounding to x's dtype.
    g = self.round(g, self.xdt)
    return dyp, g, xhat, self.round(xhat, self.xdt)

  def reciprocal(self, a):
    """Correctly rounded float32 ``1 / a``.

    Triton lowers ``/`` to an approximate division (``div.full.f32``); XLA
    divides exactly.
    """
    if self.interpret:
      return _F32(1.0) / a
    return _ptx("div.rn.f32 $0, $1, $2;", [jnp.full(a.shape, 1.0, _F32), a],
                "=f,f,f")

  # base.quantize's rule: products with float32 reciprocals (of qmax, and
  # one per row of q_scale), as XLA compiles the divisions.

  def abs_max(self, v, axis=-1):
    """``max|v|`` along ``axis`` as the compiled kernels take it.

    Pallas lowers Triton's max to ``maxnumf``, which drops a NaN operand:
    a NaN element counts only in a row of NaN. Interpret mode takes it the
    same way (XLA's max would keep the NaN), so that it runs the compiled
    kernels' arithmetic.
    """
    a = jnp.abs(v)
    if not self.interpret:
      return jnp.max(a, axis=axis)
    nan = jnp.isnan(a)
    m = jnp.max(jnp.where(nan, -jnp.inf, a), axis=axis)
    return jnp.where(jnp.all(nan, axis=axis), jnp.nan, m)

  def running_max(self, a, b):
    """``max(a, b)`` dropping a NaN operand, as ``abs_max``."""
    return jnp.fmax(a, b) if self.interpret else jnp.maximum(a, b)

  def quant_scale(self, amax):
    """Dynamic per-row scale: ``amax * (1 / qmax)``, 1 for a zero row."""
    s = amax * _F32(self.inverse_qmax)
    return jnp.where(amax > 0, s, _F32(1.0))

  def quantize(self, y, qs):
    """q from float32 ``y``: ``y * (1 / qs)``, saturated (int8: rounded).

    Returns the values to store: int8, or float32 that the store converts
    to the float8 dtype. Each step is the cheapest exact one: this kernel's
    per-element instruction count, not its bytes, set its time (in SASS
    for sm_90, 30 instructions an element for int8 before these steps and
    the launch changes, 12 for the plain forward).

    A dynamic scale gives ``|v| <= qmax * (1 + 4 ulp)``, which rounds to
    at most qmax: no clamp. float8's round-to-nearest conversion
    (saturating on sm_89+) and int8's ``cvt.rni.sat`` map it to qmax as the
    clip would. A NaN element stays NaN up to the conversion, which makes
    it 0 in int8 and NaN in float8, as XLA's cast does (a row holding an
    infinity or a NaN has such elements).
    """
    v = y * self.reciprocal(qs)[..., None]
    if self.q_static:
      # cvt.rni.sat saturates to [-128, 127]: int8 needs the lower bound.
      v = self.bound(v, "max", -self.qmax)
      if not self.q_int:
        v = self.bound(v, "min", self.qmax)
    return self.round_to_int8(v) if self.q_int else v

  def bound(self, v, op, c):
    """``max(v, c)`` or ``min(v, c)`` that keeps a NaN ``v`` NaN, as XLA's
    clip does (Pallas lowers jnp.maximum to the max that drops a NaN, which
    made a NaN element of a static quantization -qmax). One instruction,
    as the other."""
    if self.interpret:
      return (jnp.maximum if op == "max" else jnp.minimum)(v, _F32(c))
    imm = "0f%08X" % np.float32(c).view(np.uint32)
    return _ptx(f"{op}.NaN.f32 $0, $1, {imm};", [v], "=f,f")

  def round_to_int8(self, v):
    """float32 ``v`` in [-127.5, 127.5) rounded half to even, as int8.

    One conversion: PTX's ``cvt.rni.sat.s8.f32`` rounds to the nearest
    integer, ties to even (and saturates; NaN gives 0, as XLA's cast).
    Rounding first (``cvt.rni.f32.f32``) and then casting took a second
    conversion and the two clamps Pallas adds to every float to int cast.
    Adding 1.5 * 2**23 and keeping the low byte is as exact; on an H200 it
    timed the same.
    """
    if self.interpret:
      return jnp.round(v).astype(jnp.int8)
    return _ptx("cvt.rni.sat.s8.f32 $0, $1;", [v], "=r,f",
                jnp.int32).astype(jnp.int8)


def _l1_bypass_modifier() -> str | None:
  """The load cache modifier that skips L1 (``".cg"``), or None where the
  installed Pallas cannot lower it.

  Pallas' Triton lowering accepts ``cache_modifier=".cg"`` and then looks
  it up in a table keyed ``"cg"`` (jax 0.10.2 to 0.11.2: ``KeyError:
  '.cg'``). The missing key is added to that table, naming the modifier
  Triton already has; where the table is not found (another jax), loads
  keep L1, which changes their speed only.
  """
  try:
    from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
    table = lowering._STR_TO_CACHE_MODIFIER  # pylint: disable=protected-access
    table.setdefault(".cg", table["cg"])
  except (ImportError, AttributeError, KeyError, TypeError):
    return None
  return ".cg"


_L1_BYPASS = _l1_bypass_modifier()


# The widest global load or store a thread issues (128 bits).
_VECTOR_BYTES = 16


def _unknown_zero(r0):
  """0, from a row index (an int32 that is never negative, shifted right by
  31): the compiler cannot see that it is 0, so an offset it is multiplied
  into has no alignment beyond the factor's."""
  return lax.shift_right_logical(r0, jnp.int32(31))


_WIDEN_ASM = {
    np.dtype(jnp.bfloat16): ("{ shl.b32 $0, $2, 16; "
                             "and.b32 $1, $2, 0xffff0000; }"),
    np.dtype(jnp.float16): ("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                            "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }"),
}


def _widen(v, interpret):
  """16-bit ``v`` as float32 (other dtypes cast), two elements at a time.

  Triton widens each 16-bit element of a loop-carried block on its own: a
  PRMT moving it out of the loaded register pair, then the conversion (two
  instructions an element; the quantized forward of 4096x8192 bfloat16
  rows: 405 a thread and row in SASS for sm_90, 373 with this). Here one
  instruction widens each element in place (bfloat16: a shift or a mask;
  float16: a conversion of a register half).
  """
  asm = None if interpret else _WIDEN_ASM.get(np.dtype(v.dtype))
  if asm is None:
    return v.astype(_F32)
  return _ptx(asm, [v], "=r,=r,r", pack=2)


def _outer_mask(masks, shape):
  """AND of per-axis masks (None: all true) broadcast to ``shape``, or None."""
  out = None
  for axis, mk in enumerate(masks):
    if mk is None:
      continue
    mk = mk.reshape(tuple(-1 if i == axis else 1 for i in range(len(shape))))
    out = mk if out is None else out & mk
  return None if out is None else jnp.broadcast_to(out, shape)


class _Tile:
  """Masks and windows of one tile (``Geometry.tile_shape``).

  ``r0`` is the first row (of one head; the first token when folded), ``c0``
  the first column within the head's ``hidden``-wide window, ``head`` the
  head (0 without per-head, and when folded).
  """

  def __init__(self, g: Geometry, r0, c0, head, mask_rows: bool = False):
    self.g = g
    # int32 offsets throughout: under x64 a Python int would become int64
    # beside program_id's int32, which indexing rejects.
    self.r0, self.c0, self.head = (jnp.asarray(v, jnp.int32)
                                   for v in (r0, c0, head))
    self.zero = jnp.asarray(0, jnp.int32)
    br, bc, hp = g.block_rows, g.block_cols, g.heads_padded
    self.rmask = ((r0 + jnp.arange(br)) < g.rows
                  if g.rows_ragged or mask_rows else None)
    self.cmask = ((c0 + jnp.arange(bc)) < g.hidden
                  if g.cols_ragged else None)
    self.hmask = jnp.arange(hp) < g.heads if hp != g.heads and g.fold else None
    axes = ((self.rmask, self.hmask, self.cmask) if g.fold
            else (self.rmask, self.cmask))
    self.mask = _outer_mask(axes, g.tile_shape)
    self.vmask = _outer_mask(axes[1:], g.vector_shape)
    self.smask = _outer_mask(axes[:-1], g.stat_shape)

  def _col(self, per_head=True):
    if self.g.heads == 1 or self.g.fold or not per_head:
      return self.c0
    return self.head * self.g.hidden + self.c0

  def _heads(self):
    return pl.ds(self.zero, self.g.heads_padded)

  def _window(self, ref):
    rows = pl.ds(self.r0, self.g.block_rows)
    col = self._col()
    if self.g.row_itemsize and ref.dtype.itemsize < self.g.row_itemsize:
      # Triton gives every load and store of a tile the layout of the one
      # with the most elements in 16 bytes, and splits wider accesses
      # into 16-byte pieces, or else converts between layouts through
      # shared memory. A 1-byte q beside bfloat16 x gave each thread 16
      # elements, so each load of x used half of every sector it touched
      # and the other half came from L1, or past it from L2 again (40% of
      # the quantized forward's L1 requests hit); bfloat16 x beside a
      # float32 y or dy went through 16 KB of shared memory. A column
      # start known only to be a multiple of 16 bytes of the widest array
      # holds this array's accesses to that many elements: one layout.
      col = col + _unknown_zero(self.r0) * (
          _VECTOR_BYTES // self.g.row_itemsize)
    cols = pl.ds(col, self.g.block_cols)
    if self.g.fold:
      return ref.at[rows, self._heads(), cols]
    return ref.at[rows, cols]

  @staticmethod
  def _load(win, mask, policy=None, modifier=None):
    kw = {} if policy is None else {"eviction_policy": policy}
    if modifier is not None:
      kw["cache_modifier"] = modifier
    if mask is None:
      return pltriton.load(win, **kw)
    return pltriton.load(win, mask=mask, other=0.0, **kw)

  @staticmethod
  def _store(win, value, mask):
    value = value.astype(win.dtype)
    if mask is None:
      pltriton.store(win, value)
    else:
      pltriton.store(win, value, mask=mask)

  def load(self, ref, eviction_policy=None):
    """The tile of ``ref`` (input dtype); masked-off elements read 0.

    Past L1 with ``Config.bypass_l1``: a row input is read once (or again
    from L2), and with the L1 that XLA's launcher leaves these kernels
    (docs/gpu_profile_h200.md) the loads in flight held lines there. A load
    with an L2 eviction policy (the reads of rows that are read twice)
    keeps L1: ptxas rejects ``.cg`` beside ``.L2::evict_*``.
    """
    modifier = (_L1_BYPASS if self.g.config.bypass_l1
                and eviction_policy is None else None)
    return self._load(self._window(ref), self.mask, eviction_policy,
                      modifier)

  def store(self, ref, value):
    self._store(self._window(ref), value, self.mask)

  def _row_window(self, ref):
    rows = pl.ds(self.r0, self.g.block_rows)
    if self.g.fold:
      return ref.at[rows, self._heads()]
    return ref.at[rows, self.head]

  def load_row_stat(self, ref):
    """The tile's rows of a per-row ``(rows, heads)`` array, float32."""
    return self._load(self._row_window(ref), self.smask).astype(_F32)

  def store_row_stat(self, ref, value):
    self._store(self._row_window(ref), value, self.smask)

  def load_vector(self, ref, per_head=False, eviction_policy=None):
    """The tile's columns of a per-feature vector, float32 (0 if masked).

    ``per_head``: ``ref`` holds ``heads`` rows of ``hidden``: 2-D when
    folded (the tile's heads are loaded too), else flattened.
    """
    cols = pl.ds(self._col(per_head), self.g.block_cols)
    if self.g.fold and per_head:
      return self._load(ref.at[self._heads(), cols], self.vmask,
                        eviction_policy).astype(_F32)
    # A (hidden,) vector (the bias) broadcasts over a folded tile's heads.
    return self._load(ref.at[cols], self.cmask,
                      eviction_policy).astype(_F32)

  def store_cols(self, ref, row, value):
    """Stores a ``vector_shape`` value into row ``row`` of ``ref`` (2-D,
    or 3-D ``(rows, heads, hidden)`` when folded)."""
    cols = pl.ds(self._col(), self.g.block_cols)
    one = pl.ds(row, 1)
    win = (ref.at[one, self._heads(), cols] if self.g.fold
           else ref.at[one, cols])
    mask = None if self.vmask is None else self.vmask[None]
    self._store(win, value[None], mask)


def _multiple_of(x, n):
  # Tells the compiler a chunk start is aligned, so masks and loads vectorize.
  try:
    return pl.multiple_of(x, n)
  except Exception:  # pylint: disable=broad-except
    return x


def _take(it, flag):
  return next(it) if flag else None


def _walk(g: Geometry, load_block, work, carry, widen=None):
  """Runs ``work(k, load_block(k), carry)`` over a program's row blocks.

  With prefetch the loads of block k+1 are issued before the work on block
  k, so they are in flight during its reduction and stores (the block after
  the last one is fully masked and reads nothing). ``widen``: applied to
  each array of a prefetched block at the end of the step that loaded it,
  when its data has long arrived (``_widen``), or None.
  """
  if g.steps == 1:
    return work(0, load_block(0), carry)
  if g.prefetch:
    def widened(block):
      return block if widen is None else jax.tree.map(widen, block)

    def step(k, state):
      c, block = state
      following = load_block(k + 1)
      # Widened after the work on block k, in program order: the
      # conversion waits for the loads.
      return work(k, block, c), widened(following)
    return lax.fori_loop(0, g.steps, step,
                         (carry, widened(load_block(0))))[0]
  return lax.fori_loop(0, g.steps,
                       lambda k, c: work(k, load_block(k), c), carry)


def _head(g: Geometry):
  # An array, not a Python int: interpret mode indexes refs with arrays only.
  return pl.program_id(1) if g.head_programs > 1 else jnp.int32(0)


# ---------------------------------------------------------------- forward --

def _forward_kernel(*refs, g: Geometry, m: _Math, has_res: bool,
                    n_alias: int):
  """y = norm(h) with h = x (+ residual, rounded to residual's dtype)."""
  it = iter(refs)
  x_ref = next(it)
  r_ref = _take(it, has_res)
  w_ref = _take(it, m.has_scale)
  b_ref = _take(it, m.has_bias)
  qs_in_ref = _take(it, m.q_static)
  for _ in range(n_alias):  # poison buffers, aliased to the outputs below
    next(it)
  quant = m.qmax is not None
  y_ref = next(it)  # q when quantized
  qs_ref = _take(it, quant)
  h_ref = _take(it, has_res)
  rstd_ref = _take(it, not quant)

  pid, head = pl.program_id(0), _head(g)
  inv_n = _F32(1.0 / g.hidden)

  def operands(tile, policy=None):
    w = m.weight(tile.load_vector(w_ref, g.heads > 1, policy)) if (
        m.has_scale) else None
    b = m.bias(tile.load_vector(b_ref, False, policy)) if m.has_bias else None
    return w, b

  static_qs = None
  if m.q_static:
    static_qs = jnp.broadcast_to(
        pltriton.load(qs_in_ref.at[pl.ds(0, 1)]).astype(_F32).reshape(
            (1,) * len(g.stat_shape)), g.stat_shape)

  def emit(tile, y, rstd, qs=None):
    """Stores y (or q and its scales) and the row statistic."""
    if not quant:
      tile.store(y_ref, y)
      tile.store_row_stat(rstd_ref, rstd)
      return
    if qs is None:
      qs = static_qs if m.q_static else m.quant_scale(
          m.abs_max(y))
    tile.store(y_ref, m.quantize(y, qs))
    tile.store_row_stat(qs_ref, qs)

  def normed_input(tile, store_h, policy=None):
    h = tile.load(x_ref, policy).astype(_F32)
    if not has_res:
      return h
    # h is rounded to residual's dtype: the caller gets exactly what the
    # norm saw.
    h = (h + tile.load(r_ref, policy).astype(_F32)).astype(h_ref.dtype)
    if store_h:
      tile.store(h_ref, h)
    return h.astype(_F32)

  if g.resident:
    cached = None
    if g.config.cache_scale:
      cached = operands(_Tile(g, 0, 0, head))
      if not g.cache_bias:
        cached = cached[0], None

    def block_tile(k):
      return _Tile(g, (pid + k * g.grid) * g.block_rows, 0, head,
                   mask_rows=g.prefetch)

    def load_block(k):
      tile = block_tile(k)
      return tile.load(x_ref), tile.load(r_ref) if has_res else None

    def work(k, block, carry):
      tile = block_tile(k)
      x, r = block
      h = x.astype(_F32)
      if has_res:
        h = (h + r.astype(_F32)).astype(h_ref.dtype)
        tile.store(h_ref, h)
        h = h.astype(_F32)
      if m.factor_max:
        w = cached[0] if cached is not None else operands(tile)[0]
        # Both row reductions before either result is used.
        ss = jnp.sum(h * h, axis=-1)
        pmax = m.abs_max(m.weighted(h, w))
        rstd = lax.rsqrt(ss * inv_n + _F32(m.eps))
        emit(tile, m.output(h, rstd, w, None), rstd,
             m.quant_scale(rstd * pmax))
        return carry
      rstd = lax.rsqrt(jnp.sum(h * h, axis=-1) * inv_n + _F32(m.eps))
      w, b = cached if cached is not None else operands(tile)
      if b is None and m.has_bias:  # not kept (Geometry.cache_bias)
        b = m.bias(tile.load_vector(b_ref))
      emit(tile, m.output(h, rstd, w, b), rstd)
      return carry

    # With a residual the early widening cost instructions (the fused
    # int8 forward of 4096x8192 bfloat16 rows: 211 a thread and row in
    # SASS, 195 without it).
    _walk(g, load_block, work, 0, widen=None if has_res else
          functools.partial(_widen, interpret=m.interpret))
    return

  r0 = pid * g.block_rows

  def chunk(i):
    return _Tile(g, r0, _multiple_of(i * g.block_cols, g.block_cols), head)

  def sum_squares(i, acc):
    h = normed_input(chunk(i), store_h=True, policy="evict_last")
    return acc + h * h

  acc = lax.fori_loop(0, g.num_chunks, sum_squares,
                      jnp.zeros((g.block_rows, g.block_cols), _F32))
  rstd = lax.rsqrt(jnp.sum(acc, axis=1) * inv_n + _F32(m.eps))

  def chunk_output(tile, policy):
    # Recomputed from x and residual (L2 hits) rather than read back from
    # h_ref, which other threads of this program wrote.
    h = normed_input(tile, store_h=False, policy=policy)
    return m.output(h, rstd, *operands(tile))

  qs = static_qs
  if quant and not m.q_static:
    def row_max(i, amax):
      y = chunk_output(chunk(i), "evict_last")
      return m.running_max(amax, m.abs_max(y, axis=1))
    qs = m.quant_scale(lax.fori_loop(0, g.num_chunks, row_max,
                                     jnp.zeros((g.block_rows,), _F32)))

  def write(i, carry):
    tile = chunk(i)
    y = chunk_output(tile, "evict_first")
    if quant:
      tile.store(y_ref, m.quantize(y, qs))
    else:
      tile.store(y_ref, y)
    return carry

  lax.fori_loop(0, g.num_chunks, write, 0)
  row = _Tile(g, r0, 0, head)
  if quant:
    row.store_row_stat(qs_ref, qs)
  else:
    row.store_row_stat(rstd_ref, rstd)


def _math(norm: base.Norm, x_dtype, scale, bias, interpret, quant_scale=None):
  pdt = norm.product_dtype(x_dtype, None if scale is None else scale.dtype)
  if pdt == np.dtype(np.float64):  # x64 mode: applied in float32
    pdt = np.dtype(np.float32)
  llama = norm.cast_mode == "llama"
  offset = float(np.asarray(norm.scale_offset, pdt)) if llama else float(
      np.float32(norm.scale_offset))
  kw = {}
  if norm.quant_dtype is not None:
    qdt = np.dtype(norm.quant_dtype)
    kw = dict(qmax=base.QUANT_MAX[qdt],
              inverse_qmax=float(base.inverse_qmax(qdt)),
              q_int=qdt == np.dtype(jnp.int8),
              q_static=quant_scale is not None)
  return _Math(eps=float(norm.eps), offset=offset, llama=llama,
               xdt=np.dtype(x_dtype), pdt=pdt, wdt=norm.weight_rounding,
               has_scale=scale is not None,
               has_bias=bias is not None, interpret=interpret, **kw)


def _rows_view(a, g: Geometry):
  """(rows, hidden) as (tokens, heads * hidden), or (tokens, heads, hidden)
  when folded: free reshapes."""
  if a is None or g.heads == 1:
    return a
  return a.reshape(_token_shape(g))


def _token_shape(g: Geometry, lead=None):
  """Shape of ``lead`` (default: tokens) rows of every head."""
  lead = g.rows if lead is None else lead
  if g.fold:
    return (lead, g.heads, g.hidden)
  return (lead, g.heads * g.hidden)


def _scale_view(scale, g: Geometry):
  # Folded tiles load (heads, hidden) windows; others address it flat.
  return scale if g.fold else scale.reshape(-1)


def forward(x, residual, scale, bias, *, config: Config, norm: base.Norm,
            out_dtype, quant_scale=None, interpret: bool = False,
            poison: bool = False):
  """Runs the forward kernel (plain, fused residual or quantized).

  Args:
    x: (rows, hidden) float32/bfloat16/float16.
    residual: None, or (rows, hidden) array added to x first.
    scale: None, (hidden,) or per-head (heads, hidden), any float dtype;
      rows must be a multiple of heads.
    bias: None or (hidden,).
    config: resolved tiling (``gpu_tiling.resolve``).
    norm: the static arguments; ``norm.quant_dtype`` set selects the
      quantized output.
    out_dtype: y's dtype (ignored when quantized).
    quant_scale: static quantization: a float32 scalar array; None for
      dynamic per-row scales.
    poison: start every output from NaN (through input/output aliasing) so
      tests see any element the kernel failed to write.

  Returns:
    ``(y, rstd)``, with a residual ``(y, h, rstd)``; quantized
    ``(q, q_scale)`` or ``(q, q_scale, h)``. rstd float32 (rows,), q_scale
    float32 (rows, 1).
  """
  rows, hidden = x.shape
  heads = 1 if scale is None or scale.ndim == 1 else scale.shape[0]
  tokens = rows // heads
  has_res = residual is not None
  quant = norm.quant_dtype is not None
  row_dtypes = [x.dtype] + ([residual.dtype] if has_res else []) + (
      [] if quant else [out_dtype])
  g = Geometry(config, tokens, hidden, heads,
               row_itemsize=max(np.dtype(d).itemsize for d in row_dtypes))
  h_dtype = residual.dtype if has_res else x.dtype
  m = _math(norm, h_dtype, scale, bias, interpret, quant_scale)
  if m.can_factor_max and g.resident and g.config.persistent:
    # H200, jax 0.11.2, quantized forwards on persistent grids: int8 2.1-3.2%
    # and float8 0.5-2.3% faster, int8 with a residual (no bias) at 8192
    # columns 3.2-4.0% (docs/bench_h200_features.md). Programs of one row
    # block (non-persistent) do not take it: the fused int8 forward of
    # 8192x4096 and 16384x4096 bf16 was 3.2-4.1% slower so. The chunked
    # tiling keeps its pass for the max: the max beside the sum's
    # accumulator spilled (1024x65536 bf16: +41%).
    m = dataclasses.replace(m, factor_max=True)
  wide = _token_shape(g)
  out_shapes = [jax.ShapeDtypeStruct(
      wide, norm.quant_dtype if quant else out_dtype)]
  if quant:
    out_shapes.append(jax.ShapeDtypeStruct((tokens, heads), _F32))
  if has_res:
    out_shapes.append(jax.ShapeDtypeStruct(wide, residual.dtype))
  if not quant:
    out_shapes.append(jax.ShapeDtypeStruct((tokens, heads), _F32))
  inputs = [_rows_view(x, g)]
  if has_res:
    inputs.append(_rows_view(residual, g))
  if scale is not None:
    inputs.append(_scale_view(scale, g))
  if bias is not None:
    inputs.append(bias)
  if m.q_static:
    inputs.append(jnp.asarray(quant_scale, _F32).reshape(1))
  name = "rmsnorm_" + ("quantized_" if quant else "") + (
      "residual_forward" if has_res else "forward")
  outs = _call(_forward_kernel, inputs, out_shapes, g, poison, interpret,
               name=name, m=m, has_res=has_res)
  outs = list(outs)
  outs[0] = outs[0].reshape(rows, hidden)
  if has_res:
    outs[-2 if not quant else -1] = outs[-2 if not quant else -1].reshape(
        rows, hidden)
  if quant:
    outs[1] = outs[1].reshape(rows, 1)
  else:
    outs[-1] = outs[-1].reshape(rows)
  return tuple(outs)


# --------------------------------------------------------------- backward --

def _backward_kernel(*refs, g: Geometry, m: _Math, has_dh: bool,
                     n_alias: int):
  """dx = rstd * (g - xhat * mean(g * xhat)) (+ dh), g = dy * w."""
  it = iter(refs)
  x_ref = next(it)
  w_ref = _take(it, m.has_scale)
  rstd_ref = next(it)
  dy_ref = next(it)
  dh_ref = _take(it, has_dh)
  for _ in range(n_alias):
    next(it)
  dx_ref = next(it)
  pw_ref = _take(it, m.has_scale)
  pb_ref = _take(it, m.has_bias)

  pid, head = pl.program_id(0), _head(g)
  inv_n = _F32(1.0 / g.hidden)
  zeros = jnp.zeros(g.tile_shape, _F32)

  def weight(tile, policy=None):
    if not m.has_scale:
      return None
    return m.weight(tile.load_vector(w_ref, g.heads > 1, policy))

  def write_dx(tile, xhat, grad, rstd, c, dh=None):
    dx = rstd[..., None] * (grad - xhat * c[..., None])
    if has_dh:
      dx = dx + dh.astype(_F32)
    tile.store(dx_ref, dx)

  def accumulate(acc, dyp, xhat_s):
    # Tile-shaped accumulators: the sum over the tile's rows, which crosses
    # warps (through shared memory, with a barrier) once a tile has more
    # than one row, is taken once per program in store_partials instead of
    # once per row block (H200, 16384x2048 bf16, 4-row tiles, us: backward
    # 64.0 -> 56.6, with a bias 76.2 -> 59.0, fused backward 81.9 -> 71.7).
    # Rows past the end loaded zeros and add nothing.
    aw, ab = acc
    if m.has_scale:
      aw = aw + dyp * xhat_s
    if m.has_bias:
      ab = ab + dyp
    return aw, ab

  def store_partials(tile, row, acc):
    if m.has_scale:
      tile.store_cols(pw_ref, row, jnp.sum(acc[0], axis=0))
    if m.has_bias:
      tile.store_cols(pb_ref, row, jnp.sum(acc[1], axis=0))

  if g.resident and g.config.reload and (
      g.block_cols > gpu_tiling.BWD_PIECE_COLS):
    _backward_pieces(g, m, has_dh, pid, head, inv_n, x_ref, dy_ref,
                     rstd_ref, dh_ref, weight, write_dx, accumulate,
                     store_partials)
    return

  if g.resident:
    w_cached = None
    if m.has_scale and g.config.cache_scale:
      w_cached = weight(_Tile(g, 0, 0, head))

    def block_tile(k):
      # Prefetching reads one block past the last: its rows are masked off.
      return _Tile(g, (pid + k * g.grid) * g.block_rows, 0, head,
                   mask_rows=g.prefetch)

    # With reload, the first reads of x and dy ask L2 to keep their lines
    # for the second. The two reads of each input carry different eviction
    # policies, which also keeps the compiler from merging them into one;
    # the scale, shared by every program, is never marked evict_first.
    first = "evict_last" if g.config.reload else None

    def load_block(k):
      # Every input of the block is requested up front (dh too, unless it
      # is read after the reduction), so its loads are in flight together.
      tile = block_tile(k)
      return (tile.load(x_ref, first), tile.load(dy_ref, first),
              tile.load_row_stat(rstd_ref),
              tile.load(dh_ref) if has_dh and not g.config.reload else None)

    def block_weight(tile, policy=None):
      return w_cached if w_cached is not None else weight(tile, policy)

    def work(k, block, acc):
      tile = block_tile(k)
      x, dy, rstd, dh = block
      dyp, grad, xhat, xhat_s = m.grad_terms(x, dy, block_weight(tile), rstd)
      c = jnp.sum(grad * xhat, axis=-1) * inv_n
      if g.config.reload:
        dyp, grad, xhat, xhat_s = m.grad_terms(
            tile.load(x_ref, "evict_first"), tile.load(dy_ref, "evict_first"),
            block_weight(tile, "evict_last"), rstd)
        dh = tile.load(dh_ref, "evict_first") if has_dh else None
      write_dx(tile, xhat, grad, rstd, c, dh)
      return accumulate(acc, dyp, xhat_s)

    acc = _walk(g, load_block, work, (zeros, zeros))
    store_partials(_Tile(g, 0, 0, head), pid, acc)
    return

  r0 = pid * g.block_rows

  def chunk(i):
    return _Tile(g, r0, _multiple_of(i * g.block_cols, g.block_cols), head)

  rstd = _Tile(g, r0, 0, head).load_row_stat(rstd_ref)

  def dot_gx(i, acc):
    tile = chunk(i)
    _, grad, xhat, _ = m.grad_terms(tile.load(x_ref, "evict_last"),
                                    tile.load(dy_ref, "evict_last"),
                                    weight(tile), rstd)
    return acc + grad * xhat

  acc = lax.fori_loop(0, g.num_chunks, dot_gx,
                      jnp.zeros((g.block_rows, g.block_cols), _F32))
  c = jnp.sum(acc, axis=1) * inv_n

  def write(i, carry):
    tile = chunk(i)
    dh = tile.load(dh_ref, "evict_first") if has_dh else None
    dyp, grad, xhat, xhat_s = m.grad_terms(
        tile.load(x_ref, "evict_first"), tile.load(dy_ref, "evict_first"),
        weight(tile), rstd)
    write_dx(tile, xhat, grad, rstd, c, dh)
    store_partials(tile, pid, accumulate((zeros, zeros), dyp, xhat_s))
    return carry

  lax.fori_loop(0, g.num_chunks, write, 0)


def _backward_pieces(g: Geometry, m: _Math, has_dh, pid, head, inv_n, x_ref,
                     dy_ref, rstd_ref, dh_ref, weight, write_dx, accumulate,
                     store_partials):
  """The persistent whole-row backward in static column pieces.

  Rows wider than ``gpu_tiling.BWD_PIECE_COLS`` (with ``reload``): each
  row block is read piece by piece for the row reduction and again, from
  L2, for dx, and dscale (dbias) is one register accumulator per piece, so
  only one piece of x and dy is live beside the accumulators (a whole
  32768-wide row held 32 values of each per thread next to the accumulator
  and spilled).
  """
  width = gpu_tiling.BWD_PIECE_COLS
  pieces = g.block_cols // width
  pg = dataclasses.replace(
      g, config=dataclasses.replace(g.config, block_cols=width))
  zeros = jnp.zeros((g.block_rows, width), _F32)

  def piece(k, j):
    return _Tile(pg, (pid + k * g.grid) * g.block_rows, j * width, head,
                 mask_rows=g.rows_ragged)

  def step(k, accs):
    rstd = piece(k, 0).load_row_stat(rstd_ref)
    c = jnp.zeros((g.block_rows,), _F32)
    for j in range(pieces):
      tile = piece(k, j)
      _, grad, xhat, _ = m.grad_terms(tile.load(x_ref, "evict_last"),
                                      tile.load(dy_ref, "evict_last"),
                                      weight(tile), rstd)
      c = c + jnp.sum(grad * xhat, axis=1)
    c = c * inv_n
    out = []
    for j in range(pieces):
      tile = piece(k, j)
      dh = tile.load(dh_ref, "evict_first") if has_dh else None
      dyp, grad, xhat, xhat_s = m.grad_terms(
          tile.load(x_ref, "evict_first"), tile.load(dy_ref, "evict_first"),
          weight(tile, "evict_last"), rstd)
      write_dx(tile, xhat, grad, rstd, c, dh)
      out.append(accumulate(accs[j], dyp, xhat_s))
    return tuple(out)

  accs = lax.fori_loop(0, g.steps, step,
                       tuple((zeros, zeros) for _ in range(pieces)))
  for j in range(pieces):
    store_partials(piece(0, j), pid, accs[j])


def backward(x, scale, bias, rstd, dy, dh, *, config: Config,
             norm: base.Norm, interpret: bool = False, poison: bool = False):
  """Runs the backward kernel.

  Args:
    x: (rows, hidden) the normalized input (the updated residual h for the
      fused variant); dy: cotangent of y, (rows, hidden), any float dtype.
    scale: None, (hidden,) or per-head (heads, hidden); bias: None or
      (hidden,) (only its presence matters); rstd: float32 (rows,) from the
      forward.
    dh: None, or the cotangent of h (fused variant), added to dx.
    config: resolved tiling (``gpu_tiling.resolve``).

  Returns:
    ``(dx in x.dtype, dscale float32 of scale's shape or None, dbias
    float32 (hidden,) or None)``.
  """
  rows, hidden = x.shape
  heads = 1 if scale is None or scale.ndim == 1 else scale.shape[0]
  tokens = rows // heads
  # One layout (Geometry.row_itemsize) where the rows are read once: the
  # backward of bfloat16 x with a float32 dy (flax's default dtypes),
  # H200, us, before -> after: 8192x4096 84.2 -> 69.5, 4096x8192 80.0 ->
  # 70.0, 2048x8192 42.5 -> 37.0. Rows read again (reload, 16384 columns
  # and up) keep their layouts: there one layout spilled at 32 warps and
  # took 192.4 us against 182.3 at 4096x16384.
  g = Geometry(config, tokens, hidden, heads)
  if g.resident and not config.reload:
    g = dataclasses.replace(g, row_itemsize=max(
        a.dtype.itemsize for a in (x, dy, dh) if a is not None))
  m = _math(norm, x.dtype, scale, bias, interpret)
  has_dh = dh is not None
  out_shapes = [jax.ShapeDtypeStruct(_token_shape(g), x.dtype)]
  partial = jax.ShapeDtypeStruct(_token_shape(g, g.grid), _F32)
  out_shapes += [partial] * (int(m.has_scale) + int(m.has_bias))
  inputs = [_rows_view(x, g)]
  if scale is not None:
    inputs.append(_scale_view(scale, g))
  inputs += [rstd.reshape(tokens, heads), _rows_view(dy, g)]
  if has_dh:
    inputs.append(_rows_view(dh, g))
  outs = _call(_backward_kernel, inputs, out_shapes, g, poison, interpret,
               name="rmsnorm_" + ("residual_backward" if has_dh
                                  else "backward"),
               m=m, has_dh=has_dh)
  dx = outs[0].reshape(rows, hidden)
  rest = list(outs[1:])
  # The second step: column sums of (grid, heads * hidden) partials (or
  # (grid, heads, hidden) when folded), in a fixed order, small next to the
  # inputs.
  dscale = dbias = None
  if m.has_scale and m.has_bias and heads == 1:
    dscale, dbias = common.leading_sums(rest, scale.dtype)
    return dx, dscale, dbias
  if m.has_scale:
    dscale = jnp.sum(rest.pop(0), axis=0).reshape(scale.shape)
  if m.has_bias:
    dbias = jnp.sum(rest.pop(0).reshape(-1, hidden), axis=0)
  return dx, dscale, dbias


# ------------------------------------------------------------------ common --

# jax 0.11 deprecates Pallas' Triton backend: lowering a Triton kernel warns
# (a DeprecationWarning attributed to jax's pallas_call module). These
# kernels use it on purpose, where the Mosaic GPU ones are slower or do not
# run (docs/mosaic_gpu.md); the warning asks this library to act, and left
# in, a user's suite run with -W error::DeprecationWarning would fail in any
# model that calls it. Every compiled trace puts an "ignore" filter for that
# message from that module first in the filter list. Python's filters
# cannot tell this library's kernels from other Triton kernels lowered in
# the same process, which stop warning too.
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
_TRITON_DEPRECATION_MODULE = r"jax\._src\.pallas\.pallas_call"


def _quiet_triton_deprecation(interpret: bool):
  if not interpret:
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION,
                            category=DeprecationWarning,
                            module=_TRITON_DEPRECATION_MODULE)


def _call(kernel, inputs, out_shapes, g: Geometry, poison: bool,
          interpret: bool, *, name, **kernel_kwargs):
  n_alias = len(out_shapes) if poison else 0
  aliases = {}
  if poison:
    # Outputs start as NaN: an element the kernel never writes stays NaN
    # (int8 outputs, which have no NaN, start at the invalid -128).
    poison_bufs = [jnp.full(s.shape, jnp.nan if jnp.issubdtype(
        s.dtype, jnp.floating) else -128, s.dtype) for s in out_shapes]
    aliases = {len(inputs) + i: i for i in range(n_alias)}
    inputs = list(inputs) + poison_bufs
  _quiet_triton_deprecation(interpret)
  body = functools.partial(kernel, g=g, n_alias=n_alias, **kernel_kwargs)
  grid = (g.grid,) if g.head_programs == 1 else (g.grid, g.head_programs)
  call = pl.pallas_call(
      body,
      out_shape=common.vary_like(tuple(out_shapes), inputs),
      grid=grid,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(
          num_warps=g.config.num_warps, num_stages=g.config.num_stages),
      interpret=interpret,
      name=name,
  )
  return call(*common.match_varying(inputs))
