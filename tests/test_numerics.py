"""Every implementation against the float64 reference, through the public API.

Parameterized over tests/implementations.py, so each kernel (in interpret mode
on CPU) passes the same checks as the XLA path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax import shapes

from implementations import IMPLEMENTATIONS
from numerics_util import assert_close, assert_residual_matches_reference
from numerics_util import dx_magnitude, outputs_and_vjp, random
from numerics_util import residual_inputs, rng_for, tol
from numerics_util import xla_tol

IMPL_PARAMS = [pytest.param(f, id=name) for name, f in IMPLEMENTATIONS]
DTYPES = [pytest.param(d, id=np.dtype(d).name) for d in shapes.DTYPES]
SHAPES = [pytest.param(s, id="x".join(map(str, s)))
          for s in shapes.CORRECTNESS]


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_grads_match_reference(make_impl, dtype, shape):
  rng = rng_for("fwd", shape, np.dtype(dtype).name)
  hidden = shape[-1]
  x = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (hidden,), dtype, mean=1.0, scale=0.5)
  dy = random(rng, shape, dtype)
  impl = make_impl()

  def f(x, scale, x_, scale_):
    return (rj.rms_norm(x, scale, eps=1e-5, backend=impl),
            rj.rms_norm(x_, scale_, eps=1e-5, backend="xla"))

  # The implementation and XLA side by side in one program.
  (y, y_x), (dx, dscale, dx_x, dscale_x) = outputs_and_vjp(
      f, (x, scale, x, scale), (dy, dy))
  y_ref, _ = reference.rms_norm(x, scale, eps=1e-5)
  dx_ref, dscale_ref = reference.rms_norm_grad(x, scale, dy, eps=1e-5)
  assert y.dtype == dtype and dx.dtype == dtype and dscale.dtype == dtype
  mag = dx_magnitude(x, scale, dy, eps=1e-5)
  assert_close(y, y_ref, tol(dtype), "y")
  assert_close(dx, dx_ref, tol(dtype), "dx", mag)
  assert_close(dscale, dscale_ref, tol(dtype), "dscale")
  if isinstance(impl, base.Xla):
    return
  # The same float32 formula as XLA's, up to summation order.
  assert_close(y, y_x, xla_tol(dtype), "y vs xla")
  assert_close(dx, dx_x, xla_tol(dtype), "dx vs xla", mag)
  assert_close(dscale, dscale_x, xla_tol(dtype), "dscale vs xla")


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 100), (2, 9, 256)])
def test_float32_scale_and_gemma_offset(make_impl, dtype, shape):
  rng = rng_for("offset", shape, np.dtype(dtype).name)
  hidden = shape[-1]
  x = random(rng, shape, dtype)
  scale = random(rng, (hidden,), jnp.float32, scale=0.1)
  dy = random(rng, shape, dtype)
  impl = make_impl()
  f = lambda x, s: rj.rms_norm(x, s, scale_offset=1.0, out_dtype=jnp.float32,
                               backend=impl)
  y, (dx, dscale) = outputs_and_vjp(f, (x, scale), dy.astype(jnp.float32))
  y_ref, _ = reference.rms_norm(x, scale, scale_offset=1.0)
  dx_ref, dscale_ref = reference.rms_norm_grad(x, scale, dy, scale_offset=1.0)
  assert y.dtype == jnp.float32 and dscale.dtype == jnp.float32
  # Output in float32: only float32 arithmetic error remains.
  assert_close(y, y_ref, tol(jnp.float32), "y")
  assert_close(dx, dx_ref, tol(dtype), "dx")
  assert_close(dscale, dscale_ref, tol(jnp.float32), "dscale")


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
@pytest.mark.parametrize("x_dtype,res_dtype", [
    (jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16), (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("shape", [(1, 8), (37, 129), (3, 5, 384)])
def test_residual_matches_reference(make_impl, x_dtype, res_dtype, shape):
  rng = rng_for("res", shape, np.dtype(x_dtype).name, np.dtype(res_dtype).name)
  inputs = residual_inputs(rng, shape, x_dtype, res_dtype)
  x, res, scale, dy, dh = inputs
  impl = make_impl()
  def f(x, r, s, x_, r_, s_):
    return (rj.rms_norm_residual(x, r, s, backend=impl),
            rj.rms_norm_residual(x_, r_, s_, backend="xla"))

  # The implementation and XLA side by side in one program.
  ((y, h), (y_x, h_x)), grads = outputs_and_vjp(
      f, (x, res, scale) * 2, ((dy, dh),) * 2)
  outs = (y, h, *grads[:3])
  assert_residual_matches_reference(inputs, outs)
  if isinstance(impl, base.Xla):
    return
  # The same float32 formula as XLA's, up to summation order; h = x + res
  # is one rounding, identical.
  want = (y_x, h_x, *grads[3:])
  np.testing.assert_array_equal(np.asarray(h, np.float32),
                                np.asarray(h_x, np.float32))
  mag = dx_magnitude(h, scale, dy) + float(
      np.linalg.norm(np.asarray(dh, np.float64).ravel()))
  for name, got, exp, dt in zip(
      ("y", "dx", "dresidual", "dscale"), outs[:1] + outs[2:], want[:1]
      + want[2:], (res_dtype, x_dtype, res_dtype, jnp.float32)):
    assert_close(got, exp, xla_tol(dt, res_dtype), f"{name} vs xla", mag)


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
def test_no_scale(make_impl):
  rng = rng_for("noscale")
  x = random(rng, (6, 200), jnp.bfloat16)
  dy = random(rng, (6, 200), jnp.bfloat16)
  impl = make_impl()
  y, vjp = jax.vjp(lambda x: rj.rms_norm(x, backend=impl), x)
  (dx,) = vjp(dy)
  assert_close(y, reference.rms_norm(x)[0], tol(jnp.bfloat16), "y")
  assert_close(dx, reference.rms_norm_grad(x, None, dy)[0], tol(jnp.bfloat16),
               "dx")


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
def test_float16_large_values_do_not_overflow(make_impl):
  rng = rng_for("f16big")
  x = jnp.asarray(rng.uniform(-60000, 60000, (8, 256)), jnp.float16)
  y = rj.rms_norm(x, backend=make_impl())
  assert bool(jnp.all(jnp.isfinite(y)))
  assert_close(y, reference.rms_norm(x)[0], tol(jnp.float16), "y")


@pytest.mark.parametrize("make_impl", IMPL_PARAMS)
def test_zero_row_and_nan_row_stay_local(make_impl):
  rng = rng_for("rows")
  x = np.array(random(rng, (5, 64), jnp.float32))
  x[1] = 0.0
  x[3, 7] = np.nan
  scale = random(rng, (64,), jnp.float32)
  y = np.asarray(rj.rms_norm(jnp.asarray(x), scale, backend=make_impl()))
  np.testing.assert_array_equal(y[1], np.zeros(64, np.float32))
  assert np.all(np.isnan(y[3]))
  good = [0, 2, 4]
  assert np.all(np.isfinite(y[good]))
  assert_close(y[good], reference.rms_norm(x[good], scale)[0],
               tol(jnp.float32), "untouched rows")


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="checks the CPU backend's reductions, which the "
                    "interpreted kernels and the references run on in CI")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
def test_cpu_reductions_keep_roundings(dtype):
  # A reduction of values rounded to a 16-bit dtype must see the rounded
  # values. XLA's YNNPACK fusions on CPU (jaxlib 0.10) skipped the rounding,
  # which conftest.py turns off; the interpreted kernels' checks rely on it.
  rng = rng_for("cpu_reduction_rounding", np.dtype(dtype).name)
  v = random(rng, (16, 256), jnp.float32)
  rounded = np.asarray(np.asarray(v).astype(dtype), np.float32)
  got_max = jax.jit(lambda v: jnp.max(
      v.astype(dtype).astype(jnp.float32), axis=1))(v)
  np.testing.assert_array_equal(np.asarray(got_max), rounded.max(axis=1))
  got_sum = jax.jit(lambda v: jnp.sum(
      v.astype(dtype).astype(jnp.float32), axis=1))(v)
  np.testing.assert_allclose(np.asarray(got_sum),
                             rounded.astype(np.float64).sum(axis=1),
                             rtol=1e-5, atol=1e-4)
