"""Peer implementations and the device-copy reference, timed in a worker.

The peers (``torch.nn.functional.rms_norm``, Liger-Kernel's Triton kernels,
quack's CuTe-DSL kernels) and a device-to-device copy of the op's minimum
bytes run through PyTorch in their own process (``peer_worker.py``), timed
with the torch profiler (sum of the device events of a call, median over
calls rotating over input sets past L2). A peer that is not installed is a
note, never an error. Without torch, the copy is timed in this process
through CuPy (``cudaMemcpyAsync`` between CUDA events) when CuPy is
importable.
"""

from __future__ import annotations

import json
import math
import queue
import statistics
import subprocess
import sys
import threading
from typing import Callable

from rmsnorm_jax import shapes
from rmsnorm_jax.bench import peer_worker

PEERS = peer_worker.PEERS
PEER_OPS = peer_worker.PEER_OPS
MARK = peer_worker.MARK
# The worker compiles Triton and CuTe kernels per case; a case that takes
# longer than this is given up (its columns stay empty, with a note).
CASE_TIMEOUT_S = 180.0


class PeerWorker:
  """A running ``peer_worker.py`` process; one request per case.

  Args:
    peers: names from :data:`PEERS` to time.
    log: printer for what the worker prints besides its answers, or None.

  Attributes:
    hello: what the worker found (torch version, CUDA, device, peers
      importable, and why the others are not).
    notes: one line per missing peer or failure, for the report.
  """

  def __init__(self, peers=PEERS, log: Callable[[str], None] | None = print):
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
      raise ValueError(f"peers: unknown {unknown}; expected some of {PEERS}")
    self.peers = list(peers)
    self.log = log
    self.notes: list[str] = []
    self._lines: queue.Queue = queue.Queue()
    # The same interpreter and environment (PYTHONPATH included, where
    # carried wheels may be installed).
    self.proc = subprocess.Popen(
        [sys.executable, "-u", peer_worker.__file__], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, bufsize=1)
    threading.Thread(target=self._pump, daemon=True).start()
    self.hello = self._answer(CASE_TIMEOUT_S).get("hello") or {}
    if not self.hello.get("torch"):
      self.notes.append("peers and copy: torch is not importable "
                        f"({self.hello.get('missing', {}).get('torch', '?')})")
    elif not self.hello.get("cuda"):
      self.notes.append(f"peers and copy: torch {self.hello['torch']} sees "
                        "no CUDA device")
    if self.usable:
      versions = self.hello.get("versions", {})
      where = f"torch {self.hello['torch']} on {self.hello.get('device')}"
      timed = [f"{p} {versions.get(p, '')}".strip() for p in self.peers
               if p in self.hello.get("peers", [])]
      self.notes.append(
          f"peers and copy timed through {where}: {', '.join(timed)}"
          if timed else f"copy timed through {where} (no peer)")
    for p in self.peers:
      why = self.hello.get("missing", {}).get(p)
      if why and self.hello.get("torch"):
        self.notes.append(f"peer {p}: not timed, not importable ({why})")

  @property
  def usable(self) -> bool:
    """Whether the worker can time anything (torch with a CUDA device)."""
    return bool(self.hello.get("cuda")) and self.proc.poll() is None

  def _pump(self):
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def _answer(self, timeout):
    while True:
      try:
        line = self._lines.get(timeout=timeout)
      except queue.Empty:
        self.close()
        return dict(notes=[f"peer worker: no answer within {timeout:.0f} s; "
                           "stopped"])
      if line is None:
        return dict(notes=["peer worker: exited"])
      if line.startswith(MARK):
        return json.loads(line[len(MARK):])
      if self.log and line.strip():
        self.log(f"  [peers] {line.rstrip()}")

  def run_case(self, rows: int, hidden: int, dtype: str, ops: dict,
               copy: dict, reps: int, eps: float) -> list[dict]:
    """Times the peers on one case.

    Args:
      rows, hidden, dtype: the case (dtype a NumPy dtype name).
      ops: {op: input sets} for the peers (ops a peer lacks are skipped).
      copy: {op: bytes} for the copy reference ({} for none).
      reps: passes over the input sets.
      eps: the epsilon every implementation uses.

    Returns:
      Records (impl, op, time_us, time_min, time_max, timing, kernels,
      breakdown, or error); notes go to :attr:`notes`.
    """
    if not self.usable:
      return []
    req = dict(rows=rows, hidden=hidden, dtype=dtype, ops=ops, copy=copy,
               reps=reps, eps=eps, head_dim=shapes.HEAD_DIM,
               peers=self.peers)
    try:
      self.proc.stdin.write(json.dumps(req) + "\n")
      self.proc.stdin.flush()
    except OSError as e:
      self.notes.append(f"peer worker: {type(e).__name__}: {e}")
      return []
    ans = self._answer(CASE_TIMEOUT_S)
    self.notes.extend(f"({rows}x{hidden} {dtype}) {n}"
                      for n in ans.get("notes", []))
    return ans.get("records", [])

  def close(self):
    """Stops the worker (idempotent)."""
    if self.proc.poll() is None:
      try:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def cupy_copy_us(nbytes: int, reps: int = 5) -> dict:
  """Device-to-device copy moving ``nbytes`` (read + write) through CuPy.

  ``cudaMemcpyAsync`` between CUDA events, one pair of events per copy,
  over buffer pairs rotated past L2.

  Returns:
    dict(time_us, time_min, time_max, timing="cupy-events").

  Raises:
    ImportError: CuPy is not installed; CuPy's errors without a device.
  """
  import cupy  # pylint: disable=import-outside-toplevel
  n = max(16, (nbytes // 2) // 16 * 16)
  sets = int(min(16, max(2, math.ceil(peer_worker.ROTATE_BYTES / (2 * n)))))
  pairs = [(cupy.ones(n, dtype=cupy.uint8), cupy.empty(n, dtype=cupy.uint8))
           for _ in range(sets)]
  stream = cupy.cuda.get_current_stream()
  rt = cupy.cuda.runtime

  def copy(src, dst):
    rt.memcpyAsync(dst.data.ptr, src.data.ptr, n,
                   rt.memcpyDeviceToDevice, stream.ptr)
  for s, d in pairs:
    copy(s, d)
  stream.synchronize()
  times = []
  for _ in range(reps):
    for s, d in pairs:
      start, end = cupy.cuda.Event(), cupy.cuda.Event()
      start.record(stream)
      copy(s, d)
      end.record(stream)
      end.synchronize()
      times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
  return dict(time_us=statistics.median(times), time_min=min(times),
              time_max=max(times), timing="cupy-events")
