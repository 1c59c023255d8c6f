"""Argument checks shared by the public functions and the layers.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base


def _describe(a) -> str:
  return f"shape {tuple(a.shape)} and dtype {a.dtype}"


def floating_array(name: str, a, *, allow_scalar: bool = False):
  """Returns ``a`` as a jax array after checking it holds real floats."""
  if a is None:
    raise TypeError(f"{name} must be a floating-point array; got None.")
  if not hasattr(a, "dtype") or not hasattr(a, "shape"):
    a = jnp.asarray(a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a real floating-point dtype (float32, bfloat16, "
        f"float16 or float64); got {_describe(a)}.")
  if not allow_scalar and a.ndim == 0:
    raise ValueError(
        f"{name} must have at least one dimension (the normalized hidden "
        f"axis is the last one); got a 0-d array of dtype {a.dtype}.")
  return a


def scale_for(name: str, scale, x_shape):
  """scale as an array of shape ``(hidden,)`` or per-head ``x.shape[-2:]``."""
  if scale is None:
    return None
  scale = floating_array(name, scale, allow_scalar=True)
  hidden = x_shape[-1]
  shape = tuple(scale.shape)
  if shape == (hidden,):
    return scale
  if len(x_shape) >= 2 and shape == tuple(x_shape[-2:]):
    return scale
  per_head = (f" or, per head, {tuple(x_shape[-2:])}" if len(x_shape) >= 2
              else "")
  raise ValueError(
      f"{name} must have shape ({hidden},), matching the last axis of x"
      f"{per_head}; got {_describe(scale)}.")


def bias_for(name: str, bias, hidden):
  """bias as an array of shape ``(hidden,)``."""
  if bias is None:
    return None
  bias = floating_array(name, bias, allow_scalar=True)
  if tuple(bias.shape) != (hidden,):
    raise ValueError(
        f"{name} must have shape ({hidden},), matching the last axis of x; "
        f"got {_describe(bias)}.")
  return bias


def same_shape(name: str, a, x):
  a = floating_array(name, a, allow_scalar=True)
  if tuple(a.shape) != tuple(x.shape):
    raise ValueError(
        f"{name} must have the same shape as x, {tuple(x.shape)}; got "
        f"{_describe(a)}.")
  return a


def static_float(name: str, value, *, nonnegative: bool = False) -> float:
  """A finite Python float (these arguments are compile-time constants)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.floating, np.integer)):
    raise TypeError(
        f"{name} must be a Python float (a compile-time constant); got "
        f"{value!r} of type {type(value).__name__}.")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite; got {value}.")
  if nonnegative and value < 0:
    raise ValueError(f"{name} must be >= 0; got {value}.")
  return value


def one_of(name: str, value, allowed):
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
  return value


WEIGHT_DTYPES = tuple(np.dtype(d) for d in (
    jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


def _dtype_among(what: str, value, allowed, error) -> np.dtype:
  """``value`` as one of the dtypes ``allowed``; else ``error`` saying
  ``what`` must be one of them."""
  expected = ", ".join(np.dtype(d).name for d in allowed)
  try:
    dt = np.dtype(jnp.dtype(value))
  except TypeError as e:
    raise error(f"{what} one of {expected}; got {value!r}.") from e
  if dt not in allowed:
    raise error(f"{what} one of {expected}; got {dt}.")
  return dt


def weight_dtype_for(value, scale, bias) -> np.dtype | None:
  """``weight_dtype`` as a dtype, or None where it changes nothing.

  It is None when not given, without scale and bias, or equal to their
  dtypes: then the call is the same without it.
  """
  if value is None:
    return None
  dt = _dtype_among("weight_dtype must be None or", value, WEIGHT_DTYPES,
                    TypeError)
  present = [np.dtype(a.dtype) for a in (scale, bias) if a is not None]
  if all(d == dt for d in present):
    return None
  return dt


def norm_args(x, scale, bias, *, eps, scale_offset, cast_mode, out_dtype,
              quant_dtype=None, weight_dtype=None):
  """Validates the arguments every op shares; returns them with a Norm.

  ``x`` is the normalized stream (x, or the residual of the fused ops); the
  default out_dtype is its dtype ("float32") or ``result_type(scale, x)``
  ("llama"; with ``weight_dtype`` in scale's place).
  """
  x = floating_array("x", x)
  scale = scale_for("scale", scale, x.shape)
  bias = bias_for("bias", bias, x.shape[-1])
  eps = static_float("eps", eps, nonnegative=True)
  scale_offset = static_float("scale_offset", scale_offset)
  cast_mode = one_of("cast_mode", cast_mode, base.CAST_MODES)
  if scale is None and scale_offset != 0.0:
    raise ValueError(
        "scale_offset applies to scale, so it needs a scale array; got "
        f"scale=None with scale_offset={scale_offset}.")
  norm = base.Norm(eps=eps, scale_offset=scale_offset, cast_mode=cast_mode,
                   quant_dtype=quant_dtype,
                   weight_dtype=weight_dtype_for(weight_dtype, scale, bias))
  default = x.dtype
  if cast_mode == "llama" and scale is not None:
    default = norm.product_dtype(x.dtype, scale.dtype)
  norm = dataclasses.replace(norm,
                             out_dtype=out_dtype_for(out_dtype, default))
  return x, scale, bias, norm


def axis_names(axis_name, backend) -> tuple[str, ...]:
  """``axis_name`` as a tuple of mesh axis names (with backend auto/xla)."""
  if not (isinstance(backend, str) and backend in ("auto", "xla")):
    # A row split over devices needs its all-reduced statistics before any
    # output is written, so this is XLA's two-pass path, never a kernel.
    raise ValueError("axis_name runs the XLA path (statistics all-reduced "
                     "between two passes), so backend must be 'auto' or "
                     f"'xla'; got backend={backend!r}.")
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise TypeError("axis_name must be a mesh axis name or a tuple of names; "
                    f"got {axis_name!r}.")
  return names


def quant_dtype(dtype) -> np.dtype:
  """One of the quantized dtypes of ``base.QUANT_MAX``."""
  return _dtype_among("quant_dtype must be", dtype, tuple(base.QUANT_MAX),
                      ValueError)


def quant_scale(value):
  """None, or the static quantization scale as a float32 scalar array."""
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"quant_scale must be a float32 scalar; got {value!r}.")
  a = jnp.asarray(value)
  if a.ndim != 0 or not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError("quant_scale must be a floating scalar (static "
                     f"scaling) or None (dynamic); got {_describe(a)}.")
  if isinstance(value, (int, float, np.floating)) and not (
      math.isfinite(float(value)) and float(value) > 0):
    raise ValueError(f"quant_scale must be positive and finite; got {value}.")
  return a.astype(jnp.float32)


def out_dtype_for(out_dtype, default):
  if out_dtype is None:
    return np.dtype(default)
  try:
    dt = np.dtype(jnp.dtype(out_dtype))
  except TypeError as e:
    raise TypeError(f"out_dtype must be a floating dtype; got {out_dtype!r}."
                    ) from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"out_dtype must be a floating dtype; got {dt}.")
  return dt
