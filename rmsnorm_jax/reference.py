"""Float64 NumPy reference, independent of JAX, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def _f64(a):
  return None if a is None else np.asarray(a, dtype=np.float64)


def rms_norm(x, scale=None, *, eps=1e-6, scale_offset=0.0):
  """Returns ``(y, rstd)`` in float64; x of shape (..., hidden)."""
  x = _f64(x)
  rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  w = 1.0 if scale is None else _f64(scale) + scale_offset
  return x * rstd * w, rstd[..., 0]


def rms_norm_grad(x, scale, dy, *, eps=1e-6, scale_offset=0.0):
  """Returns ``(dx, dscale)`` in float64 (dscale None when scale is None)."""
  x, dy = _f64(x), _f64(dy)
  hidden = x.shape[-1]
  _, rstd = rms_norm(x, eps=eps)
  r = rstd[..., None]
  w = 1.0 if scale is None else _f64(scale) + scale_offset
  g = dy * w
  dx = r * g - x * r**3 * np.sum(g * x, axis=-1, keepdims=True) / hidden
  dscale = None
  if scale is not None:
    dscale = np.sum((dy * x * r).reshape(-1, hidden), axis=0)
  return dx, dscale


def rel_error(got, want) -> float:
  """``||got - want|| / ||want||`` in float64; NaN anywhere gives inf."""
  got, want = _f64(got), _f64(want)
  if not np.all(np.isfinite(got)):
    return float("inf")
  denom = np.linalg.norm(want.ravel())
  return float(np.linalg.norm((got - want).ravel()) / max(denom, 1e-300))


# ------------------------------------------------ emulations of the formulas --
# NumPy emulations of each cast mode's formula with the reference libraries'
# roundings (float32 arithmetic, 16-bit rounding through ml_dtypes), for
# bit-level comparisons. Shapes: x (rows, hidden); scale (hidden,) or
# (heads, hidden) with row r using scale[r % heads].


def _np_dtype(d):
  import jax.numpy as jnp  # ml_dtypes' dtypes, as jax names them
  return np.dtype(jnp.dtype(d))


def _scale_rows(w, rows):
  if w.ndim == 1:
    return w[None, :]
  heads = w.shape[0]
  return np.tile(w, (rows // heads, 1))


def emulate(x, scale=None, bias=None, *, eps=1e-6, scale_offset=0.0,
            cast_mode="float32", out_dtype=None):
  """The forward of ``cast_mode`` as its reference library computes it.

  "float32" (flax, Hugging Face's Gemma): x to float32, ``x * rstd * (scale +
  offset) + bias`` in float32, one rounding to out_dtype (default x's).
  "llama" (Hugging Face's LlamaRMSNorm): ``x_hat = x * rstd`` in float32,
  rounded to x's dtype, then ``x_hat * (scale + offset) + bias`` in
  ``result_type(scale, x)`` (default out_dtype).
  Returns the output array in out_dtype (NumPy/ml_dtypes).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rmsnorm_jax import base  # pylint: disable=import-outside-toplevel
  x = np.asarray(x)
  f32 = np.float32
  xf = x.astype(f32)
  rstd = (f32(1) / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True,
                                    dtype=f32) + f32(eps))).astype(f32)
  xhat = (xf * rstd).astype(f32)
  if cast_mode == "llama":
    # jax's promotion table, as the library applies it under any settings.
    with base.own_promotion_rules():
      pdt = _np_dtype(jnp.result_type(x.dtype, x.dtype if scale is None
                                      else np.asarray(scale).dtype))
    y = xhat.astype(x.dtype).astype(pdt)
  else:
    pdt = np.dtype(f32)
    y = xhat
  if scale is not None:
    w = np.asarray(scale).astype(pdt)
    if scale_offset:
      w = (w + np.asarray(scale_offset, pdt)).astype(pdt)
    y = (y * _scale_rows(w, x.shape[0])).astype(pdt)
  if bias is not None:
    y = (y + np.asarray(bias).astype(pdt)[None, :]).astype(pdt)
  out = pdt if (out_dtype is None and cast_mode == "llama") else (
      x.dtype if out_dtype is None else _np_dtype(out_dtype))
  return y.astype(out)


def emulate_quantize(y, quant_dtype, quant_scale=None):
  """``(q, q_scale)`` of float32 ``y`` (rows, hidden), as documented.

  Dynamic: per row ``max|y| * (1 / qmax)`` (1 for an all-zero row); static:
  the given scalar. ``q = y * (1 / q_scale)`` saturated to +-qmax, rounded
  half to even for int8, cast (round to nearest even) for float8; each
  reciprocal rounded to float32.
  """
  qmax = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}[
      _np_dtype(quant_dtype).name]
  y = np.asarray(y, np.float32)
  if quant_scale is None:
    amax = np.max(np.abs(y), axis=-1, keepdims=True)
    inv_qmax = np.float32(1.0) / np.float32(qmax)
    q_scale = np.where(amax > 0, (amax * inv_qmax).astype(np.float32),
                       np.float32(1.0))
  else:
    q_scale = np.full((y.shape[0], 1), quant_scale, np.float32)
  inv = (np.float32(1.0) / q_scale.astype(np.float32)).astype(np.float32)
  v = np.clip((y * inv).astype(np.float32), -qmax, qmax).astype(np.float32)
  if _np_dtype(quant_dtype) == np.dtype(np.int8):
    v = np.round(v)  # NumPy rounds half to even
  return v.astype(_np_dtype(quant_dtype)), q_scale.astype(np.float32)
