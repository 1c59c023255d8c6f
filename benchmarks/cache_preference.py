"""Times kernels under two L1/shared-memory cache preferences (a diagnostic).

XLA's CUDA kernel launcher calls ``cuFuncSetCacheConfig(f,
CU_FUNC_CACHE_PREFER_SHARED)`` on a kernel the first time it is launched
with dynamic shared memory (``CudaKernel::UpdateMaxDynamicSharedMemoryBytes``
in XLA's stream executor). Every Pallas Triton kernel asks for some (its
cross-warp reductions take 64-128 bytes), so on an H200 the driver gives
the SM its largest shared-memory carveout (228 KB, Nsight Compute's
``launch__shared_mem_config_size``) and leaves about 28 KB of L1 for the
loads in flight. Triton's own launcher (Liger's kernels through torch) and
XLA's fusions without shared memory keep the driver default (8-32 KB of
shared memory, the rest L1).

Modes (run on the GPU machine, from the repository root):

* default: the benchmark's own calls of the Pallas Triton kernels
  (``rmsnorm_jax.bench.cases``, impl ``rmsnorm_jax``) timed four times in one
  process: as the launcher leaves them, then with the driver default
  (``CU_FUNC_CACHE_PREFER_NONE``), the launcher's preference again, and the
  default again. The preference is switched on the kernels' next launch
  through a CUPTI driver-API callback, which is unsubscribed before each
  timing (``jax.profiler`` needs CUPTI to itself); the kernels, inputs and
  launches are otherwise the same.
* ``--liger-launch``: beside each forward and fused forward, the same
  kernels launched as Liger-Kernel launches its own (``liger_launch``), so
  that the two libraries' kernels are compared under one cache preference.
* ``--peer liger``: the reverse, in a torch process: Liger-Kernel's RMSNorm
  forward and fused add+RMSNorm forward launched directly, timed with CUDA
  events under the default and under ``PREFER_SHARED``.

::

  PYTHONPATH=. python3 benchmarks/cache_preference.py \\
      [--ops fwd,fused_fwd,bwd,quant_fwd] [--cases 8192x4096:bfloat16,...]
      [--liger-launch]
  PYTHONPATH=. python3 benchmarks/cache_preference.py --peer liger

Not library code: the library never touches a kernel's cache configuration
(docs/gpu_profile_h200.md, "The launcher's cache preference").
"""

import argparse
import ctypes
import glob
import os
import statistics
import sys

CU_FUNC_CACHE_PREFER_NONE = 0
CU_FUNC_CACHE_PREFER_SHARED = 1
DEFAULT_CASES = ("8192x4096:bfloat16,2048x8192:float16,4096x16384:bfloat16,"
                 "2048x32768:bfloat16,8192x4096:float16")
DEFAULT_OPS = "fwd,fused_fwd,bwd,quant_fwd"
# Liger forwards: (fused, rows, hidden, torch dtype name).
LIGER_CASES = [(True, 8192, 4096, "bfloat16"), (True, 2048, 8192, "float16"),
               (True, 4096, 16384, "bfloat16"), (False, 8192, 4096, "float16"),
               (False, 2048, 32768, "bfloat16")]


def _libcuda():
  return ctypes.CDLL("libcuda.so.1")


def _find_cupti() -> str:
  pats = ["/usr/local/cuda*/extras/CUPTI/lib64/libcupti.so*",
          "/usr/local/cuda*/lib64/libcupti.so*"]
  for p in sys.path:
    pats.append(os.path.join(p, "nvidia", "*", "lib", "libcupti.so*"))
  for pat in pats:
    found = sorted(glob.glob(pat))
    if found:
      return found[0]
  raise FileNotFoundError("libcupti.so not found (CUDA toolkit or the "
                          "nvidia-cuda-cupti wheel)")


class _CallbackData(ctypes.Structure):
  # CUpti_CallbackData (cupti_callbacks.h), the fields up to symbolName.
  _fields_ = [("site", ctypes.c_int), ("function_name", ctypes.c_char_p),
              ("function_params", ctypes.c_void_p),
              ("return_value", ctypes.c_void_p),
              ("symbol_name", ctypes.c_char_p)]


_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_uint32, ctypes.c_void_p)
_CUPTI_CB_DOMAIN_DRIVER_API = 1
_CUPTI_API_ENTER = 0


class PreferenceSwitch:
  """Sets a cache preference on kernels (by symbol prefix) as they launch."""

  def __init__(self, prefix: str):
    self.cupti = ctypes.CDLL(_find_cupti())
    self.cuda = _libcuda()
    self.prefix = prefix.encode()
    self.mode = None
    self.switched = {}
    self._callback = _CALLBACK_TYPE(self._on_call)

  def _on_call(self, userdata, domain, cbid, data):
    del userdata, domain, cbid
    d = ctypes.cast(data, ctypes.POINTER(_CallbackData)).contents
    name = d.function_name or b""
    if d.site != _CUPTI_API_ENTER or not name.startswith(b"cuLaunchKernel"):
      return
    if not (d.symbol_name or b"").startswith(self.prefix):
      return
    params = ctypes.cast(d.function_params, ctypes.POINTER(ctypes.c_void_p))
    # cuLaunchKernel_params starts with the CUfunction; cuLaunchKernelEx's
    # with the launch config, then the CUfunction.
    func = params[1] if name.startswith(b"cuLaunchKernelEx") else params[0]
    rc = self.cuda.cuFuncSetCacheConfig(ctypes.c_void_p(func),
                                        ctypes.c_int(self.mode))
    self.switched[d.symbol_name.decode()] = (self.mode, rc)

  def apply(self, mode: int, run_once) -> None:
    """Runs ``run_once()`` with every matching launch set to ``mode``."""
    sub = ctypes.c_void_p()
    self.mode = mode
    rc = self.cupti.cuptiSubscribe(ctypes.byref(sub), self._callback, None)
    if rc:
      raise RuntimeError(f"cuptiSubscribe failed: {rc}")
    try:
      rc = self.cupti.cuptiEnableDomain(1, sub, _CUPTI_CB_DOMAIN_DRIVER_API)
      if rc:
        raise RuntimeError(f"cuptiEnableDomain failed: {rc}")
      run_once()
    finally:
      self.cupti.cuptiUnsubscribe(sub)


def liger_launch(hidden: int):
  """``(label, PallasGpu)``: this library's kernel with Liger-Kernel's
  forward launch: one program a row of the whole padded width, the scale
  re-read each row, and Liger's warps for that width (4, 8 from 2048
  columns, 16 from 8192, 32 from 32768)."""
  from rmsnorm_jax.kernels import gpu_tiling  # pylint: disable=import-outside-toplevel
  from rmsnorm_jax.kernels.gpu import PallasGpu  # pylint: disable=import-outside-toplevel
  cols = gpu_tiling.next_pow2(hidden)
  warps = 32 if cols >= 32768 else 16 if cols >= 8192 else (
      8 if cols >= 2048 else 4)
  config = gpu_tiling.Config(block_rows=1, block_cols=cols, num_warps=warps,
                             persistent=False, prefetch=False,
                             cache_scale=False)
  return f"liger launch (w{warps})", PallasGpu(config=config)


def run_jax(ops, cases_text, reps, with_liger_launch=False):
  import jax  # pylint: disable=import-outside-toplevel
  from rmsnorm_jax.bench import cases as bench_cases  # pylint: disable=import-outside-toplevel
  from rmsnorm_jax.bench import timing  # pylint: disable=import-outside-toplevel

  # CUPTI is loaded before JAX starts on the GPU (loaded after, its
  # subscription failed with CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED).
  switch = PreferenceSwitch("rmsnorm")
  cands, labels = [], []
  for uid, ((rows, hidden), dtype) in enumerate(
      bench_cases.parse_cases(cases_text)):
    for op in ops:
      dt = bench_cases.op_dtype(op, dtype)
      n = bench_cases.n_sets(op, rows, hidden, dt)
      impls = ["rmsnorm_jax"]
      if with_liger_launch and op in ("fwd", "fused_fwd"):
        impls.append(liger_launch(hidden))
      for c in bench_cases.build_candidates(op, impls, rows, hidden, dt, n,
                                            uid=uid):
        if isinstance(c, Exception):
          print(f"{op} {rows}x{hidden}: {c!r}", file=sys.stderr)
          continue
        cands.append(c)
        launch = "" if c.impl == "rmsnorm_jax" else f", {c.impl}"
        labels.append(f"{op} {rows}x{hidden} {jax.numpy.dtype(dt).name}"
                      + launch)

  def run_once():
    for c in cands:
      jax.block_until_ready(c.fn(*c.arg_sets[0]))

  run_once()  # compile; the launcher sets its preference at first launch
  phases = [("launcher", None), ("default", CU_FUNC_CACHE_PREFER_NONE),
            ("launcher again", CU_FUNC_CACHE_PREFER_SHARED),
            ("default again", CU_FUNC_CACHE_PREFER_NONE)]
  table = {}
  for label, mode in phases:
    print(f"phase: {label}", file=sys.stderr, flush=True)
    if mode is not None:
      switch.apply(mode, run_once)
    res = timing.time_candidates(cands, reps=reps)
    table[label] = [res[c.fn.__name__].get("time_us") for c in cands]
  print("switched:", switch.switched, file=sys.stderr)
  print("| call | " + " | ".join(f"{p} us" for p, _ in phases)
        + " | default / launcher |")
  print("|---|" + "---:|" * (len(phases) + 1))
  for i, label in enumerate(labels):
    vals = [table[p][i] for p, _ in phases]
    ratio = statistics.mean(vals[1::2]) / statistics.mean(vals[0::2])
    print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals)
          + f" | {ratio:.3f} |")


def run_liger(reps):
  import torch  # pylint: disable=import-outside-toplevel
  from liger_kernel.ops import fused_add_rms_norm as fused_ops  # pylint: disable=import-outside-toplevel
  from liger_kernel.ops import rms_norm as plain_ops  # pylint: disable=import-outside-toplevel
  from liger_kernel.ops.utils import calculate_settings  # pylint: disable=import-outside-toplevel

  cuda = _libcuda()
  dev = "cuda"
  gen = torch.Generator(device=dev).manual_seed(0)
  sets = 4  # > L2 for every case

  def launcher(fused, rows, hidden, dt):
    def rand(shape, mean):
      return (torch.randn(shape, generator=gen, device=dev) + mean).to(dt)
    xs = [rand((rows, hidden), 0.3) for _ in range(sets)]
    rs = [rand((rows, hidden), 0.5) for _ in range(sets)]
    w = rand((hidden,), 1.0)
    y, h = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    block, warps = calculate_settings(hidden)

    def run(i):
      x, r = xs[i % sets], rs[i % sets]
      if fused:
        return fused_ops._fused_add_rms_norm_forward_kernel[(rows,)](  # pylint: disable=protected-access
            y, y.stride(0), h, h.stride(0), x, x.stride(0), r, r.stride(0),
            w, w.stride(0), rstd, rstd.stride(0), hidden, 1e-6, 0.0, 0,
            BLOCK_SIZE=block, num_warps=warps, num_stages=2)
      return plain_ops._rms_norm_forward_kernel[(rows,)](  # pylint: disable=protected-access
          y, y.stride(0), x, x.stride(0), w, w.stride(0), rstd,
          rstd.stride(0), hidden, 1e-6, 0.0, 0, elementwise_affine=True,
          BLOCK_SIZE=block, num_warps=warps)
    return run

  def time_it(run, n):
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(2 * sets):
      run(i)
    torch.cuda.synchronize()
    for i in range(n):
      starts[i].record()
      run(i)
      ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3
                             for s, e in zip(starts, ends))

  phases = [("default", CU_FUNC_CACHE_PREFER_NONE),
            ("prefer shared", CU_FUNC_CACHE_PREFER_SHARED),
            ("default again", CU_FUNC_CACHE_PREFER_NONE),
            ("prefer shared again", CU_FUNC_CACHE_PREFER_SHARED)]
  print("| Liger call | " + " | ".join(f"{p} us" for p, _ in phases)
        + " | shared / default |")
  print("|---|" + "---:|" * (len(phases) + 1))
  for fused, rows, hidden, dtname in LIGER_CASES:
    run = launcher(fused, rows, hidden, getattr(torch, dtname))
    kernel = run(0)
    torch.cuda.synchronize()
    vals = []
    for _, mode in phases:
      cuda.cuFuncSetCacheConfig(ctypes.c_void_p(kernel.function),
                                ctypes.c_int(mode))
      vals.append(time_it(run, 40 * reps))
    ratio = statistics.mean(vals[1::2]) / statistics.mean(vals[0::2])
    name = "fused_fwd" if fused else "fwd"
    print(f"| {name} {rows}x{hidden} {dtname} | "
          + " | ".join(f"{v:.1f}" for v in vals) + f" | {ratio:.3f} |")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ops", default=DEFAULT_OPS,
                  help="benchmark ops (rmsnorm_jax.bench.cases.OPS)")
  ap.add_argument("--cases", default=DEFAULT_CASES,
                  help="ROWSxHIDDEN:DTYPE or tag:NAME items")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--peer", choices=("liger",), default=None,
                  help="time the peer's kernels instead (torch process)")
  ap.add_argument("--liger-launch", action="store_true",
                  help="also time the forward ops with Liger-Kernel's "
                  "launch (liger_launch)")
  args = ap.parse_args(argv)
  if args.peer == "liger":
    run_liger(args.reps)
  else:
    run_jax([o for o in args.ops.split(",") if o], args.cases, args.reps,
            args.liger_launch)


if __name__ == "__main__":
  main()
