"""Block-size and VMEM choice for the TPU (Mosaic) kernels.

The rule, applied when a kernel is traced:

1. **Which chip.** ``pltpu.get_tpu_info()`` reads the device kind of the
   abstract mesh in context (``jax.set_mesh`` over TPU devices, which is how
   deviceless AOT compilation names its target) or else of the default device.
   When neither is a TPU (tracing on a CPU host, ``platform_dependent``
   tracing every branch, interpret mode, an export for ``platforms=["tpu"]``)
   the smallest generation is assumed: :data:`FALLBACK_VMEM_BYTES` (TPU v4's
   16 MiB per TensorCore) and :data:`FALLBACK_HBM_BYTES_PER_S` (v4's per-core
   share). Blocks chosen that way fit every generation, since later chips
   only have more VMEM.
2. **How much VMEM a step may use.** The pipelined blocks (each streamed
   operand double-buffered) plus the kernel's scratch must stay below
   ``VMEM_BUDGET_FRACTION`` of the chip's VMEM, and ``vmem_limit_bytes`` is
   always set explicitly (scoped-VMEM defaults differ between generations:
   16 MiB on v4/v5e, more on later chips) to the footprint plus
   :data:`VMEM_HEADROOM_BYTES` for in-kernel temporaries and Mosaic's internal
   scratch, never less than :data:`MIN_VMEM_LIMIT_BYTES` nor more than the
   chip has.
3. **How many rows per step.** Each grid step should move about
   ``STEP_SECONDS`` worth of HBM traffic at the chip's per-core bandwidth, so
   the fixed per-step cost (~0.35 us) stays small, and the grid should have at
   least ``MIN_PIPELINE_STEPS`` steps, so DMA overlaps compute and megacore
   chips (v4, v5p) have row blocks to split, as long as a step still moves at
   least ``MIN_STEP_BYTES``. The row block is a multiple of the sublane tile
   (8 rows for 32-bit, 16 for 16-bit data, :data:`ROW_ALIGN`) or all rows.
4. **Wide rows.** If even the smallest row block (``ROW_ALIGN`` rows, or all
   rows if fewer) of full rows does not fit the budget, the hidden axis is
   split into lane-aligned chunks and the kernels run in two passes over HBM
   (statistics, then the elementwise pass). That reads the inputs twice; it
   only happens for rows of roughly 100K+ elements (and on v4 for the
   backward of 64K-wide float32 rows), never for the shapes in
   ``shapes.TPU_AOT`` on v5e and later.

Inside a block the kernels work on row groups of at most
:data:`CHUNK_ELEMENTS` float32 elements (several lane chunks for wide rows),
so temporaries stay a few dozen vector registers whatever the block size.

A user's ``block_rows`` replaces step 3 (it is rounded to the sublane tile);
``hidden_block`` forces the two-pass path with that chunk width (a multiple
of 128), which the tests use to cover it on small shapes; ``vmem_limit_bytes``
replaces the computed limit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LANES = 128
# Row blocks and row groups are multiples of this when any streamed operand is
# 16-bit: a packed (16, 128) tile must not be split across groups.
ROW_ALIGN_16BIT = 16
ROW_ALIGN_32BIT = 8
F32_BYTES = 4
MIB = 1 << 20

# Assumed when the TPU generation cannot be learned at trace time: TPU v4,
# the smallest VMEM among supported chips (16 MiB per TensorCore) and its
# per-TensorCore share of HBM bandwidth (1.2 TB/s per chip, 2 cores).
FALLBACK_VMEM_BYTES = 16 * MIB
FALLBACK_HBM_BYTES_PER_S = 600e9

VMEM_BUDGET_FRACTION = 0.75
VMEM_HEADROOM_BYTES = 4 * MIB
MIN_VMEM_LIMIT_BYTES = 16 * MIB

# ~0.35 us fixed cost per grid step: 4 us steps keep it under ~10%.
STEP_SECONDS = 4e-6
MIN_STEP_BYTES = 512 * 1024
MIN_PIPELINE_STEPS = 8

# f32 elements per in-kernel working chunk: 32 vector registers of (8, 128).
CHUNK_ELEMENTS = 32 * 8 * LANES
# Row blocks are split over two grid slices in the backward so that megacore
# chips run one per TensorCore (single-core chips just iterate over both).
BACKWARD_SPLITS = 2


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the block choice needs to know about the target TPU core."""

  name: str
  vmem_bytes: int
  hbm_bytes_per_s: float
  known: bool


def detect_chip() -> Chip:
  """The TPU core being traced for, or the smallest one when unknown."""
  try:
    from jax.experimental.pallas import tpu as pltpu
    info = pltpu.get_tpu_info()
  except Exception:  # Not a TPU (CPU host, interpret mode, export).
    return Chip("unknown (assumed v4)", FALLBACK_VMEM_BYTES,
                FALLBACK_HBM_BYTES_PER_S, False)
  return Chip(str(info.chip_version), int(info.vmem_capacity_bytes),
              float(info.mem_bw_bytes_per_second), True)


@dataclasses.dataclass(frozen=True)
class Blocking:
  """The static schedule of one kernel call.

  Attributes:
    block_rows: rows per grid step (a multiple of ``row_align`` or all rows).
    row_align: the sublane tile the row block and row groups respect.
    group_rows: rows processed together inside a block.
    lane_chunk: lanes processed together inside a row group.
    hidden_block: ``None`` for the one-pass kernels (a step holds full rows);
      else the lane width of a block in the two-pass kernels.
    vmem_limit_bytes: passed to Mosaic.
    footprint_bytes: modelled VMEM use of the pipelined blocks and scratch.
    chip: the chip the choice was made for.
  """

  block_rows: int
  row_align: int
  group_rows: int
  lane_chunk: int
  hidden_block: int | None
  vmem_limit_bytes: int
  footprint_bytes: int
  chip: str

  def describe(self) -> str:
    """Short text for reports: ``rows`` or ``rowsxlanes`` (two-pass)."""
    if self.hidden_block is None:
      return str(self.block_rows)
    return f"{self.block_rows}x{self.hidden_block} (2-pass)"


def round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def row_align(itemsizes) -> int:
  return ROW_ALIGN_16BIT if min(itemsizes) < F32_BYTES else ROW_ALIGN_32BIT


def footprint(block_rows: int, width: int, streams, *, align: int,
              row_stats: int, hidden_accumulators: int) -> int:
  """Modelled VMEM bytes of one grid step.

  Args:
    block_rows, width: block shape (width in lanes).
    streams: itemsizes of the operands streamed in ``(block_rows, width)``
      blocks, inputs and outputs; each is double-buffered.
    align: sublane tile of the blocks.
    row_stats: per-row float32 ``(1, block_rows)`` blocks (rstd in or out),
      double-buffered, plus one ``(block_rows, 1)`` column scratch each,
      which pads to 128 lanes.
    hidden_accumulators: ``(1, width)`` float32 blocks (scale, dscale out),
      double-buffered; a backward (2 of them) also has the ``(8, width)``
      float32 dscale accumulator.
  """
  r = round_up(max(block_rows, 1), align)
  w = round_up(width, LANES)
  data = 2 * sum(streams) * r * w
  stats = row_stats * (2 * round_up(r, LANES) + r * LANES) * F32_BYTES
  acc = hidden_accumulators * 2 * w * F32_BYTES
  if hidden_accumulators > 1:
    acc += 8 * w * F32_BYTES
  return data + stats + acc


def vmem_limit(chip: Chip, fp: int) -> int:
  return int(min(chip.vmem_bytes, max(MIN_VMEM_LIMIT_BYTES,
                                      fp + VMEM_HEADROOM_BYTES)))


def _groups(block_rows: int, width: int, align: int) -> tuple[int, int]:
  """(group_rows, lane_chunk) so a group is at most CHUNK_ELEMENTS f32."""
  w = round_up(width, LANES)
  if w * align >= CHUNK_ELEMENTS:
    rows = align
  else:
    rows = max(align, (CHUNK_ELEMENTS // w) // align * align)
  rows = min(rows, block_rows)
  lanes = max(LANES, (CHUNK_ELEMENTS // max(rows, 1)) // LANES * LANES)
  return rows, min(lanes, w)


def choose(*, rows: int, hidden: int, streams, row_stats: int,
           hidden_accumulators: int, block_rows: int | None = None,
           hidden_block: int | None = None,
           vmem_limit_bytes: int | None = None,
           chip: Chip | None = None) -> Blocking:
  """Picks the schedule for one kernel call (see the module docstring).

  Args:
    rows, hidden: the 2-D problem.
    streams: itemsizes of the operands streamed per element (inputs and
      outputs, e.g. ``(2, 2)`` for a bfloat16 forward).
    row_stats, hidden_accumulators: see :func:`footprint`.
    block_rows: user override of the rows per step (rounded up to the
      sublane tile unless it covers all rows).
    hidden_block: forces the two-pass path with this lane width.
    vmem_limit_bytes: user override of the Mosaic VMEM limit.
    chip: the target; default :func:`detect_chip`.

  Returns:
    The :class:`Blocking`; ``hidden_block`` is None unless rows are split
    into lane chunks (two passes over HBM).

  Raises:
    ValueError: ``block_rows`` < 1, ``hidden_block`` not a positive multiple
      of 128, or (on a known chip) a ``block_rows`` whose blocks exceed VMEM.
  """
  chip = chip or detect_chip()
  align = row_align(streams)
  budget = int(chip.vmem_bytes * VMEM_BUDGET_FRACTION)
  if block_rows is not None and block_rows < 1:
    raise ValueError(f"block_rows must be a positive int; got {block_rows}.")
  if hidden_block is not None and (hidden_block < LANES
                                   or hidden_block % LANES):
    raise ValueError(
        f"hidden_block must be a positive multiple of {LANES}; got "
        f"{hidden_block}.")

  def fits(r, w):
    return footprint(r, w, streams, align=align, row_stats=row_stats,
                     hidden_accumulators=hidden_accumulators) <= budget

  def fix_rows(r):
    r = max(1, int(r))
    return rows if r >= rows else min(rows, round_up(r, align))

  min_rows = min(rows, align)
  two_pass = hidden_block is not None or (
      hidden > LANES and not fits(min_rows, hidden))
  width = hidden
  if two_pass:
    if hidden_block is None:
      # Widest lane-aligned chunk whose minimal row block fits.
      lanes = round_up(hidden, LANES) // LANES
      while lanes > 1 and not fits(min_rows, lanes * LANES):
        lanes = -(-lanes // 2)
      hidden_block = lanes * LANES
    width = min(hidden_block, round_up(hidden, LANES))

  bytes_per_row = sum(streams) * width
  if block_rows is not None:
    br = fix_rows(block_rows)
  else:
    target = chip.hbm_bytes_per_s * STEP_SECONDS
    total = bytes_per_row * rows
    step = max(MIN_STEP_BYTES, min(target, total / MIN_PIPELINE_STEPS))
    br = fix_rows(step // bytes_per_row)
    while br > min_rows and not fits(br, width):
      br = fix_rows(br // 2) if br // 2 >= align else min_rows
  fp = footprint(br, width, streams, align=align, row_stats=row_stats,
                 hidden_accumulators=hidden_accumulators)
  if block_rows is not None and chip.known and fp > chip.vmem_bytes:
    # Mosaic would fail later with a VMEM allocation error that does not
    # say which setting caused it.
    raise ValueError(
        f"block_rows={block_rows} needs {fp / MIB:.1f} MiB of VMEM per grid "
        f"step ({br} x {width} blocks of {len(streams)} operands, double-"
        f"buffered), more than {chip.name}'s {chip.vmem_bytes / MIB:.0f} MiB;"
        " use a smaller block_rows or leave it None.")
  limit = vmem_limit_bytes or vmem_limit(chip, fp)
  group_rows, lane_chunk = _groups(br, width, align)
  return Blocking(block_rows=br, row_align=align, group_rows=group_rows,
                  lane_chunk=lane_chunk,
                  hidden_block=hidden_block if two_pass else None,
                  vmem_limit_bytes=int(limit), footprint_bytes=int(fp),
                  chip=chip.name)


def num_blocks(n: int, block: int) -> int:
  return math.ceil(n / block)


def itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize
