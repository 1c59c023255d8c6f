"""Public functions: ``rms_norm`` and ``rms_norm_residual``.

They validate arguments, flatten leading dims to rows, pick an implementation
per lowering platform (``dispatch.py``) and attach the explicit backward pass
through ``jax.custom_vjp``. Saved for the backward: the normalized input (x,
or the updated residual), scale and a per-row float32 ``rstd``; never the
output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import dispatch
from rmsnorm_jax import sharding
from rmsnorm_jax import validation as v

DEFAULT_EPS = 1e-6


def compute_dtype(*dtypes):
  """float32 for half and single precision inputs, float64 for float64."""
  return np.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))


# ---------------------------------------------------------------- rms_norm --

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rms_norm(x, scale, plan, eps, scale_offset, out_dtype):
  return _rms_norm_fwd(x, scale, plan, eps, scale_offset, out_dtype)[0]


def _rms_norm_fwd(x, scale, plan, eps, scale_offset, out_dtype):
  y, rstd = sharding.execute(plan, "forward", x, scale, eps=eps,
                             scale_offset=scale_offset, out_dtype=out_dtype)
  return y, (x, scale, rstd)


def _rms_norm_bwd(plan, eps, scale_offset, out_dtype, res, dy):
  del eps, out_dtype
  x, scale, rstd = res
  dx, dscale = sharding.execute(plan, "backward", x, scale, rstd, dy,
                                scale_offset=scale_offset)
  if scale is None:
    return dx, None
  return dx, sharding.sum_like(dscale, scale).astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _plan(backend, axis_name, **shape_info):
  plan = dispatch.resolve(backend, **shape_info)
  if axis_name is None:
    return dataclasses.replace(plan, partition=sharding.partitioning_enabled())
  if backend not in ("auto", "xla"):
    # A row split over devices needs its all-reduced statistics before any
    # output is written, so this is XLA's two-pass path, never a kernel.
    raise ValueError("axis_name runs the XLA path (statistics all-reduced "
                     "between two passes), so backend must be 'auto' or "
                     f"'xla'; got backend={backend!r}.")
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise TypeError("axis_name must be a mesh axis name or a tuple of names; "
                    f"got {axis_name!r}.")
  return sharding.hidden_sharded_plan(names)


def _check_common(x, scale, eps, scale_offset):
  x = v.floating_array("x", x)
  hidden = x.shape[-1]
  scale = v.scale_for("scale", scale, hidden)
  eps = v.static_float("eps", eps, nonnegative=True)
  scale_offset = v.static_float("scale_offset", scale_offset)
  if scale is None and scale_offset != 0.0:
    raise ValueError(
        "scale_offset applies to scale, so it needs a scale array; got "
        f"scale=None with scale_offset={scale_offset}.")
  return x, scale, eps, scale_offset


def rms_norm(x, scale=None, *, eps: float = DEFAULT_EPS,
             scale_offset: float = 0.0, out_dtype=None,
             backend: dispatch.Backend = "auto", axis_name=None):
  """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * (scale + offset)``.

  Args:
    x: array of shape ``(..., hidden)`` (any number of leading dims, at least
      one dim), dtype float32, bfloat16, float16 (or float64).
    scale: ``None`` (no scaling) or array of shape ``(hidden,)``, any floating
      dtype; it is applied in float32.
    eps: non-negative finite Python float added to the mean square.
    scale_offset: Python float added to scale; ``1.0`` gives Gemma's
      ``(1 + scale)`` parameterization. Needs ``scale``.
    out_dtype: result dtype; default ``x.dtype``.
    backend: ``"auto"`` (the fastest implementation for the platform the
      computation is lowered for), ``"xla"``, ``"pallas"`` (this library's
      kernel for the platform, an error where there is none), a kernel name
      from ``rmsnorm_jax.backend_names()``, or an Implementation instance
      (e.g. a kernel config with its own block size).
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      over which the hidden dim of x (and scale) is split; the per-row
      statistics are all-reduced over it. Under plain ``jax.jit`` with
      sharded arrays this is not needed: the sharding is read from the
      operands.

  Returns:
    Array of ``x.shape`` and ``out_dtype``. Statistics and arithmetic are in
    float32 (float64 for float64 inputs). Differentiable in x and scale
    (reverse mode; forward mode raises JAX's custom_vjp TypeError).

  Raises:
    TypeError: non-floating x/scale, or non-numeric eps/scale_offset/out_dtype.
    ValueError: 0-d x, scale of the wrong shape, eps negative or not finite,
      scale_offset without scale, unknown backend; at lowering time, an
      explicit backend with no implementation for the platform.
  """
  x, scale, eps, scale_offset = _check_common(x, scale, eps, scale_offset)
  out_dtype = v.out_dtype_for(out_dtype, x.dtype)
  hidden = x.shape[-1]
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  plan = _plan(backend, axis_name, rows=rows, hidden=hidden, dtype=x.dtype)
  if rows == 0 or hidden == 0:
    return jnp.zeros(x.shape, out_dtype)
  return _rms_norm(x, scale, plan, eps, scale_offset, out_dtype)


# ------------------------------------------------------- rms_norm_residual --

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _rms_norm_residual(x, residual, scale, plan, eps, scale_offset, out_dtype,
                       x_dtype):
  (y, h), _ = _residual_fwd(x, residual, scale, plan, eps, scale_offset,
                            out_dtype, x_dtype)
  return y, h


def _residual_fwd(x, residual, scale, plan, eps, scale_offset, out_dtype,
                  x_dtype):
  del x_dtype  # Only the backward needs it, to cast the gradient of x.
  y, h, rstd = sharding.execute(
      plan, "residual_forward", x, residual, scale, eps=eps,
      scale_offset=scale_offset, out_dtype=out_dtype)
  return (y, h), (h, scale, rstd)


def _residual_bwd(plan, eps, scale_offset, out_dtype, x_dtype, res, cts):
  del eps, out_dtype
  h, scale, rstd = res
  dy, dh = cts
  dh_total, dscale = sharding.execute(plan, "residual_backward", h, scale,
                                     rstd, dy, dh, scale_offset=scale_offset)
  if scale is not None:
    dscale = sharding.sum_like(dscale, scale).astype(scale.dtype)
  return dh_total.astype(x_dtype), dh_total, dscale


_rms_norm_residual.defvjp(_residual_fwd, _residual_bwd)


def rms_norm_residual(x, residual, scale=None, *, eps: float = DEFAULT_EPS,
                      scale_offset: float = 0.0, out_dtype=None,
                      backend: dispatch.Backend = "auto", axis_name=None):
  """Fused residual add + RMSNorm, the pre-norm transformer block pattern.

  ``h = x + residual`` (added in float32, stored in residual's dtype) and
  ``normed = rms_norm(h, scale, ...)``; a kernel backend reads x and residual
  once and writes both outputs in one pass.

  Args:
    x: array of shape ``(..., hidden)``, float32/bfloat16/float16 (float64).
    residual: array of x's shape, floating (its dtype is the residual stream's).
    scale, eps, scale_offset, backend, axis_name: as in ``rms_norm``.
    out_dtype: dtype of ``normed``; default residual's dtype.

  Returns:
    ``(normed, h)``: normed in ``out_dtype``, h (the updated residual) in
    residual's dtype, both of x's shape. Differentiable in x, residual and
    scale; the gradient reaching h flows into both x and residual.

  Raises:
    As ``rms_norm``, plus ValueError when residual's shape differs from x's.
  """
  x, scale, eps, scale_offset = _check_common(x, scale, eps, scale_offset)
  residual = v.same_shape("residual", residual, x)
  out_dtype = v.out_dtype_for(out_dtype, residual.dtype)
  hidden = x.shape[-1]
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  plan = _plan(backend, axis_name, rows=rows, hidden=hidden,
               dtype=residual.dtype)
  if rows == 0 or hidden == 0:
    h = (x.astype(compute_dtype(x.dtype, residual.dtype)) + residual
         ).astype(residual.dtype)
    return jnp.zeros(x.shape, out_dtype), h
  return _rms_norm_residual(x, residual, scale, plan, eps, scale_offset,
                            out_dtype, np.dtype(x.dtype))
