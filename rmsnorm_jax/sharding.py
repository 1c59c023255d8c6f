"""Running implementations on sharded arrays without hidden gathers.

A ``pallas_call`` is opaque to XLA's SPMD partitioner, which would gather a
sharded operand onto every device before running it. ``execute`` therefore
runs each implementation call per shard. With Explicit mesh axes the sharding
is part of x's type, so the call is wrapped in ``shard_map`` when traced; with
Auto axes (jit and NamedSharding-placed arrays) it is wrapped in
``custom_partitioning``, whose rule reads the operands' shardings when the
program is partitioned. Either way each device runs

- leading (batch/sequence) dims sharded: the implementation on the local rows
  (the kernel, per shard); ``dscale`` is summed over those mesh axes;
- the hidden (last) dim sharded: ``HiddenShardedXla`` on the local slice, which
  all-reduces one float32 scalar per row (the sum of squares; in the backward,
  the row's ``sum(g * x_hat)``). A row split across devices needs its global
  statistics before any output can be written, so this path is two passes
  over x; XLA's fused elementwise passes run at the memory roofline for them.

``HiddenShardedXla`` is also what ``rms_norm(..., axis_name=...)`` uses inside
``shard_map``. Plans that use XLA on every platform skip custom_partitioning:
XLA partitions its own ops. ``partitioning(False)`` (or the environment
variable ``RMSNORM_JAX_PARTITIONING=0``) turns the wrapper off, e.g. for
``jax.export`` of a program with multi-device shardings, which cannot
serialize the partitioning callback.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import string
from typing import ClassVar

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rmsnorm_jax import base
from rmsnorm_jax import dispatch

ENV_VAR = "RMSNORM_JAX_PARTITIONING"
_enabled: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rmsnorm_jax_partitioning", default=None)


@contextlib.contextmanager
def partitioning(enabled: bool):
  """Within the block, turn the sharding-aware wrapper on or off."""
  if not isinstance(enabled, bool):
    raise TypeError(f"partitioning(enabled) takes a bool; got {enabled!r}.")
  token = _enabled.set(enabled)
  try:
    yield
  finally:
    _enabled.reset(token)


def partitioning_enabled() -> bool:
  value = _enabled.get()
  if value is None:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in (
        "0", "false", "no", "off")
  return value


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class HiddenShardedXla(base.Implementation):
  """XLA math for x whose hidden dim is split over the mesh axes ``axis_names``.

  Runs on the local slice inside shard_map (or a partitioned program): the
  per-row statistics are all-reduced over ``axis_names``; dscale stays the
  local slice's (scale is split the same way as the hidden dim).
  """

  name: ClassVar[str] = "xla_hidden_sharded"
  platforms: ClassVar[tuple[str, ...]] = dispatch.ALL_PLATFORMS
  axis_names: tuple[str, ...] = ()

  def _global_hidden(self, local):
    return local * jax.lax.psum(1, self.axis_names)

  def forward(self, x, scale, *, eps, scale_offset, out_dtype):
    xf = base.upcast(x)
    ss = jax.lax.psum(jnp.sum(xf * xf, axis=-1), self.axis_names)
    rstd = jax.lax.rsqrt(ss / self._global_hidden(x.shape[-1])
                         + jnp.asarray(eps, xf.dtype))
    w = base.effective_scale(scale, scale_offset, x.shape[-1], xf.dtype)
    return (xf * rstd[:, None] * w).astype(out_dtype), rstd

  def backward(self, x, scale, rstd, dy, *, scale_offset):
    xf, dyf = base.upcast(x), base.upcast(dy)
    r = rstd[:, None]
    w = base.effective_scale(scale, scale_offset, x.shape[-1], xf.dtype)
    g = dyf * w
    xhat = xf * r
    dot = jax.lax.psum(jnp.sum(g * xhat, axis=-1, keepdims=True),
                       self.axis_names)
    dx = r * (g - xhat * (dot / self._global_hidden(x.shape[-1])))
    dscale = None if scale is None else jnp.sum(dyf * xhat, axis=0)
    return dx.astype(x.dtype), dscale


def _varying_axes(a) -> frozenset:
  """Mesh axes over which ``a`` varies inside shard_map (empty elsewhere)."""
  aval = jax.typeof(a)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", None)
  return frozenset(vma or ())


def sum_like(grad, primal):
  """Sums ``grad`` over the mesh axes where it varies but ``primal`` does not.

  Inside ``shard_map`` (check_vma), a scale replicated over a data axis is
  implicitly broadcast to every shard of x; its gradient is the sum of the
  shards' contributions, which the custom_vjp must return itself.
  """
  extra = _varying_axes(grad) - _varying_axes(primal)
  return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def hidden_sharded_plan(axis_names) -> dispatch.Plan:
  impl = HiddenShardedXla(tuple(axis_names))
  return dispatch.Plan("axis_name", tuple(
      (p, impl) for p in dispatch.ALL_PLATFORMS))


# Per method: which operands are full-size (like x), per-row (like rstd) or
# per-feature (like scale), and the same for the results.
_SIGNATURES = {
    "forward": (("x", "scale"), ("x", "row")),
    "backward": (("x", "scale", "row", "x"), ("x", "scale")),
    "residual_forward": (("x", "x", "scale"), ("x", "x", "row")),
    "residual_backward": (("x", "scale", "row", "x", "x"), ("x", "scale")),
}


def _local(plan, method, kwargs, has_scale, *args):
  """Flattens to rows, runs the plan's implementation, restores shapes."""
  kinds = _SIGNATURES[method][0]
  args = list(args)
  if not has_scale:
    args.insert(kinds.index("scale"), None)
  lead = args[0].shape[:-1]
  hidden = args[0].shape[-1]
  rows = 1
  for d in lead:
    rows *= d
  flat = [a if k == "scale" else
          a.reshape(rows, hidden) if k == "x" else a.reshape(rows)
          for a, k in zip(args, kinds)]

  outs = plan.call(method, *flat, **kwargs)
  result_kinds = _SIGNATURES[method][1]
  return tuple(
      o if k == "scale" else
      o.reshape(*lead, hidden) if k == "x" else o.reshape(lead)
      for o, k in zip(outs, result_kinds))


def execute(plan: dispatch.Plan, method: str, *args, **kwargs):
  """Calls ``plan``'s ``method`` on N-D operands, partitioned per shard.

  Operands are the method's (see base.Implementation) with x-like arrays of
  shape ``(..., hidden)`` and per-row arrays of shape ``(...)``; scale may be
  None. Returns the method's results in the same N-D layout.
  """
  kinds = _SIGNATURES[method][0]
  has_scale = args[kinds.index("scale")] is not None
  arrays = [a for a, k in zip(args, kinds) if k != "scale" or has_scale]
  key = (plan, method, tuple(sorted(kwargs.items())), has_scale)
  explicit = _explicit_sharding(arrays[0])
  if explicit is not None:
    return _shard_mapped(plan, method, dict(kwargs), has_scale, *explicit,
                         arrays)
  # XLA partitions its own ops; only opaque kernels need the wrapper.
  all_xla = all(type(i) in (base.Xla, HiddenShardedXla)
                for _, i in plan.per_platform)
  # Inside shard_map the operands are already the local shards.
  in_shard_map = bool(jax.sharding.get_abstract_mesh().manual_axes)
  if (all_xla or in_shard_map or arrays[0].ndim < 2 or not plan.partition):
    return _local(plan, method, dict(kwargs), has_scale, *arrays)
  # How many devices the program spans is known when it is lowered: one
  # device needs no partitioning callback, several get custom_partitioning.
  # Except on TPU, where custom_partitioning's placeholder call has no
  # lowering in programs over several devices (jax-ml/jax#38196: "Custom
  # emitter for CustomSPMDPartitioning not found"): there the TPU runs XLA's
  # math, which XLA partitions itself. Explicit mesh axes and shard_map
  # need no callback and keep the kernel on TPU too.
  kw_items = tuple(sorted(kwargs.items()))
  local = _Local(plan, method, kw_items, has_scale)
  wrapper = _batching_wrapper(key, arrays[0].ndim)
  xla = dispatch.Plan(plan.requested,
                      tuple((p, base.Xla()) for p in dispatch.ALL_PLATFORMS))
  fns = {}
  for p, impl in plan.per_platform:
    multi = wrapper
    if p == "tpu" and type(impl) not in (base.Xla, HiddenShardedXla):
      multi = _Local(xla, method, kw_items, has_scale)
    fns[p] = dispatch.MultiDeviceSwitch(single=local, multi=multi)
  return dispatch.per_platform_call(fns, arrays, plan.requested)


@dataclasses.dataclass(frozen=True)
class _Local:
  """``_local`` as a hashable callable (a primitive parameter)."""

  plan: dispatch.Plan
  method: str
  kw_items: tuple
  has_scale: bool

  def __call__(self, *arrays):
    return _local(self.plan, self.method, dict(self.kw_items), self.has_scale,
                  *arrays)


# custom_partitioning has no batching rule, so vmap goes through custom_vmap:
# a batch axis of x-like operands is just one more leading dim. Where each
# batch element has its own scale or needs its own dscale, the unpartitioned
# call is vmapped instead (pallas_call batches by adding a grid axis).
_wrappers: dict = {}


def _batching_wrapper(key, ndim):
  cache_key = (key, ndim)
  if cache_key in _wrappers:
    return _wrappers[cache_key]
  plan, method, kw_items, has_scale = key
  kwargs = dict(kw_items)
  kinds = [k for k in _SIGNATURES[method][0] if k != "scale" or has_scale]
  partitioned = _partitioned(key, ndim)

  @jax.custom_batching.custom_vmap
  def call(*arrays):
    return partitioned(*arrays)

  @call.def_vmap
  def _rule(axis_size, in_batched, *arrays):
    scale_batched = any(b for b, k in zip(in_batched, kinds) if k == "scale")
    # Folding the batch axis into the rows would sum dscale over it, but
    # vmap wants one dscale per batch element.
    per_element_dscale = has_scale and "scale" in _SIGNATURES[method][1]
    if scale_batched or per_element_dscale:
      in_axes = [0 if b else None for b in in_batched]
      outs = jax.vmap(lambda *a: _local(plan, method, kwargs, has_scale, *a),
                      in_axes=in_axes)(*arrays)
      return tuple(outs), (True,) * len(outs)
    full = [a if b or k == "scale" else
            jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b, k in zip(arrays, in_batched, kinds)]
    outs = _batching_wrapper(key, ndim + 1)(*full)
    return tuple(outs), tuple(k != "scale" for k in _SIGNATURES[method][1])

  _wrappers[cache_key] = call
  return call


def _specs_by_kind(spec, ndim):
  """PartitionSpecs of each operand kind given x's spec, and the axes used."""
  spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  lead, hid = spec[:-1], spec[-1]
  by_kind = {"x": P(*lead, hid), "row": P(*lead), "scale": P(hid)}
  row_axes = tuple(a for e in lead for a in _axes(e))
  return by_kind, row_axes, _axes(hid)


def _per_shard(plan, method, kwargs, has_scale, row_axes, hidden_axes,
               *arrays):
  """One device's share: its local rows (and hidden slice)."""
  local_plan = hidden_sharded_plan(hidden_axes) if hidden_axes else plan
  outs = _local(local_plan, method, kwargs, has_scale, *arrays)
  result_kinds = _SIGNATURES[method][1]
  if "scale" in result_kinds and has_scale and row_axes:
    i = result_kinds.index("scale")
    outs = tuple(jax.lax.psum(o, row_axes) if j == i else o
                 for j, o in enumerate(outs))
  return outs


def _explicit_sharding(x):
  """x's mesh and spec when its type carries an Explicit-axes sharding."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names:
    return None
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  used = {a for e in sharding.spec for a in _axes(e)}
  if not used or not used <= explicit:
    return None
  return mesh, sharding.spec


def _shard_mapped(plan, method, kwargs, has_scale, mesh, spec, arrays):
  """Explicit sharding is known when tracing: shard_map the call directly."""
  kinds = [k for k in _SIGNATURES[method][0] if k != "scale" or has_scale]
  by_kind, row_axes, hidden_axes = _specs_by_kind(spec, arrays[0].ndim)
  in_specs = tuple(by_kind[k] for k in kinds)
  arrays = [jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s in zip(arrays, in_specs)]
  body = lambda *a: _per_shard(plan, method, kwargs, has_scale, row_axes,
                               hidden_axes, *a)
  # check_vma=False: the body's collectives are written out by hand, and
  # pallas_call outputs carry no varying-axes annotation to check.
  return jax.shard_map(
      body, mesh=mesh, in_specs=in_specs,
      out_specs=tuple(by_kind[k] for k in _SIGNATURES[method][1]),
      check_vma=False)(*arrays)


def _partitioned(key, ndim):
  plan, method, kw_items, has_scale = key
  kwargs = dict(kw_items)
  kinds = [k for k in _SIGNATURES[method][0] if k != "scale" or has_scale]
  result_kinds = _SIGNATURES[method][1]

  @custom_partitioning
  def fn(*arrays):
    return _local(plan, method, kwargs, has_scale, *arrays)

  def specs(mesh, x_sharding):
    spec = x_sharding.spec if isinstance(x_sharding, NamedSharding) else ()
    by_kind, row_axes, hidden_axes = _specs_by_kind(spec, ndim)
    return ({k: NamedSharding(mesh, v) for k, v in by_kind.items()},
            row_axes, hidden_axes)

  def infer(mesh, arg_shapes, result_shape):
    by_kind, _, _ = specs(mesh, arg_shapes[0].sharding)
    return tuple(by_kind[k] for k in result_kinds)

  def partition(mesh, arg_shapes, result_shape):
    by_kind, row_axes, hidden_axes = specs(mesh, arg_shapes[0].sharding)
    lower = lambda *a: _per_shard(plan, method, kwargs, has_scale, row_axes,
                                  hidden_axes, *a)
    return (mesh, lower, tuple(by_kind[k] for k in result_kinds),
            tuple(by_kind[k] for k in kinds))

  letters = [c for c in string.ascii_lowercase if c != "h"][:ndim - 1]
  factor = {"x": " ".join(letters + ["h"]), "row": " ".join(letters),
            "scale": "h"}
  rule = (", ".join(factor[k] for k in kinds) + " -> "
          + ", ".join(factor[k] for k in result_kinds))
  fn.def_partition(partition, infer_sharding_from_operands=infer,
                   sharding_rule=rule)
  return fn
