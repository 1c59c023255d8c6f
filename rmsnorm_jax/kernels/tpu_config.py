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
   (8 rows for 32-bit, 16 for 16-bit, 32 for 8-bit data, :func:`sublane_tile`,
   and for a per-head scale a multiple of the head count too) or all rows.
4. **Wide rows.** If even the smallest row block (one tile of rows, or all
   rows if fewer) of full rows does not fit the budget, the hidden axis is
   split into lane-aligned chunks and the kernels run in two passes over HBM
   (statistics, then the elementwise pass). That reads the inputs twice; it
   only happens for rows of roughly 100K+ elements (and on v4 for the
   backward of 64K-wide float32 rows), never for the shapes in
   ``shapes.TPU_AOT`` on v5e and later.

Inside a block the kernels work on row groups of at most
:data:`CHUNK_ELEMENTS` float32 elements (several lane chunks for wide rows),
so temporaries stay a few dozen vector registers whatever the block size;
except where a kernel keeps float32 copies of a whole row group live (the
quantized forward, whose row maximum needs the group's full rows:
``group_copies``), which :func:`footprint` then counts.

A user's :class:`Config` (``PallasTpu`` is one) overrides: ``block_rows``
replaces step 3 (it is rounded to the sublane tile); ``hidden_block`` forces
the two-pass path with that chunk width (a multiple of 128), which the tests
use to cover it on small shapes; ``vmem_limit_bytes`` replaces the computed
limit. :func:`choose` returns the Config resolved, a :class:`Blocking`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LANES = 128
# Row blocks and row groups are multiples of the native tile's rows of the
# narrowest streamed operand: a packed (16, 128) or (32, 128) tile must not
# be split across groups.
ROW_ALIGN_8BIT = 32
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


def _check_int(owner: str, name: str, value, *, minimum: int,
               multiple: int = 1, what: str):
  """``owner(name=value)`` must be None or an int >= minimum."""
  if value is None:
    return
  # bool is an int subclass; True as a block size is a mistake, not 1.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{owner}({name}=...) must be an int ({what}) or None; got "
        f"{value!r} of type {type(value).__name__}.")
  if value < minimum or value % multiple:
    kind = (f"a positive multiple of {multiple}" if multiple > 1
            else f"an int >= {minimum}")
    raise ValueError(
        f"{owner}({name}=...) must be {kind} ({what}); got {value}.")


@dataclasses.dataclass(frozen=True)
class Config:
  """The knobs of the TPU kernels; None leaves one to :func:`choose`.

  ``PallasTpu`` is a Config (a user sets the knobs on it), and
  :func:`choose` returns a :class:`Blocking`, the Config with every knob
  resolved for one call plus what follows from them.

  Attributes:
    block_rows: rows per grid step; rounded up to the sublane tile (8 rows
      for 32-bit, 16 for 16-bit, 32 for 8-bit streams, and a multiple of the
      head count for a per-head scale) unless it covers all rows. Blocks that
      do not fit the target TPU's VMEM raise ValueError when traced for it.
    hidden_block: lane width (a multiple of 128) of the two-pass path; set, it
      forces that path (tests use it to cover wide rows on small shapes).
      Resolved: None for the one-pass kernels.
    vmem_limit_bytes: Mosaic's scoped VMEM limit for the kernels.

  Raises (when made):
    TypeError: a knob that is not an int.
    ValueError: block_rows < 1, hidden_block not a positive multiple of 128,
      vmem_limit_bytes < 1 MiB.
  """

  block_rows: int | None = None
  hidden_block: int | None = None
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    owner = type(self).__name__
    _check_int(owner, "block_rows", self.block_rows, minimum=1,
               what="rows per grid step")
    _check_int(owner, "hidden_block", self.hidden_block, minimum=LANES,
               multiple=LANES, what="lanes per two-pass block")
    _check_int(owner, "vmem_limit_bytes", self.vmem_limit_bytes,
               minimum=MIB, what="Mosaic's scoped VMEM limit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocking(Config):
  """A :class:`Config` resolved for one kernel call, and its consequences.

  Attributes (besides the resolved knobs):
    group_rows: rows processed together inside a block.
    lane_chunk: lanes processed together inside a row group.
    footprint_bytes: modelled VMEM use of the pipelined blocks and scratch.
    chip: the chip the choice was made for.
  """

  group_rows: int
  lane_chunk: int
  footprint_bytes: int
  chip: str

  def describe(self) -> str:
    """Short text for reports: ``rows`` or ``rowsxlanes`` (two-pass)."""
    if self.hidden_block is None:
      return str(self.block_rows)
    return f"{self.block_rows}x{self.hidden_block} (2-pass)"


def round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def sublane_tile(itemsizes) -> int:
  """Rows of one native tile of the narrowest streamed dtype."""
  return {1: ROW_ALIGN_8BIT, 2: ROW_ALIGN_16BIT}.get(min(itemsizes),
                                                     ROW_ALIGN_32BIT)


def row_tile(itemsizes, heads: int = 1) -> int:
  """Rows the row block and row groups are multiples of.

  The native tile of the narrowest stream; with a per-head scale (``heads``
  > 1) also a multiple of the head count, so that each group starts at head
  0 and the kernels take the scale as one tile of this many rows.
  """
  return math.lcm(sublane_tile(itemsizes), heads)


def footprint(block_rows: int, width: int, streams, *, align: int,
              vectors: int, vector_rows: int = 1,
              accumulators: int = 0, group_copies: int = 0) -> int:
  """Modelled VMEM bytes of one grid step.

  Args:
    block_rows, width: block shape (width in lanes).
    streams: itemsizes of the operands streamed in ``(block_rows, width)``
      blocks, inputs and outputs; each is double-buffered.
    align: sublane tile of the blocks.
    vectors: float32 ``(vector_rows, width)`` blocks (scale, bias, dscale
      and dbias partials), double-buffered.
    vector_rows: 1, or the rows of a per-head scale tiled to ``align``.
    accumulators: ``(max(8, vector_rows), width)`` float32 VMEM scratch
      accumulators (dscale, dbias in the backward).
    group_copies: float32 copies of one row group (``_groups``' rows x
      ``width``) the kernel keeps live in VMEM beside its blocks.

  One per-row float32 stream (rstd or the quantization scale) is always
  counted: its ``(1, block_rows)`` block double-buffered plus a
  ``(block_rows, 1)`` column scratch, which pads to 128 lanes.
  """
  r = round_up(max(block_rows, 1), align)
  w = round_up(width, LANES)
  data = 2 * sum(streams) * r * w
  stats = (2 * round_up(r, LANES) + r * LANES) * F32_BYTES
  vec = vectors * 2 * vector_rows * w * F32_BYTES
  acc = accumulators * max(8, round_up(vector_rows, 8)) * w * F32_BYTES
  group = group_copies * _groups(r, w, align)[0] * w * F32_BYTES
  return data + stats + vec + acc + group


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


def choose(config: Config, *, rows: int, hidden: int, streams, vectors: int,
           accumulators: int = 0, group_copies: int = 0, heads: int = 1,
           chip: Chip | None = None) -> Blocking:
  """Resolves ``config`` for one kernel call (see the module docstring).

  Args:
    config: the user's knobs (None ones are chosen here).
    rows, hidden: the 2-D problem.
    streams: itemsizes of the operands streamed per element (inputs and
      outputs, e.g. ``(2, 2)`` for a bfloat16 forward).
    vectors, accumulators, group_copies: see :func:`footprint`.
    heads: rows of a per-head scale (row r uses scale[r % heads]); the row
      block and row groups are then multiples of ``lcm(tile, heads)``, so
      every group starts at head 0, and rows past the end of the array fill
      the last block rather than a block of exactly ``rows``.
    chip: the target; default :func:`detect_chip`.

  Returns:
    The :class:`Blocking`; ``hidden_block`` is None unless rows are split
    into lane chunks (two passes over HBM).

  Raises:
    ValueError: (on a known chip) a ``block_rows`` whose blocks and
      ``VMEM_HEADROOM_BYTES`` exceed VMEM.
  """
  chip = chip or detect_chip()
  align = row_tile(streams, heads)
  vector_rows = align if heads > 1 else 1
  budget = int(chip.vmem_bytes * VMEM_BUDGET_FRACTION)

  def fp_of(r, w):
    return footprint(r, w, streams, align=align, vectors=vectors,
                     vector_rows=vector_rows, accumulators=accumulators,
                     group_copies=group_copies)

  def fix_rows(r):
    r = max(1, int(r))
    if heads == 1:
      # A block of all rows is legal for any count.
      return rows if r >= rows else min(rows, round_up(r, align))
    return round_up(min(r, rows), align)

  min_rows = fix_rows(align)
  hidden_block = config.hidden_block
  two_pass = hidden_block is not None or (
      hidden > LANES and fp_of(min_rows, hidden) > budget)
  width = hidden
  if two_pass:
    if hidden_block is None:
      # Widest lane-aligned chunk whose minimal row block fits.
      lanes = round_up(hidden, LANES) // LANES
      while lanes > 1 and fp_of(min_rows, lanes * LANES) > budget:
        lanes = -(-lanes // 2)
      hidden_block = lanes * LANES
    width = min(hidden_block, round_up(hidden, LANES))

  bytes_per_row = sum(streams) * width
  if config.block_rows is not None:
    br = fix_rows(config.block_rows)
  else:
    target = chip.hbm_bytes_per_s * STEP_SECONDS
    total = bytes_per_row * rows
    step = max(MIN_STEP_BYTES, min(target, total / MIN_PIPELINE_STEPS))
    br = fix_rows(step // bytes_per_row)
    while br > min_rows and fp_of(br, width) > budget:
      br = fix_rows(br // 2) if br // 2 >= align else min_rows
  fp = fp_of(br, width)
  if (config.block_rows is not None and chip.known
      and fp + VMEM_HEADROOM_BYTES > chip.vmem_bytes):
    # The TPU compiler would fail later with a VMEM allocation error that
    # does not say which setting caused it. The kernels' temporaries and
    # Mosaic's scratch take about the headroom the limit allows for (v2, v3:
    # 1.7-2.9 MiB beyond blocks of 14.8-15.7 MiB, which failed in 16 MiB).
    raise ValueError(
        f"block_rows={config.block_rows} needs {fp / MIB:.1f} MiB of VMEM "
        f"per grid step ({br} x {width} blocks of {len(streams)} operands, "
        f"double-buffered) and {VMEM_HEADROOM_BYTES / MIB:.0f} MiB for the "
        f"kernel's temporaries, more than {chip.name}'s "
        f"{chip.vmem_bytes / MIB:.0f} MiB; use a smaller block_rows or leave "
        "it None.")
  group_rows, lane_chunk = _groups(br, width, align)
  return Blocking(
      block_rows=br, hidden_block=hidden_block if two_pass else None,
      vmem_limit_bytes=int(config.vmem_limit_bytes or vmem_limit(chip, fp)),
      group_rows=group_rows, lane_chunk=lane_chunk, footprint_bytes=int(fp),
      chip=chip.name)


def num_blocks(n: int, block: int) -> int:
  return math.ceil(n / block)


def itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize
