"""Mosaic GPU (Hopper) backward and forward for rows too wide for
``MosaicGpu``'s plans.

The forward (``forward``, below the backward) writes y over x's row in
shared memory and copies it out from there (docs/mosaic_gpu.md, "Wide-row
forward"); the rest of this docstring is the backward's.

``mosaic_gpu_kernels.backward`` keeps the float32 dscale accumulator in
shared memory beside two pipeline stages of x, dy and dx, which caps 16-bit
rows at 12288 columns. Here each CTA (one warpgroup) carries its dscale
partial in registers instead, as the carry of ``plgpu.emit_pipeline``: a
row of ``hidden`` columns spreads over the warpgroup's 128 threads, so the
accumulator costs ``hidden / 128`` float32 registers per thread (128 at
16384 columns, under the 255 a thread may hold). Shared memory then holds
only the pipeline (``stages`` x (x, dy, dx) rows), the scale, the CTA's rstd
and Mosaic's cross-warp reduction scratch: for 16-bit rows of 16384 columns
2 x 96 KB + 32 KB + 1 KB + 1 KB, which fits the 227 KB (232448 bytes) a
Hopper block may use, since every allocation is rounded up to 1 KB.

One pipeline step is one row (x and dy in by TMA, dx out by TMA while the
next row loads). The fused residual backward (``dh`` given) reads dh as a
third input and writes dx over dh's row, copying it out from there, so it
needs no more shared memory than the plain backward: the step then waits
for that copy to have read the row before returning, since the pipeline
loads a later row into the buffer next. A row is read from shared memory
twice, in column chunks:
once for ``sum(g * x)``, once for dx and the dscale terms; DRAM sees each
input once. The arithmetic is the one of ``mosaic_gpu_kernels.backward``
(float32 throughout, each CTA summing its rows' ``dy * xhat`` in row order,
XLA summing the per-CTA partials in a fixed order): deterministic.

Served: x float32/bfloat16/float16 of shape (rows, hidden), any rows;
hidden a multiple of ``128 * vec`` columns (16-byte vectors: 1024 for
16-bit, 512 for float32) with at most ``MAX_CARRY_VALUES`` columns per
thread and two stages fitting shared memory: 16-bit rows up to 16384
columns (with a scale of at most 2 bytes), float32 rows up to 8192.
Wider rows split over a thread-block cluster of 2 or 4 CTAs (``split``),
each holding ``hidden / split`` columns; the row's ``sum(g * x)`` is then
exchanged between them (``_cluster_row_sum``): 16-bit rows up to 65536
columns, float32 up to 32768. ``shape_reason`` names the reason otherwise.

Registers: unrolled over a row's chunks, the compilers load every chunk of
the row ahead of its arithmetic, which beside the 128-register carry spilled
(H200, jax 0.11.2, 4096x16384 bf16: 255 registers and 772 bytes of spills
a thread, 279 us). An ``optimization_barrier`` on each chunk's results
(``fence="value"``) keeps one chunk live at a time (255 registers, no
spills: 124.8 us), and walking the first pass in a loop (``pass1_loop``)
took it to 110.1 us, against 146.6 for the Triton kernel (PallasGpu) and
93.2 for a copy of the same bytes; both are the defaults. A warpgroup
barrier per chunk instead (``fence="sync"``) still spilled. Writing the
plain backward's dx over dy's row too (no dx buffer: three stages at 16384
columns) was 3-4% slower (4096x16384 bf16 111.2 us against 107.5): the
wait for each row's copy out costs more than the third stage gains.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mu
from jax.experimental.pallas import mosaic_gpu as plgpu
# Mosaic GPU's own MLIR bindings (plgpu loads them already), for
# _cluster_row_sum: Pallas has no store of a register value into another
# CTA's shared memory.
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, llvm, nvvm, vector

from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.mosaic_gpu_kernels import Plan
from rmsnorm_jax.kernels.mosaic_gpu_kernels import _Cast
from rmsnorm_jax.kernels.mosaic_gpu_kernels import _view3
from rmsnorm_jax.kernels.mosaic_gpu_kernels import box_cols
from rmsnorm_jax.kernels.mosaic_gpu_kernels import load
from rmsnorm_jax.kernels.mosaic_gpu_kernels import run_kernel

_F32 = jnp.float32

SUPPORTED_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                    np.dtype(jnp.float16))
# Shared memory a Hopper block may opt into (H100/H200: 227 KB); Mosaic GPU
# refuses a kernel asking for more.
SMEM_LIMIT = 232448
# Pallas' Mosaic GPU lowering rounds every shared-memory allocation up to
# this many bytes.
SMEM_ALIGN = 1024
# One cross-warp row sum of a one-row group needs 4 warps x 32 lanes x 4
# bytes = 512 bytes; the allocation is a whole SMEM_ALIGN either way.
REDUCTION_SCRATCH = 1024
BARRIER_BYTES = 8
# float32 dscale values a thread may carry (the rest of its 255 registers
# hold a chunk of x, dy, the scale and the products).
MAX_CARRY_VALUES = 128
# float32 values per thread in one register chunk of a row.
CHUNK_VALUES = 16
MIN_STAGES = 2
MAX_STAGES = 4
# Rows per CTA: their rstd is one shared piece of at most SMEM_ALIGN bytes.
# More rows than SMs x this run more CTAs than SMs, in waves.
MAX_CTA_ROWS = 256
THREADS = 128  # one warpgroup
DEFAULT_NUM_SMS = gpu_tiling.DEFAULT_NUM_SMS
# Shared memory of one Hopper SM, of which each resident CTA also takes
# CTA_RESERVED_SMEM: what two CTAs a SM may each use (ctas_per_sm=2).
SM_SMEM = 233472
CTA_RESERVED_SMEM = 1024
# CTAs a row may be split over (a thread-block cluster, ``split``): each
# holds hidden / split columns and the row sums are exchanged through
# distributed shared memory (``_cluster_row_sum``).
SPLITS = (1, 2, 4)
# Clusters of 4 CTAs (one a SM, each with most of its shared memory) that
# an H200's 132 SMs hold at once: a grid of 32 ran in two waves (backward
# 1024x65536 bf16 219.2 us), one of 26 in one (143.7; 24 clusters 154.8).
# Scaled by the SM count on other GPUs. Clusters of 2 fill the SMs (64 of
# them: 125.6 us at 2048x32768 bf16, 57 clusters 133.9).
CLUSTERS4_PER_132_SMS = 26


def _align(n: int) -> int:
  return -(-n // SMEM_ALIGN) * SMEM_ALIGN


def smem_budget(ctas_per_sm: int) -> int:
  """Shared memory one CTA may use with ``ctas_per_sm`` CTAs resident on a
  Hopper SM."""
  if ctas_per_sm not in (1, 2):
    raise ValueError(f"ctas_per_sm must be 1 or 2; got {ctas_per_sm!r}.")
  return min(SMEM_LIMIT, SM_SMEM // ctas_per_sm - CTA_RESERVED_SMEM)


def _slot_count(split: int) -> int:
  # Two pipeline steps' worth of the cluster's row sums, after the two
  # mbarriers (8 bytes each) that count them in (_cluster_row_sum).
  return 2 * split + _BARRIER_WORDS if split > 1 else 0


def _slots_bytes(split: int) -> int:
  return _align(4 * _slot_count(split))


# The plain backward of 16-bit rows of this many columns splits them over 2
# CTAs by default, though one CTA holds them. H200, jax 0.11.2, us,
# benchmarks/mosaic_gpu_wide_timing.py --split --reps 10, 2 CTAs a row
# against 1: 2048x16384 f16 55.4 against 57.8, bf16 55.7 against 57.6,
# 4096x16384 bf16 106.0 against 107.2, 8192x16384 207.2 against 208.6. Not
# the fused backward (4096x16384 138.3 against 140.9, but 8192x16384 273.8
# against 271.6 and 2048x16384 f16 73.6 against 73.9), nor narrower rows
# (4096x14336 105.4 against 93.9, 4096x12288 86.3 against 80.7).
BWD_SPLIT2_COLS = 16384


def _max_clusters(sms: int, ctas_per_sm: int, split: int) -> int:
  """Clusters of ``split`` CTAs the grid holds at most: all at once on the
  SMs (``CLUSTERS4_PER_132_SMS`` for clusters of 4 CTAs)."""
  n = sms * ctas_per_sm // split
  if split == 4 and ctas_per_sm == 1:
    n = min(n, sms * CLUSTERS4_PER_132_SMS // 132)
  return max(1, n)


def _split_cols(hidden: int, split: int) -> int:
  """Columns each CTA of a row's cluster holds."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
  if hidden % split:
    raise ValueError(f"hidden={hidden} does not split into {split} equal "
                     "parts.")
  return hidden // split


def _row_plan(rows: int, hidden: int, *, chunk: int, vec: int, stages: int,
              steps: int, split: int) -> Plan:
  """The ``Plan`` of the wide kernels: one-row blocks and groups, ``steps``
  rows a cluster of ``split`` CTAs."""
  return Plan(rows=rows, hidden=hidden, block_rows=1, group_rows=1,
              chunk=chunk, vec=vec, kind="wide", lanes=32, stages=stages,
              grid=-(-rows // steps), steps=steps,
              k=box_cols(hidden // split), split=split)


def _more_arrays(scale_dtype, has_scale: bool, split: int) -> str:
  """The scale and the split, as the shared-memory errors name them."""
  return ((f", {np.dtype(scale_dtype).name} scale" if has_scale else "")
          + (f", {split} CTAs a row" if split > 1 else ""))


def _first_split(make, split: int | None, **overrides):
  """``make(split, **overrides)`` for the given split, or else for the first
  of ``SPLITS`` whose default launch (``make(split)``) plans: the fewest
  CTAs per row, whatever the overrides (which are then checked there).

  Raises:
    ValueError: naming why no split serves (the one-CTA reason first).
  """
  if split is not None:
    return make(split, **overrides)
  errors = []
  for sp in SPLITS:
    try:
      default = make(sp)
    except ValueError as e:
      errors.append(f"split={sp}: {e}")
      continue
    if all(v is None for v in overrides.values()):
      return default
    return make(sp, **overrides)
  raise ValueError("; ".join(errors))


# float32 words the two mbarriers of _cluster_row_sum take at the front of
# the slots.
_BARRIER_WORDS = 4


def _asm(args, text: str, constraints: str):
  llvm.inline_asm(ir.Type.parse("!llvm.void"), list(args), text, constraints,
                  has_side_effects=True)


def _scalar(fa):
  """The one value a thread holds of a (1,) array in a row layout."""
  reg = fa.registers.flat[0]
  return vector.extract(reg, dynamic_position=[],
                        static_position=[0] * ir.VectorType(reg.type).rank)


def _cluster_start(slots):
  """Readies ``slots`` for ``_cluster_row_sum``: one thread initialises its
  two mbarriers, then every thread arrives (relaxed) at the cluster barrier
  that the first exchange waits on, so that no CTA signals a peer's
  mbarrier before the peer has initialised it. Called once, at the start
  of the kernel, so that the wait overlaps the first loads."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def start(ctx, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    base = llvm.ptrtoint(i32, mu.memref_ptr(ref))
    one = mu.single_thread_predicate(mu.ThreadSubset.WARPGROUP)
    for b in range(2):
      _asm([one, arith.addi(base, mu.c(8 * b, i32))],
           "@$0 mbarrier.init.shared::cta.b64 [$1], 1;", "b,r")
    _asm([], "fence.mbarrier_init.release.cluster;", "~{memory}")
    nvvm.cluster_arrive_relaxed(aligned=True)

  start(slots)


def _cluster_row_sum(part, slots, step, split: int, row_layout):
  """The sum over a row's cluster of each CTA's partial row sum ``part``
  ((1,) float32 in ``row_layout``), added in rank order, so every CTA of the
  cluster gets the same bits.

  One thread of each CTA stores its partial into slot ``rank`` of every
  CTA's ``slots`` (distributed shared memory) with ``st.async``, which
  counts its 4 bytes in on the receiver's mbarrier; each CTA waits on its
  own mbarrier for the ``split`` partials, so no CTA waits for the whole
  cluster at a barrier (a cluster barrier a row cost more, docs/mosaic_gpu.md).
  Steps alternate between two mbarriers and two sets of slots
  (``step`` % 2): a CTA that runs ahead sends the next step's partials
  while a slower one still reads this one's; it cannot run two ahead, since
  it first waits for the slower one's next partial. ``slots`` must have been
  readied by ``_cluster_start``; the first step waits for the cluster
  barrier it arrived at.
  """
  if split == 1:
    return part

  def cluster_wait():
    @plgpu.inline_mgpu()
    def wait(ctx):
      del ctx
      nvvm.cluster_wait(aligned=True)
    wait()

  pl.when(step == 0)(cluster_wait)
  step_b = plgpu.layout_cast(
      jnp.broadcast_to(step.astype(jnp.int32), (1,)), row_layout)

  @plgpu.inline_mgpu(arg_types=(row_layout, row_layout, plgpu.RefType()))
  def exchange(ctx, p, s, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    val = arith.bitcast(i32, _scalar(p))
    s = _scalar(s)
    parity = arith.andi(s, mu.c(1, i32))
    phase = arith.andi(arith.shrui(s, mu.c(1, i32)), mu.c(1, i32))
    base = llvm.ptrtoint(i32, mu.memref_ptr(ref))
    bar = arith.addi(base, arith.muli(parity, mu.c(8, i32)))
    rank = arith.index_cast(i32, gpu.cluster_block_id(gpu.Dimension.x))
    slot = arith.addi(
        base, arith.muli(arith.addi(
            mu.c(_BARRIER_WORDS, i32),
            arith.addi(arith.muli(parity, mu.c(split, i32)), rank)),
            mu.c(4, i32)))
    one = mu.single_thread_predicate(mu.ThreadSubset.WARPGROUP)
    _asm([one, bar, mu.c(4 * split, i32)],
         "{\n .reg .b64 state;\n"
         " @$0 mbarrier.arrive.expect_tx.shared::cta.b64 state, [$1], $2;\n}",
         "b,r,r,~{memory}")
    for peer in range(split):
      _asm([one, slot, bar, mu.c(peer, i32), val],
           "{\n .reg .b32 ra, rb;\n"
           " @$0 mapa.shared::cluster.u32 ra, $1, $3;\n"
           " @$0 mapa.shared::cluster.u32 rb, $2, $3;\n"
           " @$0 st.async.shared::cluster.mbarrier::complete_tx::bytes.b32"
           " [ra], $4, [rb];\n}",
           "b,r,r,r,r,~{memory}")
    # The slots are read after this (acquire) wait; the memory clobber
    # keeps the compiler from loading them earlier.
    _asm([bar, phase],
         "{\n .reg .pred P1;\n LAB_WAIT:\n"
         " mbarrier.try_wait.parity.shared::cta.b64 P1, [$0], $1;\n"
         " @!P1 bra LAB_WAIT;\n}",
         "r,r,~{memory}")

  exchange(part, step_b, slots)
  base = _BARRIER_WORDS + (step % 2) * split
  total = slots[base]
  for j in range(1, split):
    total = total + slots[base + j]
  return plgpu.layout_cast(jnp.broadcast_to(total, (1,)), row_layout)


def _itemsize(dt) -> int:
  return np.dtype(dt).itemsize


def rstd_lead(cta_rows: int) -> int:
  """Rows of rstd a CTA may copy before its own: its copy starts on a
  16-byte boundary (the copy engine's alignment), up to 3 rows early when
  the rows a CTA are not a multiple of 4."""
  return 3 if cta_rows % 4 else 0


def rstd_rows(cta_rows: int) -> int:
  """Rows of rstd a CTA copies into shared memory: its own (and
  ``rstd_lead``'s), rounded up to whole 128-byte pieces (Mosaic GPU splits
  a copy over the warpgroup's 128 threads)."""
  return -(-(cta_rows + rstd_lead(cta_rows)) // 32) * 32


def smem_bytes(hidden: int, stages: int, rstd_rows: int, *, x_size: int,
               dy_size: int, scale_size: int | None, split: int = 1) -> int:
  """Shared memory of one CTA, as the Mosaic GPU lowering allocates it.

  Args:
    hidden: row width; stages: pipeline depth; rstd_rows: rows of rstd
      held (``rstd_rows(rows per CTA)``).
    x_size, dy_size: itemsizes of x (and dx) and dy.
    scale_size: the scale's itemsize, or None without a scale.
    split: CTAs sharing each row (each holds ``hidden // split`` columns,
      plus the cluster's row-sum slots).

  The third row buffer is dx's own, or the fused backward's dh, which dx
  overwrites: the same bytes.
  """
  cols = _split_cols(hidden, split)
  fixed = (_align(cols * scale_size) if scale_size else _align(128 * 4))
  # The cluster's row-sum slots follow the rstd rows in one allocation.
  fixed += _align(4 * (rstd_rows + _slot_count(split)))
  pipeline = sum(_align(stages * cols * s)
                 for s in (x_size, dy_size, x_size))
  # The dscale partial is staged through shared memory once the pipeline's
  # buffers are released.
  partial = _align(4 * cols) if scale_size else 0
  barriers = (2 + stages) * BARRIER_BYTES
  return fixed + max(pipeline + REDUCTION_SCRATCH, partial) + barriers


def _vector(hidden: int, itemsize: int) -> tuple[int, int]:
  """(elements per 16-byte vector, columns one pass of the warpgroup
  covers); hidden must be a multiple of the latter."""
  vec = 16 // itemsize
  unit = THREADS * vec
  if hidden % unit:
    raise ValueError(
        f"hidden={hidden} is not a multiple of {unit} columns (128 threads "
        f"of {vec}-element vectors).")
  return vec, unit


def _chunk(hidden: int, unit: int, chunk: int | None,
           max_values: int) -> int:
  """The columns of one register chunk: the override, checked, or the
  widest multiple of ``unit`` dividing hidden with at most ``max_values``
  float32 values a thread."""
  if chunk is None:
    chunk = unit
    while ((chunk * 2) // THREADS <= max_values
           and hidden % (chunk * 2) == 0):
      chunk *= 2
  elif chunk % unit or hidden % chunk:
    raise ValueError(f"chunk={chunk} must be a multiple of {unit} dividing "
                     f"hidden={hidden}.")
  return chunk


def _stages(need, stages: int | None, hidden: int, arrays: str,
            limit: int = SMEM_LIMIT) -> int:
  """The pipeline depth: the override, checked, or the deepest of
  MIN_STAGES..MAX_STAGES whose shared memory ``need(stages)`` fits
  ``limit`` bytes (``smem_budget``).

  Raises:
    ValueError: naming ``arrays`` (the rows' dtypes) and the bytes needed.
  """
  if stages is not None:
    if stages < 1 or need(stages) > limit:
      raise ValueError(f"stages={stages} does not fit {limit} bytes of "
                       f"shared memory at hidden={hidden}.")
    return stages
  st = next((s for s in range(MAX_STAGES, MIN_STAGES - 1, -1)
             if need(s) <= limit), None)
  if st is None:
    raise ValueError(
        f"rows of hidden={hidden} ({arrays}) need {need(MIN_STAGES)} bytes "
        f"of shared memory for {MIN_STAGES} pipeline stages; a CTA has "
        f"{limit}.")
  return st


def _split_default(hidden: int, x_size: int, dy_size: int,
                   scale_size: int | None, fused: bool) -> int | None:
  """The split ``plan`` launches by default where it is not the fewest
  CTAs that hold the row (``BWD_SPLIT2_COLS``), else None."""
  if (not fused and hidden == BWD_SPLIT2_COLS and x_size == dy_size == 2
      and (scale_size or 2) == 2):
    return 2
  return None


def plan(rows: int, hidden: int, *, x_dtype, dy_dtype=None, scale_dtype=None,
         has_scale: bool = True, sms: int = DEFAULT_NUM_SMS,
         stages: int | None = None, chunk: int | None = None,
         grid: int | None = None, split: int | None = None,
         ctas_per_sm: int = 1, fused: bool = False) -> Plan:
  """The launch of one ``backward`` call.

  Args:
    rows, hidden: the 2-D problem (the fused backward's dh, in x's dtype,
      takes the buffer dx would: the same shared memory).
    x_dtype: dtype of x (and dx); dy_dtype: of dy (default x's).
    scale_dtype: of the scale (default x's); has_scale: whether there is one.
    sms: SMs the persistent grid covers.
    stages, chunk, grid: overrides (timing sweeps); chunk is in columns of
      one CTA, grid counts clusters.
    split: CTAs sharing each row (``SPLITS``); default the fewest whose
      registers and shared memory hold their part, but 2 for the plain
      backward of 16-bit rows of ``BWD_SPLIT2_COLS`` columns.
    ctas_per_sm: CTAs resident per SM (1 or 2), as in ``forward_plan``.
    fused: the fused backward's launch (only the default split differs).

  Returns:
    A ``mosaic_gpu_kernels.Plan`` of one-row blocks and one-row groups.

  Raises:
    ValueError: the shape or an override cannot be served (the message says
      why).
  """
  if rows < 1 or hidden < 1:
    raise ValueError(f"empty problem: rows={rows}, hidden={hidden}.")
  dy_dtype = x_dtype if dy_dtype is None else dy_dtype
  scale_dtype = x_dtype if scale_dtype is None else scale_dtype
  xs, ds = _itemsize(x_dtype), _itemsize(dy_dtype)
  ws = _itemsize(scale_dtype) if has_scale else None
  limit = smem_budget(ctas_per_sm)

  def make(sp, stages=None, chunk=None):
    cols = _split_cols(hidden, sp)
    vec, unit = _vector(cols, max(xs, ds))
    if has_scale and cols // THREADS > MAX_CARRY_VALUES:
      raise ValueError(
          f"rows of hidden={hidden} need {cols // THREADS} float32 dscale "
          f"registers per thread; at most {MAX_CARRY_VALUES} are carried.")
    if (cols * min(xs, ds, ws or 4)) % 128:
      raise ValueError(f"rows of hidden={hidden} are not whole 128-byte "
                       "pieces for the copy engine.")
    ch = _chunk(cols, unit, chunk, CHUNK_VALUES)
    g = grid or min(rows, _max_clusters(sms, ctas_per_sm, sp))
    # Rows a cluster: as even as the grid allows (a multiple of 4 had left
    # 36 of 132 SMs idle at 384 rows: 48 clusters of 8 rows, not 64 of 6).
    steps = min(-(-rows // g), MAX_CTA_ROWS)
    if steps + rstd_lead(steps) > MAX_CTA_ROWS:
      # The rstd piece stays one copy of at most MAX_CTA_ROWS rows.
      steps = MAX_CTA_ROWS
    st = _stages(
        lambda st: smem_bytes(hidden, st, rstd_rows(steps), x_size=xs,
                              dy_size=ds, scale_size=ws, split=sp),
        stages, hidden,
        f"{np.dtype(x_dtype).name} x and dx, {np.dtype(dy_dtype).name} dy"
        + _more_arrays(scale_dtype, has_scale, sp), limit)
    return _row_plan(rows, hidden, chunk=ch, vec=vec, stages=st,
                     steps=steps, split=sp)

  preferred = None if split is not None else _split_default(
      hidden, xs, ds, ws, fused)
  if preferred is not None:
    try:
      return make(preferred, stages=stages, chunk=chunk)
    except ValueError:
      pass  # an override that only the fewest CTAs serve
  return _first_split(make, split, stages=stages, chunk=chunk)


def shape_reason(rows: int, hidden: int, dtype, scale_dtype=None,
                 has_scale: bool = True) -> str | None:
  """Why ``backward`` cannot serve this call, or None when it can.

  Args:
    rows, hidden: the 2-D problem; dtype: of x and dy.
    scale_dtype: of the scale (default dtype); has_scale: whether there is
      one.
  """
  for name, dt in (("x", dtype), ("scale", scale_dtype)):
    if dt is not None and np.dtype(dt) not in SUPPORTED_DTYPES:
      return (f"{name} dtype {np.dtype(dt).name} is not float32, bfloat16 "
              "or float16")
  try:
    plan(rows, hidden, x_dtype=dtype, scale_dtype=scale_dtype,
         has_scale=has_scale)
  except ValueError as e:
    return str(e)
  return None


def _scale_row(cast, w_s, c, offset: float):
  """Chunk ``c`` of the scale (held as ``(chunks, chunk)`` in shared memory)
  plus ``offset``, float32, in the layout of one row's chunk."""
  # Read straight into the layout of one row (a column vector broadcast to
  # one row fails jax 0.11's layout inference;
  # mosaic_gpu_kernels.Plan.row_scale).
  w = load(w_s, (pl.ds(c, 1), slice(None)), layout=cast.full,
           optimized=False).astype(_F32)
  return w + offset if offset else w


def _check_arrays(x, scale, **like_x):
  """``(rows, hidden)`` of x, once x is 2-D, x, the scale and the arrays
  ``like_x`` (by name, None for absent) have supported dtypes, those arrays
  have x's shape and the scale is ``(hidden,)``.

  Raises:
    TypeError: an unsupported dtype, naming the array.
    ValueError: a shape that disagrees, naming the array.
  """
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"x must be 2-D (rows, hidden); got shape "
                     f"{getattr(x, 'shape', None)}.")
  rows, hidden = x.shape
  for name, a in (("x", x), *like_x.items(), ("scale", scale)):
    if a is not None and np.dtype(a.dtype) not in SUPPORTED_DTYPES:
      raise TypeError(f"{name} must be float32, bfloat16 or float16; got "
                      f"{name} of dtype {a.dtype} and shape {a.shape}.")
  for name, a in like_x.items():
    if a is not None and tuple(a.shape) != (rows, hidden):
      raise ValueError(f"{name} must have x's shape {(rows, hidden)}; got "
                       f"{tuple(a.shape)}.")
  if scale is not None and tuple(scale.shape) != (hidden,):
    raise ValueError(f"scale must have shape {(hidden,)}; got "
                     f"{tuple(scale.shape)}.")
  return rows, hidden


def _kernel_call(x, scale, rstd, dy, dh, *, plan: Plan, offset: float,
                 overlap_scale: bool, fence: str | None, pass1_loop: bool):
  rows, hidden = x.shape
  has_scale, has_dh = scale is not None, dh is not None
  split = plan.split
  cols = hidden // split
  k, C = plan.k, plan.chunk
  nch = cols // C
  cta_rows = plan.cta_rows
  load_rows = rstd_rows(cta_rows)
  inv_h = 1.0 / hidden
  shape = (1, C)
  rows_pad = -(-rows // 4) * 4
  if rows_pad != rows:
    # The rstd pieces read into shared memory are 16-byte multiples.
    rstd = jnp.pad(rstd, (0, rows_pad - rows))
  out_types = [jax.ShapeDtypeStruct((rows, hidden // k, k), x.dtype)]
  if has_scale:
    out_types.append(jax.ShapeDtypeStruct((plan.grid, split, nch, C), _F32))
  # Rows are viewed as (chunks, chunk) in shared memory: a chunk is then a
  # contiguous one-row slice, which every Mosaic GPU release loads (a
  # (1, chunk) slice of a (1, hidden) view does not lower in jax 0.10).
  scratch = [plgpu.SMEM((nch, C) if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier(),
             plgpu.SMEM((load_rows + _slot_count(split),), _F32),
             plgpu.Barrier()]

  def kernel(*refs):
    it = iter(refs)
    x_g, dy_g = next(it), next(it)
    dh_g = next(it) if has_dh else None
    rstd_g = next(it)
    w_g = next(it) if has_scale else None
    dx_g = next(it)
    part_g = next(it) if has_scale else None
    w_s, bar, rst_s, rbar = next(it), next(it), next(it), next(it)
    slots = rst_s.at[pl.ds(load_rows, _slot_count(split))] if (
        split > 1) else None
    if split > 1:
      _cluster_start(slots)
    cast = _Cast(plan)
    cta = lax.axis_index("cta")
    # This CTA's columns of each row: piece ``rank`` of the row's cluster,
    # whose CTAs all walk the same rows.
    rank = lax.axis_index("cluster") if split > 1 else 0
    # The last CTA's piece may reach past the end of rstd: the copy engine
    # stops at the end, and those rows are never read. It starts on a
    # 16-byte boundary, ``lead`` rows before the CTA's first (rstd_lead).
    first = cta * cta_rows
    lead = lax.rem(first, 4) if rstd_lead(cta_rows) else 0
    plgpu.copy_gmem_to_smem(rstd_g.at[pl.ds(first - lead, load_rows)],
                            rst_s.at[pl.ds(0, load_rows)], rbar,
                            oob_mode=plgpu.OOBFillMode.UNDEFINED)
    if has_scale:
      plgpu.copy_gmem_to_smem(w_g.at[rank], w_s, bar,
                              oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

    def wait_inputs():
      plgpu.barrier_wait(rbar)
      if has_scale:
        plgpu.barrier_wait(bar)

    if not overlap_scale:
      wait_inputs()
    b0 = cta * plan.steps
    n = jnp.minimum(plan.steps, rows - b0)
    block = pl.BlockSpec((1, cols // k, k), lambda s: (b0 + s, rank, 0))

    def scale_chunk(c):
      return _scale_row(cast, w_s, c, offset) if has_scale else None

    def _fenced(v):
      # Keeps the compilers from loading later chunks of the row ahead of
      # this chunk's arithmetic (which holds the whole row in registers
      # beside the dscale carry, and spills; module docstring).
      if fence == "value":
        return lax.optimization_barrier(v)
      if fence == "sync":
        plgpu.commit_smem()
      return v

    def body(idx, x_b, dy_b, dx_b, carry=None):
      # dx_b: dx's own output buffer, or (fused) dh's row, which dx
      # overwrites: a fourth row buffer would not fit beside x, dy and dh.
      if overlap_scale:
        # The scale and rstd copies run beside the pipeline's first loads.
        pl.when(idx[0] == 0)(wait_inputs)
      x2 = x_b.reshape(nch, C)
      dy2 = dy_b.reshape(nch, C)
      dx2 = dx_b.reshape(nch, C)
      full = slice(None)
      # A one-element vector load has no tiled transfer; a scalar does.
      r = plgpu.layout_cast(jnp.broadcast_to(rst_s[lead + idx[0]], (1,)),
                            cast.row)
      rb = cast.rows_b(r, shape)
      def dot_chunk(c, acc):
        row = pl.ds(c, 1)
        gc = cast.load(dy2, row, full)
        w = scale_chunk(c)
        if w is not None:
          gc = gc * w
        t = gc * cast.load(x2, row, full)
        return t if acc is None else acc + t

      if pass1_loop:
        acc = lax.fori_loop(
            0, nch, dot_chunk,
            plgpu.layout_cast(jnp.zeros(shape, _F32), cast.full))
      else:
        acc = None
        for c in range(nch):
          acc = _fenced(dot_chunk(c, acc))
      # mean(g * xhat) = rstd * mean(g * x): the projection the norm removes.
      dot = _cluster_row_sum(jnp.sum(acc, axis=1), slots, idx[0], split,
                             cast.row)
      proj = cast.rows_b(dot * r * inv_h, shape)
      new = []
      for c in range(nch):
        row = pl.ds(c, 1)
        dyc = cast.load(dy2, row, full)
        xhat = cast.load(x2, row, full) * rb
        w = scale_chunk(c)
        gc = dyc if w is None else dyc * w
        dx = rb * (gc - xhat * proj)
        if has_dh:
          # Each thread reads back only what it wrote (same layout), so
          # dh's chunk is read before dx replaces it.
          dx = dx + cast.load(dx2, row, full)
        if has_scale:
          dx, acc_c = _fenced((dx, carry[c] + dyc * xhat))
          new.append(acc_c)
        else:
          dx = _fenced(dx)
        dx2[row, full] = dx.astype(dx2.dtype)
      if has_dh:
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            dx_b, dx_g.at[pl.ds(b0 + idx[0], 1),
                          pl.ds(rank * (cols // k), cols // k)])
        # The pipeline loads a later row into this buffer as soon as the
        # step returns: the copy out must have read it by then.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return new if has_scale else None

    ins = (x_g, dy_g) + ((dh_g,) if has_dh else ())
    outs = () if has_dh else (dx_g,)
    pipe = dict(grid=(n,), in_specs=[block] * len(ins),
                out_specs=[block] * len(outs),
                max_concurrent_steps=plan.stages)
    if has_scale:
      zero = [plgpu.layout_cast(jnp.zeros(shape, _F32), cast.full)
              for _ in range(nch)]
      final = plgpu.emit_pipeline(body, init_carry=zero, **pipe)(*ins, *outs)

      def store_partial(acc_s):
        for c in range(nch):
          acc_s[pl.ds(c, 1), :] = final[c]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_s, part_g.at[cta, rank])
        plgpu.wait_smem_to_gmem(0)

      # The pipeline's buffers are released by now: this reuses them.
      pl.run_scoped(store_partial, plgpu.SMEM((nch, C), _F32))
    else:
      plgpu.emit_pipeline(body, **pipe)(*ins, *outs)
      if has_dh:
        plgpu.wait_smem_to_gmem(0)

  args = [_view3(x, k), _view3(dy, k)]
  if has_dh:
    args.append(_view3(dh, k))
  args.append(rstd)
  if has_scale:
    args.append(scale.reshape(split, nch, C))
  outs = run_kernel(kernel, args, out_types=out_types, scratch=scratch,
                    grid=plan.grid, reduction_scratch=REDUCTION_SCRATCH,
                    cluster=split)
  dx = outs[0].reshape(rows, hidden)
  if not has_scale:
    return dx, None
  partials = outs[1].reshape(plan.grid, hidden)
  dscale = partials[0] if plan.grid == 1 else jnp.sum(partials, axis=0)
  return dx, dscale


def backward(x, scale, rstd, dy, dh=None, *, scale_offset: float = 0.0,
             num_sms: int | None = None, stages: int | None = None,
             chunk: int | None = None, grid: int | None = None,
             overlap_scale: bool = True, fence: str | None = "value",
             pass1_loop: bool = True, split: int | None = None,
             ctas_per_sm: int = 1):
  """RMSNorm backward of wide rows on Hopper: ``(dx, dscale)``; with ``dh``,
  the fused residual backward.

  ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * (scale +
  scale_offset)`` and ``xhat = x * rstd``, plus ``dh`` when given (the
  cotangent of the fused forward's h, which then is x), in float32 and
  rounded once to x's dtype; ``dscale = sum over rows of dy * xhat``,
  float32, summed per CTA in row order and over CTAs by XLA in a fixed
  order (deterministic).

  Args:
    x: (rows, hidden) float32, bfloat16 or float16 (the fused forward's h).
    scale: None or (hidden,) float32/bfloat16/float16 (see ``plan`` for the
      shared-memory limit a float32 scale beside 16-bit rows meets).
    rstd: (rows,) float32, the forward's ``1 / sqrt(mean(x^2) + eps)``.
    dy: (rows, hidden) float32/bfloat16/float16, the cotangent of y.
    dh: None or (rows, hidden) in x's dtype, the cotangent of h; dx is
      written over its row in shared memory (so the fused backward fits
      where the plain one does).
    scale_offset: added to the scale (e.g. 1.0 for Gemma's ``1 + scale``).
    num_sms: SMs the grid covers (default: the device's, else 132).
    stages, chunk, grid: launch overrides for sweeps (``plan``).
    overlap_scale: wait for the scale and rstd copies at the first pipeline
      step rather than before the pipeline's first loads are issued.
    fence: None, "value" (``lax.optimization_barrier`` on each chunk's
      results) or "sync" (a warpgroup barrier after each chunk): keeps the
      compilers from loading later chunks of the row early, which holds the
      row in registers beside the dscale carry.
    pass1_loop: walk the chunks of ``sum(g * x)`` in a loop (dynamic chunk
      index) rather than unrolled.
    split: CTAs (a cluster) sharing each row (1, 2 or 4): each carries the
      dscale of its ``hidden // split`` columns and the row's ``sum(g * x)``
      is exchanged between them; default the fewest that fit.
    ctas_per_sm: CTAs resident per SM (1 or 2), see ``plan``.

  Returns:
    ``(dx in x.dtype (rows, hidden), dscale float32 (hidden,) or None)``.

  Raises:
    TypeError: an array of an unsupported dtype, or dh not in x's dtype.
    ValueError: shapes that disagree, or a shape ``plan`` cannot serve.
  """
  rows, hidden = _check_arrays(x, scale, dy=dy, dh=dh)
  if tuple(rstd.shape) != (rows,) or np.dtype(rstd.dtype) != np.float32:
    raise ValueError(f"rstd must be float32 of shape {(rows,)}; got "
                     f"{rstd.dtype} of shape {tuple(rstd.shape)}.")
  if dh is not None and dh.dtype != x.dtype:
    raise TypeError(f"dh must have x's dtype {x.dtype} (dx is written over "
                    f"it); got {dh.dtype}.")
  if fence not in (None, "value", "sync"):
    raise ValueError(f"fence must be None, 'value' or 'sync'; got {fence!r}.")
  sms = num_sms or gpu_tiling.num_sms()
  p = plan(rows, hidden, x_dtype=x.dtype, dy_dtype=dy.dtype,
           scale_dtype=None if scale is None else scale.dtype,
           has_scale=scale is not None, sms=sms, stages=stages, chunk=chunk,
           grid=grid, split=split, ctas_per_sm=ctas_per_sm,
           fused=dh is not None)
  return _kernel_call(x, scale, rstd, dy, dh, plan=p,
                      offset=float(scale_offset),
                      overlap_scale=overlap_scale, fence=fence,
                      pass1_loop=pass1_loop)


# ---------------------------------------------------------------- forward --
# The forward of wide rows stores its outputs from the inputs' own shared
# memory: y is written over the row of x, and (fused) h over the row of the
# residual, then copied out by TMA from there. Two stages of one input row
# each (64 KB at 32768 bfloat16 columns) beside the scale then fit where
# separate output buffers (256 KB) would not.
FWD_CHUNK_VALUES = 32
# rstd leaves each step as the first RSTD_COLS of a row-broadcast tile: the
# smallest copy the engine moves is 16 bytes, and neither a one-element
# vector nor a scalar from registers stores to shared memory in jax 0.11's
# Mosaic GPU (an unsatisfiable layout, or a failed transfer plan).
RSTD_COLS = 4
# One row a cluster (``per_row``): a grid of ``rows`` clusters, each CTA
# with one pipeline stage of its columns, so that the small CTAs of several
# rows share each SM and one's loads run while another reduces, exchanges
# its row sum and copies out: what the persistent grid, one row load in
# flight a SM, leaves idle. Each CTA then holds at most this many columns
# (the fewest CTAs a row that keep to it). H200, jax 0.11.2, us, one row a
# cluster against the persistent grid (and the Triton kernel), bf16: fused
# forward 4096x16384 (1 CTA a row) 133.6 against 143.0 (138.3), 2048x32768
# (2) 137.5 against 143.7 (142.7), 1024x65536 (4) 141.4 against 156.0
# (187.5); forward 1024x65536 (4) 80.6 against 83.0 (90.9). Level or
# slower: the forward of 2048x32768 (2 CTAs a row 76.9 against 76.0; 4
# CTAs 85.2) and of 4096x16384 (68.4 against 76.4 and Triton's 68.6), 8
# CTAs a row (97.7-105.2 at 2048x32768), two stages (85.7) or two rows a
# cluster (82.3). Narrower fused rows too: 4096x12288 bf16 (1 CTA a row)
# 100.9 against 109.9 (Triton 104.1), 2048x12288 f16 52.3 against 57.2
# (57.7), 2048x20480 bf16 (2) 89.0 against 91.0 (95.0). So ``per_row`` is
# the default for 16-bit rows (and a scale of at most 2 bytes) in the fused
# forward from PER_ROW_FUSED_MIN_COLS and in the forward from
# PER_ROW_MIN_COLS (at 20480-24576 columns the forward's persistent grid is
# level or ahead: 2048x20480 bf16 49.0 against 52.0).
# A CTA of one row holds the row's values in registers between its two
# passes: these CTAs issue from one warpgroup, 4-12 warps a SM, and Nsight
# Compute finds the issue slots 29-30% busy with one warp a scheduler
# (docs/gpu_profile_h200.md), so an instruction less an element is time.
# H200, us, held against read again from shared memory: forward 1024x65536
# bf16 78.1 against 79.5 and 512x65536 f16 41.5 against 41.9 (the
# benchmark); a sweep of one session 77.9 against 80.6; the fused forward
# level (the benchmark, seven shapes: 0.99-1.02x). Held on the persistent
# grid, whose CTAs loop over rows, the forward of 2048x32768 was slower
# (78.3 against 77.2): not kept. One row a cluster with the row held takes
# the forward of 2048x32768 bf16 from 75.0 to 73.2 but of 1024x32768 from
# 37.8 to 39.3 and of 512x32768 from 20.5 to 22.2 (not profiled), so the
# forward keeps the persistent grid from 17408 columns below
# PER_ROW_MIN_COLS on fewer than PER_ROW_WIDE_MIN_ROWS rows.
# With the row held, one row a CTA is the forward's default from
# PER_ROW_FWD_MIN_COLS to PER_ROW_CTA_COLS columns too (three CTAs of 168
# registers a thread a SM). H200, jax 0.11.2, us, against the Triton kernel
# "auto" ran there before: 4096x16384 bf16 66.6 against 68.7, 8192x16384
# 130.4 against 136.4, 4096x16384 f16 66.4 against 70.0, 4096x15360 bf16
# 61.8 against 65.8, 2048x13312 28.0 against 30.5, 4096x12288 52.4 against
# 54.2, 2048x12288 f16 27.9 against 29.0 (the benchmark and the timing
# script); at 8192 columns and fewer it is behind (8192x8192 bf16 68.0
# against 67.2, 2048x8192 f16 19.0 against 18.1, 8192x4096 35.7 against
# 34.7). Reading the scale into registers from global memory instead of
# shared memory (fewer bytes a CTA, more CTAs a SM) was slower at every
# width timed (forward 1024x65536 88.4 against 78.9, fused forward
# 4096x16384 142.5 against 133.6; early loads spilled or held 254
# registers): not kept.
# Between PER_ROW_CTA_COLS and PER_ROW_MIN_COLS columns (2 CTAs a row) the
# forward runs one row a cluster from PER_ROW_WIDE_MIN_ROWS rows: the
# timing script, H200, us, one row a cluster against the persistent grid:
# 32768 columns bf16 1536 rows 58.3 against 60.2, 2048 75.4 against 77.1,
# 4096 142.8 against 147.4, f16 2048 74.3 against 77.5, 4096 142.5 against
# 149.3; 4096x24576 109.6 against 114.9, 2048x24576 58.2 against 59.2,
# 4096x20480 94.5 against 95.8, 8192x20480 182.7 against 184.9; level at
# 2048x20480 (50.0 against 49.8) and behind on fewer rows (1024x32768 40.9
# against 40.5; 512x32768 23.1 against 22.1). Since the row sums travel by
# st.async and mbarriers instead of a cluster barrier (_cluster_row_sum)
# it is ahead on fewer rows too: 1024x32768 36.7 against 39.9, 512x32768
# 20.1 against 21.3, 1024x24576 27.8 against 31.0; so the bound is the
# least rows "auto" gives the wide forward at these widths
# (mosaic_gpu.AUTO_WIDE_FWD_MIN_ROWS).
PER_ROW_CTA_COLS = 16384
PER_ROW_FUSED_MIN_COLS = 12288
PER_ROW_MIN_COLS = 65536
PER_ROW_FWD_MIN_COLS = 12288
PER_ROW_WIDE_MIN_ROWS = 384


def _per_row_split(hidden: int, x_size: int) -> int | None:
  """The fewest CTAs a row (``SPLITS``) whose equal parts are whole
  16-byte vectors of the warpgroup and at most ``PER_ROW_CTA_COLS``
  columns; None if there is none."""
  unit = THREADS * (16 // x_size)
  return next((sp for sp in SPLITS if hidden % (sp * unit) == 0
               and hidden // sp <= PER_ROW_CTA_COLS), None)


def per_row_default(rows: int, hidden: int, x_size: int,
                    scale_size: int | None, has_residual: bool) -> bool:
  """Whether ``forward_plan`` launches one row a cluster by default (see
  ``PER_ROW_CTA_COLS``): the measured cases, where some split keeps each
  CTA's part to ``PER_ROW_CTA_COLS`` columns: 16-bit rows with a scale of
  at most 2 bytes, the fused forward from ``PER_ROW_FUSED_MIN_COLS``
  columns, the forward from ``PER_ROW_FWD_MIN_COLS`` to
  ``PER_ROW_CTA_COLS``, from ``PER_ROW_MIN_COLS``, and in between on
  ``PER_ROW_WIDE_MIN_ROWS`` rows or more."""
  if has_residual:
    wide_enough = hidden >= PER_ROW_FUSED_MIN_COLS
  else:
    wide_enough = (hidden >= PER_ROW_MIN_COLS
                   or PER_ROW_FWD_MIN_COLS <= hidden <= PER_ROW_CTA_COLS
                   or (hidden > PER_ROW_CTA_COLS
                       and rows >= PER_ROW_WIDE_MIN_ROWS))
  return (x_size == 2 and (scale_size or 0) <= 2 and wide_enough
          and _per_row_split(hidden, x_size) is not None)


def forward_smem_bytes(hidden: int, stages: int, *, x_size: int,
                       scale_size: int | None, has_residual: bool,
                       split: int = 1) -> int:
  """Shared memory of one forward CTA, as the Mosaic GPU lowering allocates
  it: its ``hidden // split`` columns of the scale (or a placeholder), the
  row's rstd tile (``RSTD_COLS``), ``stages`` rows of x (and of the
  residual), the cross-warp reduction scratch, the cluster's row-sum slots
  and the barriers."""
  cols = _split_cols(hidden, split)
  fixed = (_align(cols * scale_size) if scale_size else _align(128 * 4))
  fixed += _align(4 * THREADS * (16 // x_size)) + _slots_bytes(split)
  n_in = 1 + has_residual
  pipeline = n_in * _align(stages * cols * x_size)
  barriers = (1 + stages) * BARRIER_BYTES
  return fixed + pipeline + REDUCTION_SCRATCH + barriers


def forward_plan(rows: int, hidden: int, *, x_dtype, scale_dtype=None,
                 has_scale: bool = True, has_residual: bool = False,
                 sms: int = DEFAULT_NUM_SMS, stages: int | None = None,
                 chunk: int | None = None, grid: int | None = None,
                 split: int | None = None, ctas_per_sm: int = 1,
                 per_row: bool | None = None) -> Plan:
  """The launch of one ``forward`` call.

  Args:
    rows, hidden: the 2-D problem.
    x_dtype: of x, the residual and y (the outputs overwrite the inputs'
      shared memory, so they share one dtype).
    scale_dtype: of the scale (default x's); has_scale: whether there is one.
    has_residual: the fused residual forward.
    sms: SMs the persistent grid covers.
    stages, chunk, grid: overrides (timing sweeps); chunk is in columns of
      one CTA, grid counts clusters.
    split: CTAs sharing each row (``SPLITS``); default the fewest that fit.
    ctas_per_sm: CTAs resident per SM (1 or 2): the grid covers ``sms *
      ctas_per_sm`` CTAs and each gets ``smem_budget(ctas_per_sm)`` bytes.
    per_row: one row a cluster (a grid of ``rows`` clusters, one pipeline
      stage unless ``stages`` says otherwise, and by default the fewest
      CTAs a row holding at most ``PER_ROW_CTA_COLS`` columns each); False:
      the persistent grid above. None: ``per_row_default`` when no launch
      override (split, stages, grid, ctas_per_sm) is given, else False.

  Returns:
    A ``mosaic_gpu_kernels.Plan`` of one-row blocks and one-row groups.

  Raises:
    ValueError: the shape or an override cannot be served, or ``grid`` or
      ``ctas_per_sm`` given with ``per_row=True`` (the message says why).
  """
  if rows < 1 or hidden < 1:
    raise ValueError(f"empty problem: rows={rows}, hidden={hidden}.")
  scale_dtype = x_dtype if scale_dtype is None else scale_dtype
  xs = _itemsize(x_dtype)
  ws = _itemsize(scale_dtype) if has_scale else None
  if per_row is None:
    per_row = (split is None and stages is None and grid is None
               and ctas_per_sm == 1
               and per_row_default(rows, hidden, xs, ws, has_residual))
  if per_row:
    if grid is not None or ctas_per_sm != 1:
      raise ValueError(f"per_row=True launches one cluster a row: grid "
                       f"({grid!r}) and ctas_per_sm ({ctas_per_sm!r}) do "
                       "not apply.")
    if split is None:
      split = _per_row_split(hidden, xs) or SPLITS[-1]
    stages = 1 if stages is None else stages
  # One row a cluster sizes no grid: each CTA may take a block's whole
  # shared memory, and the SM holds as many as fit.
  limit = SMEM_LIMIT if per_row else smem_budget(ctas_per_sm)

  def make(sp, stages=None, chunk=None):
    cols = _split_cols(hidden, sp)
    vec, unit = _vector(cols, xs)
    ch = _chunk(cols, unit, chunk, FWD_CHUNK_VALUES)
    steps = 1 if per_row else -(-rows // (
        grid or min(rows, _max_clusters(sms, ctas_per_sm, sp))))
    st = _stages(
        lambda st: forward_smem_bytes(hidden, st, x_size=xs, scale_size=ws,
                                      has_residual=has_residual, split=sp),
        stages, hidden,
        np.dtype(x_dtype).name
        + (" x and residual" if has_residual else " x")
        + _more_arrays(scale_dtype, has_scale, sp), limit)
    return _row_plan(rows, hidden, chunk=ch, vec=vec, stages=st,
                     steps=steps, split=sp)

  return _first_split(make, split, stages=stages, chunk=chunk)


def forward_shape_reason(rows: int, hidden: int, dtype, scale_dtype=None,
                         has_scale: bool = True, has_residual: bool = False,
                         out_dtype=None, residual_dtype=None) -> str | None:
  """Why ``forward`` cannot serve this call, or None when it can.

  Args:
    rows, hidden: the 2-D problem; dtype: of x.
    scale_dtype: of the scale (default dtype); has_scale: whether there is
      one; has_residual: the fused forward.
    out_dtype, residual_dtype: of y and of the residual (default dtype).
  """
  for name, dt in (("x", dtype), ("scale", scale_dtype)):
    if dt is not None and np.dtype(dt) not in SUPPORTED_DTYPES:
      return (f"{name} dtype {np.dtype(dt).name} is not float32, bfloat16 "
              "or float16")
  for name, dt in (("out_dtype", out_dtype),
                   ("residual dtype", residual_dtype)):
    if dt is not None and np.dtype(dt) != np.dtype(dtype):
      return (f"{name} {np.dtype(dt).name} differs from x's "
              f"{np.dtype(dtype).name} (the output is written over the "
              "input's shared memory)")
  try:
    forward_plan(rows, hidden, x_dtype=dtype, scale_dtype=scale_dtype,
                 has_scale=has_scale, has_residual=has_residual)
  except ValueError as e:
    return str(e)
  return None


def _forward_call(x, residual, scale, *, plan: Plan, eps: float,
                  offset: float, store_chunks: bool):
  rows, hidden = x.shape
  has_scale, has_res = scale is not None, residual is not None
  split = plan.split
  cols = hidden // split
  k, C = plan.k, plan.chunk
  nch = cols // C
  inv_h = 1.0 / hidden
  shape = (1, C)
  tile = (1, THREADS * plan.vec)
  # A CTA of one row (one row a cluster) keeps the row's values in
  # registers, in x's dtype, between the sum of squares and y; one that
  # loops over rows reads them again from shared memory (see
  # PER_ROW_CTA_COLS).
  hold = plan.steps == 1
  view = jax.ShapeDtypeStruct((rows, hidden // k, k), x.dtype)
  out_types = [view] + ([view] if has_res else []) + [
      jax.ShapeDtypeStruct((rows, RSTD_COLS), _F32)]
  scratch = [plgpu.SMEM((nch, C) if has_scale else (128,),
                        scale.dtype if has_scale else _F32),
             plgpu.Barrier(),
             plgpu.SMEM(tile, _F32)]
  if split > 1:
    scratch.append(plgpu.SMEM((_slot_count(split),), _F32))

  def kernel(*refs):
    it = iter(refs)
    x_g = next(it)
    r_g = next(it) if has_res else None
    w_g = next(it) if has_scale else None
    y_g = next(it)
    h_g = next(it) if has_res else None
    rstd_g = next(it)
    w_s, bar, rst_s = next(it), next(it), next(it)
    slots = next(it) if split > 1 else None
    if split > 1:
      _cluster_start(slots)
    cast = _Cast(plan)
    cta = lax.axis_index("cta")
    # This CTA's columns of each row: piece ``rank`` of the row's cluster.
    rank = lax.axis_index("cluster") if split > 1 else 0
    if has_scale:
      plgpu.copy_gmem_to_smem(w_g.at[rank], w_s, bar,
                              oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    b0 = cta * plan.steps
    n = jnp.minimum(plan.steps, rows - b0)
    block = pl.BlockSpec((1, cols // k, k), lambda s: (b0 + s, rank, 0))
    mine = pl.ds(rank * (cols // k), cols // k)
    full = slice(None)

    def body(idx, x_b, r_b=None):
      if has_scale:
        # The scale's copy runs beside the pipeline's first loads.
        pl.when(idx[0] == 0)(lambda: plgpu.barrier_wait(bar))
      row = pl.ds(b0 + idx[0], 1)
      x2 = x_b.reshape(nch, C)
      r2 = r_b.reshape(nch, C) if has_res else None

      def square(c, acc, held=None):
        sl = pl.ds(c, 1)
        v = plgpu.layout_cast(x2[sl, full], cast.full)
        if has_res:
          v = (v.astype(_F32) + cast.load(r2, sl, full)).astype(r2.dtype)
          # Each thread reads back only what it wrote (same layout).
          r2[sl, full] = v
        if held is not None:
          held.append(v)
        v = v.astype(_F32)
        return acc + v * v

      zero = plgpu.layout_cast(jnp.zeros(shape, _F32), cast.full)
      held = [] if hold else None
      if hold:
        # Unrolled, so that each chunk's values stay in registers for y.
        acc = zero
        for c in range(nch):
          acc = square(c, acc, held)
      else:
        acc = lax.fori_loop(0, nch, square, zero)
      sumsq = _cluster_row_sum(jnp.sum(acc, axis=1), slots, idx[0],
                               split, cast.row)
      rstd = lax.rsqrt(sumsq * inv_h + eps)
      rst_s[...] = cast.rows_b(rstd, tile)
      if has_res:
        # h leaves while y is computed.
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(r_b, h_g.at[row, mine])
      rb = cast.rows_b(rstd, shape)
      for c in range(nch):
        # Unrolled: a store at a dynamic chunk index does not lower. The
        # barrier keeps the compilers from loading later chunks early
        # (``backward``'s ``fence``).
        sl = pl.ds(c, 1)
        v = (held[c].astype(_F32) if hold
             else cast.load(r2 if has_res else x2, sl, full))
        y = v * rb
        if has_scale:
          y = y * _scale_row(cast, w_s, c, offset)
        x2[sl, full] = lax.optimization_barrier(y).astype(x2.dtype)
        if store_chunks:
          # Each chunk leaves as soon as it is written, so that little is
          # left to drain when the step ends.
          plgpu.commit_smem()
          piece = pl.ds(c * (C // k), C // k)
          plgpu.copy_smem_to_gmem(
              x_b.at[:, piece],
              y_g.at[row, pl.ds(rank * (cols // k) + c * (C // k), C // k)])
      plgpu.commit_smem()
      if not store_chunks:
        plgpu.copy_smem_to_gmem(x_b, y_g.at[row, mine])

      def store_rstd():
        plgpu.copy_smem_to_gmem(rst_s.at[:, pl.ds(0, RSTD_COLS)],
                                rstd_g.at[row])

      if split > 1:
        # The cluster's CTAs hold the same rstd: one of them copies it out.
        pl.when(rank == 0)(store_rstd)
      else:
        store_rstd()
      # The pipeline loads the row after next into these buffers as soon as
      # this step returns, and the next step rewrites rst_s: the copies out
      # must have read them by then.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    plgpu.emit_pipeline(
        body, grid=(n,), in_specs=[block] * (1 + has_res),
        max_concurrent_steps=plan.stages)(
            *((x_g, r_g) if has_res else (x_g,)))
    plgpu.wait_smem_to_gmem(0)

  args = [_view3(x, k)] + ([_view3(residual, k)] if has_res else [])
  if has_scale:
    args.append(scale.reshape(split, nch, C))
  outs = list(run_kernel(kernel, args, out_types=out_types, scratch=scratch,
                         grid=plan.grid, reduction_scratch=REDUCTION_SCRATCH,
                         cluster=split))
  outs[0] = outs[0].reshape(rows, hidden)
  if has_res:
    outs[1] = outs[1].reshape(rows, hidden)
  outs[-1] = outs[-1][:, 0]
  return tuple(outs)


def forward(x, scale, residual=None, *, eps: float = 1e-6,
            scale_offset: float = 0.0, num_sms: int | None = None,
            stages: int | None = None, chunk: int | None = None,
            grid: int | None = None, store_chunks: bool = False,
            split: int | None = None, ctas_per_sm: int = 1,
            per_row: bool | None = None):
  """RMSNorm forward of wide rows on Hopper: ``(y, rstd)`` or, with a
  residual, ``(y, h, rstd)``.

  ``h = x + residual`` (rounded to the residual's dtype) when a residual is
  given, else ``h = x``; ``rstd = 1 / sqrt(mean(h^2) + eps)`` and ``y = h *
  rstd * (scale + scale_offset)``, float32 throughout, rounded once to x's
  dtype. Each row's sum of squares runs in column chunks in a fixed order;
  split over a cluster of CTAs, each CTA's partial sums are added in rank
  order (deterministic).

  Args:
    x: (rows, hidden) float32, bfloat16 or float16.
    scale: None or (hidden,) float32/bfloat16/float16.
    residual: None or (rows, hidden) in x's dtype.
    eps: added to the mean square; scale_offset: added to the scale (1.0
      for Gemma's ``1 + scale``).
    num_sms: SMs the grid covers (default: the device's, else 132).
    stages, chunk, grid: launch overrides for sweeps (``forward_plan``).
    store_chunks: copy y out chunk by chunk as it is written, rather than
      the whole row at the end of the step.
    split: CTAs (a cluster) sharing each row (1, 2 or 4); default the fewest
      whose shared memory holds the row's part.
    ctas_per_sm: CTAs resident per SM (1 or 2), see ``forward_plan``.
    per_row: one row a cluster, see ``forward_plan`` (None: its default).

  Returns:
    y (rows, hidden) in x's dtype, h likewise (with a residual), and rstd
    float32 (rows,).

  Raises:
    TypeError: an array of an unsupported dtype, or a residual whose dtype
      is not x's.
    ValueError: shapes that disagree, or a shape ``forward_plan`` cannot
      serve.
  """
  rows, hidden = _check_arrays(x, scale, residual=residual)
  if residual is not None and residual.dtype != x.dtype:
    raise TypeError(f"residual must have x's dtype {x.dtype} (h is "
                    f"written over it); got {residual.dtype}.")
  sms = num_sms or gpu_tiling.num_sms()
  p = forward_plan(rows, hidden, x_dtype=x.dtype,
                   scale_dtype=None if scale is None else scale.dtype,
                   has_scale=scale is not None,
                   has_residual=residual is not None, sms=sms,
                   stages=stages, chunk=chunk, grid=grid, split=split,
                   ctas_per_sm=ctas_per_sm, per_row=per_row)
  return _forward_call(x, residual, scale, plan=p, eps=float(eps),
                       offset=float(scale_offset), store_chunks=store_chunks)


__all__ = ["backward", "forward", "forward_plan", "forward_shape_reason",
           "forward_smem_bytes", "per_row_default", "plan", "rstd_rows",
           "shape_reason", "smem_bytes"]
