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

A device kind that was tuned (``python -m rmsnorm_jax.tune``) has a data file
``kernels/tuning/<slug>.json`` holding the chosen knobs per op and shape class
with the measurements behind them; ``resolve`` takes its knobs before the
heuristic's (see docs/tuning.md). The file is read once per process, on the
first call that needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax

from rmsnorm_jax import ops

# Widest padded row of a tuning file entry, and the width past which
# kernels/gpu.py counts a row as chunked for backend="auto".
MAX_RESIDENT_COLS = 16384
# Widest padded row the heuristic keeps whole in registers; wider rows are
# walked in chunks. A user block_cols >= the padded row asks for whole-row
# tiles at any width.
HEURISTIC_RESIDENT_MAX_COLS = MAX_RESIDENT_COLS
# 16-bit rows stay whole up to 32768 padded columns: one 32-warp program per
# SM holds 32 values per thread in its 64 registers (sweep round 6, H200,
# 2048x32768 bf16, us: forward 83.4 against 110.8 chunked, fused forward
# 146.6 against 205.1, backward 220.6 against 276.1, fused backward 275.9
# against 311.1; round 8, with the backward in 16384-wide pieces
# (BWD_PIECE_COLS): 180.3 and 221.3). The chunked forward's second loop re-read x from DRAM:
# all 256 programs of 8 rows are in flight at once, 128 MB of rows against
# a 60 MB L2 (Nsight Compute: 257 MB of DRAM reads for 134 MB of x, 37% L2
# hits; whole rows: 134 MB). At 65536 columns whole rows spill (64 values
# per thread: forward 156.1, backward 519.7) and stay chunked.
HEURISTIC_RESIDENT16_MAX_COLS = 32768


def heuristic_resident_cols(itemsize: int) -> int:
  """Widest padded row the heuristic keeps whole for inputs of ``itemsize``
  bytes; wider rows are walked in chunks."""
  return (HEURISTIC_RESIDENT_MAX_COLS if itemsize >= 4
          else HEURISTIC_RESIDENT16_MAX_COLS)

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
# Past 16384 padded columns a 32-warp program takes the SM's registers: one
# per SM (2048x32768 bf16: 83.4 us, 83.8 asking for two).
FWD_WIDE_PROGRAMS_PER_SM = 1

# Backward, rows of >= 1024 padded columns: 16 warps, 32 bytes of each input
# per thread, one program per SM walking row blocks (8192x4096 bf16: 72 us;
# 2 per SM 73.7, 8 warps 74.9, 32 warps 92.4, no prefetch 97.8; at
# 1024x4096 float32 three 8-warp programs per SM took 24.8 against 20.4:
# more partial sums to write and reduce, no better latency hiding).
BWD_WIDE_MIN_COLS = 1024
BWD_WARPS = 16
BWD_BYTES_PER_THREAD = 32
BWD_PROGRAMS_PER_SM = 1
# Narrow rows (e.g. 128 wide): 2048-element tiles of 4 warps, four
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
# The forward keeps the bias in registers beside the scale only while a
# thread holds at most this many of a row's columns (block_cols / threads);
# a per-feature vector costs that many registers per thread. H200, forward
# with a bias, us, bias kept against reloaded per row block: 16 per thread
# (8192-wide rows, 16 warps) 4096x8192 bf16 40.9 against 37.3, 2048x8192
# f16 21.8 against 19.6 (the plain forward without a bias: 34.6 and 18.2);
# 8 per thread (4096-wide, 16 warps) 8192x4096 bf16 35.1 against 36.6; 4
# per thread 16384x4096 69.3 against 72.2 and 16384x2048 37.5 against 37.1.
FWD_CACHE_BIAS_MAX_PER_THREAD = 8
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
# The float16 backward with a bias on rows of this padded width runs this
# many warps instead of the heuristic's or the tuning file's (whose entries
# were timed without a bias, on bfloat16). H200, us, 16 / 8 warps: with a
# bias 2048x8192 f16 39.5 / 36.0, 4096x8192 f16 69.9 / 62.8; bfloat16 with
# a bias 34.2 / 35.7, 60.3 / 62.7, float16 without 31.3 / 32.3, 56.8 /
# 59.1, so neither takes it. Likely cause, not profiled: the 16-warp
# program's 128-register cap, which the bias's accumulator passes with
# float16's conversions only. The compiled kernels agree (sm_90a,
# benchmarks/triton_registers.py with pip Triton 3.6, 2048x8192): at 16
# warps only the float16 one with a bias spills (4 bytes a thread; not
# bfloat16, not without a bias); at 8 warps it holds 254 registers
# unspilled. Two programs of 8 warps per SM timed 41.2 and 68.8.
BWD_F16_BIAS_COLS = 8192
BWD_F16_BIAS_WARPS = 8
# The fused residual backward (which also reads dh) in the same case runs
# this many. H200, us, default 16 / 8 / 32 warps: 2048x8192 f16 129.0 /
# 103.0 / 77.5, 4096x8192 f16 248.6 / 195.2 / 149.0 (without a bias, 16
# warps: 39.3, 72.7; bfloat16 with a bias 52.1 and 92.7 at 16 warps, 84.1
# and 157.4 at 32, so bfloat16 keeps the heuristic). Still about twice the
# time without a bias; not profiled. On Hopper "auto" runs the Mosaic GPU
# fused backward there (mosaic_gpu.AUTO_BIAS_FUSED_BWD_COLS).
FUSED_BWD_F16_BIAS_WARPS = 32
# Whole-row backward tiles wider than this (with reload) are walked in
# static pieces of this width, one dscale accumulator per piece
# (gpu_kernels._backward_pieces).
BWD_PIECE_COLS = 16384
# The forward holds no dscale accumulator, so it affords both up to 16384.
FWD_PREFETCH_MAX_COLS = 16384
FWD_CACHE_SCALE_MAX_COLS = 16384

# The forward of 16-bit rows of this padded width with a bias: two rows of
# 32 warps, one program per SM (persistent), over the tuning file's launch
# for the forward without a bias, which re-reads the bias from L1 per row
# (16 columns a thread: too many to keep beside the scale,
# FWD_CACHE_BIAS_MAX_PER_THREAD). H200, us, the file's one row of 16 warps
# against this launch: 4096x8192 bf16 37.7 against 35.9, 2048x8192 f16 19.5
# against 18.8 (both with L1 in the loads' path); two rows of 16 warps
# 37.6 and 19.8, one row of 32 warps 39.9 and 21.2. At 2048 columns this
# launch lost (16384x2048 bf16: 63.8 against 35.4).
FWD_BIAS_COLS = 8192
FWD_BIAS_LAUNCH = dict(block_rows=2, num_warps=32, programs_per_sm=1,
                       persistent=True)
# Whole-row tiles load the row inputs past L1 (Config.bypass_l1), in every
# op. H200, us, the kernels' default launches with L1 in the path against
# past it, two runs each in one device session: forward 8192x4096 bf16
# 34.6/34.4 against 33.2/33.6, 2048x8192 f16 18.1/18.0 against 17.8/17.7,
# 4096x8192 bf16 34.2/34.3 against 33.4/33.4; backward 55.6/56.0 against
# 54.8/54.4, 30.2/30.5 against 29.9/29.9, 56.3/56.3 against 54.9/55.3;
# the forward with a bias 34.9/34.9 against 33.9/33.6, 19.4/19.3 against
# 18.8/18.9, 37.1/37.4 against 35.9/36.0; the backward with a bias 58.0/58.8
# against 57.4/57.2; the fused forward 66.9/67.0 against 66.5/66.8. The
# quantized forwards lost past L1 (int8 29.7 against 34.4 at 8192x4096)
# while their loads used half of every sector (gpu_kernels._Tile._window);
# with whole 16-byte loads they win too: int8 8192x4096 28.6 against 29.5,
# 16384x4096 55.1 against 56.6; float8 27.4 against 28.4 and 51.7 against
# 54.1; with a residual, int8 8192x4096 60.0 against 62.1, 2048x8192 f16
# 33.4 against 34.3, 16384x4096 116.6 against 122.0 (16384x2048, one warp a
# row: 58.6 against 57.5).

# Chunked (wide-row) tiling: elements per chunk tile and the most rows.
CHUNK_TILE = 8192
MAX_CHUNK_ROWS = 16
ELEMS_PER_THREAD = 16
MAX_WARPS = 32
# The forward of 16-bit rows too wide to stay whole: one row per program in
# 32768-wide chunks (32 warps, one program per SM), so that about 132 rows
# (17 MB at 65536 columns) are in flight and the second loop finds them in
# L2 (sweep round 7, H200, 1024x65536 bf16, us: forward 90.8 against 111.8
# for 4-row blocks of 2048-wide chunks, 99.2 with 16384-wide chunks, 106.4
# with one row of 8192; fused forward 190.0 against 210.0, 186.8 with
# 16384-wide chunks). The backward keeps its row blocks: one-row programs
# would each write a partial dscale row (grid x hidden floats).
FWD_CHUNK16_ROWS = 1
FWD_CHUNK16_COLS = 32768
# Per-head scales: a token's heads are one tile (gpu_kernels.Geometry.fold)
# while their padded width, next_pow2(heads) * next_pow2(head_dim), is at
# most this; the call is then tiled as rows of that width (and takes the
# tuning file's entries of that width). Wider tokens tile each head apart.
FOLD_MAX_COLS = MAX_RESIDENT_COLS
# The folded forward of tokens this wide or wider runs twice the warps of
# the plain rows' launch (tuned or heuristic): its tile holds a row
# reduction per head. H200, bf16 unless named, us, per-head forward with
# heads of 128 (folded with the plain launch; with twice its warps; heads
# apart on a second grid axis): 8192x32: 36.7, 34.4, 35.8; 16384x32: 72.4,
# 68.8, 72.0; 4096x64: 37.2, 34.7, 38.0; 2048x64 f16: 18.5, 17.5, 18.6. At
# 16384x16 (2048 columns) twice the warps lost (35.3 against 40.5).
FOLD_FWD_WIDE_COLS = 4096
# Fewer programs than this many per SM leave SMs idle: shrink the row block.
MIN_WAVES = 1
DEFAULT_NUM_SMS = 132  # H100 SXM


# The quantized forward with a residual is tuned under its own key: it reads
# x and residual and writes h beside q, so its best launch is not the one
# without (H200, 8192x4096 bf16, int8: the launch chosen without a residual,
# one-row programs of 8 warps, 4 per SM, took 73.1 us with one, against 62.3
# for one-row programs of 16 warps, one block each; without a residual 29.9
# against 36.2 for 2-row programs of 16 warps).
QUANTIZED_RESIDUAL_OP = "quantized_residual_forward"
OPS = tuple(ops.SIGNATURES) + (QUANTIZED_RESIDUAL_OP,)


# The Config fields that are switches (True, False or None).
BOOL_KNOBS = ("persistent", "prefetch", "cache_scale", "reload", "bypass_l1")


@dataclasses.dataclass(frozen=True)
class Config:
  """Launch knobs of the GPU kernels; None means the measured heuristic.

  Attributes:
    block_rows: rows per tile (a power of two; others are rounded up).
    block_cols: columns per tile (a power of two; others are rounded up).
      Below the padded row width it forces the chunked (two-loop) tiling,
      where each row block is walked in ``block_cols``-wide chunks; at or
      above it, whole-row tiles, also for rows wider than the heuristic
      keeps whole (``HEURISTIC_RESIDENT_MAX_COLS``).
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
    bypass_l1: the row inputs (x, residual, dy, dh) are loaded past L1
      (PTX ``ld.global.cg``; the scale, bias and rstd still through it).
      ``resolve`` turns it on for whole-row tiles; tuning files do not set
      it.
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
  bypass_l1: bool | None = None

  def __post_init__(self):
    for f in ("block_rows", "block_cols", "num_warps", "programs_per_sm",
              "num_stages", "num_sms"):
      v = getattr(self, f)
      if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
        raise ValueError(f"Config.{f} must be a positive int or None; got "
                         f"{v!r}.")
    for f in BOOL_KNOBS:
      v = getattr(self, f)
      if v is not None and not isinstance(v, bool):
        raise ValueError(f"Config.{f} must be True, False or None; got "
                         f"{v!r}.")

  @property
  def resolved(self) -> bool:
    return all(getattr(self, f.name) is not None
               for f in dataclasses.fields(self))


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _floor_pow2(n: int) -> int:
  return 1 << (max(1, int(n)).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _first_gpu():
  # Cached: resolve runs at every trace of every kernel call.
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


_GPU_PLATFORMS = ("cuda", "gpu", "rocm")


def abstract_gpu():
  """The abstract device of the abstract mesh in context, where it names a
  GPU (``jax.sharding.use_abstract_mesh``: ahead-of-time lowering for a GPU
  the host does not have), or None."""
  dev = jax.sharding.get_abstract_mesh().abstract_device
  return dev if dev is not None and dev.platform in _GPU_PLATFORMS else None


def num_sms() -> int:
  """Streaming multiprocessors of the GPU the kernels are lowered for: the
  abstract GPU device's ``num_cores`` where one is in context and gives it,
  else the first visible GPU's, else the H100's 132."""
  abstract = abstract_gpu()
  if abstract is not None and abstract.num_cores:
    return int(abstract.num_cores)
  count = getattr(_first_gpu(), "core_count", None)
  return int(count) if count else DEFAULT_NUM_SMS


def gpu_kind() -> str | None:
  """``device_kind`` of the GPU the kernels are lowered for (e.g. ``"NVIDIA
  H200"``): an abstract GPU device in context (``abstract_gpu``) names it,
  as it does for jax's own Triton lowering; else the first GPU, or None
  where JAX has none. JAX picks one device kind per process in practice,
  and a trace cannot see its device."""
  abstract = abstract_gpu()
  if abstract is not None:
    return str(abstract.device_kind)
  dev = _first_gpu()
  return None if dev is None else str(dev.device_kind)


def _warps_for(elements: int, per_thread: int) -> int:
  return max(1, min(MAX_WARPS, _floor_pow2(elements // (32 * per_thread))))


def _shrink_for_grid(block_rows: int, rows: int, sms: int) -> int:
  while block_rows > 1 and -(-rows // block_rows) < MIN_WAVES * sms:
    block_rows //= 2
  return block_rows


def _pick(value, default):
  return default if value is None else value


# ------------------------------------------------------------ tuned data --

TUNING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "tuning")
# Searched before TUNING_DIR, so that a GPU tuned after installation needs
# no write into the installed package.
TUNING_DIR_ENV = "RMSNORM_JAX_TUNING_DIR"
SCHEMA = 1
# The knobs a tuning file sets. block_cols follows from the shape (files
# cover whole-row tiles only) and num_sms from the device.
TUNED_KNOBS = ("block_rows", "num_warps", "programs_per_sm", "persistent",
               "prefetch", "cache_scale", "reload", "num_stages")
_INT_KNOBS = frozenset(("block_rows", "num_warps", "programs_per_sm",
                        "num_stages"))
DECISIONS = ("tuned", "heuristic")
# An entry measured at an exact width that pads to its class serves calls
# of that width on rows within this many powers of two of its own; others
# take the class's entries. H200, forward 5120 16-bit columns, us: the
# launch chosen on 8192 rows (4 warps, 4 programs an SM) 43.3 against the
# class entry's 47.6 there, but 12.3 against 11.1 on 2048 float16 rows.
EXACT_WIDTH_ROWS_LOG2 = 1
# resolve's device_kind default: the kind of the GPU the kernels run on.
AUTO = "auto"


class TuningFileError(ValueError):
  """A tuning file that cannot be read as the schema says (names the file
  and the key)."""


def device_slug(kind: str) -> str:
  """File stem of a device kind: ``"NVIDIA H200"`` -> ``"nvidia_h200"``.

  Raises:
    ValueError: ``kind`` has no letter or digit.
  """
  slug = re.sub(r"[^a-z0-9]+", "_", str(kind).lower()).strip("_")
  if not slug:
    raise ValueError(f"device kind must contain a letter or digit; got "
                     f"{kind!r}.")
  return slug


def tuning_file(kind: str) -> str | None:
  """Path of the tuning file of device ``kind`` (``$RMSNORM_JAX_TUNING_DIR``
  first, then the package's), or None when neither has one."""
  name = device_slug(kind) + ".json"
  dirs = [os.environ.get(TUNING_DIR_ENV), TUNING_DIR]
  for d in dirs:
    if d and os.path.isfile(os.path.join(d, name)):
      return os.path.join(d, name)
  return None


def _bad(path, key, expected, got):
  return TuningFileError(f"tuning file {path}: {key}: expected {expected}; "
                         f"got {got!r}.")


def _check_int(path, key, v, pow2=False):
  if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (
      pow2 and v & (v - 1)):
    raise _bad(path, key, "a positive int" + (" power of two" if pow2
                                              else ""), v)


def validate_knobs(knobs, path: str = "<config>", key: str = "chosen"
                   ) -> dict:
  """Checks a ``{knob: value}`` dict of a tuning file entry.

  Args:
    knobs: names from ``TUNED_KNOBS``; ints >= 1 (block_rows a power of
      two) or bools as ``Config`` types them.
    path, key: named in the error.

  Returns:
    ``knobs`` (a dict).

  Raises:
    TuningFileError: not a dict, an unknown knob or a value of the wrong
      type, naming ``path`` and the knob's key.
  """
  if not isinstance(knobs, dict):
    raise _bad(path, key, "an object of knobs", knobs)
  for name, v in knobs.items():
    if name not in TUNED_KNOBS:
      raise _bad(path, f"{key}.{name}", "one of " + ", ".join(TUNED_KNOBS),
                 name)
    if name in _INT_KNOBS:
      _check_int(path, f"{key}.{name}", v, pow2=name == "block_rows")
    elif not isinstance(v, bool):
      raise _bad(path, f"{key}.{name}", "true or false", v)
  return knobs


def validate_table(data, path: str = "<tuning data>") -> dict:
  """Checks a parsed tuning file and indexes what ``resolve`` reads.

  Args:
    data: the file's JSON: ``{"schema": 1, "device_kind": str, "runs":
      [...], "entries": [{"op", "itemsize", "cols", "rows", "decision",
      "chosen", "candidates", ...}, ...]}`` (docs/tuning.md). An entry may
      name the exact ``hidden`` it was measured at, a width below ``cols``
      that pads to it (e.g. 4608 in the 8192 class); it then serves that
      width only.
    path: named in errors.

  Returns:
    ``{(op, itemsize, cols): [(rows, hidden or None, knobs), ...]}`` sorted;
    knobs is ``{}`` where the heuristic was kept (``decision ==
    "heuristic"``).

  Raises:
    TuningFileError: any field missing or of the wrong type or value,
      naming ``path`` and the field's key (e.g. ``entries[3].chosen``).
  """
  if not isinstance(data, dict):
    raise _bad(path, "top level", "an object", type(data).__name__)
  if data.get("schema") != SCHEMA:
    raise _bad(path, "schema", SCHEMA, data.get("schema"))
  if not isinstance(data.get("device_kind"), str):
    raise _bad(path, "device_kind", "a string", data.get("device_kind"))
  entries = data.get("entries")
  if not isinstance(entries, list):
    raise _bad(path, "entries", "a list", entries)
  index = {}
  for i, e in enumerate(entries):
    key = f"entries[{i}]"
    if not isinstance(e, dict):
      raise _bad(path, key, "an object", e)
    if e.get("op") not in OPS:
      raise _bad(path, f"{key}.op", "one of " + ", ".join(OPS), e.get("op"))
    if e.get("itemsize") not in (2, 4) or isinstance(e.get("itemsize"),
                                                     bool):
      raise _bad(path, f"{key}.itemsize", "2 or 4", e.get("itemsize"))
    _check_int(path, f"{key}.cols", e.get("cols"), pow2=True)
    if e["cols"] > MAX_RESIDENT_COLS:
      raise _bad(path, f"{key}.cols", f"at most {MAX_RESIDENT_COLS} (whole-"
                 "row tiles)", e["cols"])
    _check_int(path, f"{key}.rows", e.get("rows"))
    hidden = e.get("hidden")
    if hidden is not None:
      _check_int(path, f"{key}.hidden", hidden)
      if hidden >= e["cols"] or next_pow2(hidden) != e["cols"]:
        raise _bad(path, f"{key}.hidden", f"a width that pads to cols="
                   f"{e['cols']} (below it)", hidden)
    if e.get("decision") not in DECISIONS:
      raise _bad(path, f"{key}.decision", " or ".join(DECISIONS),
                 e.get("decision"))
    chosen = validate_knobs(e.get("chosen"), path, f"{key}.chosen")
    cands = e.get("candidates", [])
    if not isinstance(cands, list):
      raise _bad(path, f"{key}.candidates", "a list", cands)
    for j, cand in enumerate(cands):
      ck = f"{key}.candidates[{j}]"
      if not isinstance(cand, dict):
        raise _bad(path, ck, "an object", cand)
      validate_knobs(cand.get("config"), path, f"{ck}.config")
      us = cand.get("us")
      if us is not None and (isinstance(us, bool)
                             or not isinstance(us, (int, float))):
        raise _bad(path, f"{ck}.us", "a number or null", us)
    slot = index.setdefault((e["op"], e["itemsize"], e["cols"]), [])
    if any(r == e["rows"] and h == hidden for r, h, _ in slot):
      raise _bad(path, key, "one entry per (op, itemsize, cols, hidden, "
                 "rows)", (e["op"], e["itemsize"], e["cols"], hidden,
                           e["rows"]))
    slot.append((e["rows"], hidden, dict(chosen)
                 if e["decision"] == "tuned" else {}))
  for slot in index.values():
    slot.sort(key=lambda rhk: (rhk[0], rhk[1] or 0))
  return index


@functools.lru_cache(maxsize=None)
def _table(kind: str):
  path = tuning_file(kind)
  if path is None:
    return None
  try:
    with open(path, encoding="utf-8") as fp:
      data = json.load(fp)
  except (OSError, ValueError) as e:
    raise TuningFileError(f"tuning file {path}: not readable as JSON: "
                          f"{e}") from e
  index = validate_table(data, path)
  if data["device_kind"] != kind:
    raise _bad(path, "device_kind", repr(kind), data["device_kind"])
  return index


def clear_cache() -> None:
  """Forgets the GPU found and the tuning files read (after writing one)."""
  _table.cache_clear()
  _first_gpu.cache_clear()


def tuned_knobs(kind: str | None, op: str, rows: int, cols: int,
                itemsize: int, hidden: int | None = None) -> dict:
  """The knobs the tuning file of ``kind`` chose for this call.

  Matching: the same op, itemsize class (2 or 4 bytes) and padded width
  ``cols``; among those, the entries measured at this exact ``hidden`` (a
  width that pads to ``cols``) on rows within ``EXACT_WIDTH_ROWS_LOG2``
  powers of two of the call's where there are any, else the entries of the
  whole class; of those, the one whose row count is nearest in log2 (ties:
  the larger). Rows are only matched loosely because the row block is
  still shrunk for the grid (see ``resolve``).

  Args:
    kind: a device kind (None: no device, so no knobs).
    op: one of ``OPS``.
    rows, cols: the call's rows and padded width (a power of two).
    itemsize: 2 or 4.
    hidden: the call's row width (default ``cols``).

  Returns:
    ``{knob: value}`` (empty: no file, no entry for the key, or the
    heuristic kept there).

  Raises:
    TuningFileError: the device's file is malformed.
  """
  if kind is None:
    return {}
  table = _table(kind)
  if not table:
    return {}
  slot = table.get((op, itemsize, cols), [])
  target = math.log2(max(1, rows))
  exact = [(r, k) for r, h, k in slot if h is not None and h == hidden
           and abs(math.log2(r) - target) <= EXACT_WIDTH_ROWS_LOG2]
  slot = exact or [(r, k) for r, h, k in slot if h is None]
  if not slot:
    return {}
  _, knobs = min(slot, key=lambda rk: (abs(math.log2(rk[0]) - target),
                                       -rk[0]))
  return knobs


def has_entry(kind: str | None, op: str, rows: int, cols: int, itemsize: int,
              hidden: int | None = None) -> bool:
  """Whether the tuning file of ``kind`` has an entry measured at exactly
  this case (``hidden`` None or ``cols``: a class entry)."""
  table = _table(kind) if kind is not None else None
  exact = None if hidden in (None, cols) else hidden
  return any(r == rows and h == exact
             for r, h, _ in (table or {}).get((op, itemsize, cols), []))


def fold_cols(hidden: int, heads: int) -> int:
  """Padded width of one token's heads in a folded tile."""
  return next_pow2(heads) * next_pow2(hidden)


def fold_heads(config: Config, hidden: int, heads: int) -> bool:
  """Whether a per-head call tiles whole tokens (see ``FOLD_MAX_COLS``); a
  user ``block_cols`` asks for it by covering ``fold_cols``."""
  if heads <= 1:
    return False
  if config.block_cols:
    return next_pow2(config.block_cols) >= fold_cols(hidden, heads)
  return fold_cols(hidden, heads) <= FOLD_MAX_COLS


def resolve(config: Config, op: str, rows: int, hidden: int, *,
            itemsize: int = 2, heads: int = 1,
            device_kind: str | None = AUTO, bias: bool = False,
            float16_bias: bool = False) -> Config:
  """``config`` with every None field chosen for one kernel call.

  Each knob comes from, in order: ``config``; the device's tuning file
  (``tuned_knobs``; whole-row tiles only); the heuristic. A tuned
  ``block_rows`` is shrunk like the heuristic's when the rows leave SMs
  idle, and a tuned ``num_warps`` shrinks with it (same values per thread).

  Args:
    config: the user's partial configuration (None fields are chosen here;
      ``num_sms`` None means the device's).
    op: one of ``OPS``; the forward ops share one heuristic tiling.
    rows: rows of the call (with a per-head scale: all heads' rows).
    hidden: normalized width (with a per-head scale: head_dim).
    itemsize: bytes per element of the main input (2 or 4).
    heads: scale rows of a per-head scale. Whole tokens (every head) are
      one tile when ``fold_heads`` says so: then the call is tiled as
      ``rows // heads`` rows of ``fold_cols`` columns and ``block_cols`` is
      that width. Else each head's rows are tiled apart, so a row block
      holds at most ``rows // heads`` rows.
    device_kind: whose tuning file to read: ``"auto"`` (the GPU JAX runs
      on, ``gpu_kind()``), a kind such as ``"NVIDIA H200"``, or None
      for the heuristic alone.
    bias: the call has a bias (the forward's launch: ``FWD_BIAS_COLS``).
    float16_bias: the call is a float16 backward or fused backward with a
      bias (see ``BWD_F16_BIAS_WARPS``, ``FUSED_BWD_F16_BIAS_WARPS``).

  Returns:
    A ``Config`` with no None field; block sizes are powers of two.

  Raises:
    ValueError: unknown ``op``.
    TuningFileError: the device's tuning file is malformed.
  """
  if op not in OPS:
    raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}.")
  c = config
  folded = fold_heads(c, hidden, heads)
  if folded:
    rows, hidden, heads = max(1, rows // heads), fold_cols(hidden, heads), 1
  sms = c.num_sms or num_sms()
  fwd = not op.endswith("backward")
  isz = 4 if itemsize >= 4 else 2
  padded = next_pow2(hidden)
  want_cols = next_pow2(c.block_cols) if c.block_cols else None
  if want_cols is None:
    resident = padded <= heuristic_resident_cols(isz)
  else:
    resident = want_cols >= padded
  tuned = {}
  if resident:
    kind = gpu_kind() if device_kind == AUTO else device_kind
    tuned = tuned_knobs(kind, op, rows, padded, isz, hidden)
    if (bias and op == "forward" and isz == 2 and not folded
        and padded == FWD_BIAS_COLS):
      tuned = {**tuned, **FWD_BIAS_LAUNCH}
  per_sm = None
  max_warps = MAX_WARPS
  if not resident:
    # Only where the width alone chose chunks: a user block_cols keeps the
    # general shape.
    wide16_fwd = fwd and isz == 2 and want_cols is None
    if c.block_rows:
      br = next_pow2(c.block_rows)
    elif wide16_fwd:
      br = FWD_CHUNK16_ROWS
    else:
      br = _shrink_for_grid(MAX_CHUNK_ROWS, rows, sms)
    if want_cols:
      bc = want_cols
    elif wide16_fwd:
      bc = min(padded, FWD_CHUNK16_COLS)
    else:
      bc = max(256, min(padded, CHUNK_TILE // br))
    per_thread = ELEMS_PER_THREAD
    persistent = False
  elif fwd:
    bc = padded
    br = max(1, FWD_TILE[isz] // bc)
    per_thread = FWD_ELEMS_PER_THREAD[isz]
    persistent = _pick(c.persistent, tuned.get(
        "persistent", bc >= FWD_PERSISTENT_MIN_COLS))
    per_sm = (FWD_PROGRAMS_PER_SM if bc <= MAX_RESIDENT_COLS
              else FWD_WIDE_PROGRAMS_PER_SM)
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
        tuned.get("block_rows", br), rows, sms)
  br = min(br, next_pow2(max(1, rows // heads)))
  warps = c.num_warps
  if warps is None:
    if "num_warps" in tuned:
      tuned_br = tuned.get("block_rows", br)
      warps = max(1, tuned["num_warps"] * min(br, tuned_br) // tuned_br)
    else:
      warps = min(max_warps, _warps_for(br * bc, per_thread))
    if folded and op == "forward" and bc >= FOLD_FWD_WIDE_COLS:
      warps = min(MAX_WARPS, 2 * warps)
    if float16_bias and resident and bc == BWD_F16_BIAS_COLS:
      if op == "backward":
        warps = BWD_F16_BIAS_WARPS
      elif op == "residual_backward":
        warps = FUSED_BWD_F16_BIAS_WARPS
  cache_max = FWD_CACHE_SCALE_MAX_COLS if fwd else CACHE_SCALE_MAX_COLS
  if op == "backward" and isz == 2 and max_warps == BWD_WIDE16_WARPS:
    cache_max = MAX_RESIDENT_COLS
  prefetch_max = FWD_PREFETCH_MAX_COLS if fwd else PREFETCH_MAX_COLS
  return Config(
      block_rows=br, block_cols=bc,
      num_warps=warps,
      programs_per_sm=(c.programs_per_sm or tuned.get("programs_per_sm")
                       or per_sm or FWD_PROGRAMS_PER_SM),
      persistent=bool(persistent),
      prefetch=bool(_pick(c.prefetch, tuned.get("prefetch",
                                                bc <= prefetch_max))),
      cache_scale=bool(_pick(c.cache_scale, tuned.get("cache_scale",
                                                      bc <= cache_max))),
      reload=bool(not fwd and resident
                  and _pick(c.reload, tuned.get("reload",
                                                bc >= RELOAD_MIN_COLS))),
      num_stages=c.num_stages or tuned.get("num_stages") or 1, num_sms=sms,
      bypass_l1=bool(_pick(c.bypass_l1, resident)))
