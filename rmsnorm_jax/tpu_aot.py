"""Deviceless ahead-of-time compilation of the TPU kernels for every generation.

``python -m rmsnorm_jax.tpu_aot`` needs libtpu (``pip install
"jax[tpu]==<jax version>"``, best in a separate virtualenv, see
.ci/tpu_aot.sh) but no TPU: ``jax.experimental.topologies`` describes a TPU
slice, a mesh over its devices gives ``jax.jit(...).trace(...).lower()`` its
target, and ``.compile()`` runs the real TPU compiler (Mosaic included, so
VMEM overflows and layout errors surface here).

For each generation in ``shapes.TPU_GENERATIONS``, shape in
``shapes.TPU_AOT``, dtype (bfloat16, float32) and op (forward, backward,
fused residual forward and backward) it compiles the ``pallas_tpu`` kernels
and the XLA implementation, and reports:

* whether it compiled, and the kernel's block (rows per step, or
  ``rows x lanes (2-pass)``);
* **HBM bytes** of the compiled program: for every instruction of the
  optimized HLO's entry computation, the sizes of its operands and results
  that live in HBM (memory space 0), padded to their tiled layouts, i.e.
  what each top-level op moves if it reads each operand and writes each
  result once. XLA's ``cost_analysis()`` is not used for this: it reports no
  total for Mosaic custom calls and counts VMEM traffic for XLA fusions;
* the minimum bytes for the op (N = rows * hidden * itemsize): forward 2N,
  backward 3N (x, dy, dx), fused forward 4N (x, residual, y, h), fused
  backward 4N (h, dy, dh, dh_total), plus the O(rows + hidden) terms
  (rstd 4 B/row, scale, dscale 4 B/lane);
* roofline times, bytes / HBM bandwidth of the compiled-for device (the
  chip's public spec-sheet bandwidth, :data:`HBM_BYTES_PER_S`, times the
  device's share of the chip's TensorCores). These are bounds derived from
  byte counts; nothing here is a measured TPU time.

Writes the report to docs/tpu_aot.md (``--out`` to change): a summary per
generation, then one row per compiled program. ``--ops``, ``--gens``,
``--dtypes`` and ``--shapes`` restrict the sweep; ``--no-xla`` compiles only
the kernels (what CI needs to prove they compile; the XLA columns are then
empty). Exits 1 if anything failed to compile, 2 without libtpu.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

# libtpu reads these when it initializes; without them it probes for a TPU
# host and logs errors. Deviceless compilation needs neither. libtpu also
# takes a machine-wide lock file (/tmp/libtpu_lockfile) so that two processes
# cannot drive one TPU; with no TPU to share, several compiling processes
# (pytest-xdist workers, the CI sweep's jobs) may load it at once.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from rmsnorm_jax import base  # noqa: E402
from rmsnorm_jax import shapes  # noqa: E402
from rmsnorm_jax.kernels import tpu_config  # noqa: E402
from rmsnorm_jax.kernels.tpu import PallasTpu  # noqa: E402

# Public spec-sheet HBM bandwidth per chip, bytes/s.
HBM_BYTES_PER_S = {
    "v4": 1200e9,
    "v5e": 819e9,
    "v5p": 2765e9,
    "v6e": 1640e9,
    "tpu7x": 7370e9,
}
# TensorCores per chip; a device that is one of them gets its share of HBM.
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1, "tpu7x": 2}

OPS = ("fwd", "bwd", "res_fwd", "res_bwd")
# Multiples of N (one (rows, hidden) array) an op must move at least.
MIN_ARRAYS = {"fwd": 2, "bwd": 3, "res_fwd": 4, "res_bwd": 4}
DTYPES = (jnp.bfloat16, jnp.float32)
EPS = 1e-6
DEFAULT_OUT = os.path.join("docs", "tpu_aot.md")


def libtpu_available() -> bool:
  """Whether a TPU compiler can be loaded (libtpu installed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


# ------------------------------------------------------------- HLO bytes --

_SKIP_OPS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant",
             "after-all", "partition-id", "replica-id", "opt-barrier",
             "add-dependency"}
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2,
          "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8}


def _array_bytes(dtype: str, dims: str, layout: str | None) -> tuple[int, bool]:
  """(padded bytes, in HBM) of one array shape from HLO text."""
  shape = [int(d) for d in dims.split(",") if d]
  size = _BYTES.get(dtype, 4)
  in_hbm = True
  if layout:
    body = layout[1:-1]
    minor_to_major, _, rest = body.partition(":")
    order = [int(d) for d in minor_to_major.split(",") if d]
    if re.search(r"S\((\d+)\)", rest) and re.search(r"S\((\d+)\)", rest
                                                     ).group(1) != "0":
      in_hbm = False
    tile = re.search(r"T\(([0-9,]+)\)", rest)
    if tile and order:
      t = [int(v) for v in tile.group(1).split(",")]
      # The tile's last entry applies to the most minor dim, and so on.
      for k, tk in enumerate(reversed(t)):
        if k < len(order):
          d = order[k]
          shape[d] = -(-shape[d] // tk) * tk
  return int(np.prod(shape, dtype=np.int64)) * size, in_hbm


def _shape_bytes(text: str) -> int:
  total = 0
  for m in _ARRAY.finditer(text):
    b, hbm = _array_bytes(m.group(1), m.group(2), m.group(3))
    if hbm:
      total += b
  return total


def hbm_bytes(hlo_text: str) -> int:
  """HBM bytes moved by the entry computation of optimized HLO text."""
  lines = hlo_text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("ENTRY"))
  shapes_by_name: dict[str, str] = {}
  total = 0
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if not m:
      continue
    name, rhs = m.groups()
    # rhs: "<shape> <opcode>(<operands>), attrs"
    op_m = re.search(r"\s([a-z][\w\-]*)\(", rhs)
    if not op_m:
      continue
    shape_text = rhs[:op_m.start()]
    opcode = op_m.group(1)
    shapes_by_name[name] = shape_text
    # An async op's "-done" only hands over what its "-start" moved.
    if opcode in _SKIP_OPS or opcode.endswith("-done"):
      continue
    depth, i = 1, op_m.end()
    while depth and i < len(rhs):
      depth += {"(": 1, ")": -1}.get(rhs[i], 0)
      i += 1
    operands = re.findall(r"%([\w.\-]+)", rhs[op_m.end():i])
    if opcode.endswith("-start"):
      # Async copy/slice: the result tuple holds the operand (aliased), the
      # destination and a context scalar. The bytes moved are the
      # destination's, read from the operand's memory space and written to
      # the destination's.
      src = {shapes_by_name.get(o, "") for o in operands}
      dest = [m for m in _ARRAY.finditer(shape_text)
              if m.group(0) not in " ".join(src) and m.group(2)]
      moved = max((_array_bytes(m.group(1), m.group(2), m.group(3))[0]
                   for m in dest), default=0)
      reads = moved if any(_shape_bytes(t) for t in src) else 0
      writes = moved if any(_array_bytes(m.group(1), m.group(2), m.group(3))[1]
                            for m in dest) else 0
      total += reads + writes
      continue
    out = _shape_bytes(shape_text)
    total += out + sum(_shape_bytes(shapes_by_name.get(o, ""))
                       for o in operands)
  return total


# -------------------------------------------------------------- the sweep --

@dataclasses.dataclass
class Row:
  """One (generation, shape, dtype, op): the kernel and the XLA program.

  ``xla_compiled`` is None when the XLA program was not compiled
  (``--no-xla``); byte counts are None for programs that did not compile.
  """

  gen: str
  shape: tuple[int, int]
  dtype: str
  op: str
  compiled: bool
  block: str
  kernel_bytes: int | None
  xla_compiled: bool | None
  xla_bytes: int | None
  min_bytes: int
  bandwidth: float
  seconds: float
  error: str = ""

  @property
  def ok(self) -> bool:
    return self.compiled and self.xla_compiled is not False


def _op_fn(impl, op):
  if op == "fwd":
    return lambda x, s: impl.forward(x, s, eps=EPS, scale_offset=0.0,
                                     out_dtype=x.dtype)
  if op == "bwd":
    return lambda x, s, r, dy: impl.backward(x, s, r, dy, scale_offset=0.0)
  if op == "res_fwd":
    return lambda x, res, s: impl.residual_forward(
        x, res, s, eps=EPS, scale_offset=0.0, out_dtype=res.dtype)
  return lambda h, s, r, dy, dh: impl.residual_backward(
      h, s, r, dy, dh, scale_offset=0.0)


def _args(op, rows, hidden, dtype, sharding):
  a = jax.ShapeDtypeStruct((rows, hidden), dtype, sharding=sharding)
  s = jax.ShapeDtypeStruct((hidden,), dtype, sharding=sharding)
  r = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
  return {"fwd": (a, s), "bwd": (a, s, r, a), "res_fwd": (a, a, s),
          "res_bwd": (a, s, r, a, a)}[op]


def min_bytes(op, rows, hidden, dtype) -> int:
  """The least HBM traffic of op: k arrays of N, plus rstd, scale, dscale."""
  n = rows * hidden * np.dtype(dtype).itemsize
  small = 4 * rows + hidden * np.dtype(dtype).itemsize
  if op in ("bwd", "res_bwd"):
    small += 4 * hidden
  return MIN_ARRAYS[op] * n + small


def _kernel_dtypes(op, dtype):
  return {"fwd": [dtype, dtype], "bwd": [dtype, dtype, dtype],
          "res_fwd": [dtype] * 4, "res_bwd": [dtype] * 4}[op]


def topology(gen: str):
  """The deviceless description of a TPU slice, e.g. ``"v5e:2x2"``.

  Raises:
    RuntimeError (from libtpu): unknown generation name or topology.
  """
  from jax.experimental import topologies
  return topologies.get_topology_desc(gen, "tpu")


def single_device_mesh(gen: str) -> jax.sharding.Mesh:
  """A one-device mesh on the first TensorCore (or megacore) of ``gen``."""
  return jax.sharding.Mesh(np.array(topology(gen).devices[:1]), ("x",))


def compile_fn(fn, args, mesh):
  """Compiles ``jax.jit(fn)`` for ``args`` (ShapeDtypeStructs) on ``mesh``.

  ``jax.set_mesh`` makes the mesh's TPU the target of tracing too, so the
  kernels pick blocks for that generation (``tpu_config.detect_chip``).
  """
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


def compile_one(impl, op, rows, hidden, dtype, mesh):
  """Compiles one op of ``impl`` for the mesh's TPU; returns the executable."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return compile_fn(_op_fn(impl, op),
                    _args(op, rows, hidden, dtype, sharding), mesh)


def device_bandwidth(gen_name: str, device) -> float:
  """HBM bytes/s available to ``device``: its share of the chip's."""
  family = gen_name.split(":")[0]
  share = getattr(device, "num_cores", 1) / CORES_PER_CHIP[family]
  return HBM_BYTES_PER_S[family] * min(1.0, share)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def sweep(gens=shapes.TPU_GENERATIONS, shape_list=shapes.TPU_AOT,
          dtypes=DTYPES, ops=OPS, xla=True, log=print):
  """Compiles every combination; returns a list of :class:`Row`.

  Args:
    gens: topology names for ``jax.experimental.topologies``.
    shape_list: ``(rows, hidden)`` pairs.
    dtypes: dtypes of x (and scale, residual, dy).
    ops: among :data:`OPS`.
    xla: also compile the XLA implementation, for the comparison columns.
    log: called with one line of text per row.

  Compile errors are recorded in the row (``compiled`` False, ``error``),
  not raised, so one failure does not hide the others.
  """
  rows_out = []
  kernel, xla_impl = PallasTpu(), base.Xla()
  for gen in gens:
    mesh = single_device_mesh(gen)
    device = mesh.devices.flat[0]
    with jax.set_mesh(mesh):
      chip = tpu_config.detect_chip()
    bw = device_bandwidth(gen, device)
    for (rows, hidden) in shape_list:
      for dtype in dtypes:
        for op in ops:
          t0 = time.perf_counter()
          err = ""
          try:
            block = kernel.blocking(op, rows, hidden,
                                    _kernel_dtypes(op, dtype),
                                    chip=chip).describe()
            c = compile_one(kernel, op, rows, hidden, dtype, mesh)
            kbytes, ok = hbm_bytes(c.as_text()), True
          except Exception as e:  # Report, keep sweeping.
            block, kbytes, ok = "-", None, False
            err = _first_line(e)
          xbytes, xok = None, None
          if xla:
            try:
              cx = compile_one(xla_impl, op, rows, hidden, dtype, mesh)
              xbytes, xok = hbm_bytes(cx.as_text()), True
            except Exception as e:
              xok = False
              err = err or "xla: " + _first_line(e)
          row = Row(gen, (rows, hidden), np.dtype(dtype).name, op, ok,
                    block, kbytes, xok, xbytes,
                    min_bytes(op, rows, hidden, dtype), bw,
                    time.perf_counter() - t0, err)
          rows_out.append(row)
          log(_line(row))
  return rows_out


# ----------------------------------------------------------------- report --

def _us(nbytes, bw):
  return "-" if nbytes is None else f"{nbytes / bw * 1e6:.2f}"


def _ratio(nbytes, minimum):
  return "-" if nbytes is None else f"{nbytes / minimum:.2f}"


def _line(r: Row) -> str:
  xla = "" if r.xla_compiled is None else (
      f" xla={_ratio(r.xla_bytes, r.min_bytes)}x")
  return (f"{r.gen:12s} {r.shape[0]:>6d}x{r.shape[1]:<6d} {r.dtype:9s} "
          f"{r.op:8s} {'yes' if r.compiled else 'NO ':3s} "
          f"block={r.block:18s} kernel={_ratio(r.kernel_bytes, r.min_bytes)}x"
          f"{xla}  {r.seconds:.1f}s"
          + (f"  ERROR {r.error}" if r.error else ""))


def _shape_text(r: Row) -> str:
  return f"{r.shape[0]}x{r.shape[1]} {r.dtype} {r.op}"


def _roofline_sum(rows, attr):
  """Sum of bytes/bandwidth (us) over rows, or None if any is missing."""
  vals = [getattr(r, attr) for r in rows]
  if not rows or any(v is None for v in vals):
    return None
  return sum(v / r.bandwidth for v, r in zip(vals, rows)) * 1e6


def summary(rows) -> list[str]:
  """Markdown lines: one summary row per generation."""
  out = [
      "| generation | device GB/s | pallas_tpu compiled | xla compiled | "
      "max kernel bytes / min | same, rows >= 64 | two-pass programs | "
      + " | ".join(f"{op} roofline us, kernel / xla" for op in OPS)
      + " |",
      "|---" * (7 + len(OPS)) + "|",
  ]
  for gen in dict.fromkeys(r.gen for r in rows):
    g = [r for r in rows if r.gen == gen]
    ok = [r for r in g if r.kernel_bytes is not None]
    worst = max(ok, key=lambda r: r.kernel_bytes / r.min_bytes, default=None)
    big = [r for r in ok if r.shape[0] >= 64]
    worst_big = max((r.kernel_bytes / r.min_bytes for r in big), default=None)
    xla_tried = [r for r in g if r.xla_compiled is not None]
    cells = [
        gen, f"{g[0].bandwidth / 1e9:.0f}",
        f"{sum(r.compiled for r in g)}/{len(g)}",
        (f"{sum(bool(r.xla_compiled) for r in xla_tried)}/{len(xla_tried)}"
         if xla_tried else "not run"),
        ("-" if worst is None else
         f"{worst.kernel_bytes / worst.min_bytes:.2f} ({_shape_text(worst)})"),
        "-" if worst_big is None else f"{worst_big:.3f}",
        ", ".join(_shape_text(r) for r in g if "2-pass" in r.block) or "none",
    ]
    for op in OPS:
      o = [r for r in g if r.op == op]
      k = _roofline_sum(o, "kernel_bytes")
      x = _roofline_sum(o, "xla_bytes")
      cell = "-" if k is None else f"{k:.0f}"
      if k is not None and x is not None:
        cell += f" / {x:.0f} ({x / k:.2f}x)"
      cells.append(cell)
    out.append("| " + " | ".join(cells) + " |")
  return out


def markdown(rows, ci_note: str = "") -> str:
  """The report as a markdown document (summary, then every row)."""
  n_ok = sum(r.compiled for r in rows)
  xla_tried = [r for r in rows if r.xla_compiled is not None]
  out = [
      "# TPU deviceless AOT compilation",
      "",
      "Generated by `python -m rmsnorm_jax.tpu_aot` (jax "
      f"{jax.__version__}) on a CPU host with libtpu: every program below was "
      "compiled by the TPU compiler (XLA and Mosaic) for the named "
      "generation, without a TPU. Nothing here is a measured TPU time.",
      "",
      f"Compiled: pallas_tpu {n_ok}/{len(rows)}"
      + (f", xla {sum(bool(r.xla_compiled) for r in xla_tried)}/"
         f"{len(xla_tried)}" if xla_tried else "") + ".",
      "",
  ]
  if ci_note:
    out += ci_note.splitlines() + [""]
  out += [
      "## Summary per generation",
      "",
      "* **max kernel bytes / min**: the largest ratio of the kernel "
      "program's HBM bytes to the op's minimum over the sweep (single-row "
      "shapes are padded to a full (8 or 16, 128) tile, hence up to ~1.9x "
      "there); the next column leaves out shapes of fewer than 64 rows.",
      "* **two-pass programs**: where the row is too wide for one VMEM "
      "block and the kernels read their inputs twice.",
      "* **roofline us, kernel / xla**: per op, the sum over all shapes and "
      "dtypes of bytes / device bandwidth, kernel then XLA, and XLA's time "
      "over the kernel's.",
      "",
  ] + summary(rows) + [
      "",
      "## Every program",
      "",
      "* **block**: rows per grid step of the `pallas_tpu` kernel "
      "(`rows x lanes (2-pass)` for the wide-row path), chosen for the "
      "generation's VMEM by `rmsnorm_jax/kernels/tpu_config.py`.",
      "* **bytes**: HBM bytes of the compiled program, from its optimized "
      "HLO: every top-level instruction's operands and results that live in "
      "HBM, padded to their tiled layout (each read or written once; a "
      "Mosaic kernel counts as one instruction that reads its operands and "
      "writes its results once, which is what its block specs do). **min**: "
      "the op's unavoidable traffic: forward 2N, backward 3N, fused forward "
      "4N, fused backward 4N (N = rows x hidden x itemsize), plus rstd, "
      "scale and dscale.",
      "* **roofline**: bytes / HBM bandwidth of the device compiled for "
      "(public spec-sheet chip bandwidth: "
      + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in
                  HBM_BYTES_PER_S.items())
      + "; a device that is one of a chip's two TensorCores, as in the v4 "
      "and tpu7x topologies here, gets half). A lower bound derived from "
      "byte counts, not a measurement; sub-microsecond rows are dominated "
      "by launch cost.",
      "",
      "| generation | shape | dtype | op | compiled | block | "
      "kernel bytes | x min | kernel roofline us | xla bytes | x min | "
      "xla roofline us | min roofline us |",
      "|---" * 13 + "|",
  ]
  for r in rows:
    out.append(
        f"| {r.gen} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.op} | "
        f"{'yes' if r.compiled else 'NO: ' + r.error} | {r.block} | "
        f"{r.kernel_bytes if r.kernel_bytes is not None else '-'} | "
        f"{_ratio(r.kernel_bytes, r.min_bytes)} | "
        f"{_us(r.kernel_bytes, r.bandwidth)} | "
        f"{r.xla_bytes if r.xla_bytes is not None else '-'} | "
        f"{_ratio(r.xla_bytes, r.min_bytes)} | "
        f"{_us(r.xla_bytes, r.bandwidth)} | {_us(r.min_bytes, r.bandwidth)} |")
  out.append("")
  return "\n".join(out)


CI_NOTE = """## What CI checks

`.ci/tpu_aot.sh`, the last step of `.ci/run`, installs `jax[tpu]` at the
installed jax version (libtpu; no TPU needed) and fails if anything below
does not compile:

1. the tests marked `tpu_aot` in `tests/test_tpu_kernels.py`: all four
   kernels in one program for shapes outside this sweep (1000x2880, 1x1,
   3x8 without scale, 33x129 float16 with a float32 residual and a user
   `block_rows`, 37x100, the forced two-pass path) on all five generations;
   16x65536 float32 taking two passes on v4 and one on v5e (block choice
   follows the target's VMEM); one row of this sweep with its byte counts;
   and `rms_norm` forward and gradient with batch- and hidden-sharded input
   on the 4-chip v5e and v6e meshes. With Explicit mesh axes it compiles
   with no all-gather (batch: the kernel per shard, only dscale
   all-reduced; hidden: one float32 per row all-reduced). With Auto axes
   custom_partitioning does not compile for TPU (jax-ml/jax#38196), so
   such multi-device TPU programs run XLA's math, which XLA partitions:
   the test checks that they compile with no kernel call and no gather of
   x, and that a one-device program keeps the kernel;
2. every kernel program of the sweep below, all generations, shapes, dtypes
   and ops (`python -m rmsnorm_jax.tpu_aot --no-xla`, two jobs). The XLA
   comparison programs only feed the byte columns and are left out there
   to stay within CI's time budget; this file is regenerated by hand with
   the full command, `python -m rmsnorm_jax.tpu_aot`."""


def _parse_shapes(text):
  return tuple(tuple(int(v) for v in s.split("x")) for s in text.split(","))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=DEFAULT_OUT,
                 help="markdown report path ('' for none)")
  p.add_argument("--gens", default=",".join(shapes.TPU_GENERATIONS))
  p.add_argument("--ops", default=",".join(OPS))
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--shapes", default=None,
                 help="comma-separated ROWSxHIDDEN; default shapes.TPU_AOT")
  p.add_argument("--no-xla", dest="xla", action="store_false",
                 help="compile only the kernels, not the XLA comparison")
  args = p.parse_args(argv)
  if not libtpu_available():
    print("libtpu is not installed: pip install \"jax[tpu]==" +
          jax.__version__ + "\" (see .ci/tpu_aot.sh)", file=sys.stderr)
    return 2
  ops = tuple(args.ops.split(","))
  unknown = set(ops) - set(OPS)
  if unknown:
    p.error(f"--ops: unknown {sorted(unknown)}; choose from {OPS}")
  t0 = time.perf_counter()
  rows = sweep(
      gens=tuple(args.gens.split(",")),
      shape_list=(_parse_shapes(args.shapes) if args.shapes
                  else shapes.TPU_AOT),
      dtypes=tuple(jnp.dtype(d) for d in args.dtypes.split(",")),
      ops=ops, xla=args.xla)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(markdown(rows, CI_NOTE))
  failed = [r for r in rows if not r.ok]
  print(f"{len(rows) - len(failed)}/{len(rows)} compiled "
        f"in {time.perf_counter() - t0:.0f}s; report: {args.out or '-'}")
  for r in failed:
    print("FAILED", _line(r))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
