"""What the linen and nnx layers share: when the fused function can serve a
layer configuration, and the general XLA formula for when it cannot.

The general formula is flax's own RMSNorm math (float32-or-wider statistics,
``y = x * (rsqrt(ms + eps) * scale)``), so any configuration flax accepts
(several reduction axes, a mask, a named axis, half-precision reductions)
gives flax's result.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax.linen import dtypes


def canonical_axes(ndim: int, axes) -> tuple[int, ...]:
  if not isinstance(axes, Iterable):
    axes = (axes,)
  return tuple(sorted({a + ndim if a < 0 else a for a in axes}))


def feature_shape(x_shape, feature_axes) -> tuple[int, ...]:
  """The parameter shape flax uses: the sizes of x along feature_axes."""
  return tuple(x_shape[a] for a in canonical_axes(len(x_shape), feature_axes))


def fused_path_serves(x, reduction_axes, feature_axes, axis_index_groups,
                      mask, force_float32_reductions=True) -> bool:
  """True when the configuration is exactly ``rms_norm`` over the last axis.

  A named axis is served too: flax's pmean of each row's mean square over it
  equals ``rms_norm(..., axis_name=...)``'s all-reduced sum of squares when
  the hidden dim is split evenly across that axis (the only split under
  which a per-row pmean is meaningful). Index groups are not.
  """
  last = (x.ndim - 1,)
  # x's dtype is not looked at here: the function validates it (once) and
  # names the argument in its error.
  return (x.ndim >= 1
          and canonical_axes(x.ndim, reduction_axes) == last
          and canonical_axes(x.ndim, feature_axes) == last
          and axis_index_groups is None and mask is None
          and force_float32_reductions)


def cast_unless_exact_widening(a, want, llama: bool = False):
  """``a`` cast to ``want.dtype``, or ``a`` itself where that cast is exact.

  bfloat16 or float16 to float32 changes no value, and ``rms_norm`` computes
  in float32 whatever it is given, so handing it the narrower array gives
  the same result without a separate cast over all of x (flax.nnx's default
  promotion of bfloat16 activations with float32 params is exactly that
  cast). Rounding casts (to a narrower dtype) and casts to float64, whose
  arithmetic would then be float64, are kept; so is every cast of x under
  ``cast_mode="llama"`` (``llama``), whose x_hat is rounded to x's dtype.
  """
  if a is None or want is None or a.dtype == want.dtype:
    return a
  src, dst = jnp.dtype(a.dtype), jnp.dtype(want.dtype)
  exact = (not llama and jnp.issubdtype(src, jnp.floating)
           and dst == jnp.float32 and src.itemsize < dst.itemsize)
  return a if exact else a.astype(dst)


def weights_as_promoted(arrays, wants, llama: bool = False):
  """``(scale, bias, weight_dtype)`` for parameters promoted to ``wants``.

  A promotion that rounds (float32 parameters to a 16-bit dtype) becomes
  ``rms_norm``'s ``weight_dtype``, applied as the kernel loads them, and so
  does an exact widening to float32 under ``cast_mode="llama"``
  (``llama``), where the parameters' dtype sets the products'; the others
  are cast here as ``cast_unless_exact_widening`` says.
  """
  def folded(a, w):
    if a is None or w is None or a.dtype == w.dtype:
      return False
    src, dst = jnp.dtype(a.dtype), jnp.dtype(w.dtype)
    return dst.itemsize < src.itemsize or (llama and dst == jnp.float32)
  fold = [w.dtype for a, w in zip(arrays, wants) if folded(a, w)]
  if fold:
    # promote_dtype gives every parameter one dtype.
    return (*arrays, fold[0])
  return (*(cast_unless_exact_widening(a, w) for a, w in zip(arrays, wants)),
          None)


def output_dtype(x, scale, dtype, bias=None):
  """flax's result dtype: ``dtype`` if given, else x promoted with params."""
  args = [a for a in (x, scale, bias) if a is not None]
  return dtypes.canonicalize_dtype(*args, dtype=dtype)


def general_rms_norm(x, scale, *, epsilon, dtype, reduction_axes,
                     feature_axes, axis_name=None, axis_index_groups=None,
                     mask=None, force_float32_reductions=True,
                     scale_offset=0.0, bias=None, cast_mode="float32"):
  """flax's RMSNorm formula for any axes, mask and named axis.

  Raises:
    ValueError: cast_mode other than "float32" (the llama order is defined
      for the last-axis norm only).
  """
  if cast_mode != "float32":
    raise ValueError(
        "cast_mode='llama' is defined for the norm over the last axis "
        "without mask or axis_index_groups; got cast_mode="
        f"{cast_mode!r} with reduction_axes={reduction_axes!r}, "
        f"mask {'set' if mask is not None else 'None'}.")
  stat_dtype = jnp.result_type(x) if dtype is None else dtype
  if force_float32_reductions:
    stat_dtype = jnp.promote_types(stat_dtype, jnp.float32)
  red = canonical_axes(x.ndim, reduction_axes)
  xs = jnp.asarray(x, stat_dtype)
  where = None if mask is None else jnp.asarray(mask, bool)
  ms = jnp.mean(jax.lax.square(xs), axis=red, where=where)
  if axis_name is not None:
    ms = jax.lax.pmean(ms, axis_name, axis_index_groups=axis_index_groups)
  mul = jax.lax.rsqrt(jnp.expand_dims(ms, red) + epsilon)
  args = [x]
  shape = [1] * x.ndim
  for a in canonical_axes(x.ndim, feature_axes):
    shape[a] = x.shape[a]
  if scale is not None:
    s = scale.reshape(shape)
    if scale_offset:
      s = s + jnp.asarray(scale_offset, s.dtype)
    mul = mul * s
    args.append(s)
  y = x * mul
  if bias is not None:
    y = y + bias.reshape(shape)
    args.append(bias)
  return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=dtype))
