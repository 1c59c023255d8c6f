"""Checks and times MosaicGpu against PallasGpu (Triton) on one Hopper GPU.

``--check``: every op of MosaicGpu (forward with and without scale,
backward, fused residual forward and backward) on ragged and benchmark
shapes in float32, bfloat16 and float16, against ``base.Xla`` on the same
device. For each output it prints the largest error relative to the
output's RMS, the count of elements off by more than about one rounding of
the output dtype, and where they are (row and column ranges, the CTAs and
row positions inside a block they fall in). A failing op is rerun with one
CTA, two stages and the smallest block, and twice on the same inputs (a
result that moves between runs is a race), so one run tells the cause.
``--shard i/n`` splits the cases over processes.

``--time``: device time per call of each op from a ``jax.profiler`` trace
(the sum of the kernels one call launches, median over calls), for
MosaicGpu, PallasGpu and an XLA ``x + 1`` over the same bytes (``copy``).
Each candidate rotates over enough input sets to exceed the L2 cache.

Usage (on the GPU machine, from the repository root)::

  PYTHONPATH=$PWD python3 benchmarks/mosaic_gpu_timing.py --check
  PYTHONPATH=$PWD python3 benchmarks/mosaic_gpu_timing.py --time
"""

import argparse
import glob
import gzip
import json
import math
import os
import statistics
import tempfile
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

CHECK_SHAPES = [(1, 128), (37, 128), (300, 768), (129, 896), (67, 1024),
                (19, 4096), (1000, 2048), (4099, 1024), (8192, 4096),
                (32768, 128), (2048, 8192), (45, 320), (33, 96)]
TIME_SHAPES = [((8192, 4096), jnp.bfloat16), ((4096, 8192), jnp.bfloat16),
               ((2048, 8192), jnp.float16), ((1024, 4096), jnp.float32),
               ((32768, 128), jnp.bfloat16)]
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
OPS = ("fwd", "bwd", "fused_fwd", "fused_bwd")
# Timed with --time --ops ...: a bias (in x's dtype), cast_mode "llama",
# and the quantized forward (dynamic per-row scales; int8 unless named).
FEATURE_OPS = ("bias_fwd", "bias_bwd", "bias_fused_fwd", "bias_fused_bwd",
               "llama_fwd", "llama_bwd", "quant_fwd", "quant_fp8_fwd",
               "quant_fused_fwd", "quant_static_fwd")
EPS = 1e-5
# Input sets rotated per candidate: their bytes exceed the 60 MB L2 ~3x.
ROTATE_BYTES = 192 * 2**20
MAX_SETS = 24


# ------------------------------------------------------------------ check --

def _ranges(idx, limit=12):
  """Sorted ints as "a-b" ranges, at most ``limit`` of them."""
  idx = sorted(set(int(i) for i in idx))
  out, start, prev = [], None, None
  for i in idx:
    if start is None:
      start = prev = i
    elif i == prev + 1:
      prev = i
    else:
      out.append((start, prev))
      start = prev = i
  if start is not None:
    out.append((start, prev))
  text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out[:limit])
  return text + (f",...({len(out)} ranges)" if len(out) > limit else "")


def _compare(name, got, want, plan=None):
  """One output against XLA's: a line, and whether it is off."""
  g = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  w = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if g.shape != w.shape:
    return f"  {name}: shape {g.shape} != {w.shape}", True
  dt = np.dtype(got.dtype)
  # One rounding of a 16-bit output; float32 results differ by summation
  # order only, dscale (a sum over rows) a little more.
  eps = 2.0**-7 if dt == jnp.bfloat16 else 2.0**-10 if dt == jnp.float16 \
      else 1e-5
  if name == "dscale":
    eps = max(eps, 1e-4)
  rms = float(np.sqrt(np.mean(w * w))) or 1.0
  err = np.abs(g - w)
  nan = int(np.sum(~np.isfinite(g)))
  bad = ~(err <= eps * (np.abs(w) + 0.1 * rms))
  nbad = int(bad.sum())
  line = (f"  {name}: maxerr/rms={np.nanmax(np.where(np.isfinite(err), err, 0)) / rms:.3g} "
          f"bad={nbad}/{g.size} nonfinite={nan}")
  if nbad:
    pos = np.argwhere(bad if g.ndim > 1 else bad[:, None])
    rows = pos[:, 0]
    line += f"\n    rows {_ranges(rows)}"
    if g.ndim > 1:
      line += f"\n    cols {_ranges(pos[:, 1])}"
    if plan is not None and name != "dscale":
      br, cta = plan.block_rows, plan.cta_rows
      line += (f"\n    ctas {_ranges(rows // cta)}; row%block {_ranges(rows % br)};"
               f" block-of-cta {_ranges((rows % cta) // br)}")
      if g.ndim > 1:
        line += f"; col%chunk {_ranges(pos[:, 1] % plan.chunk)}"
    for p in pos[:3]:
      p = tuple(int(v) for v in p[:g.ndim])
      line += f"\n    at {p}: got {g[p]:.6g} want {w[p]:.6g}"
  return line, nbad > 0


def _inputs(rows, hidden, dtype, seed):
  key = jax.random.key(seed)
  ks = jax.random.split(key, 6)
  f = lambda k, shape, m=0.0, s=1.0: (
      jax.random.normal(k, shape, jnp.float32) * s + m).astype(dtype)
  return dict(x=f(ks[0], (rows, hidden), 0.3), r=f(ks[1], (rows, hidden)),
              w=f(ks[2], (hidden,), 0.0, 0.5), dy=f(ks[3], (rows, hidden)),
              dh=f(ks[4], (rows, hidden)))


def _op_fns(impl, op, with_scale, dtype):
  """(jitted fn of the inputs dict, output names)."""
  norm = base.Norm(eps=EPS, scale_offset=1.0 if with_scale else 0.0,
                   out_dtype=np.dtype(dtype))
  ws = (lambda a: a["w"]) if with_scale else (lambda a: None)
  xla = base.Xla()
  if op == "fwd":
    return (lambda a: impl.forward(a["x"], ws(a), None, norm=norm),
            ("y", "rstd"))
  if op == "bwd":
    def f(a):
      r = xla.forward(a["x"], ws(a), None, norm=norm)[1]
      return impl.backward(a["x"], ws(a), None, r, a["dy"], norm=norm)[:2]
    return f, ("dx", "dscale")
  if op == "fused_fwd":
    return (lambda a: impl.residual_forward(a["x"], a["r"], ws(a), None,
                                            norm=norm), ("y", "h", "rstd"))
  def g(a):
    h, r = xla.residual_forward(a["x"], a["r"], ws(a), None, norm=norm)[1:]
    return impl.residual_backward(h, ws(a), None, r, a["dy"], a["dh"],
                                  norm=norm)[:2]
  return g, ("dx", "dscale")


_SHAPE_OP = {"fwd": "fwd", "bwd": "bwd", "fused_fwd": "residual_fwd",
             "fused_bwd": "residual_bwd"}


def _plan_of(impl, op, rows, hidden, dtype):
  s = np.dtype(dtype).itemsize
  ins = {"fwd": [s], "bwd": [s, s], "fused_fwd": [s, s],
         "fused_bwd": [s, s, s]}[op]
  outs = {"fwd": [s], "bwd": [s], "fused_fwd": [s, s], "fused_bwd": [s]}[op]
  from rmsnorm_jax.kernels import mosaic_gpu as mg
  return mg.plan("fwd" if "fwd" in op else "bwd", rows, hidden,
                 in_sizes=ins, out_sizes=outs,
                 sms=impl.num_sms or mg._num_sms(), block_rows=impl.block_rows,
                 stages=impl.stages, grid=impl.grid, scale_size=s)


def _check_one(op, with_scale, shape, dtype, a, want):
  """Runs MosaicGpu on one op; returns (lines, off)."""
  impl = MosaicGpu()
  fn, names = _op_fns(impl, op, with_scale, dtype)
  plan = _plan_of(impl, op, *shape, dtype)
  got = jax.jit(fn)(a)
  lines, off = [], False
  for n, g, w in zip(names, got, want):
    if g is None and w is None:
      continue
    line, bad = _compare(n, g, w, plan)
    lines.append(line)
    off |= bad
  if not off:
    return lines, plan, False
  again = jax.jit(fn)(a)
  moved = [n for n, g, h in zip(names, got, again)
           if g is not None and not np.array_equal(np.asarray(g),
                                                   np.asarray(h))]
  lines.append(f"  rerun on the same inputs: "
               f"{'moved: ' + ','.join(moved) if moved else 'identical'}")
  variants = {"grid=1": dict(grid=1), "stages=2": dict(stages=2),
              "block=min": dict(block_rows=max(4 if op.endswith('fwd') else 1,
                                               plan.group_rows))}
  for vname, kw in variants.items():
    try:
      vimpl = MosaicGpu(**kw)
      vfn, _ = _op_fns(vimpl, op, with_scale, dtype)
      vgot = jax.jit(vfn)(a)
      res = []
      for n, g, w in zip(names, vgot, want):
        if g is None:
          continue
        _, bad = _compare(n, g, w)
        res.append(f"{n}:{'BAD' if bad else 'ok'}")
      lines.append(f"  variant {vname}: {' '.join(res)}")
    except Exception as e:  # report and go on
      lines.append(f"  variant {vname}: {type(e).__name__}: {str(e)[:200]}")
  return lines, plan, True


def check(shard, nshards):
  cases = [(s, d) for s in CHECK_SHAPES for d in DTYPES]
  cases = cases[shard::nshards]
  xla = base.Xla()
  n_off = 0
  for shape, dtype in cases:
    dname = np.dtype(dtype).name
    a = _inputs(*shape, dtype, seed=zlib.crc32(repr((shape, dname)).encode()))
    for op in OPS:
      for with_scale in (True, False):
        if op.startswith("fused") and not with_scale:
          continue
        tag = f"{op}{'' if with_scale else '_noscale'} {shape[0]}x{shape[1]} {dname}"
        reason = MosaicGpu().shape_reason(*shape, dtype, _SHAPE_OP[op])
        if reason is not None:
          print(f"SKIP {tag}: {reason}", flush=True)
          continue
        try:
          want = jax.jit(_op_fns(xla, op, with_scale, dtype)[0])(a)
          t0 = time.perf_counter()
          lines, plan, off = _check_one(op, with_scale, shape, dtype, a,
                                        want)
          dt = time.perf_counter() - t0
        except Exception as e:  # report and go on
          try:
            p = _plan_of(MosaicGpu(), op, *shape, dtype)
            p = f"block={p.block_rows} group={p.group_rows} vec={p.vec}"
          except Exception:  # pylint: disable=broad-except
            p = "no plan"
          print(f"ERROR {tag} [{p}]: {type(e).__name__}: {str(e)[:600]}",
                flush=True)
          traceback.print_exc(limit=3)
          n_off += 1
          continue
        n_off += off
        p = (f"kind={plan.kind} vec={plan.vec} block={plan.block_rows} "
             f"group={plan.group_rows} chunk={plan.chunk} k={plan.k} "
             f"stages={plan.stages} grid={plan.grid} steps={plan.steps}")
        print(f"{'BAD' if off else 'ok '} {tag} [{p}] {dt:.1f}s", flush=True)
        if off:
          print("\n".join(lines), flush=True)
  print(f"done: {n_off} ops off", flush=True)


# ------------------------------------------------------------------- time --

def _trace_kernels(log_dir):
  """GPU kernel events (name, ts, dur, module) of a profiler trace.

  A kernel event without an ``hlo_module`` argument takes the name of the
  "XLA Modules" span it falls in.
  """
  path = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path, "rt") as fp:
    events = json.load(fp).get("traceEvents", [])
  pnames, tnames = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pnames[e["pid"]] = e.get("args", {}).get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tnames[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  dev = {p for p, n in pnames.items() if "/device:gpu" in n.lower()}
  out, spans = [], []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in dev:
      continue
    line = tnames.get((e["pid"], e.get("tid")), "")
    if line == "XLA Modules":
      spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)),
                    e.get("name", "")))
    if not line.startswith("Stream"):
      continue
    args = e.get("args", {}) or {}
    out.append(dict(name=e.get("name", ""), ts=float(e["ts"]),
                    dur=float(e.get("dur", 0.0)),
                    module=args.get("hlo_module") or
                    args.get("hlo_module_name") or ""))
  for k in out:
    if not k["module"]:
      k["module"] = next((n.split("(")[0] for lo, hi, n in spans
                          if lo - 0.01 <= k["ts"] <= hi + 0.01), "")
  return out


def _named_jit(fn, name):
  fn.__name__ = fn.__qualname__ = name
  return jax.jit(fn)


def device_times(cands, reps, error_chars=300):
  """Device time per call of each candidate, from one profiler trace.

  Args:
    cands: ``{key: (fn, arg_sets)}``, each fn from ``_named_jit`` (its name
      finds its kernels in the trace); a candidate whose warm-up raises is
      reported and dropped (``cands`` is edited in place).
    reps: passes over every candidate's argument sets.

  Returns:
    ``({key: (median us, min, max, kernels per call)}, kernel events)``;
    the times are None where the trace's kernels do not split into calls.
  """
  for key, (fn, args) in list(cands.items()):
    try:
      for a in args:
        jax.block_until_ready(fn(*a))
    except Exception as e:  # report and go on
      print(f"  {key}: {type(e).__name__}: {str(e)[:error_chars]}",
            flush=True)
      del cands[key]
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(reps):
      for fn, args in cands.values():
        for a in args:
          jax.block_until_ready(fn(*a))
    jax.profiler.stop_trace()
    kernels = _trace_kernels(tmp)
  results = {}
  for key, (fn, args) in cands.items():
    tag = f"jit_{fn.__name__}"
    ev = sorted((k for k in kernels if k["module"] == tag or
                 k["module"].startswith(tag + ".")), key=lambda k: k["ts"])
    calls = reps * len(args)
    if not ev or len(ev) % calls:
      results[key] = (sum(k["dur"] for k in ev) / calls if ev else None,
                      None, None, len(ev) / calls)
      continue
    per = len(ev) // calls
    t = [sum(k["dur"] for k in ev[i * per:(i + 1) * per])
         for i in range(calls)]
    results[key] = (statistics.median(t), min(t), max(t), per)
  return results, kernels


def _sets(rows, hidden, dtype, n):
  key = jax.random.key(1)
  out = []
  for i in range(n):
    ks = jax.random.split(jax.random.fold_in(key, i), 4)
    f = lambda k, m=0.0: (jax.random.normal(k, (rows, hidden), jnp.float32)
                          + m).astype(dtype)
    out.append(dict(x=f(ks[0], 0.3), r=f(ks[1]), dy=f(ks[2]), dh=f(ks[3])))
  return out


def _feature_fn(impl, op, dtype):
  """(fn, names of its inputs in a set, the shape_reason op and bias)."""
  dt = np.dtype(dtype)
  norm = base.Norm(eps=1e-6, out_dtype=dt)
  llama = base.Norm(eps=1e-6, cast_mode="llama", out_dtype=dt)
  quant = lambda q: base.Norm(eps=1e-6, quant_dtype=np.dtype(q))
  i8, e4 = jnp.int8, jnp.float8_e4m3fn
  table = {
      "bias_fwd": (lambda x, w, b: impl.forward(x, w, b, norm=norm),
                   ("x", "w", "b"), "fwd"),
      "bias_bwd": (lambda x, w, b, r, dy: impl.backward(
          x, w, b, r, dy, norm=norm), ("x", "w", "b", "rstd", "dy"), "bwd"),
      "bias_fused_fwd": (lambda x, res, w, b: impl.residual_forward(
          x, res, w, b, norm=norm), ("x", "r", "w", "b"), "residual_fwd"),
      "bias_fused_bwd": (lambda h, w, b, r, dy, dh: impl.residual_backward(
          h, w, b, r, dy, dh, norm=norm),
                         ("x", "w", "b", "rstd", "dy", "dh"), "residual_bwd"),
      "llama_fwd": (lambda x, w: impl.forward(x, w, None, norm=llama),
                    ("x", "w"), "fwd"),
      "llama_bwd": (lambda x, w, r, dy: impl.backward(
          x, w, None, r, dy, norm=llama)[:2], ("x", "w", "rstd", "dy"),
                    "bwd"),
      "quant_fwd": (lambda x, w: impl.quantized_forward(
          x, None, w, None, None, norm=quant(i8))[:2], ("x", "w"),
                    "quantized_fwd"),
      "quant_fp8_fwd": (lambda x, w: impl.quantized_forward(
          x, None, w, None, None, norm=quant(e4))[:2], ("x", "w"),
                        "quantized_fwd"),
      "quant_fused_fwd": (lambda x, res, w: impl.quantized_forward(
          x, res, w, None, None, norm=quant(i8)), ("x", "r", "w"),
                          "quantized_fwd"),
      "quant_static_fwd": (lambda x, w, qs: impl.quantized_forward(
          x, None, w, None, qs, norm=quant(i8))[:2], ("x", "w", "qs"),
                           "quantized_fwd"),
  }
  return table[op]


def time_shape(rows, hidden, dtype, reps, ops=OPS):
  """{(op, impl): (median us, min, max, kernels per call)} for one shape."""
  n_bytes = rows * hidden * np.dtype(dtype).itemsize
  n_sets = int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / n_bytes))))
  sets = _sets(rows, hidden, dtype, n_sets)
  w = (jax.random.normal(jax.random.key(2), (hidden,), jnp.float32) * 0.1
       + 1).astype(dtype)
  norm = base.Norm(eps=1e-6, out_dtype=np.dtype(dtype))
  xla = base.Xla()
  for s in sets:
    s["rstd"] = xla.forward(s["x"], w, None, norm=norm)[1]
  impls = {"mosaic": MosaicGpu(), "triton": PallasGpu()}
  cands = {("copy", "xla"): (_named_jit(
      lambda x: x + jnp.asarray(1, x.dtype), "mgt_copy_xla"),
      [(s["x"],) for s in sets])}
  b = (jax.random.normal(jax.random.key(3), (hidden,), jnp.float32) * 0.1
       ).astype(dtype)
  for s in sets:
    s.update(w=w, b=b, qs=jnp.float32(0.05))
  for iname, impl in impls.items():
    for op in ops:
      if op in FEATURE_OPS:
        fn, names, shape_op = _feature_fn(impl, op, dtype)
        if iname == "mosaic" and impl.shape_reason(
            rows, hidden, dtype, shape_op,
            has_bias=op.startswith("bias")) is not None:
          continue
        cands[(op, iname)] = (_named_jit(fn, f"mgt_{op}_{iname}"),
                              [tuple(s[n] for n in names) for s in sets])
        continue
      if iname == "mosaic" and impl.shape_reason(
          rows, hidden, dtype, _SHAPE_OP[op]) is not None:
        continue
      if op == "fwd":
        fn = lambda x, w, impl=impl: impl.forward(x, w, None, norm=norm)
        args = [(s["x"], w) for s in sets]
      elif op == "bwd":
        fn = lambda x, w, r, dy, impl=impl: impl.backward(
            x, w, None, r, dy, norm=norm)[:2]
        args = [(s["x"], w, s["rstd"], s["dy"]) for s in sets]
      elif op == "fused_fwd":
        fn = lambda x, r, w, impl=impl: impl.residual_forward(
            x, r, w, None, norm=norm)
        args = [(s["x"], s["r"], w) for s in sets]
      else:
        fn = lambda h, w, r, dy, dh, impl=impl: impl.residual_backward(
            h, w, None, r, dy, dh, norm=norm)[:2]
        args = [(s["x"], w, s["rstd"], s["dy"], s["dh"]) for s in sets]
      cands[(op, iname)] = (_named_jit(fn, f"mgt_{op}_{iname}"), args)
  results, kernels = device_times(cands, reps)
  if any(v[0] is None for v in results.values()):
    print("  modules in the trace:", sorted({k["module"] for k in kernels})[:20],
          flush=True)
  return results, n_sets


def time_all(reps, ops=OPS, shapes=TIME_SHAPES):
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  rows_out = []
  for (rows, hidden), dt in shapes:
    t0 = time.perf_counter()
    try:
      res, n_sets = time_shape(rows, hidden, dt, reps, ops)
    except Exception as e:  # report and go on
      print(f"{rows}x{hidden}: {type(e).__name__}: {str(e)[:400]}",
            flush=True)
      continue
    name = f"{rows}x{hidden} {np.dtype(dt).name}"
    rows_out.append((name, res))
    f = lambda v: "-" if v is None or v[0] is None else (
        f"{v[0]:.1f}" + ("" if v[1] is None else f" ({v[1]:.1f}-{v[2]:.1f})"))
    print(f"{name}: {n_sets} sets, {time.perf_counter() - t0:.0f}s; copy "
          f"{f(res.get(('copy', 'xla')))}", flush=True)
    for op in ops:
      m, t = res.get((op, "mosaic")), res.get((op, "triton"))
      print(f"  {op}: mosaic {f(m)} [{m and m[3]} kernels] triton {f(t)} "
            f"[{t and t[3]} kernels]", flush=True)
  print("\nus per call, profiler device time, median over calls "
        "(inputs rotated)")
  print("| shape | copy | " + " | ".join(
      f"{op} mosaic | {op} triton" for op in ops) + " |")
  g = lambda v: "-" if v is None or v[0] is None else f"{v[0]:.1f}"
  for name, res in rows_out:
    print(f"| {name} | {g(res.get(('copy', 'xla')))} | " + " | ".join(
        f"{g(res.get((op, 'mosaic')))} | {g(res.get((op, 'triton')))}"
        for op in ops) + " |")


def _shapes(text):
  """"8192x4096:bfloat16,..." -> [((rows, hidden), dtype), ...]."""
  out = []
  for item in text.split(","):
    dims, dt = item.split(":")
    rows, hidden = map(int, dims.split("x"))
    out.append(((rows, hidden), jnp.dtype(dt)))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--time", action="store_true")
  ap.add_argument("--shard", default="0/1")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--ops", default=",".join(OPS),
                  help="comma-separated ops to time, of "
                  f"{', '.join(OPS + FEATURE_OPS)}")
  ap.add_argument("--shapes", default=None,
                  help="comma-separated ROWSxHIDDEN:DTYPE (default: "
                  "the timing set)")
  args = ap.parse_args()
  ops = tuple(args.ops.split(","))
  unknown = set(ops) - set(OPS + FEATURE_OPS)
  if unknown:
    ap.error(f"--ops: unknown {sorted(unknown)}")
  shapes = _shapes(args.shapes) if args.shapes else TIME_SHAPES
  if args.check:
    i, n = map(int, args.shard.split("/"))
    check(i, n)
  if args.time or not args.check:
    time_all(args.reps, ops, shapes)


if __name__ == "__main__":
  main()
