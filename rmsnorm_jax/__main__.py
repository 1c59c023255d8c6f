"""Main job, run as python -m rmsnorm_jax.

Runs rms_norm and rms_norm_residual with backend="auto" on LLaMA-sized inputs
on the device present, says which implementation ran and why "auto" chose it,
checks each result against a float64 NumPy reference and times the call next
to the XLA implementation and flax.linen.RMSNorm.

Every time is shown as min / median / max over the timed calls: on a GPU
the device time of the kernels each call launches (from a jax.profiler trace,
as the benchmark measures it), elsewhere the host clock. A speed ratio is
printed only on an accelerator, and only where the two ranges do not overlap;
on a CPU "auto" runs XLA, so there is nothing to compare. The benchmark
(python -m rmsnorm_jax.bench) measures more shapes, ops and peers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
import time

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import dispatch
from rmsnorm_jax import kernels
from rmsnorm_jax import reference

# (op, (rows, hidden), dtype): LLaMA-7B's hidden size, a 2048-token batch and
# one decode step.
CASES = (
    ("rms_norm", (2048, 4096), jnp.float32),
    ("rms_norm", (2048, 4096), jnp.bfloat16),
    ("rms_norm", (1, 4096), jnp.bfloat16),
    ("rms_norm_residual", (2048, 4096), jnp.bfloat16),
)
# Bounds on ||y - ref|| / ||ref||: the result's own rounding (see
# tests/numerics_util.py for the reasoning).
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}
IMPLS = ("auto", "xla", "flax")
IMPL_TITLES = {"auto": 'backend="auto"', "xla": 'backend="xla"',
               "flax": "flax.linen.RMSNorm"}
# Back-to-back calls per timed sample on an accelerator: dispatch is
# asynchronous, so a batch keeps the device busy and the host clock over it
# reads device time rather than launch latency.
ACCELERATOR_BATCH = 20
BENCH_HINT = ("python -m rmsnorm_jax.bench on a GPU or TPU, or the measured "
              "tables in docs/bench_h100.md")


def lowering_platform() -> str:
  """The platform jax lowers for by default: cpu, cuda, rocm or tpu."""
  platform = jax.default_backend()
  if platform == "gpu":
    version = getattr(jax.devices()[0].client, "platform_version", "")
    return "rocm" if "rocm" in version.lower() else "cuda"
  return platform


def explain(op: str, platform: str, shape, dtype) -> str:
  """What backend="auto" runs for this case on ``platform``, and why.

  ``dispatch.explain``'s answer (e.g. ``"pallas_gpu"``, or ``"xla
  (pallas_gpu: <reason>)"``), with the reason added where it is a bare
  "xla" on a platform that has no kernel at all, which a newcomer on a CPU
  would otherwise have to guess.
  """
  text = dispatch.explain(
      "auto", platform=platform, shape=tuple(shape), dtype=np.dtype(dtype),
      op="forward" if op == "rms_norm" else "residual_forward")
  if text == "xla" and platform not in kernels.BY_PLATFORM:
    text = f"xla (no Pallas kernel for {platform})"
  return text


def _functions(op, dtype, scale):
  """Jitted callables for each entry of IMPLS, taking the case's arrays."""
  layer = fnn.RMSNorm(dtype=dtype)
  params = {"params": {"scale": scale}}
  if op == "rms_norm":
    return {
        "auto": jax.jit(lambda x, s: rj.rms_norm(x, s)),
        "xla": jax.jit(lambda x, s: rj.rms_norm(x, s, backend="xla")),
        "flax": jax.jit(lambda x, s: layer.apply(params, x)),
    }
  return {
      "auto": jax.jit(lambda x, r, s: rj.rms_norm_residual(x, r, s)),
      "xla": jax.jit(
          lambda x, r, s: rj.rms_norm_residual(x, r, s, backend="xla")),
      "flax": jax.jit(lambda x, r, s: (layer.apply(params, x + r), x + r)),
  }


def time_calls(fns: dict, args, repeats: int, batch: int) -> dict:
  """Seconds per call of each fn: a list of ``repeats`` samples.

  A sample is the host clock around ``batch`` back-to-back calls and one
  wait for the results, divided by ``batch``. The functions are timed
  round-robin so that the order of measurement does not favour one of them
  (timed one after another on a 2-core CPU, whichever ran first read ~15%
  slower, although auto and xla compile to the same program there).
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready([fn(*args) for _ in range(batch)])
      samples[name].append((time.perf_counter() - t0) / batch)
  return samples


def spread(samples) -> tuple[float, float, float]:
  """(min, median, max) of a list of samples."""
  return min(samples), statistics.median(samples), max(samples)


# The benchmark's names for this job's ops and implementations.
BENCH_OPS = {"rms_norm": "fwd", "rms_norm_residual": "fused_fwd"}
BENCH_IMPLS = {"auto": "rmsnorm_jax_auto", "xla": "xla",
               "flax": "flax_linen"}


def device_times(op, shape, dtype, repeats) -> dict:
  """Device seconds per call of each entry of IMPLS: (min, median, max).

  Uses the benchmark's candidates and profiler timing
  (``bench.build_candidates``, ``bench.time_candidates``): the kernels each
  call launches, summed, over ``repeats`` passes over input sets that
  together exceed L2.

  Raises:
    RuntimeError: the benchmark has no profiler timing here, or a candidate
      got no device time (the message says which and why).
  """
  from rmsnorm_jax import bench  # pylint: disable=import-outside-toplevel
  for name in ("build_candidates", "time_candidates"):
    if not hasattr(bench, name):
      raise RuntimeError(f"rmsnorm_jax.bench has no {name}")
  bench_op = BENCH_OPS[op]
  rows, hidden = int(np.prod(shape[:-1])), shape[-1]
  n_sets = (bench.n_sets(bench_op, rows, hidden, dtype)
            if hasattr(bench, "n_sets") else 2)
  cands = bench.build_candidates(bench_op, list(BENCH_IMPLS.values()), rows,
                                 hidden, dtype, n_sets)
  for c in cands:
    if isinstance(c, Exception):
      raise RuntimeError(f"building a candidate failed: {c!r}")
  results = bench.time_candidates(cands, reps=repeats, profiler=True)
  by_label = {c.impl: results.get(c.fn.__name__, {}) for c in cands}
  out = {}
  for key, label in BENCH_IMPLS.items():
    r = by_label.get(label)
    if not r or r.get("timing") != "profiler" or "time_min" not in r:
      why = "not built" if r is None else (
          r.get("error") or f"timing {r.get('timing')!r}, no spread")
      raise RuntimeError(f"{label}: {why}")
    out[key] = (r["time_min"] * 1e-6, r["time_us"] * 1e-6,
                r["time_max"] * 1e-6)
  return out


def ratio_cell(ours, other) -> str:
  """``other``'s median over ``ours``, or why no ratio is claimed.

  Both are (min, median, max). A ratio is printed only when the two
  [min, max] ranges are disjoint: where they overlap, the measured
  difference is within the run-to-run spread and a ratio would read noise as
  a result.
  """
  lo_a, med_a, hi_a = ours
  lo_b, med_b, hi_b = other
  if hi_a < lo_b or hi_b < lo_a:
    return f"{med_b / med_a:.2f}x"
  return "overlap"


def run_case(op, shape, dtype, *, platform, repeats, batch, device_clock,
             rng) -> dict:
  """One row: what auto ran, its error vs float64, and its times.

  ``times`` maps each entry of IMPLS to (min, median, max) seconds;
  ``clock`` says which clock measured them ("device" or "host"), and
  ``note`` why device time was not used where it was asked for.
  """
  x = jnp.asarray(rng.normal(0.1, 1.0, shape), dtype)
  scale = jnp.asarray(rng.normal(1.0, 0.2, shape[-1:]), jnp.float32)
  fns = _functions(op, dtype, scale)
  if op == "rms_norm":
    args = (x, scale)
    y = fns["auto"](*args)
    want, _ = reference.rms_norm(x, scale)
  else:
    residual = jnp.asarray(rng.normal(0.0, 1.0, shape), dtype)
    args = (x, residual, scale)
    y, h = fns["auto"](*args)
    h_want = np.asarray(x, np.float64) + np.asarray(residual, np.float64)
    # h is stored in residual's dtype: its error is that rounding.
    want, _ = reference.rms_norm(h_want, scale)
    h_err = reference.rel_error(h, h_want)
  name = np.dtype(dtype).name
  err = reference.rel_error(y, want)
  if op != "rms_norm":
    err = max(err, h_err)
  row = dict(op=op, shape=shape, dtype=name,
             ran=explain(op, platform, shape, dtype), err=err,
             tol=TOLERANCE[name], ok=err <= TOLERANCE[name], note=None)
  if device_clock:
    try:
      return dict(row, times=device_times(op, shape, dtype, repeats),
                  clock="device")
    except Exception as e:  # pylint: disable=broad-except
      # A missing or unreadable profiler trace costs the device clock, not
      # the row: the host clock still gives a time with its spread.
      row["note"] = f"{type(e).__name__}: {e}"[:300]
  samples = time_calls(fns, args, repeats, batch)
  return dict(row, times={k: spread(v) for k, v in samples.items()},
              clock="host")


def _us(seconds: float) -> str:
  return f"{seconds * 1e6:.0f}" if seconds >= 1e-4 else f"{seconds * 1e6:.1f}"


def _say(text: str) -> None:
  print(textwrap.fill(text, width=88))


def _time_cell(triple) -> str:
  return " / ".join(_us(t) for t in triple)


def _parser() -> argparse.ArgumentParser:
  doc = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(
      prog="python -m rmsnorm_jax",
      description="\n\n".join(doc[1:]).strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=textwrap.fill(
          "Exit status: 0 when every result is within tolerance, else 1. "
          "With RMSNORM_JAX_BACKEND=xla (or another backend name) in the "
          'environment, "auto" is forced to that backend in every row.',
          width=79))
  parser.add_argument(
      "--repeats", type=int, default=10, metavar="N",
      help="timed samples per implementation and case (with device time: "
           "passes over the input sets, every call a sample); min / median / "
           "max are taken over them (default: %(default)s)")
  parser.add_argument(
      "--batch", type=int, default=None, metavar="K",
      help="calls per timed sample; the host clock over K back-to-back calls "
           f"is divided by K (default: 1 on a CPU, {ACCELERATOR_BATCH} on a "
           "GPU or TPU, where calls are dispatched asynchronously)")
  parser.add_argument(
      "--host-clock", action="store_true",
      help="time with the host clock on a GPU too (default: off, so that a "
           "GPU's times are the device time of the kernels each call "
           "launches, read from a jax.profiler trace as the benchmark "
           "reads it)")
  return parser


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1; got {args.repeats}")
  if args.batch is not None and args.batch < 1:
    parser.error(f"--batch must be >= 1; got {args.batch}")

  platform = lowering_platform()
  accelerator = platform != "cpu"
  batch = args.batch or (ACCELERATOR_BATCH if accelerator else 1)
  device = jax.devices()[0]
  print(f"rmsnorm_jax {rj.__version__} | jax {jax.__version__} | "
        f"platform {platform} | device {device.device_kind} "
        f"x{jax.device_count()}\n")
  rng = np.random.default_rng()
  device_clock = platform in ("cuda", "rocm") and not args.host_clock
  rows = [run_case(op, shape, dtype, platform=platform, repeats=args.repeats,
                   batch=batch, device_clock=device_clock, rng=rng)
          for op, shape, dtype in CASES]

  _say('Correctness of backend="auto" against a float64 NumPy reference '
       "(fresh random inputs): rel err = ||y - ref|| / ||ref||, tol = the "
       "result dtype's rounding bound.")
  print()
  header = (f"{'op':<18} {'shape':<10} {'dtype':<9} {'rel err':>8} "
            f"{'tol':>7} {'ok':<3} auto ran (and why)")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['op']:<18} {'x'.join(map(str, r['shape'])):<10} "
          f"{r['dtype']:<9} {r['err']:>8.1e} {r['tol']:>7.0e} "
          f"{'yes' if r['ok'] else 'NO':<3} {r['ran']}")

  host = ("the host clock around one call of the jitted function and the "
          "wait for its result" if batch == 1 else
          f"the host clock over {batch} back-to-back calls and one wait, "
          f"divided by {batch}")
  print()
  clocks = {r["clock"] for r in rows}
  if "device" in clocks:
    _say("Time per call in us, min / median / max over the calls of "
         f"{args.repeats} passes: device time, the kernels one call launches "
         "summed, from a jax.profiler trace (inputs rotated so that L2 does "
         "not hold them).")
  if "host" in clocks:
    _say(f"{'Rows marked * (host clock): time' if 'device' in clocks else 'Time'}"
         f" per call in us, min / median / max of {args.repeats} samples; a "
         f"sample is {host}.")
  for r in rows:
    if r["note"]:
      _say(f"* {r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']}: no "
           f"device time ({r['note']}).")
  print()
  cols = [IMPL_TITLES[i] for i in IMPLS]
  width = max(24, *(len(c) for c in cols))
  ratio_cols = ["auto vs xla", "auto vs flax"] if accelerator else []
  header = (f"{'op':<18} {'shape':<10} {'dtype':<9} "
            + " ".join(f"{c:>{width}}" for c in cols)
            + "".join(f" {c:>12}" for c in ratio_cols))
  print(header)
  print("-" * len(header))
  for r in rows:
    t = r["times"]
    mark = "*" if r["clock"] == "host" and "device" in clocks else " "
    line = (f"{r['op']:<18} {'x'.join(map(str, r['shape'])):<10} "
            f"{r['dtype']:<8}{mark} "
            + " ".join(f"{_time_cell(t[i]):>{width}}" for i in IMPLS))
    if accelerator:
      line += (f" {ratio_cell(t['auto'], t['xla']):>12}"
               f" {ratio_cell(t['auto'], t['flax']):>12}")
    print(line)

  if accelerator:
    print()
    gaps = (" Host-clock times include launch gaps, which dominate small "
            "shapes." if "host" in clocks else "")
    _say('"N.NNx": the other\'s median over auto\'s, shown only where the '
         'two min-max ranges do not overlap ("overlap": the difference is '
         f"within the spread).{gaps} More shapes and ops: {BENCH_HINT}.")
  elif all(r["ran"].split()[0] == "xla" for r in rows):
    print()
    _say(f'No speed ratio on {platform}: backend="auto" ran XLA here, the '
          'same program as backend="xla", so the columns differ only by '
          f"noise. Kernel speed: {BENCH_HINT}.")
  else:
    print()
    _say(f"No speed ratio on {platform}: a Pallas kernel off its "
          "accelerator runs in interpret mode, whose speed says nothing "
          f"about the kernel's. Kernel speed: {BENCH_HINT}.")
  bad = sum(not r["ok"] for r in rows)
  print(f"\nall {len(rows)} results within tolerance" if not bad else
        f"\n{bad} OF {len(rows)} RESULTS EXCEED TOLERANCE")
  return 0 if not bad else 1


if __name__ == "__main__":
  sys.exit(main())
