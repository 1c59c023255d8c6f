"""Registers and spills of the Triton kernels of a call, without a GPU.

    pip install triton          # its CPU wheel ships ptxas
    JAX_PLATFORMS=cpu python benchmarks/triton_registers.py \
        --op bias_bwd[,bwd,...] --case 2048x8192:float16[,tag:bench,...] \
        [--warps 8,16,32] [--config block_rows=1,cache_scale=0] \
        [--device-kind "NVIDIA H200"] [--spills-only]

The call is the benchmark's (``rmsnorm_jax.bench.cases``: the public call of
``--op`` on its inputs, a backward op as the vjp of its forward) with
``backend=PallasGpu(config)``. It is lowered for CUDA on this host
(``rmsnorm_jax.bench.triton_ir``), and each Triton kernel's IR is compiled
by the installed Triton for ``--arch`` (default sm_90a, Hopper) at the
kernel's own warp count and at each of ``--warps``; ``ptxas -v`` reports
its registers per thread, spill stores and loads, and Triton its shared
memory. The Triton that compiles here is pip's, not the one inside XLA, so
the figures are the same kernel's under a close compiler (the float16 bias
backward of 2048x8192: 254 registers here at 8 warps, 252 in Nsight
Compute on an H200).

``--device-kind`` resolves the launch as on that GPU (its tuning file, and
``--sms`` SMs); by default, the heuristic's launch for 132 SMs.
"""

import argparse
import os
import re
import subprocess
import tempfile
from unittest import mock

import jax

from rmsnorm_jax.bench import cases
from rmsnorm_jax.bench.triton_ir import triton_kernels
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu

OPS = ("fwd", "bwd", "fused_fwd", "fused_bwd") + cases.FEATURE_OPS


def call(op, backend):
  """``(f, names)``: the op's public call as a function of the inputs named
  (see ``cases.make_inputs``), a backward op as its vjp."""
  custom = ("triton_registers", backend)  # cases' form of a given backend
  if op in cases.FEATURE_OPS:
    f, names = cases.feature_call(op, backend)
  elif op in ("fwd", "bwd"):
    f, names = cases._plain_fn(custom)[0], ("x", "s")  # pylint: disable=protected-access
  else:
    f, names = cases._residual_fn(custom)[0], ("x", "r", "s")  # pylint: disable=protected-access
  if op != "bwd" and not op.endswith("_bwd"):
    return f, names
  cot_names = ("dy", "dh") if op == "fused_bwd" else ("dy",)

  def backward(*args):
    primals, cots = args[:len(names)], args[len(names):]
    _, vjp = jax.vjp(f, *primals)
    return vjp(cots if len(cots) > 1 else cots[0])
  return backward, names + cot_names


def ptxas_report(ptx: str, arch: str) -> dict:
  """``ptxas -v`` of one kernel: registers, spill store and load bytes."""
  import triton  # pylint: disable=import-outside-toplevel
  ptxas = os.path.join(os.path.dirname(triton.__file__),
                       "backends", "nvidia", "bin", "ptxas")
  with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
    f.write(ptx)
    f.flush()
    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o",
                          os.devnull], capture_output=True, text=True,
                         check=True).stderr
  regs = re.search(r"Used (\d+) registers", out)
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                    out)
  return dict(registers=int(regs.group(1)),
              spill_stores=int(spill.group(1)) if spill else 0,
              spill_loads=int(spill.group(2)) if spill else 0)


def compile_kernel(kernel, warps: int, arch: str) -> dict:
  """The kernel's IR compiled by pip's Triton at ``warps`` warps."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  cc = int(re.sub(r"\D", "", arch))
  with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
    f.write(kernel.ir)
    f.flush()
    compiled = triton.compile(
        f.name, target=GPUTarget("cuda", cc, 32),
        options={"num_warps": warps, "num_stages": kernel.num_stages})
  report = ptxas_report(compiled.asm["ptx"], arch)
  report["shared_bytes"] = compiled.metadata.shared
  return report


def _config(text: str) -> gpu_tiling.Config:
  knobs = {}
  for item in filter(None, text.split(",")):
    key, value = item.split("=")
    knobs[key] = int(value)
    if key in gpu_tiling.BOOL_KNOBS:
      knobs[key] = bool(knobs[key])
  return gpu_tiling.Config(**knobs)


def kernels_of(op, rows, hidden, dtype, config, device_kind, sms):
  """The Triton kernels of ``op``'s call on ``(rows, hidden)``."""
  f, names = call(op, PallasGpu(config=config))
  inputs = jax.eval_shape(
      lambda k: cases.make_inputs(k, op, rows, hidden, dtype),
      jax.random.key(0))
  with mock.patch.object(gpu_tiling, "gpu_kind", lambda: device_kind), \
       mock.patch.object(gpu_tiling, "num_sms", lambda: sms):
    return triton_kernels(f, *(inputs[n] for n in names))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--op", required=True,
                 help=f"comma-separated ops, of: {', '.join(OPS)}")
  p.add_argument("--case", required=True,
                 help="comma-separated ROWSxHIDDEN:DTYPE or tag:NAME")
  p.add_argument("--warps", default="",
                 help="comma-separated warp counts to compile at as well")
  p.add_argument("--config", default="",
                 help="Config fields, e.g. block_rows=2,num_warps=16")
  p.add_argument("--device-kind", default=None,
                 help='resolve the launch as on this GPU, e.g. "NVIDIA H200"')
  p.add_argument("--sms", type=int, default=132)
  p.add_argument("--arch", default="sm_90a")
  p.add_argument("--spills-only", action="store_true",
                 help="print only the launches that spill")
  args = p.parse_args(argv)
  ops = [o for o in args.op.split(",") if o]
  if bad := [o for o in ops if o not in OPS]:
    p.error(f"--op: unknown {', '.join(bad)}; expected some of "
            f"{', '.join(OPS)}")
  config = _config(args.config)
  extra = [int(w) for w in filter(None, args.warps.split(","))]
  print(f"{args.arch}, launches as on {args.device_kind or 'no tuning file'}"
        f" with {args.sms} SMs")
  print("| op | case | kernel | grid | warps | registers | spill stores B | "
        "spill loads B | shared B |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|")
  for (rows, hidden), dtype in cases.parse_cases(args.case):
    case = f"{rows}x{hidden}:{jax.numpy.dtype(dtype).name}"
    for op in ops:
      kernels = kernels_of(op, rows, hidden, dtype, config, args.device_kind,
                           args.sms)
      if not kernels:
        print(f"| {op} | {case} | no Triton kernel | | | | | | |")
      for k in kernels:
        for warps in dict.fromkeys([k.num_warps] + extra):
          r = compile_kernel(k, warps, args.arch)
          if args.spills_only and not r["spill_stores"]:
            continue
          own = "" if warps != k.num_warps else " (its own)"
          print(f"| {op} | {case} | {k.name} | {k.grid[0]} | {warps}{own} | "
                f"{r['registers']} | {r['spill_stores']} | "
                f"{r['spill_loads']} | {r['shared_bytes']} |", flush=True)


if __name__ == "__main__":
  main()
