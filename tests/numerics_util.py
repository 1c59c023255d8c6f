"""The numerics harness every test module shares: seeded random inputs, the
one tolerance table, and the comparisons (float64 reference, the XLA
implementation, emulations of other libraries' formulas).

Each comparison's tolerance lives in ``TOLERANCE``, one row per output dtype:

* ``reference``: ``||got - ref|| / ||ref||`` against the float64 reference
  computed from the same (already rounded) inputs. The kernels compute in
  float32, so the error is the rounding of the result to the output dtype
  plus float32 accumulation:
  float32 out: ~sqrt(hidden) ulp-level accumulation error, far below 2e-5;
  bfloat16 out: one rounding to 8 significant bits, |err| <= 2**-9 relative
  per element, ~2e-3 in norm; 1e-2 leaves room for gradients' two roundings;
  float16 out: 11 significant bits, 2**-12 per element; 2e-3 in norm.
* ``same_formula``: the same norm against ``base.Xla``, which computes the
  same float32 formula with another summation order. A 16-bit output may
  round the other way where its float32 value sits on a rounding boundary,
  so the bound is one ulp relative (2**-7 for bfloat16, 2**-10 for float16;
  reached when hidden is 1 and the single element flips); float32 outputs
  differ by reduction order only, far below 1e-5.
* ``identical`` / ``ulps``: against ``reference.emulate``, a NumPy emulation
  of a reference library's exact order of float32 operations and 16-bit
  roundings. 16-bit outputs must be bit-identical in at least 99.9% of
  elements: the only differences allowed are one-ulp flips where another
  order of the float32 sum of squares moves rstd across a rounding boundary
  (observed: bfloat16 100% identical, float16 99.977% at worst, in llama
  mode with a float32 scale); float32 outputs within 6 ulps: rstd's
  summation order and its rsqrt (a hardware rsqrt, or sqrt then a division)
  against NumPy's 1/sqrt, each worth an ulp or two of rstd, plus the
  formula's own roundings (observed: 4 on the Triton kernels, 5 on the
  Mosaic GPU kernels in llama mode).
* quantized output (``assert_quantized_near_rule``): q against NumPy's rule
  applied to another kernel's float32 y. Compiled for a GPU, y and the
  rule's own float32 steps may land an ulp from NumPy's, which moves
  y / q_scale across a rounding midpoint only when it lies within a few
  float32 ulps of one (observed on an H200: 19 of 104 million elements,
  those inspected within 1.7 ulps; XLA's rule on the GPU agreed with the
  Mosaic GPU kernel there).
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import reference


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """How close an output of one dtype must be (see the module doc)."""

  reference: float
  same_formula: float
  identical: float | None  # 16-bit outputs against an emulation
  ulps: int | None  # float32 outputs against an emulation


TOLERANCE = {
    np.dtype(jnp.float32): Tolerance(2e-5, 1e-5, None, 6),
    np.dtype(jnp.bfloat16): Tolerance(1e-2, 2.0**-7, 0.999, None),
    np.dtype(jnp.float16): Tolerance(2e-3, 2.0**-10, 0.999, None),
    np.dtype(jnp.float64): Tolerance(1e-12, 1e-12, None, None),
}


def tol(*dtypes) -> float:
  """The loosest reference tolerance among the dtypes an output passed
  through."""
  return max(TOLERANCE[np.dtype(d)].reference for d in dtypes)


def xla_tol(*dtypes) -> float:
  """The loosest same-formula (against ``base.Xla``) tolerance among
  ``dtypes``."""
  return max(TOLERANCE[np.dtype(d)].same_formula for d in dtypes)


def rng_for(*key) -> np.random.Generator:
  """A generator seeded from ``key``: fresh inputs per case, reproducible."""
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def identical_fraction(got, want) -> float:
  """Share of elements with exactly the same value (NaN equals NaN)."""
  g = np.asarray(got).astype(np.float32)
  w = np.asarray(want).astype(np.float32)
  assert g.shape == w.shape, (g.shape, w.shape)
  return float(np.mean((g == w) | (np.isnan(g) & np.isnan(w))))


def ulps_apart(got, want, magnitude=None) -> float:
  """Largest distance between float32 arrays in float32 ulps of ``want``.

  ``magnitude`` (broadcastable to ``want``) replaces ``|want|`` as the size
  whose ulp is the unit: a sum that cancels to far below its terms (y + bias)
  is judged by the terms' ulp.
  """
  w = np.asarray(want, np.float32)
  mag = np.abs(w) if magnitude is None else np.asarray(magnitude, np.float32)
  ulp = np.spacing(np.broadcast_to(mag, w.shape)).astype(np.float64)
  diff = np.abs(np.asarray(got, np.float64) - w.astype(np.float64))
  return float(np.max(diff / ulp))


def assert_matches_emulation(got, want, what, *, magnitude=None,
                             rounded_inside=None):
  """``got`` against ``reference.emulate``'s ``want`` (see the module doc).

  ``rounded_inside``: a 16-bit dtype the formula rounds to before the
  (float32) result, as the llama order rounds x_hat to x's dtype; a flip of
  that rounding is one ulp of that dtype, so the result is judged as that
  dtype's would be.
  """
  assert np.dtype(got.dtype) == np.dtype(want.dtype), (got.dtype, want.dtype)
  dt = np.dtype(got.dtype)
  if dt == np.float32 and rounded_inside is not None and (
      np.dtype(rounded_inside) != np.float32):
    dt = np.dtype(rounded_inside)
  t = TOLERANCE[dt]
  if dt == np.float32:
    ulps = ulps_apart(got, want, magnitude)
    assert ulps <= t.ulps, f"{what}: {ulps} ulps from the emulation"
  else:
    frac = identical_fraction(got, want)
    assert frac >= t.identical, (
        f"{what}: only {frac:.4%} identical to the emulation")


def assert_quantized_near_rule(q, y, quant_dtype, quant_scale=None, *,
                               midpoint_ulps=3, max_fraction=1e-5):
  """q (from a fused quantized kernel) against ``reference.emulate_quantize``
  of ``y``, the float32 output of a separate forward of the same inputs.

  An element may differ only by one step of quant_dtype (adjacent values),
  where y * (1 / q_scale) lies within ``midpoint_ulps`` float32 ulps of the
  midpoint between the two values (on it too: an ulp less or more of the
  kernel's own y moves an exact tie off it; the kernels' rounding of exact
  ties is tested on its own), in at most ``max_fraction`` of the elements
  (or one). Returns the number of such elements.
  """
  q_want, s_want = reference.emulate_quantize(np.asarray(y), quant_dtype,
                                              quant_scale)
  got = np.asarray(q)
  assert got.dtype == q_want.dtype and got.shape == q_want.shape
  bad = np.nonzero(got.view(np.uint8) != q_want.view(np.uint8))
  if not bad[0].size:
    return 0
  a = got[bad].astype(np.float64)
  b = q_want[bad].astype(np.float64)
  if got.dtype == np.int8:
    adjacent = np.abs(a - b) == 1
  else:  # float8: adjacent finite values of one sign differ by 1 in bits
    bits = np.abs(got.view(np.uint8)[bad].astype(np.int16)
                  - q_want.view(np.uint8)[bad].astype(np.int16))
    adjacent = (bits == 1) & (np.sign(a) == np.sign(b))
  inv = (np.float32(1) / s_want.astype(np.float32)).astype(np.float32)
  yb = np.asarray(y, np.float32)[bad]
  t = yb.astype(np.float64) * inv[bad[0], 0].astype(np.float64)
  t32 = (yb * inv[bad[0], 0]).astype(np.float32)
  mid = (a + b) / 2
  ulp = np.spacing(np.abs(t32)).astype(np.float64)
  near = np.abs(t - mid) <= midpoint_ulps * ulp
  where = [tuple(int(i) for i in ix) for ix in zip(*bad)]
  assert np.all(adjacent & near), (
      f"q differs from the rule away from a rounding midpoint at "
      f"{[w for w, ok in zip(where, adjacent & near) if not ok][:5]}")
  assert len(where) <= max(1.0, max_fraction * got.size), (
      f"q differs from the rule at {len(where)} of {got.size} elements "
      f"(near midpoints; at most {max_fraction:g} of them allowed)")
  return len(where)


def random(rng: np.random.Generator, shape, dtype, *, scale=1.0, mean=0.0):
  """Fresh normal samples (never zeros), rounded to dtype."""
  a = rng.normal(mean, scale, size=shape).astype(np.float32)
  # Rounded by NumPy (ml_dtypes, round to nearest even like XLA's convert):
  # a device transfer, not a compiled conversion program per shape.
  return jnp.asarray(a.astype(np.dtype(dtype)))


def outputs_and_vjp(f, primals, cotangents):
  """``f(*primals)`` and its vjp of ``cotangents``, as one compiled program.

  One program per case instead of a forward, a backward and eager
  comparisons: on CPU the suite's time is mostly XLA compiling, and each
  program has a fixed cost.
  """
  def run(primals, cotangents):
    out, vjp = jax.vjp(f, *primals)
    return out, vjp(cotangents)
  return jax.jit(run)(tuple(primals), cotangents)


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
