"""The benchmark loop: every (op, impl) on every case, with the references."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from rmsnorm_jax.bench import cases as case_lib
from rmsnorm_jax.bench import peers as peer_lib
from rmsnorm_jax.bench import report
from rmsnorm_jax.bench import timing
from rmsnorm_jax.bench.cases import (DEFAULT_OPS, EPS, FEATURE_OPS,
                                     HEAD_OPS, IMPLS, LINEN_OPS, OPS, SMALL,
                                     Candidate, build_candidates, min_bytes,
                                     n_sets, on_gpu, op_dtype, roofline_bytes)
from rmsnorm_jax import shapes


def case_key(shape, dtype) -> str:
  """A case as the command line writes it: ``"ROWSxHIDDEN:DTYPE"``."""
  rows, hidden = shape
  return f"{rows}x{hidden}:{np.dtype(dtype).name}"


def _peer_records(worker, rows, hidden, dt_name, ops, reps, device, copy):
  plain = [op for op in ops if op not in LINEN_OPS]
  req_ops = {op: n_sets(op, rows, hidden, dt_name) for op in plain}
  req_copy = {op: min_bytes(op, rows, hidden, op_dtype(op, dt_name))
              for op in ops} if copy else {}
  out = []
  for rec in worker.run_case(rows, hidden, dt_name, req_ops, req_copy, reps,
                             EPS):
    op = rec["op"]
    dt = op_dtype(op, dt_name)
    out.append(dict(rec, rows=rows, hidden=hidden, dtype=dt.name,
                    backend=("torch" if rec["impl"] == "copy"
                             else rec["impl"]),
                    bytes=min_bytes(op, rows, hidden, dt), device=device,
                    jax=jax.__version__))
  return out


def _cupy_copy_records(rows, hidden, dt_name, ops, reps, device, notes):
  out = []
  for op in ops:
    dt = op_dtype(op, dt_name)
    nbytes = min_bytes(op, rows, hidden, dt)
    try:
      res = peer_lib.cupy_copy_us(nbytes, reps)
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"copy: not measured (neither torch nor CuPy could run "
                   f"it: {type(e).__name__}: {e})"[:300])
      return []
    out.append(dict(res, op=op, impl="copy", rows=rows, hidden=hidden,
                    dtype=dt.name, backend="cupy", bytes=nbytes,
                    device=device, jax=jax.__version__))
  return out


def run_benchmark(cases=None, *, ops: Iterable[str] = DEFAULT_OPS,
                  impls: Iterable = IMPLS, reps: int = 5, small: bool = False,
                  profiler: bool | None = None,
                  peers: Sequence[str] = (),
                  copy: bool = False,
                  notes: list[str] | None = None,
                  log: Callable[[str], None] | None = print,
                  on_case: Callable[[list[dict]], None] | None = None,
                  previous: Sequence[dict] = ()
                  ) -> list[dict]:
  """Times every (op, impl) on every case.

  Args:
    cases: sequence of ``((rows, hidden), dtype)``; default the specs tagged
      "bench" in :mod:`rmsnorm_jax.shapes` (``small``: those tagged
      "smoke").
    ops: subset of ``OPS`` (default ``DEFAULT_OPS``; the feature ops are
      timed when named). A head op skips a case whose hidden is not a
      multiple of ``shapes.HEAD_DIM``, with a note.
    impls: names from ``IMPLS``, or ``(label, Implementation)`` pairs (e.g. a
      ``PallasGpu`` with explicit tiling, for sweeps). The roofline op is
      always added.
    reps: passes over the rotated input sets; the median is over all calls.
    profiler: device time from the profiler trace (default: on GPU only).
    peers: names from ``peers.PEERS`` timed through PyTorch in a worker
      process (the command line's default: all of them on a GPU); a peer
      that is not installed adds a line to ``notes``, and so do feature
      ops, which no peer has.
    copy: time a device-to-device copy of each op's minimum bytes (torch,
      else CuPy; the command line's default: on a GPU).
    notes: a list the run appends its notes to (missing peers, no copy).
    log: progress printer, or None.
    on_case: called with the records so far after each case (so that a
      long run that is cut short still leaves its results).
    previous: the records of an earlier run with the same settings (see
      ``case_key``), e.g. one cut short: its cases are not timed again, and
      the result starts with its records.

  Returns:
    One dict per (case, op, impl) with: case (``case_key``), op, impl,
    rows, hidden, dtype (the op's: a layer op's is bfloat16), bytes (the
    op's minimum traffic; the roofline op's own for it), time_us (median),
    time_min, time_max (spread over calls, where measured), gbps, timing,
    kernels (device kernels per call), breakdown (median time of each),
    ratio_to_roofline, ratio_to_copy, speedup_vs_xla, noise (ratios the
    spread does not support), backend (what ran), device, jax (version),
    input_sets, error (when an implementation could not run).

  Raises:
    ValueError: an op not in ``OPS``; a record of ``previous`` without its
      case.
  """
  if cases is None:
    cases = SMALL if small else shapes.BENCHMARK
  records = [dict(r) for r in previous]
  if any("case" not in r for r in records):
    raise ValueError("previous: every record needs its 'case' (records "
                     "written by an earlier version of the benchmark have "
                     "none)")
  done = {r["case"] for r in records}
  cases = [c for c in cases if case_key(*c) not in done]
  ops, impls = list(ops), list(impls)
  bad = [op for op in ops if op not in OPS]
  if bad:
    raise ValueError(f"ops: unknown {bad}; expected a subset of {OPS}")
  if "roofline" not in impls:
    impls = ["roofline"] + impls
  notes = [] if notes is None else notes
  gpu = on_gpu()
  peers = list(peers)
  no_peer = [op for op in ops if op in FEATURE_OPS]
  if peers and no_peer:
    notes.append(f"{', '.join(no_peer)}: quack the only peer "
                 "(torch.nn.functional.rms_norm and Liger's RMSNorm have no "
                 "bias, per-head scale or quantized output; quack has the "
                 "first two, and no quantized output)")
  worker = None
  if peers or copy:
    worker = peer_lib.PeerWorker(peers, log=log)
    notes.extend(worker.notes)
    worker.notes.clear()
  device = jax.devices()[0].device_kind
  uid = 0
  t_start = time.perf_counter()
  try:
    for index, ((rows, hidden), dtype) in enumerate(cases):
      t_case = time.perf_counter()
      dt_name = np.dtype(dtype).name
      first_of_case = len(records)
      if log:
        log(f"[{index + 1}/{len(cases)}] {rows}x{hidden} {dt_name} "
            f"(elapsed {t_case - t_start:.0f} s)")
      # Every op of a case is timed in one profiler session: starting and
      # stopping a trace costs seconds, more than the calls themselves.
      groups = []
      for op in ops:
        dt = op_dtype(op, dtype)
        if op in HEAD_OPS and hidden % shapes.HEAD_DIM:
          notes.append(f"{op} {rows}x{hidden}: skipped, the per-head case "
                       f"needs hidden = heads x {shapes.HEAD_DIM}")
          continue
        if op in LINEN_OPS and (rows, hidden, dt.name) in {
            (r["rows"], r["hidden"], r["dtype"]) for r in records
            if r["op"] == op}:
          continue  # cases differing only in dtype repeat the bf16 layer run
        uid += 1
        # Rotating past L2 matters for device timing; on the host, the
        # extra sets only cost a trace and a forward each.
        sets = n_sets(op, rows, hidden, dt) if gpu else 2
        cands = build_candidates(op, impls, rows, hidden, dt, sets, uid=uid)
        groups.append((op, dt, sets, cands))
      timed = timing.time_candidates(
          [c for g in groups for c in g[3] if isinstance(c, Candidate)],
          reps=reps, profiler=profiler, log=log if not records else None)
      for op, dt, sets, cands in groups:
        first = len(records)
        for c in cands:
          if not isinstance(c, Candidate):
            records.append(dict(op=op, impl=c.impl, rows=rows,
                                hidden=hidden, dtype=dt.name, bytes=None,
                                time_us=None, gbps=None, timing=None,
                                error=str(c)[:400]))
            continue
          res = timed.get(c.fn.__name__, {})
          rec = dict(op=op, impl=c.impl, rows=rows, hidden=hidden,
                     dtype=dt.name, backend=c.backend,
                     bytes=(roofline_bytes if c.impl == "roofline"
                            else min_bytes)(op, rows, hidden, dt),
                     time_us=res.get("time_us"), time_min=res.get("time_min"),
                     time_max=res.get("time_max"), timing=res.get("timing"),
                     kernels=res.get("kernels"), device=device,
                     jax=jax.__version__, breakdown=res.get("breakdown"),
                     input_sets=sets)
          if "error" in res:
            rec["error"] = res["error"]
          records.append(rec)
        if log:
          summary = ", ".join(
              f"{r['impl']}={r['time_us']:.1f}" if r["time_us"] else
              f"{r['impl']}=ERR" for r in records[first:])
          log(f"  {op:9s}: {summary}")
      ops_run = [g[0] for g in groups]
      del groups, timed  # this case's inputs and executables
      # Peers and copy after JAX's calls of the case, in the worker: the
      # two never run on the device at the same time.
      extra = []
      if worker is not None and worker.usable:
        extra = _peer_records(worker, rows, hidden, dt_name, ops_run, reps,
                              device, copy)
        notes.extend(worker.notes)
        worker.notes.clear()
      elif copy and not gpu:
        # CuPy copies on a GPU, which is not the device JAX's calls ran on.
        notes.append(f"copy: not measured (the torch worker cannot run "
                     f"it, and CuPy's copy runs on a GPU while JAX runs on "
                     f"{jax.default_backend()})")
        copy = False
      elif copy:
        extra = _cupy_copy_records(rows, hidden, dt_name, ops_run, reps,
                                   device, notes)
        copy = bool(extra)
      if extra and log:
        log("  peers/copy: " + ", ".join(
            f"{r['impl']}:{r['op']}="
            + (f"{r['time_us']:.1f}" if r.get("time_us") else "ERR")
            for r in extra))
      records.extend(extra)
      for r in records[first_of_case:]:
        r["case"] = case_key((rows, hidden), dtype)
      for r in records:
        if r.get("time_us") and r.get("bytes"):
          r["gbps"] = r["bytes"] / (r["time_us"] * 1e3)
        else:
          r.setdefault("gbps", None)
      if log:
        log(f"  case done in {time.perf_counter() - t_case:.1f} s")
      if on_case is not None:
        on_case(report.add_ratios(records))
  finally:
    if worker is not None:
      worker.close()
  report.add_ratios(records)
  return records
