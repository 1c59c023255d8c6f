"""Times the peer RMSNorm implementations and a device copy through PyTorch.

Run by :mod:`rmsnorm_jax.bench.peers` as a separate process (a script, so
that it imports neither JAX nor this package): torch's CUDA context and
caching allocator live apart from JAX's, and a peer that crashes or hangs
costs its columns, not the benchmark.

Protocol: the worker prints one hello line, then reads one JSON request per
line on stdin and answers each with one line; answer lines start with
:data:`MARK` (anything else on stdout is the peers' own printing). A
request holds rows, hidden, dtype, eps, reps, head_dim (the per-head
ops' heads are hidden // head_dim), peers (names), ops ({op: input sets})
and copy ({op: bytes}); the answer holds records
(impl, op, time_us, time_min, time_max, timing, kernels, breakdown, or
error) and notes.

Timing: every call of a case runs under one ``torch.profiler`` session;
each (impl, op) group of calls is a ``record_function`` range. A device
event (kernel, memcpy, memset) belongs to the group whose range holds the
host-side launch with the same correlation id (else, the range holding the
event's own start). A call's time is the sum of its device events, as for
the JAX candidates; the calls rotate over several input sets so that L2
does not serve them.
"""

import json
import math
import os
import statistics
import sys
import tempfile
import traceback

MARK = "@@rmsnorm_bench@@ "
PEERS = ("torch", "liger", "quack")
# Fused add+norm: only the peers that have one; the bias and the per-head
# scale (QK-norm): quack alone.
PEER_OPS = {"torch": ("fwd", "bwd"),
            "liger": ("fwd", "bwd", "fused_fwd", "fused_bwd"),
            "quack": ("fwd", "bwd", "fused_fwd", "fused_bwd", "bias_fwd",
                      "bias_bwd", "head_fwd", "head_bwd")}
HEAD_OPS = ("head_fwd", "head_bwd")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
ROTATE_BYTES = 150 * 2**20


def _send(obj):
  sys.stdout.write(MARK + json.dumps(obj) + "\n")
  sys.stdout.flush()


def _err(e):
  return f"{type(e).__name__}: {e}"[:400]


def _load_peers(torch):
  """{name: module-ish or None}, {name: why not}."""
  found, missing = {}, {}
  try:
    import torch.nn.functional as F  # noqa: N812
    if not hasattr(F, "rms_norm"):
      raise AttributeError(f"torch {torch.__version__} has no "
                           "torch.nn.functional.rms_norm")
    found["torch"] = F
  except Exception as e:  # pylint: disable=broad-except
    missing["torch"] = _err(e)
  try:
    from liger_kernel.transformers.fused_add_rms_norm import (
        LigerFusedAddRMSNorm)
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    found["liger"] = (LigerRMSNorm, LigerFusedAddRMSNorm)
  except Exception as e:  # pylint: disable=broad-except
    missing["liger"] = _err(e)
  try:
    from quack.rmsnorm import rmsnorm as quack_rmsnorm
    found["quack"] = quack_rmsnorm
  except Exception as e:  # pylint: disable=broad-except
    missing["quack"] = _err(e)
  return found, missing


def _inputs(torch, op, rows, hidden, dtype, gen, dev, head_dim):
  """x, s and as ``op`` needs r, b, dy, dh; the head ops' x and dy are
  ``(rows, hidden // head_dim, head_dim)`` and their s
  ``(hidden // head_dim, head_dim)``, as the JAX candidates'."""
  def rand(shape, mean=0.0, scale=1.0):
    v = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
    return (v * scale + mean).to(dtype)
  row = ((hidden // head_dim, head_dim) if op in HEAD_OPS else (hidden,))
  d = dict(x=rand((rows,) + row, 0.3), s=rand(row, 1.0, 0.5))
  if op in ("fused_fwd", "fused_bwd"):
    d["r"] = rand((rows, hidden), 0.5)
  if op in ("bias_fwd", "bias_bwd"):
    d["b"] = rand((hidden,), 0.1, 0.5)
  if op in ("bwd", "fused_bwd", "bias_bwd", "head_bwd"):
    d["dy"] = rand((rows,) + row)
  if op == "fused_bwd":
    d["dh"] = rand((rows, hidden))
  return d


def _call(torch, peer, mod, op, d, eps):
  """A no-argument callable running ``op`` of ``peer`` on inputs ``d``.

  Backward ops build the graph once (outside the timing) and the callable
  runs only the backward from the saved tensors (retain_graph), as the JAX
  candidates time the vjp of a forward done beforehand.
  """
  hidden = d["x"].shape[-1]
  grad = op.endswith("bwd")
  x = d["x"].detach().requires_grad_(grad)
  w = d["s"].detach().requires_grad_(grad)
  if peer == "torch":
    if op == "fwd":
      return lambda: mod.rms_norm(x, (hidden,), w, eps)
    y = mod.rms_norm(x, (hidden,), w, eps)
    return lambda: torch.autograd.grad(y, (x, w), d["dy"], retain_graph=True)
  if peer == "liger":
    plain_cls, fused_cls = mod
    if op in ("fwd", "bwd"):
      layer = plain_cls(hidden, eps=eps, in_place=False)
    else:
      layer = fused_cls(hidden, eps=eps, in_place=False)
    layer = layer.to(device=x.device, dtype=x.dtype)
    layer.weight.data.copy_(d["s"])
    layer.weight.requires_grad_(grad)
    w = layer.weight
    if op == "fwd":
      return lambda: layer(x)
    if op == "bwd":
      y = layer(x)
      return lambda: torch.autograd.grad(y, (x, w), d["dy"],
                                         retain_graph=True)
    r = d["r"].detach().requires_grad_(grad)
    if op == "fused_fwd":
      return lambda: layer(x, r)
    y, h = layer(x, r)
    # The gradients of x and residual are one array: ask for the
    # residual's and the scale's, as the JAX candidates return.
    return lambda: torch.autograd.grad((y, h), (r, w), (d["dy"], d["dh"]),
                                       retain_graph=True)
  if peer == "quack":
    if op in ("fwd", "head_fwd"):
      return lambda: mod(x, w, eps=eps)
    if op in ("bwd", "head_bwd"):
      y = mod(x, w, eps=eps)
      return lambda: torch.autograd.grad(y, (x, w), d["dy"],
                                         retain_graph=True)
    if op in ("bias_fwd", "bias_bwd"):
      b = d["b"].detach().requires_grad_(grad)
      if op == "bias_fwd":
        return lambda: mod(x, w, bias=b, eps=eps)
      y = mod(x, w, bias=b, eps=eps)
      return lambda: torch.autograd.grad(y, (x, w, b), d["dy"],
                                         retain_graph=True)
    r = d["r"].detach().requires_grad_(grad)
    if op == "fused_fwd":
      return lambda: mod(x, w, residual=r, eps=eps, prenorm=True)
    y, h = mod(x, w, residual=r, eps=eps, prenorm=True)
    return lambda: torch.autograd.grad((y, h), (r, w), (d["dy"], d["dh"]),
                                       retain_graph=True)
  raise ValueError(f"unknown peer {peer!r}")


def _copy_calls(torch, nbytes, dev):
  """Device-to-device copies moving ``nbytes`` (read + write), rotated
  over enough buffer pairs to exceed L2."""
  n = max(16, (nbytes // 2) // 16 * 16)
  sets = int(min(16, max(2, math.ceil(ROTATE_BYTES / (2 * n)))))
  pairs = [(torch.empty(n, dtype=torch.uint8, device=dev).random_(),
            torch.empty(n, dtype=torch.uint8, device=dev))
           for _ in range(sets)]
  return [(lambda s=s, t=t: t.copy_(s)) for s, t in pairs]


def _attribute(trace_path, labels):
  """{label: time-ordered device events} from a torch Chrome trace."""
  with open(trace_path) as fp:
    events = json.load(fp).get("traceEvents", [])
  ranges = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"])
                  for e in events if e.get("ph") == "X"
                  and e.get("cat") == "user_annotation"
                  and e.get("name") in labels)
  launch_ts = {}
  for e in events:
    if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime",
                                               "cuda_driver"):
      corr = (e.get("args") or {}).get("correlation")
      if corr is not None:
        launch_ts[corr] = e["ts"]
  out = {label: [] for label in labels}
  for e in events:
    if e.get("ph") != "X" or e.get("cat") not in DEVICE_CATS:
      continue
    corr = (e.get("args") or {}).get("correlation")
    ts = launch_ts.get(corr, e["ts"])
    for lo, hi, label in ranges:
      if lo <= ts <= hi:
        out[label].append(dict(name=e.get("name", ""), ts=float(e["ts"]),
                               dur=float(e.get("dur", 0.0))))
        break
  return out


def _summarize(events, n_calls):
  events = sorted(events, key=lambda k: k["ts"])
  if not events:
    return dict(error="no device events in the torch profiler trace")
  if len(events) % n_calls:
    return dict(time_us=sum(k["dur"] for k in events) / n_calls,
                timing="torch-profiler-mean", kernels=len(events) / n_calls)
  per = len(events) // n_calls
  times = [sum(k["dur"] for k in events[i * per:(i + 1) * per])
           for i in range(n_calls)]
  breakdown = [(events[j]["name"][:80], statistics.median(
      events[i * per + j]["dur"] for i in range(n_calls)))
               for j in range(per)]
  return dict(time_us=statistics.median(times), time_min=min(times),
              time_max=max(times), timing="torch-profiler", kernels=per,
              breakdown=breakdown)


def _event_times(torch, calls, reps):
  times = []
  for _ in range(reps):
    for c in calls:
      start = torch.cuda.Event(enable_timing=True)
      end = torch.cuda.Event(enable_timing=True)
      start.record()
      c()
      end.record()
      end.synchronize()
      times.append(start.elapsed_time(end) * 1e3)
  return dict(time_us=statistics.median(times), time_min=min(times),
              time_max=max(times), timing="cuda-events", kernels=None)


def run_case(torch, peers, req):
  """Times every (peer, op) and the copies of one case; returns the answer."""
  dev = torch.device("cuda")
  dtype = getattr(torch, req["dtype"])
  rows, hidden, reps, eps = (req["rows"], req["hidden"], req["reps"],
                             req["eps"])
  gen = torch.Generator(device=dev)
  gen.manual_seed(0)
  groups, records, notes = [], [], []
  for peer in req["peers"]:
    if peer not in peers:
      continue
    for op, sets in req["ops"].items():
      if op not in PEER_OPS[peer]:
        continue
      label = f"{peer}|{op}"
      try:
        calls = [_call(torch, peer, peers[peer], op,
                       _inputs(torch, op, rows, hidden, dtype, gen, dev,
                               req["head_dim"]), eps)
                 for _ in range(sets)]
        for c in calls:  # compile (Triton, CuTe) and warm every set
          c()
        torch.cuda.synchronize()
        groups.append((label, peer, op, calls))
      except Exception as e:  # pylint: disable=broad-except
        records.append(dict(impl=peer, op=op, error=_err(e)))
  for op, nbytes in req.get("copy", {}).items():
    try:
      calls = _copy_calls(torch, nbytes, dev)
      for c in calls:
        c()
      groups.append((f"copy|{op}", "copy", op, calls))
    except Exception as e:  # pylint: disable=broad-except
      records.append(dict(impl="copy", op=op, error=_err(e)))
  if not groups:
    return dict(records=records, notes=notes)
  torch.cuda.synchronize()
  from torch.profiler import ProfilerActivity, profile, record_function
  with tempfile.TemporaryDirectory() as tmp:
    with profile(activities=[ProfilerActivity.CPU,
                             ProfilerActivity.CUDA]) as prof:
      for label, _, _, calls in groups:
        with record_function(label):
          for _ in range(reps):
            for c in calls:
              c()
          torch.cuda.synchronize()
    path = os.path.join(tmp, "trace.json")
    prof.export_chrome_trace(path)
    found = _attribute(path, {g[0] for g in groups})
  for label, impl, op, calls in groups:
    rec = dict(impl=impl, op=op, input_sets=len(calls))
    rec.update(_summarize(found[label], reps * len(calls)))
    if "error" in rec:
      # Nothing attributable in the trace (a profiler whose event names
      # differ): CUDA events around each call instead, which count launch
      # gaps between a call's kernels too.
      rec.pop("error")
      rec.update(_event_times(torch, calls, reps))
    records.append(rec)
  del groups
  torch.cuda.empty_cache()
  return dict(records=records, notes=notes)


def main():
  # Keep NVLink multicast off in this process too (shared machines).
  for k, v in (("NCCL_NVLS_ENABLE", "0"),
               ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(k, v)
  hello = dict(torch=None, cuda=False, device=None, peers=[], missing={})
  try:
    import torch
    hello["torch"] = torch.__version__
    hello["cuda"] = bool(torch.cuda.is_available())
    if hello["cuda"]:
      hello["device"] = torch.cuda.get_device_name(0)
    peers, missing = _load_peers(torch)
    hello["peers"], hello["missing"] = sorted(peers), missing
    hello["versions"] = {"torch": torch.__version__}
    for peer, dist in (("liger", "liger-kernel"), ("quack", "quack-kernels")):
      if peer in peers:
        try:
          from importlib import metadata
          hello["versions"][peer] = metadata.version(dist)
        except Exception:  # pylint: disable=broad-except
          hello["versions"][peer] = "?"
  except Exception as e:  # pylint: disable=broad-except
    hello["missing"] = {p: _err(e) for p in PEERS}
    torch, peers = None, {}
  _send(dict(hello=hello))
  for line in sys.stdin:
    if not line.strip():
      continue
    req = json.loads(line)
    if torch is None or not hello["cuda"]:
      _send(dict(records=[], notes=["torch with a CUDA device is needed to "
                                    "time the peers and the copy"]))
      continue
    try:
      _send(run_case(torch, peers, req))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      _send(dict(records=[], notes=[f"peer worker failed: {_err(e)}"]))


if __name__ == "__main__":
  main()
