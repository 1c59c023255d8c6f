"""Helpers for numerics tests: random inputs and per-dtype tolerances."""

import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import reference

# Tolerances on ||got - ref|| / ||ref|| against the float64 reference computed
# from the same (already rounded) inputs. The kernels compute in float32, so
# the error is the rounding of the result to the output dtype plus float32
# accumulation:
# - float32 out: ~sqrt(hidden) ulp-level accumulation error, far below 1e-5.
# - bfloat16 out: one rounding to 8 significant bits, |err| <= 2**-9 relative
#   per element, ~2e-3 in norm; 1e-2 leaves room for gradients' two roundings.
# - float16 out: 11 significant bits, 2**-12 per element; 2e-3 in norm.
TOL = {
    np.dtype(jnp.float32): 2e-5,
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(jnp.float16): 2e-3,
    np.dtype(jnp.float64): 1e-12,
}


def tol(*dtypes) -> float:
  """The loosest tolerance among the dtypes an output passed through."""
  return max(TOL[np.dtype(d)] for d in dtypes)


def random(rng: np.random.Generator, shape, dtype, *, scale=1.0, mean=0.0):
  """Fresh normal samples (never zeros), rounded to dtype."""
  a = rng.normal(mean, scale, size=shape).astype(np.float32)
  return jnp.asarray(a, dtype=dtype)


def assert_close(got, want, rtol, what="", magnitude=None):
  """Relative error in norm; ``magnitude`` replaces ||want|| when larger.

  dx = rstd*g - x*rstd**3*mean(g*x) cancels almost exactly when hidden is
  tiny (hidden=1 gives dx ~ eps), so its error is judged against the size of
  the terms, ||rstd*g||, not against the near-zero difference.
  """
  err = reference.rel_error(got, want)
  if magnitude is not None:
    diff = np.linalg.norm(np.asarray(got, np.float64).ravel()
                          - np.asarray(want, np.float64).ravel())
    denom = max(np.linalg.norm(np.asarray(want, np.float64).ravel()),
                float(magnitude))
    err = min(err, diff / max(denom, 1e-300))
  assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def dx_magnitude(x, scale, dy, eps=1e-6, scale_offset=0.0):
  """||rstd * dy * w||: the size of the terms whose difference is dx."""
  _, rstd = reference.rms_norm(x, eps=eps)
  w = 1.0 if scale is None else np.asarray(scale, np.float64) + scale_offset
  return float(np.linalg.norm((rstd[..., None] * np.asarray(dy, np.float64)
                               * w).ravel()))


def residual_inputs(rng, shape, x_dtype, res_dtype):
  """x, residual, scale (float32), dy and dh for a fused residual check."""
  x = random(rng, shape, x_dtype)
  res = random(rng, shape, res_dtype, mean=0.5)
  scale = random(rng, (shape[-1],), jnp.float32, mean=1.0, scale=0.3)
  dy = random(rng, shape, res_dtype)
  dh = random(rng, shape, res_dtype)
  return x, res, scale, dy, dh


def assert_residual_matches_reference(inputs, outputs):
  """Checks rms_norm_residual's (y, h, dx, dres, dscale) against float64.

  ``inputs`` as from ``residual_inputs``; dy and dh are the cotangents of y
  and h.
  """
  x, res, scale, dy, dh = inputs
  y, h, dx, dres, dscale = outputs
  x_dtype, res_dtype = x.dtype, res.dtype
  assert h.dtype == res_dtype and y.dtype == res_dtype
  assert dx.dtype == x_dtype and dres.dtype == res_dtype
  h_ref = np.asarray(x, np.float64) + np.asarray(res, np.float64)
  assert_close(h, h_ref, tol(res_dtype), "h")
  # The norm sees h rounded to residual's dtype, exactly as returned.
  y_ref, _ = reference.rms_norm(h, scale)
  dh_ref, ds_ref = reference.rms_norm_grad(h, scale, dy)
  dh_ref = dh_ref + np.asarray(dh, np.float64)
  assert_close(y, y_ref, tol(res_dtype), "y")
  assert_close(dres, dh_ref, tol(res_dtype), "dresidual")
  assert_close(dx, dh_ref, tol(res_dtype, x_dtype), "dx")
  assert_close(dscale, ds_ref, tol(res_dtype), "dscale")
