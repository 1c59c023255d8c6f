"""Deviceless compilation: topologies, meshes, and the sweep over programs.

``jax.experimental.topologies`` describes a TPU slice without a TPU (libtpu
is needed, a TPU is not); a mesh over its devices gives
``jax.jit(...).trace(...).lower()`` its target, and ``.compile()`` runs the
real TPU compiler, Mosaic included, so VMEM overflows and layout errors
surface here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from rmsnorm_jax import base
from rmsnorm_jax.kernels import tpu_config
from rmsnorm_jax.kernels.tpu import PallasTpu
from rmsnorm_jax.tpu_aot import hlo
from rmsnorm_jax.tpu_aot import specs


def libtpu_available() -> bool:
  """Whether a TPU compiler can be loaded (libtpu installed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=None)
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

  Returns:
    The compiled executable (``.as_text()`` is its optimized HLO).

  Raises:
    Whatever tracing, lowering or the TPU compiler raises.
  """
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


def compile_one(impl, op, rows: int, hidden: int, dtype, mesh):
  """Compiles one program of ``impl`` for the mesh's TPU, every operand
  replicated; returns the executable.

  Args:
    op: a :class:`specs.Variant`, or an op name of :data:`specs.OPS` for
      its plain call.
  """
  v = op if isinstance(op, specs.Variant) else specs.Variant(op)
  sharding = NamedSharding(mesh, PartitionSpec())
  return compile_fn(specs.program(impl, v, dtype),
                    specs.arguments(v, rows, hidden, dtype, sharding), mesh)


def chip(mesh) -> tpu_config.Chip:
  """The TPU core the kernels see when traced for ``mesh``."""
  with jax.set_mesh(mesh):
    return tpu_config.detect_chip()


def block_text(kernel, v: specs.Variant, rows: int, hidden: int, dtype,
               target: tpu_config.Chip) -> str:
  """The kernel's block for ``v`` on ``target``: ``"rows"`` per grid step,
  or ``"rows x lanes (2-pass)"``."""
  return kernel.blocking(v.op, rows, hidden, specs.streamed_dtypes(v, dtype),
                         chip=target, heads=v.heads,
                         has_bias=v.bias).describe()


@dataclasses.dataclass
class Row:
  """One (generation, shape, dtype, op): the kernel and the XLA program.

  Attributes:
    gen, shape, dtype: where and on what it was compiled (dtype a NumPy
      dtype name).
    op: the program, :attr:`specs.Variant.name` (e.g. ``"forward +bias"``).
    compiled: whether the ``pallas_tpu`` program compiled.
    declined: the kernel's reason for not serving this call (then ``"auto"``
      uses XLA and nothing is compiled); empty when it serves it.
    block: the kernel's block (see :func:`block_text`), ``"-"`` if none.
    kernel_bytes, xla_bytes: HBM bytes of the compiled programs (None when
      not compiled).
    xla_compiled: None when the XLA program was not tried (``xla=False``).
    min_bytes: the op's least traffic (:func:`specs.min_bytes`).
    bandwidth: the device's HBM bytes/s (:func:`specs.device_bandwidth`).
    vmem_bytes: the core's VMEM as the kernels see it.
    seconds: compile time of the row.
    error: the first line of the first compile error, else empty.
  """

  gen: str
  shape: tuple[int, int]
  dtype: str
  op: str
  compiled: bool
  declined: str
  block: str
  kernel_bytes: int | None
  xla_compiled: bool | None
  xla_bytes: int | None
  min_bytes: int
  bandwidth: float
  vmem_bytes: int
  seconds: float
  error: str = ""

  @property
  def ok(self) -> bool:
    """Nothing that was tried failed (a declined kernel is not a failure)."""
    kernel_ok = self.compiled or bool(self.declined)
    return kernel_ok and self.xla_compiled is not False


def _error_text(e: Exception) -> str:
  """The first line that says what went wrong (Mosaic puts it after a
  generic first line), at most 300 characters."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  text = lines[0]
  if len(lines) > 1 and text.rstrip().endswith(":"):
    text += " " + lines[1]
  return text[:300]


@functools.lru_cache(maxsize=None)
def _target(gen: str):
  mesh = single_device_mesh(gen)
  device = mesh.devices.flat[0]
  return mesh, chip(mesh), specs.device_bandwidth(gen, device)


def compile_row(gen: str, shape: tuple[int, int], dtype, v: specs.Variant,
                xla: bool = True) -> Row:
  """Compiles one program of the kernel (and of XLA) for ``gen``; a compile
  error goes into the row rather than being raised."""
  mesh, target, bandwidth = _target(gen)
  rows, hidden = shape
  dtype = np.dtype(dtype)
  kernel = PallasTpu()
  t0 = time.perf_counter()
  error, block, kbytes, compiled = "", "-", None, False
  # Inside the mesh, so that a reason that depends on the chip (VMEM) is
  # the target's.
  with jax.set_mesh(mesh):
    declined = kernel.cannot_serve(specs.call(v, rows, hidden, dtype)) or ""
  if not declined:
    try:
      c = compile_one(kernel, v, rows, hidden, dtype, mesh)
      kbytes, compiled = hlo.hbm_bytes(c.as_text()), True
      block = block_text(kernel, v, rows, hidden, dtype, target)
    except Exception as e:  # Recorded in the row; the sweep goes on.
      error = _error_text(e)
  xbytes, xok = None, None
  if xla:
    try:
      cx = compile_one(base.Xla(), v, rows, hidden, dtype, mesh)
      xbytes, xok = hlo.hbm_bytes(cx.as_text()), True
    except Exception as e:
      xok = False
      error = error or "xla: " + _error_text(e)
  return Row(gen, (rows, hidden), dtype.name, v.name, compiled, declined,
             block, kbytes, xok, xbytes,
             specs.min_bytes(v, rows, hidden, dtype), bandwidth,
             target.vmem_bytes, time.perf_counter() - t0, error)


def _compile_unit(unit) -> list[Row]:
  programs, xla = unit
  return [compile_row(*p, xla=xla) for p in programs]


def sweep(gens=specs.GENERATIONS, shape_list=None, dtypes=None,
          ops=specs.OPS, features=True, quick=False, xla=True, jobs=1,
          log=print):
  """Compiles every program of :func:`specs.plan`; returns :class:`Row` s.

  Args:
    gens: topology names for ``jax.experimental.topologies``.
    shape_list, dtypes, ops, features, quick: select the programs, see
      :func:`specs.plan`.
    xla: also compile the XLA implementation, for the comparison columns.
    jobs: processes compiling at once (each loads libtpu); 1 compiles here.
    log: called with one line of text per row, in plan order.

  Compile errors are recorded in the row (``compiled`` False, ``error``),
  not raised, so one failure does not hide the others.

  Raises:
    ValueError: an unknown op or generation family, jobs < 1.
  """
  unknown = [op for op in ops if op not in specs.OPS]
  if unknown:
    raise ValueError(f"ops must be among {', '.join(specs.OPS)}; got "
                     f"{', '.join(unknown)}")
  for gen in gens:
    specs.family(gen)
  if jobs < 1:
    raise ValueError(f"jobs must be >= 1; got {jobs}")
  programs = specs.plan(gens, shape_list, dtypes, ops, features, quick)
  # One unit per (generation, shape): enough units to balance the jobs,
  # few enough that each job reuses its topology and caches.
  units: dict = {}
  for p in programs:
    units.setdefault(p[:2], []).append(p)
  work = [(u, xla) for u in units.values()]
  out: list[Row] = []
  if jobs == 1:
    results = map(_compile_unit, work)
    executor = None
  else:
    # spawn: the workers load libtpu afresh rather than inherit this
    # process's state.
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    results = executor.map(_compile_unit, work)
  try:
    for rows in results:
      for r in rows:
        log(line(r))
      out.extend(rows)
  finally:
    if executor is not None:
      executor.shutdown()
  return out


def line(r: Row) -> str:
  """One row as a log line."""
  def ratio(b):
    return "-" if b is None else f"{b / r.min_bytes:.2f}x"
  state = ("yes" if r.compiled else "declined" if r.declined else "NO")
  xla = "" if r.xla_compiled is None else f" xla={ratio(r.xla_bytes)}"
  tail = (f"  ERROR {r.error}" if r.error else
          f"  ({r.declined})" if r.declined else "")
  return (f"{r.gen:12s} {r.shape[0]:>6d}x{r.shape[1]:<6d} {r.dtype:9s} "
          f"{r.op:34s} {state:8s} block={r.block:18s} "
          f"kernel={ratio(r.kernel_bytes)}{xla}  {r.seconds:.1f}s{tail}")
