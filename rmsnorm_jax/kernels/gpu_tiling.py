"""Launch configuration of the GPU kernels and the heuristic that fills it.

``Config`` is the one place each launch knob is named. A user (or a tuning
sweep) passes a partial ``Config`` to ``PallasGpu``; ``resolve`` returns the
same type with every field set, and the kernels read that plus what it
implies for the problem at hand (``gpu_kernels.Geometry``).

The kernels are memory-bound (a few flops per byte), so the choices aim at
(1) enough bytes in flight per SM to cover DRAM latency, (2) few enough
values per thread that nothing spills, and (3) a grid that covers every SM
even when the row count is small. The constants are the winners of tiling
sweeps on an H100 (``benchmarks/gpu_sweep.py``; numbers in
docs/gpu_perf_notes.md); other GPUs get the same shapes, with grids scaled by
their SM count.
"""

from __future__ import annotations

import dataclasses

import jax

from rmsnorm_jax import ops

# Widest padded row kept whole in registers; wider rows are walked in chunks.
MAX_RESIDENT_COLS = 16384

# Forward: elements per tile and per thread, by input itemsize. 16-bit rows:
# 8192-element tiles of 16 warps (8192x4096 bf16: 46.4 us; 4096-element
# tiles 45.7, 16384 47.8, 32 warps 51.5: within noise but the wider tiles
# lose); float32: 4 rows of 4096 with 16 warps (1024x4096: 10.7 us, the
# same as 2 rows of 8 warps and as XLA).
FWD_TILE = {2: 8192, 4: 16384}
FWD_ELEMS_PER_THREAD = {2: 16, 4: 32}
# Forward on a persistent grid (scale loaded once per program, next block
# prefetched) from this padded width up (4096x16384 bf16: 92.1 us; 126.7
# with one block per program, 115.4 without the prefetch); narrower rows do
# as well with one block per program.
FWD_PERSISTENT_MIN_COLS = 16384
FWD_PROGRAMS_PER_SM = 2

# Backward, rows of >= 1024 padded columns: 16 warps, 32 bytes of each input
# per thread, one program per SM walking row blocks (8192x4096 bf16: 72 us;
# 2 per SM 73.7, 8 warps 74.9, 32 warps 92.4, no prefetch 97.8; at
# 1024x4096 float32 three 8-warp programs per SM took 24.8 against 20.4:
# more partial sums to write and reduce, no better latency hiding).
BWD_WIDE_MIN_COLS = 1024
BWD_WARPS = 16
BWD_BYTES_PER_THREAD = 32
BWD_PROGRAMS_PER_SM = 1
# Narrow rows (e.g. 128-wide QK-norm): 2048-element tiles of 4 warps, four
# programs per SM (32768x128 bf16: 10.9 us against 11.5 for 4096-element
# tiles of 8 warps, two per SM, which held 111 registers per thread; one
# program per SM 13.4, eight 12.1).
BWD_NARROW_TILE = 2048
BWD_NARROW_WARPS = 4
BWD_NARROW_PROGRAMS_PER_SM = 4

# Prefetch the next row block / keep the scale in registers up to this padded
# width; at 16384 columns the extra registers spill (4096x16384 bf16
# backward: 631 us with prefetch, 242 with the cached scale, 203 without
# either).
PREFETCH_MAX_COLS = 8192
CACHE_SCALE_MAX_COLS = 8192
# Backward rows of this padded width are read twice (see Config.reload):
# holding x, dy and their products across the row reduction took 128
# registers per thread and spilled at 16384 columns.
RELOAD_MIN_COLS = 16384
# 16-bit rows of 16384 padded columns: 32 warps rather than 16 (half the
# values per thread: 4096x16384 bf16 backward 172.8 us against 195.7, fused
# 212.3 against 221.4; 2048x16384 f16 94.1 against 97.2), and the plain
# backward keeps the scale in registers (166.5 and 88.5 us) while the fused
# one, which also reads dh, does not (223.1). float32 rows keep 16 warps
# (fused 2048x16384 f32: 273.1 against 221.7). Sweep rounds 4 and 5.
BWD_WIDE16_WARPS = 32
# The forward holds no dscale accumulator, so it affords both up to 16384.
FWD_PREFETCH_MAX_COLS = 16384
FWD_CACHE_SCALE_MAX_COLS = 16384

# Chunked (wide-row) tiling: elements per chunk tile and the most rows.
CHUNK_TILE = 8192
MAX_CHUNK_ROWS = 16
ELEMS_PER_THREAD = 16
MAX_WARPS = 32
# Fewer programs than this many per SM leave SMs idle: shrink the row block.
MIN_WAVES = 1
DEFAULT_NUM_SMS = 132  # H100 SXM


OPS = tuple(ops.SIGNATURES)


@dataclasses.dataclass(frozen=True)
class Config:
  """Launch knobs of the GPU kernels; None means the measured heuristic.

  Attributes:
    block_rows: rows per tile (a power of two; others are rounded up).
    block_cols: columns per tile (a power of two; others are rounded up).
      Below the padded row width it forces the chunked (two-loop) tiling,
      where each row block is walked in ``block_cols``-wide chunks.
    num_warps: warps per program.
    programs_per_sm: programs per SM of a persistent grid.
    persistent: the forward runs on a persistent grid (programs walk row
      blocks and load the scale once). The backward of whole-row tiles always
      does and the chunked tiling never does; ``resolve`` sets it so.
    prefetch: a persistent program loads its next row block while working
      on the current one (its loads are in flight during the reduction and
      stores); only meaningful with more than one block per program.
    cache_scale: keep the scale (and bias) tile in registers across row
      blocks (else reload it per block from L1/L2; saves registers on wide
      rows).
    reload: backward only: read x and dy a second time, from L2, after the
      row reduction instead of keeping them in registers across it. On
      16384-wide rows the kept values did not fit (128 registers per thread
      and ~350 MB of local-memory spill traffic for 4096 rows, measured with
      Nsight Compute).
    num_stages: Triton software-pipelining depth of the kernels' loops.
    num_sms: SM count the grid is sized for (default: the device's).
  """

  block_rows: int | None = None
  block_cols: int | None = None
  num_warps: int | None = None
  programs_per_sm: int | None = None
  persistent: bool | None = None
  prefetch: bool | None = None
  cache_scale: bool | None = None
  reload: bool | None = None
  num_stages: int | None = None
  num_sms: int | None = None

  def __post_init__(self):
    for f in ("block_rows", "block_cols", "num_warps", "programs_per_sm",
              "num_stages", "num_sms"):
      v = getattr(self, f)
      if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
        raise ValueError(f"Config.{f} must be a positive int or None; got "
                         f"{v!r}.")

  @property
  def resolved(self) -> bool:
    return all(getattr(self, f.name) is not None
               for f in dataclasses.fields(self))


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _floor_pow2(n: int) -> int:
  return 1 << (max(1, int(n)).bit_length() - 1)


def num_sms() -> int:
  """Streaming multiprocessors of the first GPU, or the H100's 132."""
  try:
    dev = jax.devices("gpu")[0]
    count = getattr(dev, "core_count", None)
    if count:
      return int(count)
  except RuntimeError:
    pass
  return DEFAULT_NUM_SMS


def _warps_for(elements: int, per_thread: int) -> int:
  return max(1, min(MAX_WARPS, _floor_pow2(elements // (32 * per_thread))))


def _shrink_for_grid(block_rows: int, rows: int, sms: int) -> int:
  while block_rows > 1 and -(-rows // block_rows) < MIN_WAVES * sms:
    block_rows //= 2
  return block_rows


def _pick(value, default):
  return default if value is None else value


def resolve(config: Config, op: str, rows: int, hidden: int, *,
            itemsize: int = 2, heads: int = 1) -> Config:
  """``config`` with every None field chosen for one kernel call.

  Args:
    config: the user's partial configuration (None fields are chosen here;
      ``num_sms`` None means the device's).
    op: one of ``OPS``; the forward ops share one tiling.
    rows: rows of the call (with a per-head scale: all heads' rows).
    hidden: normalized width (with a per-head scale: head_dim).
    itemsize: bytes per element of the main input (2 or 4).
    heads: scale rows of a per-head scale (each head's rows are tiled
      apart, so a row block holds at most ``rows // heads`` rows).

  Returns:
    A ``Config`` with no None field; block sizes are powers of two.

  Raises:
    ValueError: unknown ``op``.
  """
  if op not in OPS:
    raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}.")
  c = config
  sms = c.num_sms or num_sms()
  fwd = not op.endswith("backward")
  isz = 4 if itemsize >= 4 else 2
  padded = next_pow2(hidden)
  want_cols = next_pow2(c.block_cols) if c.block_cols else None
  resident = padded <= MAX_RESIDENT_COLS and (
      want_cols is None or want_cols >= padded)
  per_sm = None
  max_warps = MAX_WARPS
  if not resident:
    br = next_pow2(c.block_rows) if c.block_rows else _shrink_for_grid(
        MAX_CHUNK_ROWS, rows, sms)
    bc = want_cols or max(256, min(padded, CHUNK_TILE // br))
    per_thread = ELEMS_PER_THREAD
    persistent = False
  elif fwd:
    bc = padded
    br = max(1, FWD_TILE[isz] // bc)
    per_thread = FWD_ELEMS_PER_THREAD[isz]
    persistent = _pick(c.persistent, bc >= FWD_PERSISTENT_MIN_COLS)
    per_sm = FWD_PROGRAMS_PER_SM
  else:
    bc = padded
    persistent = True
    if bc >= BWD_WIDE_MIN_COLS:
      per_thread = BWD_BYTES_PER_THREAD // isz
      br = max(1, BWD_WARPS * 32 * per_thread // bc)
      max_warps = BWD_WARPS
      if isz == 2 and bc >= RELOAD_MIN_COLS:
        max_warps = BWD_WIDE16_WARPS
      per_sm = BWD_PROGRAMS_PER_SM
    else:
      br = max(1, BWD_NARROW_TILE // bc)
      per_thread = BWD_NARROW_TILE // (32 * BWD_NARROW_WARPS)
      per_sm = BWD_NARROW_PROGRAMS_PER_SM
  if resident:
    br = next_pow2(c.block_rows) if c.block_rows else _shrink_for_grid(
        br, rows, sms)
  br = min(br, next_pow2(max(1, rows // heads)))
  cache_max = FWD_CACHE_SCALE_MAX_COLS if fwd else CACHE_SCALE_MAX_COLS
  if op == "backward" and isz == 2 and max_warps == BWD_WIDE16_WARPS:
    cache_max = MAX_RESIDENT_COLS
  prefetch_max = FWD_PREFETCH_MAX_COLS if fwd else PREFETCH_MAX_COLS
  return Config(
      block_rows=br, block_cols=bc,
      num_warps=c.num_warps or min(max_warps, _warps_for(br * bc, per_thread)),
      programs_per_sm=c.programs_per_sm or per_sm or FWD_PROGRAMS_PER_SM,
      persistent=bool(persistent),
      prefetch=bool(_pick(c.prefetch, bc <= prefetch_max)),
      cache_scale=bool(_pick(c.cache_scale, bc <= cache_max)),
      reload=bool(not fwd and resident
                  and _pick(c.reload, bc >= RELOAD_MIN_COLS)),
      num_stages=c.num_stages or 1, num_sms=sms)
