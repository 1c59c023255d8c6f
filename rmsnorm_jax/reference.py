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
