"""Choosing an implementation per platform, and the one primitive that runs it.

``route`` turns a ``backend=`` argument and a ``base.Call`` into a ``Route``:
which implementation each lowering platform gets, and why "auto" passed a
kernel over. ``call`` binds one primitive whose lowering keeps exactly the
platform's implementation (like ``jax.lax.platform_dependent``, but a branch
is lowered only for its own platform, so a multi-platform ``jax.export``
carries a Pallas kernel for its platform and XLA's math for the others).

At lowering the program's device count is known: one device lowers the
implementation directly; several go through ``partition.py`` so that each
device runs the implementation on its shard.

An explicitly named backend that cannot serve a call raises when traced,
with the implementation's reason; one with nothing for the platform being
lowered raises at lowering. Neither ever falls back silently.

Debugging override: ``RMSNORM_JAX_BACKEND=xla`` in the environment, or the
``force_backend("xla")`` context manager, replaces ``"auto"`` (explicit
``backend=`` arguments still win). Both are read when a function is traced,
so they do not affect functions jit has already compiled.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Union

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
# lower_per_platform is what platform_dependent and pallas_call themselves
# lower through; it has no public alias.
from jax._src.interpreters import mlir as _mlir_internal
# Which primitives need the device assignment at lowering (no public alias).
from jax._src import dispatch as _jax_dispatch
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax import kernels
from rmsnorm_jax import ops
from rmsnorm_jax import partition

ENV_VAR = "RMSNORM_JAX_BACKEND"
Backend = Union[str, base.Implementation]

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rmsnorm_jax_forced_backend", default=None)


def backend_names() -> tuple[str, ...]:
  """Every string accepted as ``backend=``."""
  return ("auto", "xla", "pallas") + tuple(sorted(kernels.BY_NAME))


@contextlib.contextmanager
def force_backend(name: str | None):
  """Within the block, ``backend="auto"`` means ``name`` (None: no override).

  Raises:
    ValueError: ``name`` is not one of ``backend_names()``.
  """
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
class Route:
  """Which implementation runs on each lowering platform (hashable).

  Attributes:
    requested: the ``backend=`` argument as the user spelled it.
    per_platform: ``(platform, implementation)`` pairs.
    notes: ``(platform, reasons)`` for each platform where "auto" (or
      "pallas") passed one of the platform's kernels over, each reason
      prefixed with the kernel's name.
  """

  requested: str
  per_platform: tuple[tuple[str, base.Implementation], ...]
  notes: tuple[tuple[str, str], ...] = ()

  def impl(self, platform: str) -> base.Implementation | None:
    return dict(self.per_platform).get(platform)

  def describe(self, platform: str) -> str:
    """``"pallas_gpu"``, or ``"xla (pallas_gpu: <reason>)"``, for a platform."""
    impl = self.impl(platform)
    if impl is None:
      return f"none (backend={self.requested!r} has nothing for {platform})"
    note = dict(self.notes).get(platform)
    return impl.name + (f" ({note})" if note else "")


def route(backend: Backend, call: base.Call) -> Route:
  """Turns a ``backend=`` argument into a Route for ``call``.

  Raises:
    ValueError: unknown backend name, or an explicit kernel that cannot
      serve the call (the message gives its reason).
  """
  if isinstance(backend, base.Implementation):
    _serves_or_raise(backend, call)
    return Route(backend.name, tuple(
        (p, backend) for p in backend.lowering_platforms()))
  _check_name(backend, "backend")
  if backend == "auto":
    forced = _forced.get() or os.environ.get(ENV_VAR) or None
    if forced is not None and forced != "auto":
      _check_name(forced, f"the {ENV_VAR} environment variable or "
                  "force_backend")
      return route(forced, call)
  xla = base.Xla()
  if backend == "xla":
    return Route("xla", tuple((p, xla) for p in base.PLATFORMS))
  if backend in kernels.BY_NAME:
    impl = kernels.BY_NAME[backend]()
    _serves_or_raise(impl, call)
    return Route(backend, tuple((p, impl) for p in impl.lowering_platforms()))
  per_platform, notes = [], []
  for platform in base.PLATFORMS:
    classes = kernels.BY_PLATFORM.get(platform, ())
    if not classes:
      if backend == "auto":
        per_platform.append((platform, xla))
      continue
    chosen, serving, reasons = _first_kernel(classes, call)
    if backend == "pallas":
      # The kernel regardless of XLA's speed: the first one not declined,
      # else the first that serves.
      chosen = chosen or serving
      if chosen is None:
        raise ValueError(
            f"backend='pallas' on {platform} has no kernel that can serve "
            f"this call: {'; '.join(reasons)}.")
    per_platform.append((platform, chosen or xla))
    if reasons and (chosen is None or backend == "auto"):
      notes.append((platform, "; ".join(reasons)))
  return Route(backend, tuple(per_platform), tuple(notes))


def _first_kernel(classes, call):
  """(first kernel serving and not declining, first serving, reasons of
  the kernels passed over before the chosen one)."""
  serving, reasons = None, []
  for cls in classes:
    kernel = cls()
    seen = call.seen_by(kernel)
    reason = kernel.cannot_serve(seen)
    if reason is None:
      serving = serving or kernel
      reason = kernel.auto_declines(seen)
      if reason is None:
        return kernel, serving, reasons
    reasons.append(f"{kernel.name}: {reason}")
  return None, serving, reasons


def _serves_or_raise(impl: base.Implementation, call: base.Call):
  reason = impl.cannot_serve(call.seen_by(impl))
  if reason is not None:
    raise ValueError(f"backend={impl.name!r} cannot serve this call: "
                     f"{reason.rstrip('.')}. Use backend='auto' or 'xla'.")


def explain(backend: Backend = "auto", *, platform: str, shape, dtype,
            op: str = "forward", scale_dtype=None, **norm_args) -> str:
  """What ``backend`` runs for an input of ``shape``/``dtype`` on ``platform``.

  Returns e.g. ``"pallas_gpu"`` or ``"xla (pallas_gpu: ...reason...)"``.
  ``scale_dtype`` is the scale's dtype (default x's; float32 parameters
  route differently on some GPU shapes); ``norm_args`` are ``base.Norm``
  fields (eps, cast_mode, out_dtype, ...; out_dtype defaults to x's).
  """
  rows = int(np.prod(shape[:-1], dtype=np.int64))
  norm = base.Norm(**{"eps": 1e-6, "out_dtype": np.dtype(dtype),
                      **norm_args})
  call = base.Call(op, rows, int(shape[-1]), np.dtype(dtype), (shape[-1],),
                   False, norm, scale_dtype=np.dtype(scale_dtype or dtype))
  return route(backend, call).describe(platform)


# ------------------------------------------------------------ the primitive --

def call(rte: Route, op: str, norm: base.Norm, operands, *,
         partitioned: bool = True):
  """Runs ``op`` (see ``ops.SIGNATURES``) on N-D operands, per platform.

  ``operands`` follow the op's signature, ``None`` for absent optional ones;
  the results come back the same way. ``partitioned``: multi-device
  programs run the implementation per shard (``partition.py``); off, the
  implementation sees the global arrays and XLA partitions around it.
  """
  present = tuple(a is not None for a in operands)
  arrays = [a for a in operands if a is not None]
  impls = {impl for _, impl in rte.per_platform}
  if (len(impls) == 1 and type(next(iter(impls))) is base.Xla
      and len(rte.per_platform) == len(base.PLATFORMS)):
    # XLA's math everywhere: traced in place, so XLA partitions it, vmap
    # batches it (named axes included) and no custom primitive is left in
    # the program.
    outs = partition.Local(next(iter(impls)), op, norm, present)(*arrays)
    return ops.unflatten_results(op, present, outs)
  outs = _call_p.bind(*arrays, route=rte, op=op, norm=norm, present=present,
                      partitioned=partitioned, nvmap=0)
  return ops.unflatten_results(op, present, outs)


# jax evaluates the primitive's results wherever it checks a jaxpr (with
# jax_enable_checks, again while lowering, outside the public functions and
# under the caller's settings): the result dtypes must not depend on the
# caller's promotion rules (strict promotion raised there).
@base.with_own_promotion_rules
def _abstract_eval(*avals, route, op, norm, present, partitioned, nvmap):
  del route, partitioned, nvmap
  return ops.result_avals(op, norm, present, avals)


def _impl(*args, **params):
  return jax.jit(lambda *a: _call_p.bind(*a, **params))(*args)


def _lowering(ctx, *args, route, op, norm, present, partitioned, nvmap):
  rules = {}
  for platform, impl in route.per_platform:
    fn = partition.lowering_body(ctx, platform, impl, op, norm, present,
                                 nvmap, partitioned=partitioned)
    rules[platform] = mlir.lower_fun(fn, multiple_results=True)

  def unavailable(ctx, *args):
    platforms = _mlir_internal._platforms_for_eqn(ctx)  # pylint: disable=protected-access
    raise ValueError(
        f"rmsnorm_jax: backend={route.requested!r} has no implementation for "
        f"platform {', '.join(repr(p) for p in platforms)}. Use "
        "backend='auto' or 'xla', or run on a platform the backend supports.")

  return _mlir_internal.lower_per_platform(
      ctx, f"rmsnorm_jax {op} backend={route.requested}", rules, unavailable,
      set(), *args)


def _batching_rule(args, dims, *, route, op, norm, present, partitioned,
                   nvmap):
  """vmap: a batch axis of x-like operands is one more leading dim.

  Where each batch element needs its own per-feature operand or result
  (a batched scale, or dscale/dbias, which would otherwise be summed over
  the batch), every operand gets the batch axis in front and the
  implementation is vmapped at lowering (a pallas_call batches by adding a
  grid axis).
  """
  kinds = ops.operand_kinds(op, present)
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  per_element = (nvmap > 0 or any(
      d is not None for d, k in zip(dims, kinds) if k in ops.FEATURE_KINDS)
      or ops.has_feature_results(op, present))
  if per_element:
    args = [jax.numpy.broadcast_to(a, (size, *a.shape)) if d is None
            else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    outs = _call_p.bind(*args, route=route, op=op, norm=norm,
                        present=present, partitioned=partitioned,
                        nvmap=nvmap + 1)
    return outs, [0] * len(outs)
  args = [jax.numpy.moveaxis(a, d, 0) if d is not None else
          (jax.numpy.broadcast_to(a, (size, *a.shape)) if k in ops.ROW_KINDS
           else a)
          for a, d, k in zip(args, dims, kinds)]
  outs = _call_p.bind(*args, route=route, op=op, norm=norm, present=present,
                      partitioned=partitioned, nvmap=nvmap)
  return outs, [0 if k in ops.ROW_KINDS else None
                for k in ops.result_kinds(op, present)]


def _jvp_rule(primals, tangents, *, route, op, norm, present, partitioned,
              nvmap):
  """The op's forward-mode derivative: results from the route's own
  implementation, tangents from ``jax.jvp`` of XLA's math of the same op.

  The public functions attach their first-order backward with custom_vjp,
  so this rule is reached by a second differentiation: grad of grad,
  ``jax.hessian``, forward mode over a gradient. It differentiates the
  forward and backward ops alike (the backward as a function of its saved
  residuals and cotangent), in the float32 arithmetic of ``base.Xla``,
  which the kernels are tested to match.
  """
  params = dict(route=route, op=op, norm=norm, present=present,
                partitioned=partitioned, nvmap=nvmap)
  outs = _call_p.bind(*primals, **params)
  reference = partition.Local(base.Xla(), op, norm, present, nvmap)
  _, tangents_out = jax.jvp(
      reference, tuple(primals),
      tuple(ad.instantiate_zeros(t) for t in tangents))
  return outs, list(tangents_out)


_call_p = jex_core.Primitive("rmsnorm_jax")
_call_p.multiple_results = True
_call_p.def_abstract_eval(_abstract_eval)
_call_p.def_impl(_impl)
mlir.register_lowering(_call_p, _lowering)
batching.primitive_batchers[_call_p] = _batching_rule
ad.primitive_jvps[_call_p] = _jvp_rule
# jit lowers without the device assignment unless a primitive asks for it;
# the multi-device path (custom_partitioning) needs it.
_jax_dispatch.prim_requires_devices_during_lowering.add(_call_p)
