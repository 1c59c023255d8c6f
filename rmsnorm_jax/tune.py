"""Tunes the Pallas Triton GPU kernels for the GPU at hand and writes its file.

    python -m rmsnorm_jax.tune [--ops OP,...] [--cases ROWSxHIDDEN:DTYPE,...]
                               [--out PATH] [--budget-s N] [--reps N]

For each op (``forward``, ``backward``, ``residual_forward``,
``residual_backward``, ``quantized_forward``, ``quantized_residual_forward``:
the quantized forward with a residual) and each shape class (input
itemsize x padded row width, measured at one row count that fills the GPU),
it times a small set of launch configurations around the heuristic of
``rmsnorm_jax.kernels.gpu_tiling`` (the heuristic itself twice, to show the
noise; the row block halved and doubled; the warps halved and doubled; the
programs per SM and the next-block prefetch of the persistent grids; for a
width that pads to its class, fewer warps with more programs; for the
forward ops of rows up to 4096 columns, one warp a row; for the forward
ops on a persistent grid, one program a row (Liger-Kernel's launch); for the
backward ops, the scale re-read each row rather than held in registers; and
the launch the device's tuning file gives the call now, where it differs). A
width that is not a power of two gets entries of its own (``hidden``). Times
are device kernel time from the ``jax.profiler`` trace, median over calls
rotating over input sets larger than the L2 (``rmsnorm_jax.bench.timing``).
A candidate is adopted only when it beats the better of the two heuristic
timings by more than ``--min-gain`` (2%) and by more than their spread;
otherwise the heuristic is recorded as chosen. Re-measuring a case the
file already chose another launch for, that launch is the one to beat
(``decide``).

The result is ``kernels/tuning/<device slug>.json`` in the package (or
``--out``), merged with the entries already there: afterwards
``gpu_tiling.resolve`` takes its knobs on this device kind (for a file
outside the package set ``RMSNORM_JAX_TUNING_DIR`` to its folder). See
docs/tuning.md for the format.

Time: each (op, shape class) compiles up to 8 configurations in parallel and
times them in one profiler trace; on an H200 the first five ops x 5 classes
(171 timed configurations) took 20 s after JAX's start, and the sixth op on
three classes 7 s, so budget about a minute per run. ``--budget-s`` stops
starting new (op, class) pairs once it is spent; the file is rewritten
after each pair, so a run cut short keeps what it measured.

Without a GPU it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import shapes
from rmsnorm_jax.kernels import gpu_tiling

OPS = gpu_tiling.OPS
# Widest padded row the one-warp candidate is tried at: 128 values a thread.
ONE_WARP_MAX_COLS = 4096
# (rows, hidden, dtype) in order of importance: the LLM widths in bfloat16,
# QK-norm rows, the widest whole-row tiles, float32. Rows make each array
# 32-128 MB, so every class fills the grid.
DEFAULT_CASES = (
    (8192, 4096, "bfloat16"),
    (32768, 128, "bfloat16"),
    (4096, 16384, "bfloat16"),
    (4096, 8192, "bfloat16"),
    (4096, 4096, "float32"),
)
MIN_GAIN = 0.02
EPS = 1e-6
# Input sets rotated per call: their bytes exceed the L2 (50 MB on H100,
# 60 MB on H200) about three times, as in the benchmark.
ROTATE_BYTES = 150 * 2**20
MAX_SETS = 16
# Each op's traffic counted as the benchmark's op of the same bytes.
_BYTES_OP = {"forward": "fwd", "backward": "bwd",
             "residual_forward": "fused_fwd",
             "residual_backward": "fused_bwd", "quantized_forward": "fwd",
             gpu_tiling.QUANTIZED_RESIDUAL_OP: "quant_fused_fwd"}
_SHORT = dict(block_rows="br", num_warps="w", programs_per_sm="p",
              persistent="ps", prefetch="pf", cache_scale="cs", reload="rl",
              num_stages="st")


class NoGpuError(RuntimeError):
  """Tuning needs an NVIDIA GPU visible to JAX."""


def knobs_of(config: gpu_tiling.Config) -> dict:
  """The tuned knobs (``gpu_tiling.TUNED_KNOBS``) of a resolved config."""
  return {k: getattr(config, k) for k in gpu_tiling.TUNED_KNOBS}


def label(override: dict) -> str:
  """Short name of a candidate, e.g. ``{"num_warps": 8}`` -> ``"w8"``."""
  return "_".join(f"{_SHORT[k]}{int(v)}" for k, v in override.items()
                  ) or "heuristic"


def candidates(op: str, rows: int, hidden: int, itemsize: int,
               num_sms: int, device_kind: str | None = None
               ) -> list[tuple[str, gpu_tiling.Config]]:
  """Resolved configs to time: the heuristic, then single-knob changes.

  Args:
    op: one of ``OPS``.
    rows, hidden, itemsize: the shape class's measured case (hidden at most
      ``gpu_tiling.MAX_RESIDENT_COLS``: whole-row tiles).
    num_sms: SMs the grids are sized for.
    device_kind: the GPU kind whose tuning file gives the launch the call
      runs with now (None: no file).

  Returns:
    ``[(label, Config), ...]``: first the heuristic (resolved without any
    tuning file); then, where it differs, the launch the device's file
    resolves to now (``"current"``: a re-tune weighs its choice against what
    it replaces, e.g. a padded width's class entry); then distinct configs
    each differing from the heuristic in one choice (for a width that pads
    to its class, first two that also change the programs or rows with the
    warps; for forward ops of rows padded to at most ``ONE_WARP_MAX_COLS``,
    first one warp a row; for forward ops on a persistent grid, first one
    program a row with the scale re-read; for backward ops that hold the
    scale in registers, next the scale re-read each row); at most 7 in all.

  Raises:
    ValueError: unknown op, or rows wider than whole-row tiles.
  """
  if op not in OPS:
    raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}.")
  if gpu_tiling.next_pow2(hidden) > gpu_tiling.MAX_RESIDENT_COLS:
    raise ValueError(f"hidden must be at most {gpu_tiling.MAX_RESIDENT_COLS}"
                     f" (whole-row tiles are tuned); got {hidden}.")

  def res(kind=None, **kw):
    return gpu_tiling.resolve(gpu_tiling.Config(num_sms=num_sms, **kw), op,
                              rows, hidden, itemsize=itemsize,
                              device_kind=kind)
  h = res()
  overrides = [dict(block_rows=h.block_rows * 2)]
  if h.block_rows > 1:
    overrides.append(dict(block_rows=h.block_rows // 2))
  if h.num_warps < gpu_tiling.MAX_WARPS:
    overrides.append(dict(num_warps=h.num_warps * 2))
  if h.num_warps > 2:
    overrides.append(dict(num_warps=h.num_warps // 2))
  if h.persistent:
    if not op.endswith("backward"):
      # One program a row with the scale re-read from L1 each row, the
      # launch of Liger-Kernel's forward kernels, which holds fewer
      # registers than a persistent program with the cached scale and the
      # prefetched row. On an H200 it is as fast or faster under the
      # driver's default L1 carveout, and 2% faster to 5% slower under
      # XLA's launcher (fused forward 4096x16384 bf16: 137.6 against the
      # heuristic's 140.4 us; forward 73.6 against 69.8), so the tune
      # weighs it per device.
      overrides.insert(0, dict(persistent=False, prefetch=False,
                               cache_scale=False))
    p = h.programs_per_sm
    overrides.append(dict(programs_per_sm=p * 2 if p < 4 else p // 2))
    overrides.append(dict(prefetch=not h.prefetch))
  else:
    overrides.append(dict(persistent=True))
  if op.endswith("backward") and h.cache_scale:
    # The scale (and bias) re-read each row rather than held in registers
    # beside x, dy and the accumulators. Compiled for sm_90a
    # (benchmarks/triton_registers.py), the backward of 8192x5376 bf16
    # spills 20 bytes a thread at the heuristic's 16 warps and none so.
    overrides.insert(0, dict(cache_scale=False))
  if hidden < gpu_tiling.next_pow2(hidden) and h.num_warps >= 8:
    # A padded row (e.g. 4608 in 8192-wide tiles) holds fewer values per
    # thread than the tile: fewer warps a program and more programs an SM,
    # on a persistent grid (H200 forward 8192x4608 bf16: 4 warps and 4
    # programs 39.2 us, 2 rows of 8 warps 39.9, the class's 16 warps 42.9).
    overrides.insert(0, dict(num_warps=h.num_warps // 4, programs_per_sm=4,
                             persistent=True))
    overrides.insert(1, dict(block_rows=h.block_rows * 2,
                             num_warps=h.num_warps // 2, persistent=True))
  if not op.endswith("backward") and (
      gpu_tiling.next_pow2(hidden) <= ONE_WARP_MAX_COLS):
    # One warp a row reduces it with shuffles alone: the kernel asks for no
    # shared memory, so XLA's launcher leaves the driver's L1 carveout
    # (benchmarks/cache_preference.py), and the scale is re-read from L1
    # each row rather than held beside the row's 128 values a thread (H200
    # fused forward 8192x4096 bf16: 65.7 us against the heuristic's 67.2).
    overrides.insert(0, dict(block_rows=1, num_warps=1, persistent=False,
                             cache_scale=False))
  out, seen = [("heuristic", h)], {h}
  if device_kind is not None:
    now = res(device_kind)
    if now not in seen:
      seen.add(now)
      out.append(("current", now))
  for ov in overrides:
    c = res(**ov)
    if c not in seen:
      seen.add(c)
      out.append((label(ov), c))
  return out[:7]


# ------------------------------------------------------------ file format --

def dumps(data: dict) -> str:
  """The tuning file's text: one line per key, run, entry field and
  candidate, so that a re-tune diffs line by line. ``json.loads`` of it
  gives ``data`` back."""
  one = lambda v: json.dumps(v, sort_keys=False)  # noqa: E731
  lines = ["{"]
  top = [k for k in data if k not in ("runs", "entries")]
  for k in top:
    lines.append(f'  {one(k)}: {one(data[k])},')
  lines.append('  "runs": [')
  runs = data.get("runs", [])
  lines += [f"    {one(r)}{',' if i < len(runs) - 1 else ''}"
            for i, r in enumerate(runs)]
  lines.append("  ],")
  lines.append('  "entries": [')
  entries = data.get("entries", [])
  for i, e in enumerate(entries):
    fields = []
    for k, v in e.items():
      if k == "candidates":
        inner = ",\n".join(f"      {one(c)}" for c in v)
        fields.append(f'     {one(k)}: [\n{inner}\n     ]' if v
                      else f'     {one(k)}: []')
      else:
        fields.append(f"     {one(k)}: {one(v)}")
    lines.append("    {\n" + ",\n".join(fields) + "\n    }"
                 + ("," if i < len(entries) - 1 else ""))
  lines.append("  ]")
  lines.append("}")
  return "\n".join(lines) + "\n"


def entry_key(e: dict) -> tuple:
  return (e["op"], e["itemsize"], e["cols"], e.get("hidden"), e["rows"])


def merge(old: dict | None, new: dict) -> dict:
  """``new``'s entries over ``old``'s (same op, itemsize, cols, rows),
  keeping the runs that some kept entry still refers to.

  Raises:
    ValueError: the two are of different device kinds.
  """
  if not old:
    return new
  if old.get("device_kind") != new["device_kind"]:
    raise ValueError(f"out file holds device_kind "
                     f"{old.get('device_kind')!r}, this GPU is "
                     f"{new['device_kind']!r}; pass another --out.")
  replaced = {entry_key(e) for e in new["entries"]}
  entries = [e for e in old.get("entries", [])
             if entry_key(e) not in replaced] + new["entries"]
  entries.sort(key=lambda e: (OPS.index(e["op"]), e["itemsize"], e["cols"],
                              e.get("hidden") or 0, e["rows"]))
  used = {e.get("run") for e in entries}
  runs = [r for r in old.get("runs", []) + new["runs"] if r["run"] in used]
  return dict(new, runs=runs, entries=entries)


def write(path: str, data: dict) -> None:
  """Checks ``data`` against the schema, then writes it (atomically).

  Raises:
    gpu_tiling.TuningFileError: ``data`` does not pass the schema.
  """
  text = dumps(data)
  gpu_tiling.validate_table(json.loads(text), path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as fp:
    fp.write(text)
  os.replace(tmp, path)


def decide(heuristic_us: list, timed: list, min_gain: float = MIN_GAIN,
           incumbent: int | None = None) -> int | None:
  """Which candidate to adopt, or None to keep the heuristic.

  Args:
    heuristic_us: the heuristic's timings (two, for their spread).
    timed: ``(index, us)`` of the other candidates that ran.
    min_gain: the least relative gain adopted.
    incumbent: the index (in ``timed``) of the launch the file's entry for
      this very case chose before, when it is not the heuristic: the
      launch to beat, with the heuristic one more challenger. A re-tune
      then changes an entry only for a measured gain, not on noise (an
      entry shared by ops the tune does not time, as the bias forward
      shares the forward's, would otherwise flip with it).

  Returns:
    The index of the fastest candidate when it beats the baseline (the
    best heuristic time, or the incumbent's) by more than ``min_gain`` and
    by more than the heuristic's spread; else None (the heuristic), or the
    incumbent's index where there is one.
  """
  good = [t for t in heuristic_us if t]
  if not good or not timed:
    return None
  base = min(good)
  spread = max(good) - base
  held = dict(timed).get(incumbent) if incumbent is not None else None
  # The launch to beat: the incumbent (the heuristic then one more rival),
  # else the heuristic.
  keep, ref = (incumbent, held) if held else (None, base)
  rivals = ([(None, base)] if held else []) + [t for t in timed
                                               if t[0] != keep]
  idx, us = min(rivals, key=lambda t: t[1])
  if us < ref * (1 - min_gain) and ref - us > spread:
    return idx
  return keep


# ------------------------------------------------------------- measuring --

def _named_jit(fn, name):
  # The name becomes the XLA module's, which attributes trace events.
  def wrapped(*a):
    return fn(*a)
  wrapped.__name__ = wrapped.__qualname__ = name
  return jax.jit(wrapped)


def _inputs(op, rows, hidden, dtype, n_sets, seed):
  """Random argument sets of ``op`` (never zeros), drawn on the device."""
  sets = []
  for i in range(n_sets):
    k = iter(jax.random.split(jax.random.fold_in(jax.random.key(seed), i),
                              5))

    def rand(shape, mean=0.0, std=1.0):
      v = jax.random.normal(next(k), shape, jnp.float32) * std + mean
      return v.astype(dtype)
    x = rand((rows, hidden), 0.3)
    s = rand((hidden,), 1.0, 0.5)
    if op in ("forward", "quantized_forward"):
      sets.append((x, s))
      continue
    if op in ("residual_forward", gpu_tiling.QUANTIZED_RESIDUAL_OP):
      sets.append((x, rand((rows, hidden), 0.5), s))
      continue
    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + EPS)
    dy = rand((rows, hidden))
    if op == "backward":
      sets.append((x, s, rstd, dy))
    else:
      sets.append((x, s, rstd, dy, rand((rows, hidden))))
  return sets


def _op_fn(op, impl, dtype):
  from rmsnorm_jax import base
  norm = base.Norm(eps=EPS, out_dtype=np.dtype(dtype))
  if op == "forward":
    return lambda x, s: impl.forward(x, s, None, norm=norm)
  if op == "backward":
    return lambda x, s, r, dy: impl.backward(x, s, None, r, dy, norm=norm)
  if op == "residual_forward":
    return lambda x, r, s: impl.residual_forward(x, r, s, None, norm=norm)
  if op == "residual_backward":
    return lambda h, s, r, dy, dh: impl.residual_backward(
        h, s, None, r, dy, dh, norm=norm)
  if op == gpu_tiling.QUANTIZED_RESIDUAL_OP:
    # int8, as the benchmark's quant_fused_fwd.
    inorm = dataclasses.replace(norm, quant_dtype=np.dtype(jnp.int8))
    return lambda x, r, s: impl.quantized_forward(x, r, s, None, None,
                                                  norm=inorm)
  qnorm = dataclasses.replace(norm, quant_dtype=np.dtype(jnp.float8_e4m3fn))
  return lambda x, s: impl.quantized_forward(x, None, s, None, None,
                                             norm=qnorm)


def n_sets(op, rows, hidden, dtype) -> int:
  """Argument sets rotated per call so that together they exceed L2."""
  per = max(1, shapes.min_bytes(_BYTES_OP[op], rows, hidden, dtype))
  return int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / per))))


def measure(op: str, rows: int, hidden: int, dtype, *, num_sms: int,
            reps: int, uid: int, min_gain: float = MIN_GAIN,
            log=print, interpret: bool = False) -> dict:
  """Times the candidates of one (op, shape class); returns its entry.

  ``interpret`` runs the kernels in the Pallas interpreter with host
  timing (a CPU check of this code path; its times mean nothing).

  Returns:
    The file entry: op, itemsize, cols, rows, dtype, decision, chosen,
    heuristic (the heuristic's knobs), candidates (label, config, us with
    min and max, or error).
  """
  from rmsnorm_jax.bench import timing
  from rmsnorm_jax.bench.cases import Candidate
  from rmsnorm_jax.kernels.gpu import PallasGpu
  dt = jnp.dtype(dtype)
  kind = None if interpret else gpu_tiling.gpu_kind()
  cands = candidates(op, rows, hidden, dt.itemsize, num_sms, kind)
  # The heuristic twice: the spread between the two is the noise floor.
  runs = [cands[0]] + cands
  args = _inputs(op, rows, hidden, dt, n_sets(op, rows, hidden, dt), uid)
  timed = []
  for j, (lab, cfg) in enumerate(runs):
    impl = PallasGpu(config=cfg, interpret=interpret)
    fn = _named_jit(_op_fn(op, impl, dt),
                    f"tune{uid:03d}_{j:02d}")
    timed.append(Candidate(op, lab, fn, args, "pallas_gpu"))
  res = timing.time_candidates(timed, reps=reps, profiler=not interpret)
  rows_out = []
  for j, ((lab, cfg), c) in enumerate(zip(runs, timed)):
    r = res.get(c.fn.__name__, dict(error="not timed"))
    rec = dict(label="heuristic (again)" if j == 1 else lab,
               config=knobs_of(cfg))
    if r.get("time_us") is not None:
      rec["us"] = round(r["time_us"], 2)
      if r.get("time_min") is not None:
        rec["min"] = round(r["time_min"], 2)
        rec["max"] = round(r["time_max"], 2)
    else:
      rec["us"] = None
      rec["error"] = str(r.get("error", "no time"))[:200]
    rows_out.append(rec)
  heur = [rows_out[0]["us"], rows_out[1]["us"]]
  cols = gpu_tiling.next_pow2(hidden)
  itemsize = dt.itemsize if dt.itemsize >= 4 else 2
  # "current" is this very entry's earlier choice only where the file has
  # an entry for the case (else it is a neighbouring or class entry's).
  incumbent = next((j for j, r in enumerate(rows_out)
                    if r["label"] == "current"), None) if (
                        gpu_tiling.has_entry(kind, op, rows, cols, itemsize,
                                             hidden)) else None
  pick = decide(heur, [(j, r["us"]) for j, r in enumerate(rows_out)
                       if j > 1 and r["us"]], min_gain, incumbent)
  # A width that pads to cols gets an entry of its own (tuned_knobs).
  exact = dict(hidden=hidden) if hidden != cols else {}
  entry = dict(op=op, itemsize=itemsize, cols=cols, **exact, rows=rows,
               dtype=dt.name,
               decision="heuristic" if pick is None else "tuned",
               chosen=rows_out[0 if pick is None else pick]["config"],
               candidates=rows_out)
  best = min((r for r in rows_out if r["us"]), key=lambda r: r["us"],
             default=None)
  if log:
    log(f"{op} {rows}x{hidden} {dt.name}: heuristic {heur[0]} / {heur[1]} "
        f"us; best {best['label'] if best else '-'} "
        f"{best['us'] if best else '-'} us -> {entry['decision']}"
        + ("" if pick is None else f" ({rows_out[pick]['label']})"))
  return entry


# ------------------------------------------------------------------- CLI --

def _parse_ops(text):
  ops = [t.strip() for t in text.split(",") if t.strip()]
  bad = [o for o in ops if o not in OPS]
  if bad or not ops:
    raise argparse.ArgumentTypeError(
        f"--ops: expected names from {', '.join(OPS)}; got {text!r}")
  return ops


def _parse_cases(text):
  from rmsnorm_jax.bench.cases import parse_cases
  try:
    got = parse_cases(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  out = []
  for (rows, hidden), dt in got:
    if gpu_tiling.next_pow2(hidden) > gpu_tiling.MAX_RESIDENT_COLS:
      raise argparse.ArgumentTypeError(
          f"--cases: hidden must be at most {gpu_tiling.MAX_RESIDENT_COLS} "
          f"(wider rows use the chunked tiling, which is not tuned); got "
          f"{rows}x{hidden}")
    out.append((rows, hidden, jnp.dtype(dt).name))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m rmsnorm_jax.tune",
      description=__doc__.split("\n\n")[2] + "\n\n" + __doc__.split(
          "\n\n")[4],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ops", type=_parse_ops, default=list(OPS),
                 help="comma-separated ops (default: all six)")
  p.add_argument("--cases", type=_parse_cases, default=list(DEFAULT_CASES),
                 help="comma-separated ROWSxHIDDEN:DTYPE, one per shape "
                      "class (default: " + ",".join(
                          f"{r}x{h}:{d}" for r, h, d in DEFAULT_CASES) + ")")
  p.add_argument("--out", help="file to write (default: the package's "
                 "kernels/tuning/<device slug>.json); entries already in "
                 "it are kept unless re-measured")
  p.add_argument("--budget-s", type=float, default=600.0,
                 help="start no new (op, class) pair after this many "
                      "seconds (default 600)")
  p.add_argument("--reps", type=int, default=5,
                 help="passes over the rotated input sets (default 5)")
  p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                 help="least relative gain over the heuristic adopted "
                      "(default 0.02)")
  return p


def main(argv=None) -> int:
  """The command line; returns the exit status (2 without a GPU)."""
  args = parser().parse_args(argv)
  kind = gpu_tiling.gpu_kind()
  if kind is None or jax.default_backend() != "gpu":
    print("rmsnorm_jax.tune: no GPU visible to JAX (default backend "
          f"{jax.default_backend()!r}); tuning times the Pallas Triton "
          "kernels on an NVIDIA GPU, so run it on the machine to tune. "
          "Nothing was written.", file=sys.stderr)
    return 2
  sms = gpu_tiling.num_sms()
  out = args.out or os.path.join(gpu_tiling.TUNING_DIR,
                                 gpu_tiling.device_slug(kind) + ".json")
  old = None
  if os.path.isfile(out):
    with open(out, encoding="utf-8") as fp:
      old = json.load(fp)
    gpu_tiling.validate_table(old, out)
  run_id = 1 + max((r["run"] for r in (old or {}).get("runs", [])),
                   default=0)
  import jaxlib
  run = dict(run=run_id,
             date=datetime.datetime.now(datetime.timezone.utc).strftime(
                 "%Y-%m-%d %H:%M UTC"),
             device_kind=kind, num_sms=sms, jax=jax.__version__,
             jaxlib=getattr(jaxlib, "__version__", "?"),
             command="python -m rmsnorm_jax.tune " + " ".join(
                 shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                          else argv)),
             timing=f"profiler device time, median of {args.reps} passes "
                    "over input sets of >= 150 MiB",
             min_gain=args.min_gain)
  new = dict(schema=gpu_tiling.SCHEMA, device_kind=kind, runs=[run],
             entries=[])
  print(f"tuning {kind} ({sms} SMs), jax {jax.__version__}; writing {out}",
        flush=True)
  t0 = time.monotonic()
  uid, last = 0, 0.0
  pairs = [(op, case) for case in args.cases for op in args.ops]
  for n, (op, (rows, hidden, dtype)) in enumerate(pairs):
    spent = time.monotonic() - t0
    if spent + last > args.budget_s:
      print(f"budget of {args.budget_s:.0f} s spent ({spent:.0f} s): "
            f"{len(pairs) - n} (op, class) pairs not measured", flush=True)
      break
    t1 = time.monotonic()
    entry = measure(op, rows, hidden, dtype, num_sms=sms, reps=args.reps,
                    uid=uid, min_gain=args.min_gain)
    entry["run"] = run_id
    uid += 1
    last = time.monotonic() - t1
    new["entries"].append(entry)
    write(out, merge(old, new))
  gpu_tiling.clear_cache()
  print(f"wrote {out} ({len(new['entries'])} entries measured, "
        f"{time.monotonic() - t0:.0f} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
