"""The command line of ``python -m rmsnorm_jax.tpu_aot``."""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from rmsnorm_jax.tpu_aot import compile as aot
from rmsnorm_jax.tpu_aot import report
from rmsnorm_jax.tpu_aot import specs

DEFAULT_OUT = os.path.join("docs", "tpu_aot.md")

DESCRIPTION = f"""\
Compile the TPU kernels of rmsnorm_jax (and, for comparison, the plain XLA
programs) for every TPU generation with the real TPU compiler, on a host
without a TPU, and report for each program whether it compiled, the
kernel's block size and the HBM bytes it moves against the op's minimum.
Needs libtpu: pip install "jax[tpu]=={jax.__version__}"."""

EPILOG = """\
Exit status: 0 when every program compiled, 1 when any failed to compile
(each failure is printed with its error), 2 for bad arguments or when
libtpu is not installed."""


def _shape(text: str) -> tuple[int, int]:
  try:
    rows, hidden = (int(v) for v in text.split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"a shape is ROWSxHIDDEN, e.g. 1024x4096; got {text!r}") from None
  if rows < 1 or hidden < 1:
    raise argparse.ArgumentTypeError(
        f"shape sizes must be >= 1; got {text!r}")
  return rows, hidden


def _list(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _shown(items) -> str:
  return ", ".join(str(i) for i in items)


def parser() -> argparse.ArgumentParser:
  """The argument parser (every option with its help and default)."""
  p = argparse.ArgumentParser(
      prog="python -m rmsnorm_jax.tpu_aot", description=DESCRIPTION,
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
      "--gens", type=_list, default=list(specs.GENERATIONS),
      metavar="GEN,...",
      help="TPU topologies to compile for, as libtpu names them "
           "(generation:chips), comma-separated. Default: "
           + _shown(specs.GENERATIONS))
  p.add_argument(
      "--shapes", type=_list, default=None, metavar="ROWSxHIDDEN,...",
      help="input shapes, rows x hidden, comma-separated, for every "
           "program. Default: the plain ops on "
           + _shown(f"{r}x{h}" for r, h in specs.SHAPES)
           + "; the feature programs on "
           + _shown(f"{r}x{h}" for r, h in specs.FEATURE_SHAPES))
  p.add_argument(
      "--dtypes", type=_list, default=None, metavar="DTYPE,...",
      help="dtypes of the input, scale, bias, residual and gradients, "
           "comma-separated, for every program. Default: "
           + _shown(d.name for d in specs.DTYPES) + " for the plain ops, "
           + _shown(d.name for d in specs.FEATURE_DTYPES)
           + " for the feature programs")
  p.add_argument(
      "--ops", type=_list, default=list(specs.OPS), metavar="OP,...",
      help="ops to compile, comma-separated. Default (all): "
           + _shown(specs.OPS))
  p.add_argument(
      "--no-features", dest="features", action="store_false",
      help="compile only the plain forward, backward and residual ops, not "
           "the feature programs (bias, per-head scale, llama cast order, "
           "quantized output; default: compile both)")
  p.add_argument(
      "--quick", action="store_true",
      help="every program on every generation, on fewer shapes (what CI "
           "compiles): the feature programs on "
           + _shown(f"{r}x{h}" for r, h in specs.QUICK_FEATURE_SHAPES)
           + ", and on " + _shown(specs.QUICK_SHORT_FAMILIES)
           + " the plain ops on "
           + _shown(f"{r}x{h}" for r, h in specs.QUICK_SHORT_SHAPES)
           + " (default: off, the full lists)")
  p.add_argument(
      "--no-xla", dest="xla", action="store_false",
      help="compile only the kernels, not the XLA programs the comparison "
           "columns of the report need (default: compile both)")
  p.add_argument(
      "--jobs", type=int, default=1, metavar="N",
      help="processes compiling at once; each loads its own TPU compiler. "
           "Default: 1")
  p.add_argument(
      "--out", default=DEFAULT_OUT, metavar="PATH",
      help="markdown report to write; the text above its marker line is "
           "kept, the rest replaced. An empty PATH writes none. Default: "
           + DEFAULT_OUT)
  return p


def main(argv=None) -> int:
  """Runs the sweep; returns the exit status (see the epilog)."""
  p = parser()
  args = p.parse_args(argv)
  unknown = [op for op in args.ops if op not in specs.OPS]
  if unknown:
    p.error(f"--ops: unknown {', '.join(unknown)}; choose from "
            f"{', '.join(specs.OPS)}")
  for gen in args.gens:
    try:
      specs.family(gen)
    except ValueError as e:
      p.error(f"--gens: {e}")
  try:
    dtypes = [np.dtype(d) for d in args.dtypes] if args.dtypes else None
  except TypeError as e:
    p.error(f"--dtypes: {e}")
  try:
    shape_list = [_shape(s) for s in args.shapes] if args.shapes else None
  except argparse.ArgumentTypeError as e:
    p.error(f"--shapes: {e}")
  if args.jobs < 1:
    p.error(f"--jobs must be >= 1; got {args.jobs}")
  if not aot.libtpu_available():
    print(f'libtpu is not installed: pip install "jax[tpu]=={jax.__version__}"',
          file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  rows = aot.sweep(gens=args.gens, shape_list=shape_list, dtypes=dtypes,
                   ops=args.ops, features=args.features, quick=args.quick,
                   xla=args.xla, jobs=args.jobs)
  if args.out:
    report.write(args.out, rows)
  failed = [r for r in rows if not r.ok]
  declined = [r for r in rows if r.declined]
  print(f"{len(rows) - len(failed)}/{len(rows)} compiled"
        + (f" ({len(declined)} declined by the kernel)" if declined else "")
        + f" in {time.perf_counter() - t0:.0f}s; report: {args.out or '-'}")
  for r in failed:
    print("FAILED", aot.line(r))
  return 1 if failed else 0
