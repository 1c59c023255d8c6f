"""Argument checks shared by the public functions and the layers.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np


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


def scale_for(name: str, scale, hidden: int):
  if scale is None:
    return None
  scale = floating_array(name, scale, allow_scalar=True)
  if tuple(scale.shape) != (hidden,):
    raise ValueError(
        f"{name} must have shape ({hidden},), matching the last axis of x; "
        f"got {_describe(scale)}.")
  return scale


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
