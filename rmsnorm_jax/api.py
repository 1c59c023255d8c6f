"""Public functions: ``rms_norm``, ``rms_norm_residual``, ``rms_norm_quantized``.

Each validates its arguments once, describes the call (``base.Call``), picks
an implementation per platform (``dispatch.route``) and runs through
``sharding.run`` -> ``dispatch.call`` -> implementation -> kernel. The
differentiable ones attach the explicit backward through ``jax.custom_vjp``;
saved for it: the normalized input (x, or the updated residual; named
``"rmsnorm_input"``), scale, bias and a per-row float32 ``rstd`` (named
``"rmsnorm_rstd"``), never the output. The names let
``jax.checkpoint(policy=jax.checkpoint_policies.save_only_these_names(
"rmsnorm_rstd"))`` keep only rstd and recompute the rest.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax import dispatch
from rmsnorm_jax import sharding
from rmsnorm_jax import validation as v

DEFAULT_EPS = 1e-6
RSTD_NAME = "rmsnorm_rstd"
INPUT_NAME = "rmsnorm_input"


def _rows(shape) -> object:
  """The row count: an int, or a symbolic expression under shape polymorphism."""
  return math.prod(shape[:-1]) if len(shape) > 1 else 1


def _empty(shape) -> bool:
  # Symbolic dims are >= 1 by construction, so only constants can be 0.
  return any(isinstance(d, (int, np.integer)) and d == 0 for d in shape)


def _routes(backend, axis_name, ops_pair, x, scale, bias, norm, dtype,
            has_residual=None):
  """The Routes of the forward and backward ops (hashable, static)."""
  if axis_name is not None:
    names = v.axis_names(axis_name, backend)
    route = sharding.hidden_sharded_route(names)
    return tuple(route for _ in ops_pair)
  # Ops that add x to a residual run in the residual's dtype; x's own,
  # where it differs, sizes the kernels' buffers too.
  x_dtype = np.dtype(x.dtype) if np.dtype(x.dtype) != np.dtype(dtype) else None
  return tuple(dispatch.route(backend, base.Call(
      op, _rows(x.shape), x.shape[-1], np.dtype(dtype),
      () if scale is None else tuple(scale.shape), bias is not None, norm,
      None if scale is None else np.dtype(scale.dtype),
      None if bias is None else np.dtype(bias.dtype), has_residual,
      x_dtype if op.endswith("forward") else None))
               for op in ops_pair)


def _feature_grad(g, primal):
  if primal is None:
    return None
  return sharding.sum_like(g, primal).astype(primal.dtype)


# ---------------------------------------------------------------- rms_norm --

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rms_norm(x, scale, bias, routes, norm):
  return _rms_norm_fwd(x, scale, bias, routes, norm)[0]


@base.with_own_promotion_rules
def _rms_norm_fwd(x, scale, bias, routes, norm):
  y, rstd = sharding.run(routes[0], "forward", norm, (x, scale, bias))
  saved = (checkpoint_name(x, INPUT_NAME), scale, bias,
           checkpoint_name(rstd, RSTD_NAME))
  return y, saved


@base.with_own_promotion_rules
def _rms_norm_bwd(routes, norm, saved, dy):
  x, scale, bias, rstd = saved
  dx, dscale, dbias = sharding.run(routes[1], "backward", norm,
                                   (x, scale, bias, rstd, dy))
  return dx, _feature_grad(dscale, scale), _feature_grad(dbias, bias)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@base.with_own_promotion_rules
def rms_norm(x, scale=None, bias=None, *, eps: float = DEFAULT_EPS,
             scale_offset: float = 0.0, cast_mode: str = "float32",
             out_dtype=None, weight_dtype=None,
             backend: dispatch.Backend = "auto", axis_name=None):
  """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * (scale + offset) + bias``.

  Args:
    x: array of shape ``(..., hidden)`` (at least one dim; leading dims may
      be symbolic under ``jax.export``), dtype float32, bfloat16, float16
      (or float64 under x64, XLA only).
    scale: ``None`` (no scaling), an array of shape ``(hidden,)``, or a
      per-head scale of shape ``x.shape[-2:]``, i.e. ``(heads, hidden)``:
      each head's vector is normalized with its own scale row (QK-norm).
    bias: ``None`` or an array of shape ``(hidden,)`` added after scaling.
    eps: non-negative finite Python float added to the mean square.
    scale_offset: Python float added to scale; ``1.0`` gives Gemma's
      ``(1 + scale)`` parameterization. Needs ``scale``.
    cast_mode: ``"float32"`` (default; flax, Hugging Face's Gemma): x in
      float32, ``x_hat * (scale + offset) + bias`` in float32, one rounding
      to the output dtype. ``"llama"`` (Hugging Face's LlamaRMSNorm):
      ``x_hat = x * rstd`` in float32 rounded to x's dtype, then
      ``x_hat * (scale + offset) + bias`` in ``result_type(scale, x)``.
    out_dtype: result dtype; default x's dtype ("float32"), or
      ``result_type(scale, x)`` ("llama").
    weight_dtype: ``None``, or ``bfloat16``, ``float16``, ``float32`` or
      ``float64``: scale and bias are used as if cast to it first (their
      values, and the "llama" result type), with the cast folded into the
      kernels' loads rather than run as a separate pass: flax.nnx's
      ``promote_dtype`` of float32 parameters to a 16-bit ``dtype``. Their
      gradients are the float32 sums cast to their own dtype, not rounded
      to weight_dtype on the way (what XLA's excess precision makes of the
      cast's transpose under jit on GPU and TPU).
    backend: ``"auto"`` (the fastest implementation that serves the call on
      the platform the computation is lowered for), ``"xla"``, ``"pallas"``
      (this library's kernel for the platform; an error where there is none
      or it cannot serve the call), a kernel name from
      ``rmsnorm_jax.backend_names()``, or a kernel config instance.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      over which the hidden dim of x (and scale, bias) is split; the per-row
      statistics are all-reduced over it. Not needed under ``jax.jit`` with
      sharded arrays: the sharding is read from the operands.

  Returns:
    Array of ``x.shape`` and ``out_dtype``. Statistics in float32 (float64
    for float64 inputs). Differentiable in x, scale and bias (reverse mode;
    forward mode on the call itself raises JAX's custom_vjp TypeError);
    dscale and dbias are accumulated in float32 in a fixed order
    (deterministic). Higher orders (grad of grad, ``jax.hessian``,
    Hessian-vector products) differentiate the backward through XLA's math
    of the same op.

  Raises:
    TypeError: non-floating x/scale/bias, non-numeric eps/scale_offset/
      out_dtype, or a weight_dtype that is not one of the four above.
    ValueError: 0-d x, scale or bias of the wrong shape, eps negative or not
      finite, scale_offset without scale, unknown cast_mode or backend, an
      explicit backend that cannot serve the call (with its reason, e.g. a
      symbolic row count); at lowering time, an explicit backend with no
      implementation for the platform.
  """
  x, scale, bias, norm = v.norm_args(
      x, scale, bias, eps=eps, scale_offset=scale_offset,
      cast_mode=cast_mode, out_dtype=out_dtype, weight_dtype=weight_dtype)
  routes = _routes(backend, axis_name, ("forward", "backward"), x, scale,
                   bias, norm, x.dtype)
  if _empty(x.shape):
    return jnp.zeros(x.shape, norm.out_dtype)
  return _rms_norm(x, scale, bias, routes, norm)


# ------------------------------------------------------- rms_norm_residual --

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rms_norm_residual(x, residual, scale, bias, routes, norm, x_dtype):
  return _residual_fwd(x, residual, scale, bias, routes, norm, x_dtype)[0]


@base.with_own_promotion_rules
def _residual_fwd(x, residual, scale, bias, routes, norm, x_dtype):
  del x_dtype  # Only the backward needs it, to cast the gradient of x.
  y, h, rstd = sharding.run(routes[0], "residual_forward", norm,
                            (x, residual, scale, bias))
  saved = (checkpoint_name(h, INPUT_NAME), scale, bias,
           checkpoint_name(rstd, RSTD_NAME))
  return (y, h), saved


@base.with_own_promotion_rules
def _residual_bwd(routes, norm, x_dtype, saved, cts):
  h, scale, bias, rstd = saved
  dy, dh = cts
  dh_total, dscale, dbias = sharding.run(
      routes[1], "residual_backward", norm, (h, scale, bias, rstd, dy, dh))
  return (dh_total.astype(x_dtype), dh_total, _feature_grad(dscale, scale),
          _feature_grad(dbias, bias))


_rms_norm_residual.defvjp(_residual_fwd, _residual_bwd)


@base.with_own_promotion_rules
def rms_norm_residual(x, residual, scale=None, bias=None, *,
                      eps: float = DEFAULT_EPS, scale_offset: float = 0.0,
                      cast_mode: str = "float32", out_dtype=None,
                      weight_dtype=None, backend: dispatch.Backend = "auto",
                      axis_name=None):
  """Fused residual add + RMSNorm, the pre-norm transformer block pattern.

  ``h = x + residual`` (added in float32, stored in residual's dtype) and
  ``normed = rms_norm(h, scale, bias, ...)``; a kernel backend reads x and
  residual once and writes both outputs in one pass.

  Args:
    x: array of shape ``(..., hidden)``, float32/bfloat16/float16 (float64).
    residual: floating array of x's shape (its dtype is the residual
      stream's).
    scale, bias, eps, scale_offset, cast_mode, weight_dtype: as in
      ``rms_norm`` (with residual's dtype in the role of x's).
    backend, axis_name: as in ``rms_norm``.
    out_dtype: dtype of ``normed``; default residual's dtype ("float32"), or
      ``result_type(scale, residual)`` ("llama").

  Returns:
    ``(normed, h)``: normed in ``out_dtype``, h (the updated residual) in
    residual's dtype, both of x's shape. Differentiable in x, residual,
    scale and bias, to any order, as ``rms_norm``; the gradient reaching h
    flows into both x and residual (x's in x's dtype).

  Raises:
    TypeError: as ``rms_norm``.
    ValueError: as ``rms_norm``, and when residual's shape differs from x's.
  """
  x = v.floating_array("x", x)
  residual = v.same_shape("residual", residual, x)
  residual, scale, bias, norm = v.norm_args(
      residual, scale, bias, eps=eps, scale_offset=scale_offset,
      cast_mode=cast_mode, out_dtype=out_dtype, weight_dtype=weight_dtype)
  routes = _routes(backend, axis_name,
                   ("residual_forward", "residual_backward"), x, scale, bias,
                   norm, residual.dtype)
  if _empty(x.shape):
    h = (base.upcast(x) + base.upcast(residual)).astype(residual.dtype)
    return jnp.zeros(x.shape, norm.out_dtype), h
  return _rms_norm_residual(x, residual, scale, bias, routes, norm,
                            np.dtype(x.dtype))


# ------------------------------------------------------ rms_norm_quantized --

@base.with_own_promotion_rules
def _quantized(x, residual, scale, bias, quant_scale, route, norm):
  return sharding.run(route, "quantized_forward", norm,
                      (x, residual, scale, bias, quant_scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _rms_norm_quantized(x, residual, scale, bias, quant_scale, route, norm):
  return _quantized(x, residual, scale, bias, quant_scale, route, norm)


def _quantized_fwd(x, residual, scale, bias, quant_scale, route, norm):
  return _quantized(x, residual, scale, bias, quant_scale, route, norm), None


def _quantized_bwd(route, norm, saved, cts):
  del route, norm, saved, cts
  raise TypeError(
      "rms_norm_quantized is a forward-only op (its outputs are quantized "
      "integers or float8 values); differentiate rms_norm or "
      "rms_norm_residual instead.")


_rms_norm_quantized.defvjp(_quantized_fwd, _quantized_bwd)


@base.with_own_promotion_rules
def rms_norm_quantized(x, scale=None, *, eps: float = DEFAULT_EPS,
                       scale_offset: float = 0.0, cast_mode: str = "float32",
                       quant_dtype=jnp.int8, quant_scale=None, residual=None,
                       bias=None, weight_dtype=None,
                       backend: dispatch.Backend = "auto"):
  """RMSNorm with its output quantized in the same pass (inference, fp8).

  ``y`` is the float32 value of ``rms_norm(x (+ residual), scale, bias,
  ...)``; then ``q = saturate(round_half_even(y * (1 / q_scale)))`` for
  int8, or the saturating float8 cast of ``y * (1 / q_scale)``, with the
  row's reciprocal rounded to float32 (the product XLA compiles a division
  by a per-row scale to; within one float32 ulp of ``y / q_scale``, and the
  same bits on every backend).

  ``y`` is computed in this call's own pass and quantized exactly by that
  rule. A separate ``rms_norm(..., out_dtype=jnp.float32)`` call runs
  another kernel, whose float32 row sums may differ in their last bits (and
  the Pallas GPU kernel on a persistent grid, with a dynamic scale and no
  bias under cast_mode "float32", rounds ``rstd * (x * scale)`` rather than
  ``(x * rstd) * scale``, so that the row's max comes from ``x * scale``
  before rstd is known), so quantizing its output can give a q_scale a few
  float32 ulps away and, next to a rounding midpoint, a q one step away.

  Non-finite values: a NaN element of y quantizes to 0 in int8 and to NaN
  in float8. A row of y holding a NaN beside finite values (from a NaN
  scale element, or an infinite one where x is 0) has a NaN max: its
  dynamic q_scale is 1 on the XLA path, while the Pallas Triton kernels
  (``"pallas_gpu"``), whose max skips a NaN, give it the max of the row's
  finite ``|y|``.

  Args:
    x: array of shape ``(..., hidden)``, float32/bfloat16/float16.
    scale, bias, eps, scale_offset, cast_mode, weight_dtype, backend: as in
      ``rms_norm``.
    quant_dtype: ``jnp.int8`` (qmax 127), ``jnp.float8_e4m3fn`` (448) or
      ``jnp.float8_e5m2`` (57344).
    quant_scale: ``None`` for dynamic per-row scaling, ``q_scale =
      max|y_row| * float32(1 / qmax)`` (1 for an all-zero row); or a
      float32 scalar for static scaling.
    residual: optional array of x's shape: the input is then
      ``h = x + residual`` (rounded to residual's dtype), also returned.

  Returns:
    ``(q, q_scale)``, or ``(q, q_scale, h)`` with a residual: q of x's shape
    in ``quant_dtype``, q_scale float32 of shape ``x.shape[:-1] + (1,)``,
    so that ``q * q_scale`` approximates y.

  Raises:
    TypeError: as ``rms_norm``, and when a gradient reaches q_scale, h or a
      float8 q (a forward-only op). An int8 q carries no gradient, by JAX's
      rule for integer outputs: a loss of an int8 q alone differentiates to
      zeros, as through any cast to an integer dtype.
    ValueError: as ``rms_norm``, and for an unsupported quant_dtype or a
      quant_scale that is not a floating scalar.
  """
  x = v.floating_array("x", x)
  stream = x
  if residual is not None:
    residual = v.same_shape("residual", residual, x)
    stream = residual
  quant_dtype = v.quant_dtype(quant_dtype)
  quant_scale = v.quant_scale(quant_scale)
  stream, scale, bias, norm = v.norm_args(
      stream, scale, bias, eps=eps, scale_offset=scale_offset,
      cast_mode=cast_mode, out_dtype=jnp.float32, quant_dtype=quant_dtype,
      weight_dtype=weight_dtype)
  (route,) = _routes(backend, None, ("quantized_forward",), x, scale, bias,
                     norm, stream.dtype, has_residual=residual is not None)
  if _empty(x.shape):
    q = jnp.zeros(x.shape, quant_dtype)
    q_scale = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
    if residual is None:
      return q, q_scale
    h = (base.upcast(x) + base.upcast(residual)).astype(residual.dtype)
    return q, q_scale, h
  q, q_scale, h = _rms_norm_quantized(x, residual, scale, bias, quant_scale,
                                      route, norm)
  return (q, q_scale) if residual is None else (q, q_scale, h)
