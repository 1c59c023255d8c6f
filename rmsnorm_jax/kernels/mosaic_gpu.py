"""``MosaicGpu``: RMSNorm kernels on Pallas' Mosaic GPU backend, for Hopper.

The same five primitives as ``PallasGpu`` (forward, backward, fused residual
forward and backward, quantized forward), each one pass over its inputs,
with or without a bias, written with
``jax.experimental.pallas.mosaic_gpu``: persistent CTAs stream row blocks
through shared memory with TMA (``plgpu.emit_pipeline``), compute in float32
registers and store back with TMA. Kernel bodies and the layouts are in
``mosaic_gpu_kernels.py``; measurements in docs/mosaic_gpu.md.

Checked on an H200 with jax 0.11.2 against XLA on every op, dtype and
layout (``benchmarks/mosaic_gpu_timing.py --check``).

Served shapes (``cannot_serve`` / ``shape_reason`` name the reason
otherwise): Hopper only (a visible GPU of another compute capability is
declined); hidden a multiple of 8 whose rows are whole 128-byte pieces
(64 columns for 16-bit, 32 for float32) and whose row blocks fit shared
memory with two pipeline stages: for 16-bit inputs the forward and backward
up to 12288 columns, the fused forward up to 6144, the fused backward up to
9216; for float32 the forward up to 6144, the backward 6656, the fused
forward 3072, the fused backward 5120. The plain backward (no bias, cast
mode "float32", dy in x's dtype) of 16-bit rows from ``WIDE_BWD_MIN_COLS``
columns up to 65536, and of float32 rows too wide for the plans here (up to
32768), runs ``mosaic_gpu_wide.backward``, which carries dscale in registers
instead of shared memory (rows over 16384 16-bit or 8192 float32 columns
split over a cluster of 2 or 4 CTAs); so does the plain fused backward of
rows the plans here cannot hold (the same widths), with dx written over
dh's row. The plain forward and fused forward (the same restrictions, every
array in x's dtype) of rows the plans here cannot hold run
``mosaic_gpu_wide.forward``, which writes y over x's shared memory: both
up to 65536 16-bit columns, split over a cluster of 2 or 4 CTAs where one
does not hold the row (the fused forward from 12288 16-bit columns and the
forward at 12288-16384 and 65536, and in between on 384 rows or more,
launch one row a cluster: ``mosaic_gpu_wide.per_row_default``; the
forward of 12288 16-bit columns runs it too, though the plans here hold
such rows). Other ops on rows that wide are left to ``PallasGpu``. The
quantized forward writes 1-byte rows, so it needs hidden a multiple of
128, and is planned as the forward with a float32 y (whose values it
quantizes). The per-head scale
(``Plan.head_rows``) and cast_mode "llama" (``mk.Arith``) are served by
every op.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import mosaic_gpu_kernels as mk
from rmsnorm_jax.kernels import mosaic_gpu_wide as mw

SUPPORTED_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                    np.dtype(jnp.float16))

# Shared memory a CTA may use for its pipeline buffers, scale and dscale
# accumulator (the H100/H200 limit is 227 KB per block; a few KB stay for
# barriers and the cross-warp reduction scratch).
SMEM_BUDGET = 220 * 1024
REDUCTION_SCRATCH = 2048
# Copies into shared memory move whole multiples of this many bytes.
COPY_UNIT = 128
MIN_STAGES = 2
MAX_STAGES = 4
# Input bytes per pipeline stage the block size aims at: with two stages in
# flight per SM this covers DRAM latency (~36 KB per SM at 4.8 TB/s x 1 us).
STAGE_IN_BYTES = 32 * 1024
# float32 values per thread per register chunk.
CHUNK_VALUES = 32
# Rows of this many columns or more that are not whole 16-byte vectors of
# the 128 threads take the wide layout with vectors down to this many bytes
# (plan): from about here the narrow layout's four-row tiles and the
# backward's four-row dscale accumulator leave no room for two stages
# (16-bit rows of 3584 columns: 236 KB), and narrower rows keep it.
WIDE_NARROW_VEC_MIN_COLS = 3584
MIN_WIDE_VEC_BYTES = 4
MAX_BOX = mk.MAX_BOX
DEFAULT_NUM_SMS = gpu_tiling.DEFAULT_NUM_SMS


# jax 0.10 does not lower the chunks of a one-row backward group (a (1,
# chunk) slice of the (1, hidden) scale and dscale references raises
# "strides=[hidden, 1], ref_ty.shape=[1, chunk]" in Mosaic GPU's lowering,
# on any host: jax 0.10.2, 6144-8192 16-bit columns and 5120-6144 float32,
# lowering for cuda); jax 0.11.2 lowers and runs them (H200). Before it
# (jax 0.11.0 and 0.11.1 were not tried) ``MosaicGpu`` does not serve calls
# planned so (``_unlowered``), so that "auto" takes the Triton kernel there
# and backend="mosaic_gpu" names the reason instead of failing in the
# lowering.
ONE_ROW_CHUNKS_LOWER = jax.__version_info__ >= (0, 11, 2)


def _unlowered(p: mk.Plan) -> str | None:
  """Why the installed jax cannot lower a backward plan (None: it can)."""
  if ONE_ROW_CHUNKS_LOWER or p.group_rows != 1 or p.chunk >= p.hidden:
    return None
  return (f"rows of {p.hidden} columns take one-row backward groups in "
          f"{p.chunk}-column chunks, which jax {jax.__version__} does not "
          "lower (jax 0.11.2 does)")


def _num_sms() -> int:
  return gpu_tiling.num_sms()


def visible_compute_capability() -> str | None:
  """The first visible GPU's compute capability ("9.0"), or None.

  None where no GPU is visible (e.g. exporting for ``cuda`` from a CPU
  host): the caller then decides.
  """
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return None
  cc = getattr(gpus[0], "compute_capability", None) if gpus else None
  return None if cc is None else str(cc)


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, int(n)).bit_length() - 1)


def _itemsize(dt) -> int:
  return np.dtype(dt).itemsize


def plan(kind: str, rows: int, hidden: int, *, in_sizes, out_sizes,
         sms: int, block_rows: int | None = None, stages: int | None = None,
         grid: int | None = None, has_scale: bool = True,
         scale_size: int = 4, bias_size: int = 0,
         copy_size: int | None = None, heads: int = 1) -> mk.Plan:
  """Chooses the launch for one kernel call.

  Args:
    kind: "fwd" or "bwd".
    rows, hidden: the 2-D problem.
    in_sizes, out_sizes: itemsizes of the (rows, hidden) inputs and outputs.
    sms: SMs the persistent grid covers.
    block_rows, stages, grid: overrides (tuning sweeps).
    has_scale, scale_size: whether a scale is read, and its itemsize.
    bias_size: the bias' itemsize, 0 without a bias (the forward holds the
      bias in shared memory, the backward a dbias accumulator).
    copy_size: the itemsize of an array copied narrower than its size in
      ``out_sizes`` (a quantized output planned as the float32 y it
      replaces, so that its row sums run in the same order).
    heads: scale rows of a per-head scale (1 otherwise): the scale is tiled
      to ``Plan.head_rows`` rows, a multiple of heads and of the row
      groups, and every block starts at head 0.

  Raises:
    ValueError: the shape cannot be served (the message says why).
  """
  if rows < 1 or hidden < 1:
    raise ValueError(f"empty problem: rows={rows}, hidden={hidden}.")
  min_size = min(min(in_sizes), min(out_sizes), scale_size,
                 copy_size or scale_size)
  if (hidden * min_size) % COPY_UNIT or hidden % 8:
    raise ValueError(
        f"rows of hidden={hidden} are not whole {COPY_UNIT}-byte pieces for "
        "the copy engine.")
  isz = max(max(in_sizes), max(out_sizes))
  vec = 16 // isz
  lanes = 32
  if hidden >= WIDE_NARROW_VEC_MIN_COLS and isz == 2:
    # Rows of a model's width that is not a multiple of 1024 16-bit
    # columns (3584, 4608, 5376, ...) keep the wide layout with 8- or
    # 4-byte vectors: the narrow layout's four-row tiles (and the backward's
    # four-row dscale accumulator) do not fit two stages there. (16-bit
    # rows only: float32 rows of such widths take one-row backward groups,
    # not yet run on a GPU in this layout.)
    while vec * isz > MIN_WIDE_VEC_BYTES and hidden % (128 * vec):
      vec //= 2
  if hidden % (128 * vec) == 0:
    layout = "wide"
  else:
    vec = 16 // isz
    layout = "narrow"
    # A row spread over fewer than 32 lanes (two or more rows per warp
    # tile) fails Mosaic's layout inference in jax 0.11 (seen on an H200),
    # so rows that are not whole multiples of 32 vectors take narrower
    # vectors instead: every row is 32 lanes wide.
    while vec > 1 and hidden % (lanes * vec):
      vec //= 2
    if hidden % (lanes * vec):
      raise ValueError(f"hidden={hidden} has no register layout.")
  tile_rows = 1 if layout == "wide" else 4
  row_bytes_in = hidden * sum(in_sizes)
  row_bytes_out = hidden * sum(out_sizes)
  # Per-head: the tiled scale's rows; blocks are whole multiples of them.
  head_rows = 1 if heads <= 1 else math.lcm(int(heads), 4)
  if head_rows > MAX_BOX:
    raise ValueError(f"heads={heads} need blocks of {head_rows} rows, more "
                     f"than a copy's {MAX_BOX}.")
  if block_rows is None:
    br = _pow2_floor(max(1, STAGE_IN_BYTES // row_bytes_in))
    br = min(br, MAX_BOX, _pow2_floor(rows) if rows < MAX_BOX else MAX_BOX)
    br = max(br, tile_rows)
    if head_rows > 1:
      br = max(head_rows, br // head_rows * head_rows)
  else:
    br = block_rows
    if br % head_rows:
      raise ValueError(f"block_rows={br} must be a multiple of {head_rows} "
                       f"for heads={heads}.")
  group = min(4, br) if layout == "wide" else tile_rows
  if br % group or br > MAX_BOX:
    raise ValueError(f"block_rows={br} must be a multiple of {group} and at "
                     f"most {MAX_BOX}.")
  # Columns per register chunk: CHUNK_VALUES float32 per thread.
  unit = 128 * vec if layout == "wide" else lanes * vec
  chunk = unit
  while (group * chunk * 2 // 128 <= CHUNK_VALUES
         and hidden % (chunk * 2) == 0):
    chunk *= 2
  # The box's minor dimension is a whole number of 16-byte units of every
  # array (1-byte quantized outputs: 16 columns).
  k = mk.box_cols(hidden, step=max(8, 16 // min_size))
  n_acc = int(has_scale) + int(bias_size > 0)

  def layout_grid(br):
    row_blocks = -(-rows // br)
    g = grid or min(row_blocks, sms)
    steps = -(-row_blocks // g)
    # Each CTA's rstd is a 16-byte multiple: steps * br % 4 == 0.
    while (steps * br) % 4:
      steps += 1
    return -(-row_blocks // steps), steps

  def fit(br):
    g, steps = layout_grid(br)
    fixed = (hidden * scale_size * has_scale * head_rows + REDUCTION_SCRATCH
             + 4 * (steps * br + 128))
    if kind == "bwd":
      fixed += 4 * hidden * max(tile_rows, head_rows) * n_acc
    else:
      fixed += hidden * bias_size
    return (SMEM_BUDGET - fixed) // (br * (row_bytes_in + row_bytes_out))

  if head_rows > 1:
    # Blocks stay whole multiples of the tiled scale's rows.
    while block_rows is None and br > head_rows and fit(br) < MIN_STAGES:
      br = max(head_rows, br // 2 // head_rows * head_rows)
  while (block_rows is None and head_rows == 1 and br > group
         and fit(br) < MIN_STAGES):
    br //= 2
  if (block_rows is None and kind == "bwd" and n_acc and br == 1
      and rows >= 2 and fit(2) >= MIN_STAGES):
    # Two-row groups where two stages of them fit: the one-row group takes
    # the backward's two-dimensional scale and dscale (dbias) path
    # (mk.backward), and two rows a step move more bytes per barrier.
    br = group = 2
  if kind == "fwd" and layout == "wide" and br < 2:
    # A one-row group would need a scalar statistic, which the layouts here
    # do not lower.
    br = 2
    group = 2
  st = stages or min(MAX_STAGES, fit(br))
  if st < MIN_STAGES or fit(br) < st:
    raise ValueError(
        f"rows of {hidden} columns ({row_bytes_in + row_bytes_out} bytes in "
        f"and out) do not fit {max(st, MIN_STAGES)} pipeline stages of {br} "
        f"rows in {SMEM_BUDGET // 1024} KB of shared memory.")
  g, steps = layout_grid(br)
  return mk.Plan(rows=rows, hidden=hidden, block_rows=br, group_rows=group,
                 chunk=chunk, vec=vec, kind=layout, lanes=lanes, stages=st,
                 grid=g, steps=steps, k=k, head_rows=head_rows)


# base.Call.op -> the op names of ``shape_reason``.
_OPS = {"forward": "fwd", "backward": "bwd",
        "residual_forward": "residual_fwd",
        "residual_backward": "residual_bwd",
        "quantized_forward": "quantized_fwd"}
# The features of kernels/common.py FEATURES served.
IMPLEMENTED = frozenset(("bias", "quantized", "llama", "per_head"))
# backend="auto" takes the fused residual backward with a bias where it
# measured faster than the Triton kernel (auto_declines): 16-bit rows of
# AUTO_BIAS_FUSED_BWD_COLS columns (a multiple of 1024, the wide layout), at
# least AUTO_BIAS_FUSED_BWD_MIN_ROWS rows.
AUTO_BIAS_FUSED_BWD_COLS = (1024, 8192)
AUTO_BIAS_FUSED_BWD_MIN_ROWS = 2048
# and the plain backward with a bias on bfloat16 rows of exactly this many
# columns, from AUTO_BIAS_BWD_MIN_ROWS rows: H200, us, Mosaic GPU against
# Triton, two runs: 16384x2048 55.8 / 55.8 against 58.8 / 58.9, 8192x2048
# 32.0 / 31.6 against 32.8 / 32.9; level at 4096x2048 (19.3-19.5 against
# 19.3-19.7); slower at 16384x1024 (33.2 against 32.7), 8192x4096 (63.6
# against 58.9) and 2048x2048 float16 (13.1 against 12.3); 32768x1024 2-3%
# faster (58.4 against 59.6-60.0), within the margin, so not taken.
AUTO_BIAS_BWD_COLS = 2048
AUTO_BIAS_BWD_MIN_ROWS = 8192
# The plain backward of 16-bit rows of this many columns or more runs the
# wide kernel (mosaic_gpu_wide), which keeps dscale in registers: H200, us,
# wide kernel against this module's plan and the Triton kernel: 4096x8192
# bf16 57.6-58.9 against 64.4 and 57.0; 4096x12288 bf16 80.5 against 92.8
# and 136.4; 4096x16384 bf16 110.1 against - (not served) and 146.6.
WIDE_BWD_MIN_COLS = 8192
# backend="auto" takes the wide backward from this many 16-bit columns (at
# 8192 it tied with the Triton kernel, from 12288 it is 20-40% faster; the
# figures above, and 2048x16384 f16 58.8 against 76.6, 8192x16384 bf16
# 210.6 against 320.8).
AUTO_WIDE_BWD_MIN_COLS = 12288
# The fused backward of rows this module's plans cannot hold (16-bit rows
# over 9216 columns, float32 over 5120) runs the wide kernel with dx written
# over dh's row. backend="auto" takes it from AUTO_WIDE_BWD_MIN_COLS 16-bit
# columns and from this many float32 columns: H200, us, wide kernel against
# the Triton kernel: 4096x16384 bf16 140.9 against 176.8, 2048x16384 f16
# 74.0 against 93.0, 4096x12288 bf16 105.5 against 148.0, 2048x8192 f32 70.2
# against 99.8. At 8192 16-bit columns the module's plan was ahead of the
# wide kernel (8192x8192 bf16 135.6 against 139.6, Triton 143.4; 2048x8192
# f16 38.9 against 40.4, Triton 38.3).
AUTO_WIDE_FUSED_BWD_MIN_COLS_F32 = 8192
# backend="auto" takes the plain backward of float32 rows from this many
# columns, where the wide kernel splits each row over 2 CTAs: H200, us, wide
# kernel against the Triton kernel: 1024x16384 f32 58.1 against 82.1 (the
# fused backward there 72.5 against 96.8). At 8192 float32 columns it tied;
# 32768 (4 CTAs a row) was not timed.
AUTO_WIDE_BWD_MIN_COLS_F32 = 16384
# 16-bit rows with a float32 scale (flax's float32 parameters, dy in x's
# dtype): backend="auto" takes the wide fused backward from this many
# columns and the wide backward from AUTO_WIDE_F32_SCALE_BWD_MIN_COLS. H200,
# bf16 x, us, wide kernel against the Triton kernel and XLA: fused backward
# 4096x16384 169.0 against 230.5 and 229.6, 2048x32768 195.1 against 359.5
# and 235.0; backward 2048x32768 174.5 against 276.1 and 185.8, level at
# 4096x16384 (145.5 against 146.3). At 65536 columns such rows do not fit.
AUTO_WIDE_F32_SCALE_FUSED_BWD_MIN_COLS = 16384
AUTO_WIDE_F32_SCALE_BWD_MIN_COLS = 32768
# The plain forward (and fused forward) of rows this module's plans cannot
# hold runs the wide forward (mosaic_gpu_wide.forward), which writes y over
# x's shared memory. backend="auto" takes the plain forward from this many
# 16-bit columns: H200, us, wide kernel against the Triton kernel: 2048x32768
# bf16 76.7-77.7 against 83.4-83.6, 1024x32768 f16 40.0 against 43.7; at
# 16384 columns it was slower (4096x16384 bf16 73.9-78.3 against 68.9-69.0,
# 2048x16384 f16 39.1-40.6 against 36.0), and so was the fused forward at
# 12288-16384 (4096x16384 bf16 143.6 against 141.0). With a float32 scale
# and y in x's dtype too: 2048x32768 bf16 102.4 against 117.8 (XLA 122.2);
# at 65536 columns the wide forward cannot hold such rows. Between 16384 and
# 32768 columns the Triton kernel pads rows to 32768-column tiles, and the
# wide forward is ahead: 2048x20480 bf16 49.0 against 61.1, 2048x24576 59.3
# against 67.7; so "auto" takes it for rows wider than 16384 columns (the
# next multiple of the 1024 it needs) with a float32 scale
# (AUTO_WIDE_F32_SCALE_FWD_MIN_COLS). With the scale in x's dtype it runs
# from 12288 columns: there the wide forward launches one row a CTA and
# holds the row in registers (mosaic_gpu_wide.PER_ROW_FWD_MIN_COLS), ahead
# of the Triton kernel by 3-8% (4096x16384 bf16 66.6 against 68.7,
# 4096x12288 52.4 against 54.2, 2048x13312 28.0 against 30.5); at 12288
# columns it also takes rows this module's plans hold. With a float32 scale
# the Triton kernel stays ahead there (4096x16384 bf16 71.9 against 78.4
# one row a CTA and 77.9 on the persistent grid).
AUTO_WIDE_FWD_MIN_COLS = 12288
AUTO_WIDE_F32_SCALE_FWD_MIN_COLS = 17408
# backend="auto" takes the fused forward of 16-bit rows (every array in x's
# dtype) from this many columns, where the wide forward launches one row a
# cluster of 1, 2 or 4 CTAs (mosaic_gpu_wide.PER_ROW_CTA_COLS): H200, us,
# wide kernel against the Triton kernel: 4096x12288 bf16 100.9 against
# 104.1, 2048x12288 f16 52.3 against 57.7, 4096x16384 bf16 133.6 against
# 138.3, 2048x20480 89.0 against 95.0, 2048x32768 137.5 against 142.7,
# 1024x32768 f16 71.1 against 71.6; at 65536 columns, where no Triton tiling
# holds the row and XLA ran it, 1024x65536 bf16 141.4 against XLA's 193.8
# (the persistent grid's 154.6).
AUTO_WIDE_FUSED_FWD_MIN_COLS = 12288
# On few rows the Triton kernel's launch is ahead of the wide forward's: the
# least rows "auto" gives the wide forward, by the narrowest width (columns)
# each applies from. H200, jax 0.11.2, us, bf16, wide forward against the
# Triton kernel: fused forward at 16384 columns 64 rows 4.48 against 3.84,
# 128 5.97 against 5.02, 256 8.42 against 9.25, 512 18.56 against 20.26;
# at 32768 columns 128 rows 9.98 against 8.96, 256 21.18 against 19.74, 512
# 38.10 against 37.41, 1024 (f16) 70.6 against 72.6; at 65536 the wide
# forward is ahead from 32 rows (7.81 against XLA's 9.25 and 12.56). The
# forward at 32768 columns (the persistent grid): 64 rows 5.73 against
# 4.50, 256 11.49 against 10.53, 512 20.90 against 23.01 (the same bound is
# kept for 17408-32767 columns, not timed on few rows); at 65536 (one row a
# cluster) ahead from 32 rows (5.66 against 7.78) but for one case of four
# (128 rows 12.64 against 11.20). The fused forward's bound below 32768
# columns was timed at 16384. The forward of 12288-16384 columns (one row
# a CTA): 384 rows of 16384 7.3 against 8.7, 512 9.7 against 9.6, 256 5.7
# against the tuned Triton launch's 5.4. Since the split rows' sums travel
# without a cluster barrier (mosaic_gpu_wide._cluster_row_sum), the timing
# script, us, one row a cluster against the Triton kernel: forward at 32768
# columns 256 rows 10.8 against 10.4, 384 15.0 against 17.2, 768 28.4
# against 33.2; 256x24576 8.7 against 8.5, 384x20480 10.2 against 10.6;
# fused forward at 32768 columns 256 rows 20.9 against 19.4, 512 36.9
# against 37.3 (f16 37.1 against 37.0), 768 53.1 against 55.8; 256x24576
# 14.9 against 14.1, 512x24576 28.4 against 28.8.
AUTO_WIDE_FWD_MIN_ROWS = ((65536, 1), (0, 384))
AUTO_WIDE_FUSED_FWD_MIN_ROWS = ((65536, 1), (17408, 512), (0, 256))


def _too_few_rows(call: base.Call) -> str | None:
  """Why "auto" leaves a wide forward or fused forward call of few rows to
  the Triton kernel (``AUTO_WIDE_FWD_MIN_ROWS``,
  ``AUTO_WIDE_FUSED_FWD_MIN_ROWS``), or None when it has enough."""
  fused = call.op == "residual_forward"
  table = AUTO_WIDE_FUSED_FWD_MIN_ROWS if fused else AUTO_WIDE_FWD_MIN_ROWS
  hidden = int(call.hidden)
  least = next(r for cols, r in table if hidden >= cols)
  if int(call.rows) >= least:
    return None
  name = "AUTO_WIDE_FUSED_FWD_MIN_ROWS" if fused else "AUTO_WIDE_FWD_MIN_ROWS"
  return (f"{call.op}: on fewer than {least} rows of {hidden} columns the "
          f"Triton kernel measured faster than the wide forward "
          f"(mosaic_gpu.{name})")

# backend="auto" takes the backward of rows up to 4096 columns from this
# many rows. H200 benchmark (docs/bench_h200.md: the full run of commit
# 219efb0, which the later one repeats within 3%), us, this kernel against
# the Triton kernel: 8192x4096 bf16 54.4 / 55.7, f16 53.5 / 55.9; level at
# 1024x4096 f32 (16.5 / 16.5); slower at 2048x4096 f16 (18.2 / 16.8),
# 64x4096 f32 (7.0 / 4.3) and 1x4096 f32 (3.5 / 1.8), where a CTA's fixed
# cost (the scale's copy, the pipeline's start) is not amortized.
AUTO_BWD_MIN_ROWS = 8192
# backend="auto" takes the backward and the fused backward of 16-bit rows
# of model widths between 4096 and the wide kernels' (Qwen's 5120, Gemma's
# 4608, DeepSeek's 7168, ...) where they measured faster (_auto_mid): H200,
# us, this kernel against the Triton kernel, bfloat16 (docs/mosaic_gpu.md,
# "Model widths"): backward 8192x4608 61.6 against 72.4, 8192x5120 67.6
# against 76.5, 4096x6144 44.5 against 45.2, 8192x7168 93.7 against 97.4;
# fused backward 8192x4608 79.0 against 95.4, 8192x5376 92.3 against
# 107.5, 8192x8192 135.5 against 144.4. Slower or level: the backward of
# 5376 columns (4-byte vectors: 81.5 against 78.8) and of 6144-7168 columns
# on 2048 rows, both ops at 3584 columns, and the fused backward of
# 7168-8192 float16 columns on 2048 rows (36.2 against 35.8).
AUTO_MID_MIN_COLS = 4096  # exclusive
AUTO_MID_BWD_MAX_COLS = 7168
AUTO_MID_FUSED_BWD_MAX_COLS = 8192
AUTO_MID_MIN_ROWS = 4096
# On fewer rows (down to AUTO_MID_FEW_ROWS) only up to these widths.
AUTO_MID_FEW_ROWS = 2048
AUTO_MID_BWD_FEW_ROWS_MAX_COLS = 5120
AUTO_MID_FUSED_BWD_FEW_ROWS_MAX_COLS = 6144
# The plain backward needs vectors of at least this many bytes (plan).
AUTO_MID_BWD_MIN_VEC_BYTES = 8


def _check_dtype(name: str, a):
  if np.dtype(a.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(
        f"mosaic_gpu supports {name} of dtype float32, bfloat16 or float16; "
        f"got {name} of shape {tuple(a.shape)} and dtype {a.dtype}. Use "
        f"backend='xla' (or 'auto') for other dtypes.")


def _kernel_dtype(dt):
  dt = np.dtype(dt)
  return np.dtype(jnp.float32) if dt == np.dtype(np.float64) else dt


def _heads(scale) -> int:
  """Scale rows of a per-head ``(heads, hidden)`` scale; 1 otherwise."""
  return 1 if scale is None or scale.ndim == 1 else int(scale.shape[0])


def _kernel_scale(scale, p: mk.Plan):
  """The scale as the kernels read it: ``(hidden,)``, or a per-head scale
  tiled to ``(p.head_rows, hidden)`` (a ``(1, hidden)`` one flattened)."""
  if scale is None or scale.ndim == 1:
    return scale
  if p.head_rows == 1:
    return scale.reshape(-1)
  return jnp.tile(scale, (p.head_rows // scale.shape[0], 1))


def _scale_shaped(outs, scale):
  """The backward's outputs with dscale in scale's shape."""
  if outs[1] is None or outs[1].shape == scale.shape:
    return outs
  return (outs[0], outs[1].reshape(scale.shape), *outs[2:])


def _plain(has_bias: bool, cast_mode: str, scale_rank: int) -> bool:
  """Whether a call is one the wide kernels compute: no bias, cast mode
  "float32" and a 1-D (or no) scale."""
  return not has_bias and cast_mode == "float32" and scale_rank < 2


def wide_backward_reason(rows: int, hidden: int, dtype, *, scale_dtype=None,
                         has_scale: bool = True, dy_dtype=None,
                         plain: bool = True,
                         has_dh: bool = False) -> str | None:
  """Why the backward (or fused backward) of this call does not run
  ``mosaic_gpu_wide.backward``, or None when it does.

  Args:
    rows, hidden, dtype: x's shape and dtype (h's for the fused backward).
    scale_dtype, has_scale: the scale's dtype, and whether there is one.
    dy_dtype: the cotangent's dtype (default dtype).
    plain: no bias, cast mode "float32" and a 1-D (or no) scale: the only
      calls the wide kernel computes.
    has_dh: the fused residual backward (dh in h's dtype).
  """
  if not plain:
    return ("the wide backward has no bias, per-head scale or llama cast "
            "mode")
  if np.dtype(dy_dtype or dtype) != np.dtype(dtype):
    return "the wide backward takes dy in x's dtype"
  reason = mw.shape_reason(rows, hidden, dtype,
                           scale_dtype=scale_dtype if has_scale else None,
                           has_scale=has_scale)
  if reason is not None:
    return reason
  if (not has_dh and np.dtype(dtype).itemsize == 2
      and hidden >= WIDE_BWD_MIN_COLS):
    return None
  try:
    s = _itemsize(dtype)
    plan("bwd", rows, hidden, in_sizes=[s] * (2 + has_dh), out_sizes=[s],
         sms=DEFAULT_NUM_SMS, has_scale=has_scale,
         scale_size=_itemsize(scale_dtype or dtype))
  except ValueError:
    return None  # only the wide kernel serves it
  if has_dh:
    return (f"rows of {hidden} columns take this module's fused backward "
            "plan")
  return (f"rows of {hidden} columns take this module's backward plan (the "
          f"wide kernel from {WIDE_BWD_MIN_COLS} 16-bit columns)")


def wide_forward_reason(rows: int, hidden: int, dtype, *, scale_dtype=None,
                        has_scale: bool = True, out_dtype=None,
                        residual_dtype=None, has_residual: bool = False,
                        plain: bool = True) -> str | None:
  """Why the forward (or fused forward) of this call does not run
  ``mosaic_gpu_wide.forward``, or None when it does: it runs where this
  module's plans cannot hold the rows.

  Args:
    rows, hidden, dtype: x's shape and dtype.
    scale_dtype, has_scale: the scale's dtype, and whether there is one.
    out_dtype, residual_dtype: of y and of the residual (default dtype).
    has_residual: the fused forward.
    plain: no bias, cast mode "float32" and a 1-D (or no) scale: the only
      calls the wide kernel computes.
  """
  if not plain:
    return "the wide forward has no bias, per-head scale or llama cast mode"
  reason = mw.forward_shape_reason(
      rows, hidden, dtype, scale_dtype=scale_dtype if has_scale else None,
      has_scale=has_scale, has_residual=has_residual, out_dtype=out_dtype,
      residual_dtype=residual_dtype)
  if reason is not None:
    return reason
  s, o = _itemsize(dtype), _itemsize(out_dtype or dtype)
  try:
    plan("fwd", rows, hidden, in_sizes=[s] * (1 + has_residual),
         out_sizes=[o] + [s] * has_residual, sms=DEFAULT_NUM_SMS,
         has_scale=has_scale, scale_size=_itemsize(scale_dtype or dtype))
  except ValueError:
    return None  # only the wide kernel serves it
  if not has_residual and mw.per_row_default(
      rows, hidden, s,
      _itemsize(scale_dtype or dtype) if has_scale else None, False):
    return None  # one row a CTA measured faster (mw.PER_ROW_FWD_MIN_COLS)
  return f"rows of {hidden} columns take this module's forward plan"


def _auto_wide(call: base.Call, min_cols: int) -> bool:
  """Whether "auto" takes the wide forward or backward (or fused backward)
  for a call with every array in x's dtype: from ``min_cols`` columns,
  where the wide kernel serves it (static rows only).

  Past 16384 16-bit (8192 float32) columns the wide backward splits rows
  over a cluster of 2 or 4 CTAs, and is taken there too: H200, us, against
  the Triton kernel and XLA: 2048x32768 bf16 (2 CTAs a row) 125.6 against
  181.0 and 183.7, fused 144.2 against 221.9 and 233.4; 1024x65536 bf16 (4
  CTAs a row) 145.9 against 226.1 and 187.2, fused 163.7 against 297.8 and
  242.8; 512x65536 f16 77.1 against 132.1 and 101.4, fused 87.4 against
  161.8 and 128.0.
  """
  return int(call.hidden) >= min_cols and _wide_call_reason(call) is None


def _auto_mid(call: base.Call) -> bool:
  """Whether "auto" takes the backward or fused backward of a call with
  every array in x's 16-bit dtype and no bias on rows between 4096 columns
  and the wide kernels' (``AUTO_MID_*``)."""
  if np.dtype(call.dtype).itemsize != 2 or not call.static_rows:
    return False
  rows, hidden = int(call.rows), int(call.hidden)
  fused = call.op == "residual_backward"
  top = AUTO_MID_FUSED_BWD_MAX_COLS if fused else AUTO_MID_BWD_MAX_COLS
  few = (AUTO_MID_FUSED_BWD_FEW_ROWS_MAX_COLS if fused
         else AUTO_MID_BWD_FEW_ROWS_MAX_COLS)
  if not AUTO_MID_MIN_COLS < hidden <= top:
    return False
  try:
    p = plan("bwd", rows, hidden, in_sizes=[2] * (3 if fused else 2),
             out_sizes=[2], sms=DEFAULT_NUM_SMS, scale_size=2)
  except ValueError:  # not served: cannot_serve says why
    return False
  if p.kind != "wide" or (not fused
                          and p.vec * 2 < AUTO_MID_BWD_MIN_VEC_BYTES):
    return False
  return rows >= AUTO_MID_MIN_ROWS or (rows >= AUTO_MID_FEW_ROWS
                                       and hidden <= few)


def _wide_call_reason(call: base.Call) -> str | None:
  """``wide_forward_reason`` or ``wide_backward_reason`` of a forward,
  fused forward, backward or fused backward ``base.Call`` ("" for other
  ops)."""
  if call.op not in ("forward", "residual_forward", "backward",
                     "residual_backward"):
    return ""
  if not call.static_rows:
    # int() of a symbolic dimension raises (not a TypeError).
    return "the shape is not static"
  rows, hidden = int(call.rows), int(call.hidden)
  common_args = dict(
      scale_dtype=call.scale_dtype, has_scale=bool(call.scale_shape),
      plain=_plain(call.has_bias, call.norm.cast_mode,
                   len(call.scale_shape)))
  if call.op.endswith("forward"):
    return wide_forward_reason(
        rows, hidden, call.x_dtype or call.dtype,
        out_dtype=call.norm.out_dtype, residual_dtype=call.dtype,
        has_residual=call.op == "residual_forward", **common_args)
  return wide_backward_reason(rows, hidden, call.dtype,
                              dy_dtype=call.norm.out_dtype,
                              has_dh=call.op == "residual_backward",
                              **common_args)


def _arith(norm: base.Norm, x_dtype, scale, quant_static=False) -> mk.Arith:
  """The kernels' static arithmetic for ``norm`` on rows of ``x_dtype``
  (the residual stream's for fused ops)."""
  llama = norm.cast_mode == "llama"
  pdt = _kernel_dtype(norm.product_dtype(
      x_dtype, None if scale is None else scale.dtype))
  return mk.Arith(llama=llama, xdt=np.dtype(x_dtype), pdt=pdt,
                  quant_dtype=None if norm.quant_dtype is None
                  else np.dtype(norm.quant_dtype),
                  q_static=bool(quant_static))


def _offset(norm: base.Norm, arith: mk.Arith) -> float:
  # llama mode adds the offset in the product dtype (a Python float is
  # float32 inside the kernels).
  dt = arith.pdt if arith.llama else np.float32
  return float(np.asarray(norm.scale_offset, dt))


@dataclasses.dataclass(frozen=True)
class MosaicGpu(base.Implementation):
  """Pallas Mosaic GPU kernels for Hopper GPUs (sm_90: H100, H200).

  Inputs: x (and residual) float32, bfloat16 or float16, 2-D
  ``(rows, hidden)``, any rows; hidden as in the module docstring (see
  ``cannot_serve``); scale None or ``(hidden,)`` and bias None or
  ``(hidden,)`` in any float dtype; quantized outputs int8, float8_e4m3fn
  and float8_e5m2. The methods also compute cast_mode "llama" and a
  per-head ``(heads, hidden)`` scale (rows a multiple of heads), which
  ``cannot_serve`` declines until they are verified on a device.
  Unsupported shapes raise ValueError naming the limit; float64 x raises
  TypeError.

  Attributes (None: the heuristic in ``plan``):
    block_rows: rows per pipeline step (multiple of 4).
    stages: pipeline depth.
    grid: persistent CTAs (default: one per SM).
    num_sms: SM count used to size grids (default: read off the device).
  """

  name: ClassVar[str] = "mosaic_gpu"
  platforms: ClassVar[tuple[str, ...]] = ("cuda",)

  block_rows: int | None = None
  stages: int | None = None
  grid: int | None = None
  num_sms: int | None = None

  def _plan(self, kind, rows, hidden, in_dtypes, out_dtypes, scale,
            bias=None, copy_size=None, has_bias=None):
    p = plan(kind, rows, hidden,
             in_sizes=[_itemsize(d) for d in in_dtypes],
             out_sizes=[_itemsize(d) for d in out_dtypes],
             sms=self.num_sms or _num_sms(), block_rows=self.block_rows,
             stages=self.stages, grid=self.grid,
             has_scale=scale is not None,
             scale_size=4 if scale is None else _itemsize(scale.dtype),
             bias_size=(0 if bias is None else _itemsize(bias.dtype))
             if has_bias is None else 4 * bool(has_bias),
             copy_size=copy_size, heads=_heads(scale))
    if kind == "bwd" and (reason := _unlowered(p)) is not None:
      raise ValueError(f"{reason}.")
    return p

  def cannot_serve(self, call: base.Call) -> str | None:
    """Why the kernels cannot compute ``call`` (a base.Call), or None."""
    reason = common.not_implemented(self.name, call, SUPPORTED_DTYPES,
                                    IMPLEMENTED)
    if reason is not None:
      return reason
    cc = visible_compute_capability()
    if cc is not None and not cc.startswith("9"):
      return (f"{self.name} targets Hopper (compute capability 9.x); the "
              f"visible GPU is {cc}")
    if call.op not in _OPS:
      return f"{self.name} has no {call.op}"
    wide = _wide_call_reason(call)
    if wide is None:
      return None
    reason = self.shape_reason(
        int(call.rows), int(call.hidden), call.dtype, _OPS[call.op],
        has_bias=call.has_bias, bias_dtype=call.bias_dtype,
        has_residual=call.has_residual,
        scale_dtype=call.scale_dtype if call.scale_shape else None,
        out_dtype=call.norm.out_dtype, x_dtype=call.x_dtype,
        heads=call.scale_shape[0] if len(call.scale_shape) == 2 else 1)
    if reason is not None and wide:
      reason = f"{reason.rstrip('.')}; {wide}"
    return reason

  def auto_declines(self, call: base.Call) -> str | None:
    """Where the Triton kernels (``PallasGpu``) measured faster.

    One H200 run, jax 0.11.2, profiler device time in us, MosaicGpu against
    PallasGpu (docs/mosaic_gpu.md): the backward of wide rows of up to 4096
    columns was faster or as fast (8192x4096 bfloat16 54.3 against 56.9,
    1024x4096 float32 16.1 against 16.4), but on fewer rows slower in the
    benchmark (``AUTO_BWD_MIN_ROWS``); at 8192 columns it was slower
    (4096x8192 bfloat16 64.6 against 57.5, 2048x8192 float16 34.8 against
    31.1), and on narrow rows too (32768x128 bfloat16 11.2 against 9.8).
    The forward and the fused forward were slower at every shape but
    1024x4096 float32 (8.8 against 8.9), and the fused backward within 5%
    either way, so both stay with Triton.

    With a bias (two H200 runs, docs/mosaic_gpu.md): the fused backward was
    faster at every shape timed (8192x4096 bfloat16 73.1 against 82.7,
    2048x8192 float16 49.2 against 128.7, 16384x1024 bfloat16 38.8 against
    58.7; all arrays in x's dtype), so "auto" takes it on such 16-bit rows
    (AUTO_BIAS_FUSED_BWD_*). The forward, the backward and the fused
    forward with a bias, and the quantized forward (1.1-2.2x the Triton
    kernel's time) stay with Triton, but for the backward on bfloat16 rows
    of 2048 columns, 8192 rows or more (AUTO_BIAS_BWD_*: 3-5% faster).

    The plain backward of 16-bit rows of ``AUTO_WIDE_BWD_MIN_COLS`` columns
    or more runs the wide kernel, 20-40% faster than Triton there (see
    ``WIDE_BWD_MIN_COLS``), and so does the plain fused backward, 20-30%
    faster (there and on float32 rows of
    ``AUTO_WIDE_FUSED_BWD_MIN_COLS_F32`` columns); the plain forward of
    16-bit rows of ``AUTO_WIDE_FWD_MIN_COLS`` columns the wide forward, 3-8%
    faster at 12288-16384 (one row a CTA), 20-21% at 32768 and 24% at 65536
    columns (one row a cluster of 2 or 4 CTAs, since the row sums travel
    without a cluster barrier: 2048x32768 bf16 66.1 against 83.4, 1024x65536
    68.4 against 90.4; 13% with a float32 scale, from
    ``AUTO_WIDE_F32_SCALE_FWD_MIN_COLS``; 26% at 24576, which Triton pads
    to 32768), and
    the fused forward of 16-bit rows of ``AUTO_WIDE_FUSED_FWD_MIN_COLS``
    columns (one row a cluster of 1, 2 or 4 CTAs), 4-10% faster than
    Triton (2048x32768 bf16 131.8 against 144.0) and at 65536 columns 30%
    faster than Triton (131.7 against 187.7); both on enough rows
    (``AUTO_WIDE_FWD_MIN_ROWS``, ``AUTO_WIDE_FUSED_FWD_MIN_ROWS``). With a
    float32 scale and dy in x's dtype the wide fused backward is taken from
    ``AUTO_WIDE_F32_SCALE_FUSED_BWD_MIN_COLS`` 16-bit columns and the wide
    backward from ``AUTO_WIDE_F32_SCALE_BWD_MIN_COLS`` (27-45% faster than
    Triton, 6-17% than XLA). The wide
    backward and fused backward also take float32 rows of
    ``AUTO_WIDE_BWD_MIN_COLS_F32`` columns, and rows the wide kernel splits
    over a cluster of 2 or 4 CTAs (32768 and 65536 16-bit columns: 40-45%
    faster than Triton, 33-42% than XLA).
    """
    if len(call.scale_shape) == 2:
      return ("a per-head scale: not timed against the Triton kernel "
              "(docs/mosaic_gpu.md)")
    if call.norm.cast_mode != "float32":
      return (f"{call.op} in llama mode: the forward and backward within "
              "10% of the Triton kernel either way, the fused ops not timed "
              "(docs/mosaic_gpu.md)")
    x_dt = np.dtype(call.dtype)
    scale_dt = np.dtype(call.scale_dtype or x_dt)
    y_in_x = np.dtype(call.norm.out_dtype) == x_dt
    same_dtypes = scale_dt == x_dt and y_in_x
    if call.op == "residual_backward" and call.has_bias:
      lo, hi = AUTO_BIAS_FUSED_BWD_COLS
      if not call.static_rows:
        return "residual_backward: the shape is not static"
      rows, hidden = int(call.rows), int(call.hidden)
      if (x_dt.itemsize == 2 and same_dtypes and lo <= hidden <= hi
          and hidden % 1024 == 0 and rows >= AUTO_BIAS_FUSED_BWD_MIN_ROWS):
        return None
      return ("residual_backward with a bias: measured faster than the "
              "Triton kernel only on 16-bit rows of 1024-8192 columns (a "
              "multiple of 1024), 2048 rows or more, every array in x's "
              "dtype (docs/mosaic_gpu.md)")
    # _wide_call_reason is None only for calls without a bias.
    # The wide kernels also take a float32 scale (flax's float32 parameters
    # with dtype=x's) on 16-bit rows: AUTO_WIDE_FWD_MIN_COLS,
    # AUTO_WIDE_F32_SCALE_*.
    f32 = np.dtype(jnp.float32)
    y_in_x16 = x_dt.itemsize == 2 and y_in_x
    if (y_in_x16 and scale_dt == f32
        and call.op in ("backward", "residual_backward")
        and _auto_wide(call, AUTO_WIDE_F32_SCALE_FUSED_BWD_MIN_COLS
                       if call.op == "residual_backward"
                       else AUTO_WIDE_F32_SCALE_BWD_MIN_COLS)):
      return None
    if (call.op == "forward" and y_in_x16 and scale_dt in (x_dt, f32)
        and _auto_wide(call, AUTO_WIDE_FWD_MIN_COLS if scale_dt == x_dt
                       else AUTO_WIDE_F32_SCALE_FWD_MIN_COLS)):
      return _too_few_rows(call)
    if (call.op == "residual_forward" and x_dt.itemsize == 2 and same_dtypes
        and _auto_wide(call, AUTO_WIDE_FUSED_FWD_MIN_COLS)):
      return _too_few_rows(call)
    if call.op == "residual_backward" and same_dtypes and _auto_wide(
        call, AUTO_WIDE_BWD_MIN_COLS if x_dt.itemsize == 2
        else AUTO_WIDE_FUSED_BWD_MIN_COLS_F32):
      return None
    if call.op == "residual_backward" and same_dtypes and _auto_mid(call):
      return None
    if call.op != "backward":
      return (f"{call.op}: the Triton kernel measured as fast or faster "
              "(docs/mosaic_gpu.md)")
    if call.has_bias:
      bias_dt = np.dtype(call.bias_dtype or x_dt)
      if (x_dt == np.dtype(jnp.bfloat16) and same_dtypes and bias_dt == x_dt
          and call.hidden == AUTO_BIAS_BWD_COLS and call.static_rows
          and call.rows >= AUTO_BIAS_BWD_MIN_ROWS):
        return None
      return ("backward with a bias: the Triton kernel measured faster "
              f"but on bfloat16 rows of {AUTO_BIAS_BWD_COLS} columns, "
              f"{AUTO_BIAS_BWD_MIN_ROWS} rows or more, every array in x's "
              "dtype (docs/mosaic_gpu.md)")
    if not same_dtypes:
      # Timed (and, in the first device runs, checked) with every array in
      # x's dtype only.
      return ("backward: a scale or output dtype other than x's was not "
              "timed against the Triton kernel")
    try:
      hidden = int(call.hidden)
    except TypeError:
      return "backward: hidden is not static"
    vec = 16 // np.dtype(call.dtype).itemsize
    if hidden <= 4096 and hidden % (128 * vec) == 0:
      if call.static_rows and call.rows >= AUTO_BWD_MIN_ROWS:
        return None
      return (f"backward: on fewer than {AUTO_BWD_MIN_ROWS} rows (or a "
              "symbolic row count) the Triton kernel measured as fast or "
              "faster (docs/bench_h200.md)")
    if _auto_mid(call) or _auto_wide(
        call, AUTO_WIDE_BWD_MIN_COLS if x_dt.itemsize == 2
        else AUTO_WIDE_BWD_MIN_COLS_F32):
      return None
    return (f"backward: on rows of {hidden} columns (and {call.rows} rows) "
            "the Triton kernel measured faster or as fast "
            "(docs/mosaic_gpu.md)")

  def shape_reason(self, rows: int, hidden: int, dtype,
                   op: str = "all", *, has_bias: bool = False,
                   bias_dtype=None, has_residual: bool | None = None,
                   scale_dtype=None, out_dtype=None, x_dtype=None,
                   heads: int = 1) -> str | None:
    """Why the kernels cannot run this shape, or None when they can.

    Args:
      rows, hidden: the 2-D problem; dtype: of x (the residual stream's for
        fused ops).
      x_dtype: x's own dtype in the fused and quantized forward with a
        residual, where it differs from the residual's (default dtype).
      op: "fwd", "bwd", "residual_fwd", "residual_bwd", "quantized_fwd"
        or "all" (each).
      has_bias: with a bias. bias_dtype: its dtype, which the forward
        kernels hold in shared memory (None: judged at 4 bytes an element;
        the backward's dbias accumulator is float32 either way).
      has_residual: "quantized_fwd" only: with a residual (None: judged
        with and without).
      scale_dtype, out_dtype: default to dtype (y's dtype is dy's too).
      heads: scale rows of a per-head scale (1 otherwise).
    """
    for name, dt in (("dtype", dtype), ("x dtype", x_dtype or dtype)):
      if np.dtype(dt) not in SUPPORTED_DTYPES:
        return f"{name} {np.dtype(dt).name} is not float32/bfloat16/float16"
    s, xs = _itemsize(dtype), _itemsize(x_dtype or dtype)
    o = _itemsize(_kernel_dtype(out_dtype or dtype))
    w = _itemsize(_kernel_dtype(scale_dtype or dtype))
    bias_size = {"bwd": 4 * has_bias, "fwd": 0 if not has_bias else (
        4 if bias_dtype is None else _itemsize(_kernel_dtype(bias_dtype)))}
    # q is planned as the float32 y it quantizes (quantized_forward).
    quantized = {False: ("fwd", [s], [4]), True: ("fwd", [xs, s], [4, s])}
    cases = {
        "fwd": [("fwd", [s], [o])],
        "bwd": [("bwd", [s, o], [s])],
        "residual_fwd": [("fwd", [xs, s], [o, s])],
        "residual_bwd": [("bwd", [s, o, s], [s])],
        "quantized_fwd": list(quantized.values()) if has_residual is None
                         else [quantized[bool(has_residual)]],
    }
    names = list(cases) if op == "all" else [op]
    for name in names:
      for kind, ins, outs in cases[name]:
        try:
          p = plan(kind, rows, hidden, in_sizes=ins, out_sizes=outs,
                   sms=DEFAULT_NUM_SMS, scale_size=w,
                   bias_size=bias_size[kind],
                   copy_size=1 if name == "quantized_fwd" else None,
                   heads=heads)
        except ValueError as e:
          return f"{name}: {e}"
        if kind == "bwd" and (reason := _unlowered(p)) is not None:
          return f"{name}: {reason}"
    return None

  # ------------------------------------------- the Implementation methods --

  def forward(self, x, scale, bias, *, norm: base.Norm):
    """x (rows, hidden) -> (y in norm.out_dtype, rstd float32 (rows,))."""
    return self.forward_kernel(x, scale, eps=norm.eps,
                               scale_offset=norm.scale_offset,
                               out_dtype=norm.out_dtype, bias=bias,
                               cast_mode=norm.cast_mode)

  def backward(self, x, scale, bias, rstd, dy, *, norm: base.Norm):
    """-> (dx in x.dtype, dscale float32 or None, dbias float32 or None)."""
    outs = self.backward_kernel(x, scale, rstd, dy,
                                scale_offset=norm.scale_offset,
                                has_bias=bias is not None,
                                cast_mode=norm.cast_mode)
    return outs if bias is not None else (*outs, None)

  def residual_forward(self, x, residual, scale, bias, *, norm: base.Norm):
    """-> (y in norm.out_dtype, h = x + residual in residual.dtype, rstd)."""
    return self.residual_forward_kernel(
        x, residual, scale, eps=norm.eps, scale_offset=norm.scale_offset,
        out_dtype=norm.out_dtype, bias=bias, cast_mode=norm.cast_mode)

  def residual_backward(self, h, scale, bias, rstd, dy, dh, *,
                        norm: base.Norm):
    """-> (gradient of h in h.dtype, dscale float32 or None, dbias)."""
    outs = self.residual_backward_kernel(
        h, scale, rstd, dy, dh, scale_offset=norm.scale_offset,
        has_bias=bias is not None, cast_mode=norm.cast_mode)
    return outs if bias is not None else (*outs, None)

  def quantized_forward(self, x, residual, scale, bias, quant_scale, *,
                        norm: base.Norm):
    """-> (q in norm.quant_dtype, q_scale float32 (rows, 1), h or None).

    One pass: reads x (and residual), writes q, its per-row scale (and h).
    ``quant_scale``: None (dynamic, per row) or a float32 scalar (static).
    q is ``base.quantize`` of the float32 y this kernel computes as the
    forward with a float32 output does. Against NumPy's rule applied to
    that forward's output on an H200, q differed at 19 of 104 million
    elements, where y / q_scale lay within 1.7 float32 ulps of a rounding
    midpoint; XLA's own rule on the GPU differed there too
    (docs/mosaic_gpu.md).
    """
    _check_dtype("x", x)
    if residual is not None:
      _check_dtype("residual", residual)
    if norm.quant_dtype is None:
      raise ValueError("quantized_forward needs norm.quant_dtype; got None.")
    scale, bias = common.f32_if_wide(scale), common.f32_if_wide(bias)
    h_dtype = x.dtype if residual is None else residual.dtype
    static = quant_scale is not None
    arith = _arith(norm, h_dtype, scale, static)
    inv = None
    if static:
      # The reciprocal base.quantize multiplies by, computed by XLA alike.
      inv = jnp.float32(1.0) / jnp.asarray(quant_scale, jnp.float32)
    # Planned as the forward with a float32 y: the same register layout
    # and chunks, so the same float32 sums and y as that forward (q is
    # base.quantize of it bit for bit); q's 1-byte rows set the copy rules.
    ins = [x.dtype] + ([] if residual is None else [residual.dtype])
    outs_dt = [np.float32] + ([] if residual is None else [residual.dtype])
    p = self._plan("fwd", *x.shape, ins, outs_dt, scale, bias, copy_size=1)
    outs = mk.forward(x, residual, _kernel_scale(scale, p), plan=p,
                      eps=norm.eps,
                      offset=_offset(norm, arith), out_dtype=None,
                      bias=bias, arith=arith, quant_inverse=inv)
    q, stat = outs[0], outs[-1]
    h = outs[1] if residual is not None else None
    rows = x.shape[0]
    if static:
      q_scale = jnp.broadcast_to(
          jnp.asarray(quant_scale, jnp.float32).reshape(1, 1), (rows, 1))
    else:
      q_scale = stat.reshape(rows, 1)
    return q, q_scale, h

  # ---------------------------------------------------------- the kernels --

  def forward_kernel(self, x, scale, *, eps, scale_offset, out_dtype,
                     bias=None, cast_mode="float32"):
    """x (rows, hidden) -> (y in out_dtype, rstd float32 (rows,)).

    bias: None or (hidden,); cast_mode: "float32" or "llama".
    """
    _check_dtype("x", x)
    scale, bias = common.f32_if_wide(scale), common.f32_if_wide(bias)
    norm = base.Norm(eps=eps, scale_offset=scale_offset, cast_mode=cast_mode)
    arith = _arith(norm, x.dtype, scale)
    odt = _kernel_dtype(out_dtype)
    if self._wide_forward(x, None, scale, odt, bias, cast_mode):
      # y in x's dtype, which is odt (a float64 out_dtype is computed in
      # float32 and cast, as below).
      y, rstd = mw.forward(x, scale, eps=eps, scale_offset=scale_offset,
                           num_sms=self.num_sms)
      return y.astype(out_dtype), rstd
    p = self._plan("fwd", *x.shape, [x.dtype], [odt], scale, bias)
    y, rstd = mk.forward(x, None, _kernel_scale(scale, p), plan=p, eps=eps,
                         offset=_offset(norm, arith), out_dtype=odt,
                         bias=bias, arith=arith)
    return y.astype(out_dtype), rstd

  def _wide_args(self, scale, has_bias: bool, cast_mode: str):
    """The scale and "plain" arguments of ``wide_forward_reason`` and
    ``wide_backward_reason`` for a kernel call; None when a launch override
    (block_rows, stages, grid) asks for this module's plans."""
    if any(v is not None for v in (self.block_rows, self.stages, self.grid)):
      return None
    return dict(scale_dtype=None if scale is None else scale.dtype,
                has_scale=scale is not None,
                plain=_plain(has_bias, cast_mode,
                             0 if scale is None else scale.ndim))

  def _wide_forward(self, x, residual, scale, out_dtype, bias, cast_mode):
    """Whether a forward kernel call runs ``mosaic_gpu_wide.forward``."""
    kw = self._wide_args(scale, bias is not None, cast_mode)
    return kw is not None and wide_forward_reason(
        *x.shape, x.dtype, out_dtype=out_dtype,
        residual_dtype=None if residual is None else residual.dtype,
        has_residual=residual is not None, **kw) is None

  def _wide_backward(self, x, scale, dy, dh, has_bias, cast_mode):
    """Whether a backward kernel call runs ``mosaic_gpu_wide.backward``."""
    kw = self._wide_args(scale, has_bias, cast_mode)
    if kw is None or (dh is not None and dh.dtype != x.dtype):
      # dx is written over dh's row: the kernel takes dh in x's dtype.
      return False
    return wide_backward_reason(*x.shape, x.dtype, dy_dtype=dy.dtype,
                                has_dh=dh is not None, **kw) is None

  def backward_kernel(self, x, scale, rstd, dy, *, scale_offset,
                      has_bias=False, cast_mode="float32"):
    """-> (dx in x.dtype, dscale float32 (hidden,) or None), and dbias
    float32 (hidden,) last with ``has_bias``."""
    _check_dtype("x", x)
    scale, dy = common.f32_if_wide(scale), common.f32_if_wide(dy)
    if self._wide_backward(x, scale, dy, None, has_bias, cast_mode):
      return mw.backward(x, scale, rstd, dy, scale_offset=scale_offset,
                         num_sms=self.num_sms)
    norm = base.Norm(eps=1e-6, scale_offset=scale_offset, cast_mode=cast_mode)
    arith = _arith(norm, x.dtype, scale)
    p = self._plan("bwd", *x.shape, [x.dtype, dy.dtype], [x.dtype], scale,
                   has_bias=has_bias)
    outs = mk.backward(x, _kernel_scale(scale, p), rstd, dy, None, plan=p,
                       offset=_offset(norm, arith), has_bias=has_bias,
                       arith=arith, heads=_heads(scale))
    return _scale_shaped(outs, scale)

  def residual_forward_kernel(self, x, residual, scale, *, eps, scale_offset,
                              out_dtype, bias=None, cast_mode="float32"):
    """-> (y in out_dtype, h = x + residual in residual.dtype, rstd)."""
    _check_dtype("x", x)
    _check_dtype("residual", residual)
    scale, bias = common.f32_if_wide(scale), common.f32_if_wide(bias)
    norm = base.Norm(eps=eps, scale_offset=scale_offset, cast_mode=cast_mode)
    arith = _arith(norm, residual.dtype, scale)
    odt = _kernel_dtype(out_dtype)
    if self._wide_forward(x, residual, scale, odt, bias, cast_mode):
      y, h, rstd = mw.forward(x, scale, residual, eps=eps,
                              scale_offset=scale_offset,
                              num_sms=self.num_sms)
      return y.astype(out_dtype), h, rstd
    p = self._plan("fwd", *x.shape, [x.dtype, residual.dtype],
                   [odt, residual.dtype], scale, bias)
    y, h, rstd = mk.forward(x, residual, _kernel_scale(scale, p), plan=p,
                            eps=eps,
                            offset=_offset(norm, arith), out_dtype=odt,
                            bias=bias, arith=arith)
    return y.astype(out_dtype), h, rstd

  def residual_backward_kernel(self, h, scale, rstd, dy, dh, *,
                               scale_offset, has_bias=False,
                               cast_mode="float32"):
    """-> (gradient of h in h.dtype, dscale float32 or None), and dbias
    last with ``has_bias``."""
    _check_dtype("h", h)
    scale, dy, dh = (common.f32_if_wide(a) for a in (scale, dy, dh))
    if self._wide_backward(h, scale, dy, dh, has_bias, cast_mode):
      return mw.backward(h, scale, rstd, dy, dh, scale_offset=scale_offset,
                         num_sms=self.num_sms)
    norm = base.Norm(eps=1e-6, scale_offset=scale_offset, cast_mode=cast_mode)
    arith = _arith(norm, h.dtype, scale)
    p = self._plan("bwd", *h.shape, [h.dtype, dy.dtype, dh.dtype],
                   [h.dtype], scale, has_bias=has_bias)
    outs = mk.backward(h, _kernel_scale(scale, p), rstd, dy, dh, plan=p,
                       offset=_offset(norm, arith), has_bias=has_bias,
                       arith=arith, heads=_heads(scale))
    return _scale_shaped(outs, scale)
