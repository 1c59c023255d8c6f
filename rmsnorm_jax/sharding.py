"""Sharded operands: the layer between the public functions and dispatch.

A ``pallas_call`` is opaque to XLA's SPMD partitioner, which would gather a
sharded operand onto every device before running it. So every op runs per
shard:

- Explicit mesh axes: the sharding is part of x's type, so ``run`` wraps the
  call in ``shard_map`` when it is traced;
- Auto mesh axes (jit with NamedSharding-placed arrays): the sharding is
  known only when the program is partitioned, so ``partition.py`` wraps the
  lowered implementation in ``custom_partitioning`` (see there);
- inside ``shard_map``, ``axis_name=`` names the mesh axes that split the
  hidden dim: XLA's math with the per-row sums all-reduced over them.

Either way each device runs its rows (leading dims sharded; dscale and dbias
summed over those mesh axes) or its hidden slice (one float32 all-reduce per
row, in the backward one more). ``partitioning(False)`` (or the environment
variable ``RMSNORM_JAX_PARTITIONING=0``) turns the Auto-axes wrapper off, e.g.
for ``jax.export`` of a program with multi-device shardings, which cannot
serialize the partitioning callback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax
from jax.sharding import NamedSharding

from rmsnorm_jax import base
from rmsnorm_jax import dispatch
from rmsnorm_jax import ops
from rmsnorm_jax import partition

ENV_VAR = "RMSNORM_JAX_PARTITIONING"
_enabled: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rmsnorm_jax_partitioning", default=None)


@contextlib.contextmanager
def partitioning(enabled: bool):
  """Within the block, turn the Auto-axes per-shard wrapper on or off.

  Raises:
    TypeError: ``enabled`` is not a bool.
  """
  if not isinstance(enabled, bool):
    raise TypeError(f"partitioning(enabled) takes a bool; got {enabled!r}.")
  token = _enabled.set(enabled)
  try:
    yield
  finally:
    _enabled.reset(token)


def partitioning_enabled() -> bool:
  """Whether multi-device Auto-axes programs run the op per shard."""
  value = _enabled.get()
  if value is None:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in (
        "0", "false", "no", "off")
  return value


def hidden_sharded_route(axis_names) -> dispatch.Route:
  """XLA's math with per-row sums all-reduced over ``axis_names``."""
  impl = base.Xla(tuple(axis_names))
  return dispatch.Route("axis_name", tuple((p, impl) for p in base.PLATFORMS))


def run(rte: dispatch.Route, op: str, norm: base.Norm, operands):
  """Runs ``op`` on N-D operands (``ops.SIGNATURES``) per shard.

  Returns the op's results in the same N-D layout, None where absent.
  """
  return _run(rte, op, norm, partitioning_enabled(), tuple(operands))


# Jitted so that an eager call (outside jit) compiles the op once per shape,
# as one program, where each of its primitives would otherwise dispatch and
# compile alone; under jit it is one more nested call. ``partitioned`` is a
# static argument because it is read from a context variable, which a jit
# cache would not see.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run(rte, op, norm, partitioned, operands):
  x = operands[0]
  explicit = _explicit_sharding(x)
  if explicit is None or rte.requested == "axis_name":
    return dispatch.call(rte, op, norm, operands, partitioned=partitioned)
  mesh, spec = explicit
  present = tuple(a is not None for a in operands)
  arrays = [a for a in operands if a is not None]
  kinds = ops.operand_kinds(op, present)
  result_kinds = ops.result_kinds(op, present)
  scale = operands[[n for n, _ in ops.SIGNATURES[op][0]].index("scale")]
  per_head = scale is not None and scale.ndim == 2
  by_kind, row_axes, head_axes, hidden_axes = partition.specs_by_kind(
      spec, x.ndim, per_head)
  local_route = hidden_sharded_route(hidden_axes) if hidden_axes else rte
  in_specs = tuple(by_kind[k] for k in kinds)
  arrays = [jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s in zip(arrays, in_specs)]

  def body(*local):
    it = iter(local)
    outs = dispatch.call(local_route, op, norm,
                         [next(it) if p else None for p in present])
    outs = [o for o in outs if o is not None]
    return tuple(partition.sum_partials(outs, result_kinds, row_axes,
                                        head_axes))

  # check_vma=False: the body's collectives are written out by hand, and
  # pallas_call outputs carry no varying-axes annotation to check.
  outs = jax.shard_map(
      body, mesh=mesh, in_specs=in_specs,
      out_specs=tuple(by_kind[k] for k in result_kinds),
      check_vma=False)(*arrays)
  return ops.unflatten_results(op, present, outs)


def _explicit_sharding(x):
  """x's mesh and spec when its type carries an Explicit-axes sharding."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names:
    return None
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  used = {a for e in sharding.spec for a in partition.axes_of(e)}
  if not used or not used <= explicit:
    return None
  return mesh, sharding.spec


def sum_like(grad, primal):
  """Sums ``grad`` over the mesh axes where it varies but ``primal`` does not.

  Inside ``shard_map`` (check_vma), a scale replicated over a data axis is
  implicitly broadcast to every shard of x; its gradient is the sum of the
  shards' contributions, which the custom_vjp must return itself.
  """
  extra = (ops.varying_axes(jax.typeof(grad))
           - ops.varying_axes(jax.typeof(primal)))
  return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad
