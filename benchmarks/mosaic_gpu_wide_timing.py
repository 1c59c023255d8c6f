"""Times the wide-row Mosaic GPU backward against PallasGpu's on one Hopper GPU.

For each shape: device time per call from a ``jax.profiler`` trace (the sum
of the kernels one call launches, so the XLA sum of the dscale partials
counts; median over calls), for

* ``wide`` and its launch variants (``VARIANTS``):
  ``kernels/mosaic_gpu_wide.backward``;
* ``triton``: ``PallasGpu().backward``;
* ``mosaic``: ``MosaicGpu``'s own plans (``backward``) where they serve the
  shape;
* ``copy``: XLA's ``x + dy``, the same bytes as the backward's x and dy in
  and dx out.

With ``--fused`` the same for the fused residual backward (``dh`` in, which
the wide kernel's dx overwrites in shared memory): ``PallasGpu`` and
``MosaicGpu``'s ``residual_backward``, and ``x + dy + dh`` as the copy.

Each candidate rotates over input sets whose bytes exceed the 60 MB L2. Before
timing, each wide variant's dx and dscale are compared with the Triton
kernel's on the same inputs (the largest difference relative to the output's
RMS). A variant that fails to compile prints its whole error and is left out.

Usage (on the GPU machine, from the repository root)::

  PYTHONPATH=$PWD python3 benchmarks/mosaic_gpu_wide_timing.py [--reps 5]
  PYTHONPATH=$PWD python3 benchmarks/mosaic_gpu_wide_timing.py --fused
  MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=$PWD python3 \\
      benchmarks/mosaic_gpu_wide_timing.py --compile-only   # registers

With ``MOSAIC_GPU_DUMP_PTXAS=1`` the timing run prints each Mosaic kernel's
register report just before the line of the variant that compiled it.
"""

import argparse
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mosaic_gpu_timing import _named_jit, device_times  # noqa: E402

from rmsnorm_jax import base  # noqa: E402
from rmsnorm_jax.kernels import mosaic_gpu_wide as mw  # noqa: E402
from rmsnorm_jax.kernels.gpu import PallasGpu  # noqa: E402
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu  # noqa: E402

SHAPES = [((4096, 16384), jnp.bfloat16), ((2048, 16384), jnp.float16),
          ((8192, 16384), jnp.bfloat16)]
# Nearby widths the same design serves.
EXTRA_SHAPES = [((4096, 12288), jnp.bfloat16), ((4096, 8192), jnp.bfloat16),
                ((2048, 8192), jnp.float32)]
# Launch variants, timed on the 16384-wide shapes; EXTRA_VARIANTS on the
# others. "wide" is the default launch (fence="value", pass1_loop=True);
# "noscale" runs without a scale (no dscale carry): the pipeline's own speed.
VARIANTS = {"wide": {}, "unrolled": dict(pass1_loop=False),
            "no_fence": dict(fence=None, pass1_loop=False),
            "fence_sync": dict(fence="sync", pass1_loop=False),
            "loop1_sync": dict(fence="sync"),
            "noscale": dict(no_scale=True)}
EXTRA_VARIANTS = {k: VARIANTS[k] for k in ("wide", "unrolled", "no_fence")}
# The fused backward (--fused): dx over dh's row.
FUSED_SHAPES = [((4096, 16384), jnp.bfloat16), ((2048, 16384), jnp.float16),
                ((4096, 12288), jnp.bfloat16), ((8192, 8192), jnp.bfloat16),
                ((2048, 8192), jnp.float16), ((2048, 8192), jnp.float32)]
FUSED_VARIANTS = {"wide": {}, "unrolled": dict(pass1_loop=False)}
# The forward (--forward, with --fused the fused residual forward): one CTA
# a row against rows split over a cluster of 2 or 4 CTAs ("s2", "s4"), one
# or two CTAs resident per SM ("c2"), on the persistent grid; and one row a
# cluster ("row": per_row, the default split; "row_s2", "row_s4"; "row_st2"
# with two pipeline stages). ``--shapes`` times other shapes instead.
FWD_SHAPES = [((2048, 32768), jnp.bfloat16), ((1024, 65536), jnp.bfloat16),
              ((1024, 32768), jnp.float16), ((4096, 16384), jnp.bfloat16),
              ((2048, 16384), jnp.float16)]
FUSED_FWD_SHAPES = [((2048, 32768), jnp.bfloat16),
                    ((1024, 65536), jnp.bfloat16),
                    ((4096, 16384), jnp.bfloat16)]
FWD_VARIANTS = {"s1": dict(split=1, per_row=False),
                "s1c2": dict(split=1, ctas_per_sm=2),
                "s2": dict(split=2), "s2c2": dict(split=2, ctas_per_sm=2),
                "s4": dict(split=4), "s4c2": dict(split=4, ctas_per_sm=2),
                "row": dict(per_row=True),
                "row_s2": dict(per_row=True, split=2),
                "row_s4": dict(per_row=True, split=4),
                "row_st2": dict(per_row=True, stages=2)}
# Rows too wide for one CTA's registers or shared memory (--split, with
# --fused the fused backward): split over a cluster of 2 or 4 CTAs ("wide"
# is the default, the fewest CTAs that fit), with one or two CTAs a SM
# ("c2").
SPLIT_SHAPES = [((2048, 32768), jnp.bfloat16), ((1024, 65536), jnp.bfloat16),
                ((1024, 32768), jnp.float16), ((4096, 16384), jnp.bfloat16),
                ((1024, 16384), jnp.float32)]
SPLIT_VARIANTS = {"wide": {}, "s2": dict(split=2), "s4": dict(split=4),
                  "s1c2": dict(split=1, ctas_per_sm=2),
                  "s2c2": dict(split=2, ctas_per_sm=2)}
ROTATE_BYTES = 192 * 2**20
MAX_SETS = 24
EPS = 1e-6


def _sets(rows, hidden, dtype, n):
  key = jax.random.key(1)
  out = []
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    x = (jax.random.normal(k1, (rows, hidden), jnp.float32) + 0.3).astype(
        dtype)
    dy = jax.random.normal(k2, (rows, hidden), jnp.float32).astype(dtype)
    dh = jax.random.normal(jax.random.fold_in(k2, 7), (rows, hidden),
                           jnp.float32).astype(dtype)
    out.append(dict(x=x, dy=dy, dh=dh))
  return out


def _wide_fn(kw):
  kw = dict(kw)
  no_scale = kw.pop("no_scale", False)
  return lambda x, w, r, dy, dh=None: mw.backward(
      x, None if no_scale else w, r, dy, dh, **kw)


def _diff(name, got, want):
  g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  w = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  rms = float(np.sqrt(np.mean(w * w))) or 1.0
  return f"{name} maxdiff/rms={np.max(np.abs(g - w)) / rms:.2e}"


def _first_call(vname, fn, args):
  """``(fn(*args), seconds)``, its first (compiling) call; None when it
  fails, which is printed in full."""
  try:
    t0 = time.perf_counter()
    got = jax.block_until_ready(fn(*args))
    return got, time.perf_counter() - t0
  except Exception as e:  # report in full and go on
    print(f"  {vname}: COMPILE/RUN ERROR {type(e).__name__}:\n{e}",
          flush=True)
    traceback.print_exc()
    return None


def time_shape(rows, hidden, dtype, reps, variants, fused=False):
  n_bytes = rows * hidden * np.dtype(dtype).itemsize
  n_sets = int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / n_bytes))))
  sets = _sets(rows, hidden, dtype, n_sets)
  w = (jax.random.normal(jax.random.key(2), (hidden,), jnp.float32) * 0.1
       + 1).astype(dtype)
  norm = base.Norm(eps=EPS, out_dtype=np.dtype(dtype))
  xla = base.Xla()
  for s in sets:
    s["rstd"] = xla.forward(s["x"], w, None, norm=norm)[1]
  # A grid override keeps MosaicGpu on its own plans (without one it runs
  # the wide kernel at these widths).
  triton, mosaic = PallasGpu(), MosaicGpu(grid=mw.gpu_tiling.num_sms())
  if fused:
    args = [(s["x"], w, s["rstd"], s["dy"], s["dh"]) for s in sets]
    cands = {
        "copy": (_named_jit(lambda x, dy, dh: x + dy + dh, "mgw_copy"),
                 [(s["x"], s["dy"], s["dh"]) for s in sets]),
        "triton": (_named_jit(lambda x, w, r, dy, dh: triton.residual_backward(
            x, w, None, r, dy, dh, norm=norm)[:2], "mgw_triton"), args),
    }
    if mosaic.shape_reason(rows, hidden, dtype, "residual_bwd") is None:
      cands["mosaic"] = (_named_jit(
          lambda x, w, r, dy, dh: mosaic.residual_backward(
              x, w, None, r, dy, dh, norm=norm)[:2], "mgw_mosaic"), args)
  else:
    args = [(s["x"], w, s["rstd"], s["dy"]) for s in sets]
    cands = {
        "copy": (_named_jit(lambda x, dy: x + dy, "mgw_copy"),
                 [(s["x"], s["dy"]) for s in sets]),
        "triton": (_named_jit(lambda x, w, r, dy: triton.backward(
            x, w, None, r, dy, norm=norm)[:2], "mgw_triton"), args),
    }
    if mosaic.shape_reason(rows, hidden, dtype, "bwd") is None:
      cands["mosaic"] = (_named_jit(lambda x, w, r, dy: mosaic.backward(
          x, w, None, r, dy, norm=norm)[:2], "mgw_mosaic"), args)
  want = jax.block_until_ready(cands["triton"][0](*args[0]))
  for vname, kw in variants.items():
    fn = _named_jit(_wide_fn(kw), f"mgw_{vname}")
    first = _first_call(vname, fn, args[0])
    if first is None:
      continue
    got, dt = first
    p = mw.plan(rows, hidden, x_dtype=dtype, sms=mw.gpu_tiling.num_sms(),
                has_scale=not kw.get("no_scale"),
                **{k: v for k, v in kw.items()
                   if k in ("chunk", "stages", "split")})
    print(f"  {vname}: first call {dt:.1f}s; split={p.split} "
          f"stages={p.stages} "
          f"chunk={p.chunk} grid={p.grid} steps={p.steps}; against triton: "
          f"{_diff('dx', got[0], want[0])}"
          + ("" if got[1] is None else f", {_diff('dscale', got[1], want[1])}"),
          flush=True)
    cands[vname] = (fn, args)
  results, _ = device_times(cands, reps, error_chars=2000)
  return results, n_sets


def time_forward(rows, hidden, dtype, reps, variants, fused=False,
                 scale_dtype=None):
  """The forward's (or fused forward's) candidates on one shape, each
  variant's y (and h) and rstd first compared with the Triton kernel's;
  the scale in ``scale_dtype`` (default x's)."""
  n_bytes = rows * hidden * np.dtype(dtype).itemsize * (1 + fused)
  n_sets = int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / n_bytes))))
  sets = _sets(rows, hidden, dtype, n_sets)
  w = (jax.random.normal(jax.random.key(2), (hidden,), jnp.float32) * 0.1
       + 1).astype(scale_dtype or dtype)
  norm = base.Norm(eps=EPS, out_dtype=np.dtype(dtype))
  triton = PallasGpu()
  if fused:
    args = [(s["x"], w, s["dy"]) for s in sets]
    cands = {
        "copy": (_named_jit(lambda x, w, r: (x + r, x - r), "mgw_copy"),
                 args),
        "triton": (_named_jit(lambda x, w, r: triton.residual_forward(
            x, r, w, None, norm=norm), "mgw_triton"), args)}
  else:
    args = [(s["x"], w) for s in sets]
    cands = {
        "copy": (_named_jit(lambda x, w: x + 1, "mgw_copy"), args),
        "triton": (_named_jit(lambda x, w: triton.forward(
            x, w, None, norm=norm), "mgw_triton"), args)}
  want = jax.block_until_ready(cands["triton"][0](*args[0]))
  for vname, kw in variants.items():
    fn = _named_jit(lambda x, w, r=None, kw=kw: mw.forward(
        x, w, r, eps=EPS, **kw), f"mgw_{vname}")
    try:
      p = mw.forward_plan(rows, hidden, x_dtype=dtype, has_residual=fused,
                          scale_dtype=w.dtype,
                          sms=mw.gpu_tiling.num_sms(), **kw)
    except ValueError as e:  # a variant the shape does not fit
      print(f"  {vname}: not planned: {e}", flush=True)
      continue
    first = _first_call(vname, fn, args[0])
    if first is None:
      continue
    got, dt = first
    print(f"  {vname}: first call {dt:.1f}s; split={p.split} "
          f"stages={p.stages} grid={p.grid} steps={p.steps}; against "
          "triton: " + ", ".join(_diff(n, g, t) for n, g, t in zip(
              ("y", "h", "rstd") if fused else ("y", "rstd"), got, want)),
          flush=True)
    cands[vname] = (fn, args)
  results, _ = device_times(cands, reps, error_chars=2000)
  return results, n_sets


def compile_only():
  """Compiles the default launch on the timed widths (for ptxas reports)."""
  for (rows, hidden), dtype, variants in [
      ((4096, 16384), jnp.bfloat16, VARIANTS),
      ((4096, 12288), jnp.bfloat16, EXTRA_VARIANTS),
      ((2048, 8192), jnp.float32, EXTRA_VARIANTS)]:
    for vname, kw in variants.items():
      x = jnp.ones((rows, hidden), dtype)
      w = jnp.ones((hidden,), dtype)
      r = jnp.ones((rows,), jnp.float32)
      print(f"=== {rows}x{hidden} {np.dtype(dtype).name} {vname}", flush=True)
      try:
        jax.jit(_wide_fn(kw)).lower(x, w, r, x).compile()
      except Exception as e:  # report in full and go on
        print(f"ERROR {type(e).__name__}:\n{e}", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--compile-only", action="store_true")
  ap.add_argument("--no-extra", action="store_true")
  ap.add_argument("--fused", action="store_true")
  ap.add_argument("--split", action="store_true",
                  help="rows split over clusters (SPLIT_SHAPES)")
  ap.add_argument("--forward", action="store_true",
                  help="the forward (with --fused, the fused forward)")
  ap.add_argument("--shapes", default=None,
                  help="comma-separated RxH:dtype shapes instead of the "
                  "built-in lists")
  ap.add_argument("--scale-dtype", default=None,
                  help="the forward's scale dtype (default x's)")
  ap.add_argument("--variants", default=None,
                  help="comma-separated variant names to time (default: all)")
  args = ap.parse_args()
  if args.compile_only:
    compile_only()
    return
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  table = []
  shapes = [(s, d, VARIANTS) for s, d in SHAPES]
  if args.split and not args.forward:
    shapes = [(s, d, SPLIT_VARIANTS) for s, d in SPLIT_SHAPES]
  elif args.forward:
    shapes = [(s, d, FWD_VARIANTS)
              for s, d in (FUSED_FWD_SHAPES if args.fused else FWD_SHAPES)]
  elif args.fused:
    shapes = [(s, d, FUSED_VARIANTS) for s, d in FUSED_SHAPES]
  elif not args.no_extra:
    shapes += [(s, d, EXTRA_VARIANTS) for s, d in EXTRA_SHAPES]
  if args.shapes:
    table_variants = shapes[0][2]
    shapes = []
    for spec in args.shapes.split(","):
      dims, dt = spec.split(":")
      r, h = (int(v) for v in dims.split("x"))
      shapes.append(((r, h), jnp.dtype(dt), table_variants))
  for (rows, hidden), dtype, variants in shapes:
    if args.variants:
      variants = {k: v for k, v in variants.items()
                  if k in args.variants.split(",")}
    name = f"{rows}x{hidden} {np.dtype(dtype).name}"
    print(name, flush=True)
    t0 = time.perf_counter()
    try:
      if args.forward:
        res, n_sets = time_forward(rows, hidden, dtype, args.reps, variants,
                                   args.fused, args.scale_dtype)
      else:
        res, n_sets = time_shape(rows, hidden, dtype, args.reps, variants,
                                 args.fused)
    except Exception as e:  # report and go on
      print(f"{name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      traceback.print_exc()
      continue
    copy = res.get("copy", (None,))[0]
    for cname, v in res.items():
      if v[0] is None:
        print(f"  {cname}: no kernels found", flush=True)
        continue
      ratio = f" {v[0] / copy:.2f}x copy" if copy else ""
      spread = "" if v[1] is None else f" ({v[1]:.1f}-{v[2]:.1f})"
      print(f"  {cname}: {v[0]:.1f} us{spread}{ratio} [{v[3]} kernels]",
            flush=True)
    print(f"  ({n_sets} input sets, {time.perf_counter() - t0:.0f}s)")
    table.append((name, res))
  print("\nus per call, profiler device time, median over calls (inputs "
        "rotated); ratio to copy in brackets")
  names = sorted({c for _, r in table for c in r},
                 key=lambda c: (c != "copy", c != "triton", c))
  print("| shape | " + " | ".join(names) + " |")
  for name, res in table:
    cells = []
    copy = res.get("copy", (None,))[0]
    for c in names:
      v = res.get(c)
      if v is None or v[0] is None:
        cells.append("-")
      else:
        cells.append(f"{v[0]:.1f}" + (f" ({v[0] / copy:.2f})"
                                      if copy and c != "copy" else ""))
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
