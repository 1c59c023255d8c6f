"""Backend selection, resolved when the computation is lowered for a platform.

``backend="auto"`` does not look at ``jax.default_backend()``: it stages every
candidate in one primitive whose lowering keeps exactly the one for the
platform being lowered (like ``jax.lax.platform_dependent``), so ``jax.export(..., platforms=["cpu", "cuda", "tpu"])``
carries the right implementation for each platform and the compiler never sees
a conditional.

An explicitly named backend that has nothing for the platform being lowered
fails at lowering time with an error naming the backend and the platform; it
never falls back silently.

Debugging override: ``RMSNORM_JAX_BACKEND=xla`` in the environment, or the
``force_backend("xla")`` context manager, replaces ``"auto"`` (explicit
``backend=`` arguments still win). Both are read when a function is traced, so
they do not affect functions jit has already compiled.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Union

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir
# lower_per_platform (in JAX since 0.4.20) is what platform_dependent and
# pallas_call themselves lower through; it has no public alias.
from jax._src.interpreters import mlir as _mlir_internal
# Which primitives need the device assignment at lowering (no public alias).
from jax._src import dispatch as _jax_dispatch

from rmsnorm_jax import base
from rmsnorm_jax import kernels

ALL_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ENV_VAR = "RMSNORM_JAX_BACKEND"
Backend = Union[str, base.Implementation]

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rmsnorm_jax_forced_backend", default=None)


def backend_names() -> tuple[str, ...]:
  """Every string accepted as ``backend=``."""
  return ("auto", "xla", "pallas") + tuple(sorted(kernels.BY_NAME))


@contextlib.contextmanager
def force_backend(name: str | None):
  """Within the block, ``backend="auto"`` means ``name`` (None: no override)."""
  if name is not None:
    _check_name(name, "force_backend(name)")
  token = _forced.set(name)
  try:
    yield
  finally:
    _forced.reset(token)


def _check_name(name, what):
  if not isinstance(name, str) or name not in backend_names():
    raise ValueError(
        f"{what} must be one of {backend_names()} or an "
        f"rmsnorm_jax Implementation instance; got {name!r}.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which implementation runs on which lowering platform (hashable)."""

  requested: str
  per_platform: tuple[tuple[str, base.Implementation], ...]
  # Whether sharded operands go through custom_partitioning (sharding.py).
  # Part of the plan so that traces made under either setting stay apart.
  partition: bool = True

  def call(self, method: str, *args, **kwargs):
    """Calls ``impl.method(*args, **kwargs)`` for the lowering platform."""
    impls = dict(self.per_platform)
    distinct = set(impls.values())
    if len(distinct) == 1 and set(impls) == set(ALL_PLATFORMS):
      return getattr(distinct.pop(), method)(*args, **kwargs)
    leaves, in_tree = jax.tree.flatten(args)
    by_impl: dict = {}
    for platform in ALL_PLATFORMS:
      if platform in impls:
        by_impl.setdefault(impls[platform], []).append(platform)
    branches = tuple(
        (tuple(ps), _Branch(impl, method, tuple(sorted(kwargs.items())),
                            in_tree))
        for impl, ps in by_impl.items())
    # Every implementation returns the same structure (None for an absent
    # dscale); an abstract trace of the XLA one gives it without tracing a
    # kernel in the caller's context (e.g. inside shard_map).
    impl = base.Xla()
    out_tree = []

    def reference(*l):
      out = getattr(impl, method)(*jax.tree.unflatten(in_tree, l), **kwargs)
      out_tree.append(jax.tree.structure(out))
      return jax.tree.leaves(out)

    outs = _per_platform_p.bind(
        *leaves, branches=branches, requested=self.requested,
        out_avals=_out_avals(reference, leaves))
    return jax.tree.unflatten(out_tree[0], outs)


def per_platform_call(fns: dict, leaves, requested: str):
  """Binds ``fns[platform](*leaves)`` (each a pytree) to lower per platform.

  A value may be a ``MultiDeviceSwitch``; the program is lowered with its
  device assignment (custom_partitioning needs it). The first function's result (for a
  switch, its ``multi`` one) gives the output structure and types.
  """
  by_fn: dict = {}
  for platform in ALL_PLATFORMS:
    if platform in fns:
      by_fn.setdefault(fns[platform], []).append(platform)
  out_tree = []

  def flat(fn):
    def call(*l):
      out = fn(*l)
      out_tree.append(jax.tree.structure(out))
      return jax.tree.leaves(out)
    return call

  avals = _out_avals(flat(next(iter(by_fn))), leaves)
  branches = tuple((tuple(ps), _FlatBranch(fn)) for fn, ps in by_fn.items())
  outs = _partitioned_p.bind(*leaves, branches=branches, requested=requested,
                             out_avals=avals)
  return jax.tree.unflatten(out_tree[0], outs)


@dataclasses.dataclass(frozen=True)
class MultiDeviceSwitch:
  """A branch that lowers ``single`` in one-device programs, else ``multi``.

  How many devices a jitted program spans is known only when it is lowered.
  Calling the switch (for abstract evaluation) runs ``multi``.
  """

  single: Any
  multi: Any

  def pick(self, ctx):
    ac = ctx.module_context.axis_context
    if hasattr(ac, "num_devices"):  # jit: ShardingContext
      n = ac.num_devices
    elif hasattr(ac, "mesh"):  # shard_map: SPMDAxisContext
      n = ac.mesh.size
    else:
      n = 1
    return self.single if n <= 1 else self.multi

  def __call__(self, *args):
    return self.multi(*args)


@dataclasses.dataclass(frozen=True)
class _FlatBranch:
  fn: Any

  def __call__(self, *leaves):
    return jax.tree.leaves(self.fn(*leaves))

  def pick(self, ctx):
    if isinstance(self.fn, MultiDeviceSwitch):
      return _FlatBranch(self.fn.pick(ctx))
    return self


def _out_avals(fn, args) -> tuple:
  # Full types, including the manual axes a value varies over inside
  # shard_map, which the kernels' outputs share with the XLA reference's.
  return tuple(jax.make_jaxpr(fn)(*args).out_avals)


@dataclasses.dataclass(frozen=True)
class _Branch:
  """One implementation's method on flat operands (hashable primitive param)."""

  impl: base.Implementation
  method: str
  kw_items: tuple
  in_tree: Any

  def __call__(self, *leaves):
    args = jax.tree.unflatten(self.in_tree, leaves)
    out = getattr(self.impl, self.method)(*args, **dict(self.kw_items))
    return jax.tree.leaves(out)


# One primitive per call site rather than lax.platform_dependent: a
# platform_dependent branch is lowered for every platform of a multi-platform
# export, and a pallas_call has no lowering for the others. Here each
# platform's branch is lowered only for that platform (the narrowed
# LoweringRuleContext.platforms that mlir.lower_per_platform passes down).
def _define_primitive(name: str, needs_devices: bool):
  prim = jex_core.Primitive(name)
  prim.multiple_results = True
  prim.def_abstract_eval(
      lambda *args, branches, requested, out_avals: list(out_avals))
  prim.def_impl(lambda *args, **params: jax.jit(
      lambda *a: prim.bind(*a, **params))(*args))
  mlir.register_lowering(prim, _per_platform_lowering)

  def batching_rule(args, dims, *, branches, requested, out_avals):
    del out_avals
    # An unbatched operand has dim None (batching.not_mapped).
    args = [a if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]
    in_axes = tuple(None if d is None else 0 for d in dims)
    vmapped = tuple((ps, _Vmapped(fn, in_axes)) for ps, fn in branches)
    outs = prim.bind(*args, branches=vmapped, requested=requested,
                     out_avals=_out_avals(vmapped[0][1], args))
    return outs, [0] * len(outs)

  batching.primitive_batchers[prim] = batching_rule
  if needs_devices:
    # jit lowers without the device assignment unless a primitive asks for
    # it; custom_partitioning inside a branch needs it (sharding.py), and
    # JAX finds custom_partitioning only at the top level of a jaxpr.
    _jax_dispatch.prim_requires_devices_during_lowering.add(prim)
  return prim


def _per_platform_lowering(ctx, *args, branches, requested, out_avals):
  del out_avals
  rules = {}
  for platforms, fn in branches:
    if hasattr(fn, "pick"):
      fn = fn.pick(ctx)
    rule = mlir.lower_fun(fn, multiple_results=True)
    for p in platforms:
      rules[p] = rule

  def unavailable(ctx, *args):
    platforms = _mlir_internal._platforms_for_eqn(ctx)  # pylint: disable=protected-access
    raise ValueError(
        f"rmsnorm_jax: backend={requested!r} has no implementation for "
        f"platform {', '.join(repr(p) for p in platforms)}. Use "
        "backend='auto' or 'xla', or run on a platform the backend supports.")

  return _mlir_internal.lower_per_platform(
      ctx, f"rmsnorm_jax backend={requested}", rules, unavailable, set(),
      *args)


@dataclasses.dataclass(frozen=True)
class _Vmapped:
  fn: Any
  in_axes: tuple

  def __call__(self, *args):
    return jax.vmap(self.fn, in_axes=self.in_axes)(*args)

  def pick(self, ctx):
    if hasattr(self.fn, "pick"):
      return _Vmapped(self.fn.pick(ctx), self.in_axes)
    return self


_per_platform_p = _define_primitive("rmsnorm_jax_per_platform", False)
_partitioned_p = _define_primitive("rmsnorm_jax_partitioned", True)


def resolve(backend: Backend, *, rows: int, hidden: int, dtype) -> Plan:
  """Turns a ``backend=`` argument into a Plan.

  Raises:
    ValueError: unknown backend name.
  """
  if isinstance(backend, base.Implementation):
    return Plan(backend.name, tuple(
        (p, backend) for p in backend.lowering_platforms()))
  _check_name(backend, "backend")
  if backend == "auto":
    forced = _forced.get() or os.environ.get(ENV_VAR) or None
    if forced is not None and forced != "auto":
      _check_name(forced, f"the {ENV_VAR} environment variable or force_backend")
      return resolve(forced, rows=rows, hidden=hidden, dtype=dtype)
  xla = base.Xla()
  if backend == "xla":
    return Plan("xla", tuple((p, xla) for p in ALL_PLATFORMS))
  if backend in kernels.BY_NAME:
    impl = kernels.BY_NAME[backend]()
    return Plan(backend, tuple((p, impl) for p in impl.lowering_platforms()))
  per_platform = {}
  for platform in ALL_PLATFORMS:
    cls = kernels.BY_PLATFORM.get(platform)
    kernel = None if cls is None else cls()
    if backend == "pallas":
      if kernel is not None:
        per_platform[platform] = kernel
    elif kernel is not None and kernel.preferred_for(rows, hidden, dtype):
      per_platform[platform] = kernel
    else:
      per_platform[platform] = xla
  return Plan(backend, tuple(per_platform.items()))
