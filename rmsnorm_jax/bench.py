"""Benchmark: device time of RMSNorm implementations, side by side.

``python -m rmsnorm_jax.bench`` times, for each shape of
``rmsnorm_jax.shapes.BENCHMARK`` (``--small``: a few tiny shapes, for CPU):

* ops: ``fwd`` (y and rstd from x, scale), ``bwd`` (dx, dscale from dy and the
  residuals each implementation's own forward saved), ``fused_fwd``
  (y, h = x + residual), ``fused_bwd`` (gradients of residual and scale
  from dy, dh; x's gradient is the same array), ``linen_fwd`` (the flax
  layers, bfloat16 input, output and params), ``linen_fwd_mixed`` (the
  same with float32 params), ``linen_fwd_default`` (flax's defaults:
  float32 params, ``dtype=None``, so a float32 output) and ``linen_bwd``
  (the gradients of x and scale through the layers, bfloat16 params);
* impls: ``roofline`` (an XLA elementwise op moving the op's minimum bytes),
  ``xla`` (``backend="xla"``; autodiff of its custom_vjp for the backward),
  ``flax_linen`` (``flax.linen.RMSNorm``, its own autodiff; for the fused ops
  an add followed by it), ``jax_pallas_example``
  (``jax.experimental.pallas.ops.gpu.rms_norm``, 3-D input with a zero bias,
  GPU only), ``rmsnorm_jax`` (this library's kernel named explicitly),
  ``rmsnorm_jax_auto`` (``backend="auto"``), and for the linen ops
  ``rmsnorm_jax_linen`` (``rmsnorm_jax.linen.RMSNorm``, against
  ``flax.linen.RMSNorm`` with the same fields), ``flax_nnx`` and
  ``rmsnorm_jax_nnx`` (the two ``nnx.RMSNorm`` layers).

Timing: on a GPU, the sum of the device kernels one call launches, read from
the trace ``jax.profiler`` writes (``*.trace.json.gz`` under the log dir; one
trace per shape, covering all its ops), median over calls; the calls rotate
over several input sets so that L2 does not serve them. A candidate whose
kernels cannot be found in the trace is timed on the host over back-to-back
calls (``timing="wallclock-batched"``). Elsewhere (CPU) there are no device
events, so the median of host wall-clock per call (after
``block_until_ready``) is reported and the record says
``timing="wallclock"``.

Records (``run_benchmark`` returns them, ``--json`` writes them) hold: op,
impl, rows, hidden, dtype, bytes (the op's minimum traffic), time_us, gbps,
timing, kernels (device kernels per call), breakdown (median time of each of
those kernels), ratio_to_roofline, speedup_vs_xla, backend (what ran), device,
jax (version), error (when an implementation could not run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import shapes as shape_data
from rmsnorm_jax.kernels.gpu import PallasGpu

OPS = ("fwd", "bwd", "fused_fwd", "fused_bwd", "linen_fwd",
       "linen_fwd_mixed", "linen_fwd_default", "linen_bwd")
LINEN_OPS = ("linen_fwd", "linen_fwd_mixed", "linen_fwd_default",
             "linen_bwd")
# Layer ops: (param dtype, layer dtype); the input is bfloat16 throughout.
LAYER_DTYPES = {"linen_fwd": (jnp.bfloat16, jnp.bfloat16),
                "linen_fwd_mixed": (jnp.float32, jnp.bfloat16),
                "linen_fwd_default": (jnp.float32, None),
                "linen_bwd": (jnp.bfloat16, jnp.bfloat16)}
IMPLS = ("roofline", "xla", "flax_linen", "jax_pallas_example",
         "rmsnorm_jax", "rmsnorm_jax_auto", "rmsnorm_jax_linen", "flax_nnx",
         "rmsnorm_jax_nnx")
# The layer implementations: (module holding RMSNorm, which flax API).
LAYERS = {"flax_linen": ("flax.linen", "linen"),
          "rmsnorm_jax_linen": ("rmsnorm_jax.linen", "linen"),
          "flax_nnx": ("flax.nnx", "nnx"),
          "rmsnorm_jax_nnx": ("rmsnorm_jax.nnx", "nnx")}
SMALL = (((4, 256), jnp.float32), ((16, 128), jnp.bfloat16),
         ((3, 1000), jnp.float16))
EPS = 1e-6
# Input sets rotated per call: enough that their bytes exceed L2 (50 MB on
# H100) about three times over, at least 2 and at most 16.
ROTATE_BYTES = 150 * 2**20
MAX_SETS = 16
COMPILE_THREADS = 8


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


# ------------------------------------------------------------------ cases --

def _isz(dtype) -> int:
  return np.dtype(dtype).itemsize


def min_bytes(op: str, rows: int, hidden: int, dtype) -> int:
  """Fewest bytes the op must move through device memory.

  N = rows * hidden elements of ``dtype``; the scale is in ``dtype`` and the
  saved per-row rstd is float32.

  * fwd: read x, write y (2N), write rstd, read scale.
  * bwd: read x and dy, write dx (3N), read rstd, read scale, write dscale.
  * fused_fwd: read x and residual, write y and h (4N), rstd, scale.
  * fused_bwd: read h, dy, dh, write the gradient of h (4N; the gradients of
    x and residual are that same array), read rstd and scale, write dscale.
  * linen_fwd: read bfloat16 x, write bfloat16 y, write rstd, read a
    bfloat16 scale (layers with ``dtype=param_dtype=bfloat16``).
  * linen_fwd_mixed: the same with a float32 scale (``param_dtype=float32``).
  * linen_fwd_default: flax's defaults (float32 params, ``dtype=None``) on
    bfloat16 x: read bfloat16 x, write float32 y, rstd, a float32 scale.
  * linen_bwd: the layers' backward (bfloat16 params): read x and dy, write
    dx, read rstd and the scale, write dscale, as bwd.
  """
  n, s = rows * hidden, _isz(dtype)
  stat, vec = rows * 4, hidden * s
  return {
      "fwd": 2 * n * s + stat + vec,
      "bwd": 3 * n * s + stat + 2 * vec,
      "fused_fwd": 4 * n * s + stat + vec,
      "fused_bwd": 4 * n * s + stat + 2 * vec,
      "linen_fwd": n * 4 + stat + hidden * 2,
      "linen_fwd_mixed": n * 4 + stat + hidden * 4,
      "linen_fwd_default": n * 6 + stat + hidden * 4,
      "linen_bwd": 6 * n + stat + hidden * 4,
  }[op]


def roofline_bytes(op: str, rows: int, hidden: int, dtype) -> int:
  """Bytes the elementwise roofline op moves (the op's bytes less vectors)."""
  n, s = rows * hidden, _isz(dtype)
  return {"fwd": 2 * n * s, "bwd": 3 * n * s, "fused_fwd": 4 * n * s,
          "fused_bwd": 4 * n * s, "linen_fwd": 4 * n,
          "linen_fwd_mixed": 4 * n, "linen_fwd_default": 6 * n,
          "linen_bwd": 6 * n}[op]


# ------------------------------------------------------------ candidates --

@dataclasses.dataclass
class Candidate:
  """One (op, impl) on one shape: a jitted fn and its rotated argument sets."""

  op: str
  impl: str
  fn: Callable
  arg_sets: list
  backend: str


def _flax_norm(x, scale):
  import flax.linen as nn
  layer = nn.RMSNorm(epsilon=EPS, dtype=x.dtype, param_dtype=scale.dtype)
  return layer.apply({"params": {"scale": scale}}, x)


def _pallas_example(x, scale):
  from jax.experimental.pallas.ops.gpu import rms_norm as example
  # It normalizes (batch, seq, hidden) and always adds a bias.
  y = example.rms_norm(x[None], scale, jnp.zeros_like(scale), eps=EPS)
  return y[0]


def _kernel_backend():
  if on_gpu():
    return PallasGpu(), "pallas_gpu"
  return PallasGpu(interpret=True), "pallas_gpu(interpret)"


def _norm_fn(impl: str):
  """(x, scale) -> y for each impl; None where the impl does not apply."""
  kernel, kname = _kernel_backend()
  table = {
      "xla": (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend="xla"), "xla"),
      "rmsnorm_jax": (lambda x, s: rj.rms_norm(x, s, eps=EPS,
                                               backend=kernel), kname),
      "rmsnorm_jax_auto": (lambda x, s: rj.rms_norm(x, s, eps=EPS), "auto"),
      "flax_linen": (_flax_norm, "flax"),
  }
  if on_gpu():
    table["jax_pallas_example"] = (_pallas_example, "pallas_example")
  return table.get(impl)


def _impl_backend(impl):
  """An Implementation instance passed as impl: (label, instance)."""
  if isinstance(impl, tuple):
    return impl
  return None


def _residual_fn(impl):
  kernel, kname = _kernel_backend()
  if (custom := _impl_backend(impl)) is not None:
    return (lambda x, r, s: rj.rms_norm_residual(
        x, r, s, eps=EPS, backend=custom[1]), custom[1].name)
  table = {
      "xla": (lambda x, r, s: rj.rms_norm_residual(x, r, s, eps=EPS,
                                                   backend="xla"), "xla"),
      "rmsnorm_jax": (lambda x, r, s: rj.rms_norm_residual(
          x, r, s, eps=EPS, backend=kernel), kname),
      "rmsnorm_jax_auto": (lambda x, r, s: rj.rms_norm_residual(
          x, r, s, eps=EPS), "auto"),
      # flax has no fused variant: the add, then its layer.
      "flax_linen": (lambda x, r, s: (_flax_norm((x + r).astype(r.dtype), s),
                                      (x + r).astype(r.dtype)), "flax"),
  }
  return table.get(impl)


def _plain_fn(impl):
  if (custom := _impl_backend(impl)) is not None:
    return (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend=custom[1]),
            custom[1].name)
  return _norm_fn(impl)


def _roofline_fn(op):
  # Elementwise XLA ops reading and writing exactly the roofline bytes.
  return {
      "fwd": lambda x, s: x * 2,
      "bwd": lambda x, s, dy: x + dy,
      # h and a value computed from it: XLA emits one loop fusion with both
      # outputs (two independent outputs became two kernels each reading x
      # and r, and a stacked output a slow concatenate fusion).
      "fused_fwd": lambda x, r, s: _with_h(x + r),
      "fused_bwd": lambda h, dy, dh: h + dy + dh,
      "linen_fwd": lambda x, s: x * 2,
      "linen_fwd_mixed": lambda x, s: x * 2,
      "linen_fwd_default": lambda x, s: x.astype(jnp.float32) * 2,
      "linen_bwd": lambda x, s, dy: x + dy,
  }[op]


def _with_h(h):
  return h * 2, h


def _named_jit(fn, name):
  # A unique function name becomes the XLA module name ("jit_<name>"), which
  # is how device events are attributed to candidates in the trace.
  def wrapped(*a):
    return fn(*a)
  wrapped.__name__ = wrapped.__qualname__ = name
  return jax.jit(wrapped)


def _vjp_runner(f, primals, cot):
  """Backward only: the vjp closure (holding f's own saved residuals) and
  the cotangent are arguments, so the timed call is the backward pass."""
  _, vjp_fn = jax.vjp(jax.jit(f), *primals)
  jax.block_until_ready(vjp_fn)
  return vjp_fn, cot


def _call_vjp(vjp_fn, cot):
  return vjp_fn(cot)


def _call_vjp_residual(vjp_fn, cot):
  # The gradients of x and residual are the same array (h = x + residual);
  # returning both from one jit forces XLA to copy it into a second buffer,
  # which a training step (consuming both inside one program) would not do.
  # So the residual's and the scale's gradients are returned.
  _, d_res, d_scale = vjp_fn(cot)
  return d_res, d_scale


def _make_inputs(key, op, rows, hidden, dtype):
  # Drawn on the device: host-side generation of the large sets took longer
  # than timing them.
  keys = iter(jax.random.split(key, 6))

  def rand(shape, dt, mean=0.0, scale=1.0):
    v = jax.random.normal(next(keys), shape, jnp.float32) * scale + mean
    return v.astype(dt)
  x = rand((rows, hidden), dtype, 0.3)
  if op in LINEN_OPS:
    sdt = LAYER_DTYPES[op][0]
    d = dict(x=x, s=rand((hidden,), sdt, 1.0, 0.5))
    if op == "linen_bwd":
      d["dy"] = rand((rows, hidden), dtype)
    return d
  s = rand((hidden,), dtype, 1.0, 0.5)
  if op == "fwd":
    return dict(x=x, s=s)
  if op == "bwd":
    return dict(x=x, s=s, dy=rand((rows, hidden), dtype))
  r = rand((rows, hidden), dtype, 0.5)
  if op == "fused_fwd":
    return dict(x=x, r=r, s=s)
  return dict(x=x, r=r, s=s, dy=rand((rows, hidden), dtype),
              dh=rand((rows, hidden), dtype))


def build_candidates(op, impls, rows, hidden, dtype, n_sets, seed=0,
                     uid=0) -> list[Candidate]:
  """Jitted callables with ``n_sets`` fresh argument sets each.

  Entries that could not be built are the exceptions raised instead.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), uid)
  inputs = [_make_inputs(jax.random.fold_in(base_key, i), op, rows, hidden,
                         dtype) for i in range(n_sets)]
  out = []
  for i, impl in enumerate(impls):
    label = impl[0] if isinstance(impl, tuple) else impl
    name = f"rb{uid:03d}{i:02d}_{re.sub(r'[^A-Za-z0-9]', '_', op + '_' + label)}"
    try:
      cand = _candidate(op, impl, label, inputs, name)
    except Exception as e:  # pylint: disable=broad-except
      cand = e
    if cand is not None:
      out.append(cand)
  return out


def _layer_fn(impl, param_dtype, dtype):
  """``f(x, scale) -> y`` through a layer with params in ``param_dtype``
  and its ``dtype`` field (bfloat16, or None: x promoted with the params)."""
  if impl not in LAYERS:
    return None
  import importlib
  module, api = LAYERS[impl]
  cls = importlib.import_module(module).RMSNorm
  if api == "linen":
    layer = cls(epsilon=EPS, dtype=dtype, param_dtype=param_dtype)
    return lambda x, s: layer.apply({"params": {"scale": s}}, x)
  from flax import nnx

  def f(x, s):
    layer = cls(x.shape[-1], epsilon=EPS, dtype=dtype,
                param_dtype=param_dtype, rngs=nnx.Rngs(0))
    layer.scale.value = s
    return layer(x)
  return f


def _candidate(op, impl, label, inputs, name):
  if impl == "roofline":
    f = _roofline_fn(op)
    keys = {"fwd": "xs", "bwd": ["x", "s", "dy"], "fused_fwd": ["x", "r", "s"],
            "fused_bwd": ["x", "dy", "dh"], "linen_fwd": ["x", "s"],
            "linen_fwd_mixed": ["x", "s"], "linen_fwd_default": ["x", "s"],
            "linen_bwd": ["x", "s", "dy"]}[op]
    keys = ["x", "s"] if keys == "xs" else keys
    return Candidate(op, label, _named_jit(f, name),
                     [tuple(d[k] for k in keys) for d in inputs], "xla")
  if op in LINEN_OPS:
    f = _layer_fn(impl, *LAYER_DTYPES[op])
    if f is None:
      return None
    backend = "flax" if impl.startswith("flax") else "rmsnorm_jax." + (
        LAYERS[impl][1])
    if op == "linen_bwd":
      sets = [_vjp_runner(f, (d["x"], d["s"]), d["dy"]) for d in inputs]
      return Candidate(op, label, _named_jit(_call_vjp, name), sets, backend)
    return Candidate(op, label, _named_jit(f, name),
                     [(d["x"], d["s"]) for d in inputs], backend)
  if impl in LAYERS and impl != "flax_linen":
    return None  # flax_linen also runs the plain ops (through _plain_fn)
  if op in ("fwd", "bwd"):
    entry = _plain_fn(impl)
    if entry is None:
      return None
    f, backend = entry
    if op == "fwd":
      return Candidate(op, label, _named_jit(f, name),
                       [(d["x"], d["s"]) for d in inputs], backend)
    sets = [_vjp_runner(f, (d["x"], d["s"]), d["dy"]) for d in inputs]
    return Candidate(op, label, _named_jit(_call_vjp, name), sets, backend)
  entry = _residual_fn(impl)
  if entry is None:
    return None
  f, backend = entry
  if op == "fused_fwd":
    return Candidate(op, label, _named_jit(f, name),
                     [(d["x"], d["r"], d["s"]) for d in inputs], backend)
  sets = [_vjp_runner(f, (d["x"], d["r"], d["s"]), (d["dy"], d["dh"]))
          for d in inputs]
  return Candidate(op, label, _named_jit(_call_vjp_residual, name), sets,
                   backend)


# ---------------------------------------------------------------- timing --

def _trace_file(log_dir) -> str:
  found = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"),
                           recursive=True))
  if not found:
    found = sorted(glob.glob(os.path.join(log_dir, "**",
                                          "perfetto_trace.json.gz"),
                             recursive=True))
  if not found:
    raise FileNotFoundError(f"no trace.json.gz under {log_dir}")
  return found[-1]


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps",
                  "Framework", "TensorFlow", "Source", "Launch Stats",
                  "Host Threads", "SparseCore")


def device_events(trace_path: str) -> tuple[list[dict], list[dict], dict]:
  """Parses a profiler trace.

  Returns:
    (kernels, modules, info): device kernel/memcpy events on GPU streams
    (dicts with name, ts, dur in us, module or None), the "XLA Modules"
    spans of the device (name, ts, dur) and a description of what was found
    (process and thread names) for the notes.
  """
  with gzip.open(trace_path, "rt") as fp:
    trace = json.load(fp)
  events = trace.get("traceEvents", [])
  pnames, tnames = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    if e.get("name") == "process_name":
      pnames[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("name") == "thread_name":
      tnames[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  dev_pids = {p for p, n in pnames.items()
              if "/device:GPU" in n or "/device:gpu" in n.lower()}
  stream_tids = {k for k, n in tnames.items()
                 if k[0] in dev_pids and n.startswith("Stream")}
  kernels, modules = [], []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in dev_pids:
      continue
    line = tnames.get((e["pid"], e.get("tid")), "")
    rec = dict(name=e.get("name", ""), ts=float(e["ts"]),
               dur=float(e.get("dur", 0.0)))
    if line == "XLA Modules":
      modules.append(rec)
      continue
    if stream_tids:
      if (e["pid"], e.get("tid")) not in stream_tids:
        continue
    elif line.startswith(_DERIVED_LINES):
      continue
    args = e.get("args", {}) or {}
    rec["module"] = args.get("hlo_module") or args.get("hlo_module_name")
    kernels.append(rec)
  info = dict(device_processes=sorted(pnames[p] for p in dev_pids),
              device_lines=sorted({tnames.get((e_pid, tid), "")
                                   for (e_pid, tid) in tnames
                                   if e_pid in dev_pids}),
              n_kernels=len(kernels), n_module_spans=len(modules))
  return kernels, modules, info


def _attribute(kernels, modules, tag):
  """The kernel events of candidate ``tag``: by hlo_module, else by span."""
  mine = [k for k in kernels if k.get("module") and tag in k["module"]]
  if mine:
    return mine
  spans = [m for m in modules if tag in m["name"]]
  out = []
  for m in spans:
    lo, hi = m["ts"], m["ts"] + m["dur"]
    out.extend(k for k in kernels if lo - 0.01 <= k["ts"] <= hi + 0.01)
  return out


def _per_call(events, n_calls):
  """Splits time-ordered events of n_calls sequential calls into calls."""
  events = sorted(events, key=lambda k: k["ts"])
  if not events or len(events) % n_calls:
    return None
  per = len(events) // n_calls
  return [sum(k["dur"] for k in events[i * per:(i + 1) * per])
          for i in range(n_calls)], per


def _first_call(c: Candidate):
  jax.block_until_ready(c.fn(*c.arg_sets[0]))


def _run_all(cands, reps):
  for _ in range(reps):
    for c in cands:
      for args in c.arg_sets:
        jax.block_until_ready(c.fn(*args))


def _traced(cands, reps, log):
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    try:
      _run_all(cands, reps)
    finally:
      jax.profiler.stop_trace()
    kernels, modules, info = device_events(_trace_file(tmp))
  if log:
    log(f"trace: {json.dumps(info)}")
  return kernels, modules


def _summarize(events, n_calls):
  if not events:
    return dict(error="no device events in the profiler trace")
  split = _per_call(events, n_calls)
  if split is None:
    # Event count not a multiple of the calls (an occasional extra copy):
    # report the mean per call rather than guess the grouping.
    return dict(time_us=sum(k["dur"] for k in events) / n_calls,
                timing="profiler-mean", kernels=len(events) / n_calls)
  times, per = split
  events = sorted(events, key=lambda k: k["ts"])
  # Median duration of each kernel position within a call, for the notes.
  breakdown = [(events[j]["name"][:80], statistics.median(
      events[i * per + j]["dur"] for i in range(n_calls)))
               for j in range(per)]
  return dict(time_us=statistics.median(times), timing="profiler",
              kernels=per, breakdown=breakdown)


def time_candidates(cands: Sequence[Candidate], *, reps: int = 5,
                    profiler: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
  """Median device time per call of each candidate.

  Returns {candidate.fn name: dict(time_us, timing, kernels)}; a candidate
  that fails keeps an ``error``.
  """
  profiler = on_gpu() if profiler is None else profiler
  results = {}
  good = []
  # Compiling dominates the run time; XLA and Triton compile outside the
  # GIL, so the first call of each candidate runs on a thread pool.
  with concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS) as pool:
    first = [pool.submit(_first_call, c) for c in cands]
    errors = [f.exception() for f in first]
  for c, err in zip(cands, errors):
    try:
      if err is not None:
        raise err
      _run_all([c], 1)  # warm up every argument set
      good.append(c)
    except Exception as e:  # pylint: disable=broad-except
      results[c.fn.__name__] = dict(error=f"{type(e).__name__}: {e}"[:400])
  if not good:
    return results
  if profiler:
    try:
      kernels, modules = _traced(good, reps, log)
    except Exception as e:  # pylint: disable=broad-except
      # No readable trace: keep host timings rather than losing the case.
      if log:
        log(f"trace unusable ({type(e).__name__}: {e}); timing on the host")
      for c in good:
        results[c.fn.__name__] = _batched_wallclock(c, reps)
      return results
    for c in good:
      name = c.fn.__name__
      events = _attribute(kernels, modules, name)
      if not events:
        # Not attributable in the shared trace: trace this one alone, where
        # every device event is its own.
        try:
          events, _ = _traced([c], reps, log)
        except Exception:  # pylint: disable=broad-except
          events = []
      results[name] = _summarize(events, reps * len(c.arg_sets))
      if "error" in results[name]:
        results[name] = _batched_wallclock(c, reps)
  else:
    for c in good:
      times = []
      for _ in range(reps):
        for args in c.arg_sets:
          t0 = time.perf_counter()
          jax.block_until_ready(c.fn(*args))
          times.append((time.perf_counter() - t0) * 1e6)
      results[c.fn.__name__] = dict(time_us=statistics.median(times),
                                    timing="wallclock", kernels=None)
  return results


def _batched_wallclock(c: Candidate, reps: int) -> dict:
  """Host time per call over back-to-back calls (one sync at the end).

  Only used where the trace holds no device events for a candidate: launch
  gaps count, so small shapes read high.
  """
  _run_all([c], 1)
  t0 = time.perf_counter()
  outs = [c.fn(*args) for _ in range(reps) for args in c.arg_sets]
  jax.block_until_ready(outs)
  n = reps * len(c.arg_sets)
  return dict(time_us=(time.perf_counter() - t0) * 1e6 / n,
              timing="wallclock-batched", kernels=None)


# ------------------------------------------------------------- benchmark --

def _n_sets(op, rows, hidden, dtype):
  per_set = max(1, min_bytes(op, rows, hidden, dtype))
  return int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / per_set))))


def run_benchmark(cases=None, *, ops: Iterable[str] = OPS,
                  impls: Iterable = IMPLS, reps: int = 5, small: bool = False,
                  profiler: bool | None = None,
                  log: Callable[[str], None] | None = print,
                  on_case: Callable[[list[dict]], None] | None = None
                  ) -> list[dict]:
  """Times every (op, impl) on every case.

  Args:
    cases: sequence of ``((rows, hidden), dtype)``; default
      ``shapes.BENCHMARK`` (``SMALL`` when ``small``).
    ops: subset of ``OPS``.
    impls: names from ``IMPLS``, or ``(label, Implementation)`` pairs (e.g. a
      ``PallasGpu`` with explicit tiling, for sweeps).
    reps: passes over the rotated input sets; the median is over all calls.
    profiler: device time from the profiler trace (default: on GPU only).
    log: progress printer, or None.
    on_case: called with the records so far after each case (so that a
      long run that is cut short still leaves its results).

  Returns:
    One dict per (case, op, impl); see the module docstring for the keys.
  """
  if cases is None:
    cases = SMALL if small else shape_data.BENCHMARK
  ops, impls = list(ops), list(impls)
  if "roofline" not in impls:
    impls = ["roofline"] + impls
  device = jax.devices()[0].device_kind
  records = []
  uid = 0
  for (rows, hidden), dtype in cases:
    # Every op of a case is timed in one profiler session: starting and
    # stopping a trace costs seconds, more than the calls themselves.
    groups = []
    for op in ops:
      dt = jnp.bfloat16 if op in LINEN_OPS else dtype
      if op in LINEN_OPS and (rows, hidden, np.dtype(dt).name) in {
          (r["rows"], r["hidden"], r["dtype"]) for r in records
          if r["op"] == op}:
        continue  # cases differing only in dtype repeat the bf16 layer run
      uid += 1
      n_sets = _n_sets(op, rows, hidden, dt)
      cands = build_candidates(op, impls, rows, hidden, dt, n_sets, uid=uid)
      groups.append((op, dt, n_sets, cands))
    timed = time_candidates(
        [c for g in groups for c in g[3] if isinstance(c, Candidate)],
        reps=reps, profiler=profiler, log=log if not records else None)
    for op, dt, n_sets, cands in groups:
      first = len(records)
      for c in cands:
        if not isinstance(c, Candidate):
          records.append(dict(op=op, impl="?", rows=rows, hidden=hidden,
                              dtype=np.dtype(dt).name, bytes=None,
                              time_us=None, gbps=None, timing=None,
                              error=f"{type(c).__name__}: {c}"[:400]))
          continue
        res = timed.get(c.fn.__name__, {})
        rec = dict(op=op, impl=c.impl, rows=rows, hidden=hidden,
                   dtype=np.dtype(dt).name, backend=c.backend,
                   bytes=(roofline_bytes if c.impl == "roofline"
                          else min_bytes)(op, rows, hidden, dt),
                   time_us=res.get("time_us"), timing=res.get("timing"),
                   kernels=res.get("kernels"), device=device,
                   jax=jax.__version__,
                   breakdown=res.get("breakdown"),
                   input_sets=n_sets)
        if "error" in res:
          rec["error"] = res["error"]
        rec["gbps"] = (rec["bytes"] / (rec["time_us"] * 1e3)
                       if rec["time_us"] else None)
        records.append(rec)
      if log:
        summary = ", ".join(
            f"{r['impl']}={r['time_us']:.1f}" if r["time_us"] else
            f"{r['impl']}=ERR" for r in records[first:])
        log(f"{op:9s} ({rows},{hidden}) {np.dtype(dt).name}: {summary}")
    # Inputs and compiled functions of this case are dropped before the next.
    del groups, timed
    if on_case is not None:
      on_case(add_ratios(records))
  add_ratios(records)
  return records


def add_ratios(records: list[dict]) -> list[dict]:
  """Adds ratio_to_roofline and speedup_vs_xla (None where not defined)."""
  def key(r):
    return (r["op"], r["rows"], r["hidden"], r["dtype"])
  roof = {key(r): r["time_us"] for r in records
          if r["impl"] == "roofline" and r.get("time_us")}
  xla = {key(r): r["time_us"] for r in records
         if r["impl"] == "xla" and r.get("time_us")}
  ref = dict(xla)  # the linen ops: flax's layer is the reference
  for r in records:
    if r["op"] in LINEN_OPS and r["impl"] == "flax_linen" and r.get(
        "time_us"):
      ref[key(r)] = r["time_us"]
  for r in records:
    t = r.get("time_us")
    r["ratio_to_roofline"] = (t / roof[key(r)] if t and key(r) in roof
                              else None)
    r["speedup_vs_xla"] = (ref[key(r)] / t if t and key(r) in ref else None)
  return records


# ----------------------------------------------------------------- output --

def table(records: list[dict]) -> str:
  """A markdown table per op: us per call, and for each impl x roofline and
  speedup over XLA (over flax.linen for the linen ops)."""
  lines = []
  for op in OPS:
    recs = [r for r in records if r["op"] == op]
    if not recs:
      continue
    impls = [i for i in dict.fromkeys(r["impl"] for r in recs)]
    ref_name = "flax_linen" if op in LINEN_OPS else "xla"
    lines.append(f"\n### {op} (us per call; x roofline; speedup vs "
                 f"{ref_name})\n")
    lines.append("| shape | dtype | MB | " + " | ".join(impls) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(impls))
    for case in dict.fromkeys((r["rows"], r["hidden"], r["dtype"])
                              for r in recs):
      row = {r["impl"]: r for r in recs
             if (r["rows"], r["hidden"], r["dtype"]) == case}
      mb = next((r["bytes"] for r in row.values() if r.get("bytes")), 0) / 1e6
      cells = []
      for i in impls:
        r = row.get(i)
        if r is None:
          cells.append("")
        elif not r.get("time_us"):
          cells.append("err")
        elif i == "roofline":
          cells.append(f"{r['time_us']:.1f}")
        else:
          extra = []
          if r.get("ratio_to_roofline"):
            extra.append(f"{r['ratio_to_roofline']:.2f}x")
          if r.get("speedup_vs_xla") and i != ref_name:
            extra.append(f"{r['speedup_vs_xla']:.2f}")
          cells.append(f"{r['time_us']:.1f}"
                       + (f" ({', '.join(extra)})" if extra else ""))
      lines.append(f"| {case[0]}x{case[1]} | {case[2]} | {mb:.2f} | "
                   + " | ".join(cells) + " |")
  timing = sorted({r["timing"] for r in records if r.get("timing")})
  device = sorted({r["device"] for r in records if r.get("device")})
  versions = sorted({r["jax"] for r in records if r.get("jax")}) or [
      jax.__version__]
  lines.append(f"\ntiming: {', '.join(timing)}; device: {', '.join(device)}; "
               f"jax {', '.join(versions)}")
  errors = [r for r in records if r.get("error")]
  for r in errors:
    lines.append(f"- {r['op']} {r['impl']} ({r['rows']},{r['hidden']}) "
                 f"{r['dtype']}: {r['error'][:160]}")
  return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
  """Achieved bandwidth (GB/s) against bytes moved, one panel per op."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ops = [op for op in OPS if any(r["op"] == op for r in records)]
  cols = min(3, len(ops))
  rows = -(-len(ops) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows),
                           squeeze=False)
  # One color per implementation across panels.
  colors = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}
  for ax, op in zip(axes.flat, ops):
    recs = [r for r in records if r["op"] == op and r.get("gbps")]
    for impl in dict.fromkeys(r["impl"] for r in recs):
      pts = sorted((r["bytes"], r["gbps"]) for r in recs if r["impl"] == impl)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              markersize=3, label=impl, color=colors.get(impl),
              linestyle="--" if impl == "roofline" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved")
    ax.set_ylabel("GB/s")
    ax.set_title(op)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(ops):]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# -------------------------------------------------------------------- CLI --

def _parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m rmsnorm_jax.bench",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--small", action="store_true",
                 help="a few tiny shapes (CPU smoke runs)")
  p.add_argument("--ops", default=",".join(OPS),
                 help=f"comma-separated subset of {OPS}")
  p.add_argument("--impls", default=",".join(IMPLS),
                 help=f"comma-separated subset of {IMPLS}")
  p.add_argument("--cases", default="",
                 help="comma-separated ROWSxHIDDEN:DTYPE (e.g. "
                      "8192x4096:bfloat16); default shapes.BENCHMARK")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--json", help="write the records here")
  p.add_argument("--markdown", help="write the table here")
  p.add_argument("--plot", help="write a bandwidth plot (PNG) here")
  return p.parse_args(argv)


def main(argv=None):
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  ops = [o for o in args.ops.split(",") if o]
  impls = [i for i in args.impls.split(",") if i]
  for name, allowed, what in ((ops, OPS, "--ops"), (impls, IMPLS, "--impls")):
    bad = [n for n in name if n not in allowed]
    if bad:
      raise SystemExit(f"{what}: unknown {bad}; expected a subset of {allowed}")
  cases = None
  if args.cases:
    cases = []
    for item in args.cases.split(","):
      try:
        dims, dtype = item.split(":")
        rows, hidden = (int(v) for v in dims.split("x"))
        cases.append(((rows, hidden), jnp.dtype(dtype)))
      except (ValueError, TypeError) as e:
        raise SystemExit(f"--cases: expected ROWSxHIDDEN:DTYPE, got "
                         f"{item!r}") from e
  argv_text = " ".join(sys.argv[1:] if argv is None else argv)

  def write(records):
    text = table(records)
    if args.json:
      with open(args.json, "w") as fp:
        json.dump(records, fp, indent=1)
    if args.markdown:
      with open(args.markdown, "w") as fp:
        fp.write(f"# RMSNorm benchmark\n\ncommand: `python -m rmsnorm_jax.bench "
                 f"{argv_text}`\n" + text + "\n")
    return text

  records = run_benchmark(cases, ops=ops, impls=impls, reps=args.reps,
                          small=args.small, on_case=write)
  print(write(records))
  if args.plot:
    plot(records, args.plot)


if __name__ == "__main__":
  main()
