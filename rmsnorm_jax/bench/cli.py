"""Command line of the benchmark: python -m rmsnorm_jax.bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from rmsnorm_jax.bench import report
from rmsnorm_jax.bench.cases import (DEFAULT_OPS, FEATURE_OPS, IMPLS, OPS,
                                     on_gpu, parse_cases)
from rmsnorm_jax.bench.peers import PEERS
from rmsnorm_jax.bench.runner import run_benchmark

DESCRIPTION = """\
Times RMSNorm implementations side by side on each shape: this library's
kernel and its automatic choice, XLA, flax's layers, JAX's Pallas example
and, on a GPU, the PyTorch peers (torch.nn.functional.rms_norm,
Liger-Kernel, quack, each where installed) and a device-to-device copy of
the op's minimum bytes. On a GPU the time is the device kernels' (profiler
traces, median over calls rotating past L2); elsewhere it is host wall clock
with its spread, good for a smoke run only."""

EPILOG = """\
ops: fwd (y and rstd from x, scale), bwd (dx, dscale from dy and the
residuals each implementation's own forward saved), fused_fwd (y and
h = x + residual), fused_bwd (gradients of residual and scale), linen_fwd,
linen_fwd_mixed (float32 params), linen_fwd_default (flax's defaults:
float32 params and output), linen_bwd (the layers, bfloat16 input),
linen_bwd_mixed and linen_bwd_default (their backward with float32
params; under flax's defaults dy is float32).
Feature ops, timed when named (the group "features" names them all;
"default" the ops above, "all" both): quant_fwd (rms_norm_quantized,
dynamic per-row int8: q and its float32 row scales), quant_fp8_fwd (the
same in float8_e4m3fn), quant_fused_fwd (int8 with a residual: q, scales
and h), bias_fwd and bias_bwd (rms_norm with a bias), head_fwd and
head_bwd (per-head scale: a case ROWSxHIDDEN is x of ROWS x HIDDEN/128 x
128 with a (HIDDEN/128, 128) scale; 8192x4096 is 8192x32x128). Their
shapes: --cases tag:bench_features. Implementations with them: xla,
rmsnorm_jax, rmsnorm_jax_auto, rmsnorm_jax_mosaic (and roofline); no peer
has them.
impls: roofline (an XLA elementwise op moving the op's minimum bytes), xla,
flax_linen, jax_pallas_example (GPU only), rmsnorm_jax (the Pallas GPU
kernel named explicitly; interpreted off-GPU), rmsnorm_jax_auto,
rmsnorm_jax_mosaic (the Mosaic GPU kernels named explicitly; Hopper only,
an error record where they do not serve a call), and the layers
rmsnorm_jax_linen, flax_nnx, rmsnorm_jax_nnx.
examples: python -m rmsnorm_jax.bench --cases 8192x4096:bfloat16,tag:wide \\
  --ops fwd,bwd --json bench.json --markdown bench.md --plot bench.png
  python -m rmsnorm_jax.bench --cases tag:bench_features --ops features \\
  --impls xla,rmsnorm_jax"""

# Names --ops takes for several ops at once.
OP_GROUPS = {"default": DEFAULT_OPS, "features": FEATURE_OPS, "all": OPS}


def _list_arg(text, allowed, what, groups=None):
  items = [t.strip() for t in text.split(",") if t.strip()]
  if items == ["none"]:
    return []
  groups = groups or {}
  bad = [t for t in items if t not in allowed and t not in groups]
  if bad:
    names = ",".join(tuple(allowed) + tuple(groups))
    raise SystemExit(f"{what}: unknown {bad}; expected a comma-separated "
                     f"subset of {names}")
  expanded = [i for t in items for i in groups.get(t, (t,))]
  return list(dict.fromkeys(expanded))


def parse_args(argv):
  """The parsed command line (see ``--help``)."""
  p = argparse.ArgumentParser(
      prog="python -m rmsnorm_jax.bench", description=DESCRIPTION,
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true",
                 help="time only the tiny shapes tagged 'smoke' with 2 "
                      "passes (a CPU check that everything runs, in "
                      "seconds) (default: off)")
  p.add_argument("--cases", default="", metavar="LIST",
                 help="comma-separated ROWSxHIDDEN:DTYPE items (e.g. "
                      "8192x4096:bfloat16) or tag:NAME for every shape "
                      "with that tag in rmsnorm_jax/shapes.py (e.g. "
                      "tag:wide) (default: the benchmark set, the shapes "
                      "tagged 'bench', largest first)")
  p.add_argument("--ops", default="default",
                 metavar="LIST",
                 help="comma-separated ops to time, or the groups default, "
                      "features, all (default: 'default', the ops listed "
                      "below before the feature ops)")
  p.add_argument("--impls", default=",".join(IMPLS),
                 metavar="LIST",
                 help="comma-separated implementations to time; roofline "
                      "is always added (default: all of those listed "
                      "below)")
  p.add_argument("--peers", default=None, metavar="LIST",
                 help="comma-separated PyTorch peers to time in a worker "
                      f"process ({','.join(PEERS)}), or 'none'; a missing "
                      "one is a note (default: all on a GPU, none "
                      "elsewhere)")
  p.add_argument("--copy", choices=("auto", "on", "off"), default="auto",
                 help="time a device-to-device copy of each op's minimum "
                      "bytes (through torch, else CuPy) and print 'x copy' "
                      "ratios (default: auto, on a GPU only)")
  p.add_argument("--reps", type=int, default=None, metavar="N",
                 help="passes over the rotated input sets; the median is "
                      "over all calls (default: 5; 2 with --small)")
  p.add_argument("--json", metavar="PATH", default=None,
                 help="write every record as JSON here, after each case "
                      "(default: none)")
  p.add_argument("--resume", action="store_true",
                 help="continue the run that --json PATH holds (one cut "
                      "short, e.g. by a time limit): its cases are kept, "
                      "not timed again, and the rest are added; the "
                      "settings (ops, impls, peers, copy, reps) must be "
                      "that run's; a missing file starts a new run "
                      "(default: off)")
  p.add_argument("--markdown", metavar="PATH", default=None,
                 help="write the tables, the device and the command here "
                      "(default: none)")
  p.add_argument("--plot", metavar="PATH", default=None,
                 help="write a bandwidth plot (PNG; needs matplotlib) here "
                      "(default: none)")
  return p.parse_args(argv)


def _resumed(args, settings) -> dict:
  """What ``--json``'s file holds for ``--resume``: its records, notes and
  commands; empty when there is no file yet.

  Raises:
    SystemExit: --resume without --json; a file that is not a benchmark
      record, or written with other settings or without the settings.
  """
  if not args.json:
    raise SystemExit("--resume: expected --json PATH, the file of the run "
                     "to continue; got no --json")
  if not os.path.exists(args.json):
    return {}
  try:
    with open(args.json) as fp:
      saved = json.load(fp)
  except (OSError, ValueError) as e:
    raise SystemExit(f"--resume: could not read {args.json} as JSON: "
                     f"{e}") from e
  if not isinstance(saved, dict) or "settings" not in saved:
    raise SystemExit(f"--resume: {args.json} holds no run settings (not "
                     "written by this benchmark, or by a version before "
                     "--resume); start a new file")
  for key, value in settings.items():
    if saved["settings"].get(key) != value:
      raise SystemExit(
          f"--resume: {args.json} was written with {key}="
          f"{saved['settings'].get(key)!r}; this command has {key}="
          f"{value!r}. Resume with that run's settings, or start a new "
          "file")
  return saved


def main(argv=None):
  """Runs the benchmark from the command line; prints the tables."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  ops = _list_arg(args.ops, OPS, "--ops", OP_GROUPS)
  impls = _list_arg(args.impls, IMPLS, "--impls")
  peers = (None if args.peers is None
           else _list_arg(args.peers, PEERS, "--peers"))
  if args.reps is not None and args.reps < 1:
    raise SystemExit(f"--reps: expected an integer >= 1, got {args.reps}")
  reps = args.reps or (2 if args.small else 5)
  try:
    cases = parse_cases(args.cases) if args.cases else None
  except ValueError as e:
    raise SystemExit(str(e)) from e
  copy = {"auto": None, "on": True, "off": False}[args.copy]
  if peers != [] or copy is not False:
    # The peer process may share the GPU: JAX must not reserve most of its
    # memory up front (set before JAX's backend starts; a user's setting
    # stands).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  gpu = on_gpu()
  peers = (list(PEERS) if gpu else []) if peers is None else peers
  copy = gpu if copy is None else copy
  command = "python -m rmsnorm_jax.bench " + " ".join(argv)
  settings = dict(ops=ops, impls=impls, peers=peers, copy=copy, reps=reps)
  notes: list[str] = []
  if not gpu and not peers and not copy:
    notes.append("no GPU: the device-copy reference and the PyTorch peers "
                 "are timed on a GPU only (--peers, --copy on to force)")
  saved = _resumed(args, settings) if args.resume else {}
  previous = saved.get("records", [])
  commands = saved.get("commands", []) + [command]
  notes[:0] = saved.get("notes", [])
  t0 = time.perf_counter()

  def write(records):
    # A resumed run's notes and this one's can repeat each other.
    notes[:] = list(dict.fromkeys(notes))
    text = report.table(records, notes)
    if args.json:
      with open(args.json, "w") as fp:
        json.dump(dict(command=commands[0], commands=commands,
                       settings=settings, notes=notes, records=records), fp,
                  indent=1)
    if args.markdown:
      device = sorted({r["device"] for r in records if r.get("device")})
      with open(args.markdown, "w") as fp:
        fp.write(f"# RMSNorm benchmark\n\ndevice: {', '.join(device)}; "
                 f"jax {jax.__version__}\n\ncommand: `{command}`\n"
                 + text + "\n")
    return text

  records = run_benchmark(cases, ops=ops, impls=impls, reps=reps,
                          small=args.small, peers=peers, copy=copy,
                          notes=notes, on_case=write, previous=previous)
  print(write(records))
  if args.plot:
    report.plot(records, args.plot)
  print(f"\n{len(records)} records in {time.perf_counter() - t0:.0f} s")
  return records
