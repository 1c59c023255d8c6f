"""Timing: device kernel time from jax.profiler traces, host wall clock.

On a GPU, the time of a call is the sum of the device kernels it launches,
read from the trace ``jax.profiler`` writes (``*.trace.json.gz`` under the
log dir; one trace per shape, covering all its ops). A candidate whose
kernels cannot be found in the trace is timed on the host over back-to-back
calls (``timing="wallclock-batched"``). Elsewhere (CPU) there are no device
events: the host wall clock per call after ``block_until_ready``
(``timing="wallclock"``). Each result holds the median and the spread
(min..max) over all timed calls.
"""

from __future__ import annotations

import concurrent.futures
import glob
import gzip
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import jax

from rmsnorm_jax.bench.cases import Candidate, on_gpu

COMPILE_THREADS = 8


def trace_file(log_dir: str) -> str:
  """The newest profiler trace under ``log_dir``.

  Raises:
    FileNotFoundError: no ``*.trace.json.gz`` (nor perfetto trace) there.
  """
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
  """Parses a profiler trace (Chrome trace JSON, gzipped).

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
  dev_pids = {p for p, n in pnames.items() if "/device:gpu" in n.lower()}
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


def attribute(kernels, modules, tag) -> list[dict]:
  """The kernel events of candidate ``tag``: by hlo_module, else by the
  time span of its XLA module."""
  mine = [k for k in kernels if k.get("module") and tag in k["module"]]
  if mine:
    return mine
  spans = [m for m in modules if tag in m["name"]]
  out = []
  for m in spans:
    lo, hi = m["ts"], m["ts"] + m["dur"]
    out.extend(k for k in kernels if lo - 0.01 <= k["ts"] <= hi + 0.01)
  return out


def per_call(events, n_calls):
  """Splits time-ordered events of ``n_calls`` sequential calls into calls.

  Returns:
    (time per call in us, kernels per call), or None when the event count
    is not a multiple of ``n_calls``.
  """
  events = sorted(events, key=lambda k: k["ts"])
  if not events or len(events) % n_calls:
    return None
  per = len(events) // n_calls
  return [sum(k["dur"] for k in events[i * per:(i + 1) * per])
          for i in range(n_calls)], per


def summarize(events, n_calls) -> dict:
  """Median device time per call of a candidate's kernel events.

  Returns:
    dict(time_us, time_min, time_max, timing="profiler", kernels,
    breakdown=[(kernel name, median us)]); with an uneven event count the
    mean per call (``timing="profiler-mean"``, no spread); without events
    dict(error=...).
  """
  if not events:
    return dict(error="no device events in the profiler trace")
  split = per_call(events, n_calls)
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
  return dict(time_us=statistics.median(times), time_min=min(times),
              time_max=max(times), timing="profiler", kernels=per,
              breakdown=breakdown)


def _first_call(c: Candidate):
  jax.block_until_ready(c.fn(*c.arg_sets[0]))


def _run_all(cands, reps):
  for _ in range(reps):
    for c in cands:
      for args in c.arg_sets:
        jax.block_until_ready(c.fn(*args))


def traced(cands, reps, log=None):
  """Runs every candidate ``reps`` times over its sets under the profiler.

  Returns:
    (kernels, modules) as :func:`device_events` parses them.
  """
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    try:
      _run_all(cands, reps)
    finally:
      jax.profiler.stop_trace()
    kernels, modules, info = device_events(trace_file(tmp))
  if log:
    log(f"trace: {json.dumps(info)}")
  return kernels, modules


def wallclock(c: Candidate, reps: int) -> dict:
  """Host time of each call after ``block_until_ready``: median and
  spread (min..max) over ``reps`` passes over the argument sets."""
  times = []
  for _ in range(reps):
    for args in c.arg_sets:
      t0 = time.perf_counter()
      jax.block_until_ready(c.fn(*args))
      times.append((time.perf_counter() - t0) * 1e6)
  return dict(time_us=statistics.median(times), time_min=min(times),
              time_max=max(times), timing="wallclock", kernels=None)


def batched_wallclock(c: Candidate, reps: int) -> dict:
  """Host time per call over back-to-back calls (one sync at the end).

  Only used where the trace holds no device events for a candidate: launch
  gaps count, so small shapes read high. One measurement: no spread.
  """
  _run_all([c], 1)
  t0 = time.perf_counter()
  outs = [c.fn(*args) for _ in range(reps) for args in c.arg_sets]
  jax.block_until_ready(outs)
  n = reps * len(c.arg_sets)
  return dict(time_us=(time.perf_counter() - t0) * 1e6 / n,
              timing="wallclock-batched", kernels=None)


def time_candidates(cands: Sequence[Candidate], *, reps: int = 5,
                    profiler: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
  """Median time per call of each candidate.

  Args:
    cands: the candidates of one case (all its ops).
    reps: passes over each candidate's argument sets.
    profiler: device time from a profiler trace (default: on GPU only).
    log: printer for notes about the trace, or None.

  Returns:
    {candidate.fn name: dict(time_us, time_min, time_max, timing, kernels,
    ...)}; a candidate that failed holds ``error`` instead.
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
  if not profiler:
    for c in good:
      results[c.fn.__name__] = wallclock(c, reps)
    return results
  try:
    kernels, modules = traced(good, reps, log)
  except Exception as e:  # pylint: disable=broad-except
    # No readable trace: keep host timings rather than losing the case.
    if log:
      log(f"trace unusable ({type(e).__name__}: {e}); timing on the host")
    for c in good:
      results[c.fn.__name__] = batched_wallclock(c, reps)
    return results
  for c in good:
    name = c.fn.__name__
    events = attribute(kernels, modules, name)
    if not events:
      # Not attributable in the shared trace: trace this one alone, where
      # every device event is its own.
      try:
        events, _ = traced([c], reps, log)
      except Exception:  # pylint: disable=broad-except
        events = []
    results[name] = summarize(events, reps * len(c.arg_sets))
    if "error" in results[name]:
      results[name] = batched_wallclock(c, reps)
  return results
