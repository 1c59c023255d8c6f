"""Backend selection, resolved when the computation is lowered for a platform.

``backend="auto"`` does not look at ``jax.default_backend()``: it stages every
candidate with ``jax.lax.platform_dependent`` and the lowering for a platform
keeps exactly one, so ``jax.export(..., platforms=["cpu", "cuda", "tpu"])``
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
from typing import Any, Callable, Union

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

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

  def call(self, method: str, out_shapes: Callable[[], Any], *args, **kwargs):
    """Calls ``impl.method(*args, **kwargs)`` for the lowering platform."""
    impls = dict(self.per_platform)
    distinct = set(impls.values())
    if len(distinct) == 1 and set(impls) == set(ALL_PLATFORMS):
      return getattr(distinct.pop(), method)(*args, **kwargs)
    branches = {}
    for platform in ALL_PLATFORMS:
      impl = impls.get(platform)
      if impl is None:
        branches[platform] = _unavailable(self.requested, platform, out_shapes)
      else:
        branches[platform] = _bound(impl, method, kwargs)
    return jax.lax.platform_dependent(*args, **branches)


# Branch callables are cached so that platform_dependent sees the same object
# for platforms sharing an implementation and emits one branch for them.
_bound_cache: dict = {}


def _bound(impl, method, kwargs):
  key = (impl, method, tuple(sorted(kwargs.items())))
  if key not in _bound_cache:
    fn = getattr(impl, method)
    _bound_cache[key] = lambda *a: fn(*a, **kwargs)
  return _bound_cache[key]


def _unavailable(requested, platform, out_shapes):
  def branch(*args):
    del args
    shapes = jax.tree.leaves(out_shapes())
    outs = _unavailable_p.bind(
        message=(f"rmsnorm_jax: backend={requested!r} has no implementation "
                 f"for platform {platform!r}. Use backend='auto' or 'xla', "
                 f"or run on a platform the backend supports."),
        avals=tuple((s.shape, s.dtype) for s in shapes))
    return jax.tree.unflatten(jax.tree.structure(out_shapes()), outs)
  return branch


_unavailable_p = jex_core.Primitive("rmsnorm_jax_unavailable")
_unavailable_p.multiple_results = True
_unavailable_p.def_abstract_eval(
    lambda *, message, avals: [jax.core.ShapedArray(s, d) for s, d in avals])


def _raise_unavailable(*args, message, avals):
  del args, avals
  raise ValueError(message)


_unavailable_p.def_impl(_raise_unavailable)
mlir.register_lowering(
    _unavailable_p, lambda ctx, *a, message, avals: _raise_unavailable(
        message=message, avals=avals))


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
