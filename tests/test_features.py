"""The features of issue 11 through the public API, on every CPU backend.

Each test runs on "xla", ``PallasGpu(interpret=True)`` and
``PallasTpu(interpret=True)`` passed as ``backend=``. A kernel serves a
feature once it is implemented; until then the explicit kernel must raise a
ValueError carrying its ``cannot_serve`` reason, and the test asserts that
instead (``feature_util.unserved``), so each case keeps its meaning as the
kernels gain features.

References and tolerances:

* ``reference.emulate``: the reference library's exact order of float32
  operations and 16-bit roundings. 16-bit outputs must be identical in at
  least 99.9% of elements (``numerics_util.TOLERANCE``): the only allowed
  differences are one-ulp flips where another order of the float32 sum of
  squares moves rstd by an ulp across a rounding boundary (observed on all three backends:
  bfloat16 results 100% identical; float16 99.992% in float32 mode and
  99.977% in llama mode with a float32 scale, whose float32 result carries
  x_hat's float16 rounding). float32 outputs within 4 ulps (rsqrt
  against 1/sqrt, summation order).
* Gradients per cast mode: ``jax.vjp`` of the same formula written in
  jax.numpy (``_formula``), products of 16-bit operands computed in float32
  and rounded to the product dtype as PyTorch does. Both compute the same
  float32 expressions in different summation orders, so float32 results
  agree to ~1e-6 relative; 16-bit results differ at most by one-ulp flips of
  a few elements. Bound: ``numerics_util.TOLERANCE`` of the result's dtype
  (relative error in norm), which allows one rounding of every element.
* Bias and per-head scale: the float64 NumPy reference computed from the
  same (already rounded) inputs, with ``numerics_util.TOLERANCE`` of each
  output's dtype.
* Quantized output: ``q`` bit for bit equal to ``base.quantize`` of the same
  backend's own float32 ``y``; ``q * q_scale`` within half a quantization
  step of the float64 reference, per element: int8 ``q_scale / 2``, float8
  half the spacing of float8 values at ``q`` times ``q_scale``, plus 1e-6
  relative for y's own float32 computation.
"""

import contextlib
import io

import flax.linen as fnn
from flax import nnx as fnnx
import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import linen as rlinen
from rmsnorm_jax import nnx as rnnx
from rmsnorm_jax import reference
from rmsnorm_jax.kernels.gpu import PallasGpu

import feature_util as fu
from feature_util import BF16, E4M3, E5M2, F16, F32, I8
from numerics_util import assert_close, assert_matches_emulation
from numerics_util import assert_quantized_near_rule
from numerics_util import identical_fraction, outputs_and_vjp, random, rng_for
from numerics_util import tol
from numerics_util import ulps_apart

EPS = 1e-6
SHAPE = (4, 13, 256)  # 52 rows: ragged for every block size the kernels use
backends = fu.backend_param()


def _formula(x, scale, bias, *, scale_offset, cast_mode, out_dtype):
  """Each cast mode's forward in jax.numpy, for autodiff (see module doc)."""
  xf = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)
  xhat = xf * rstd
  if cast_mode == "float32":
    y = xhat * (scale.astype(jnp.float32) + scale_offset)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
  pdt = jnp.result_type(x.dtype, scale.dtype)
  f32 = lambda a: a.astype(jnp.float32)
  w = (f32(scale.astype(pdt)) + scale_offset).astype(pdt)
  y = (f32(xhat.astype(x.dtype).astype(pdt)) * f32(w)).astype(pdt)
  if bias is not None:
    y = (f32(y) + f32(bias.astype(pdt))).astype(pdt)
  return y.astype(out_dtype)


def _assert_matches_emulation(y, want, what, x_dtype, cast_mode):
  """y against ``reference.emulate``'s ``want``: the llama order rounds
  x_hat to x's dtype even when the result is float32, and a flip of that
  rounding is one ulp of x's dtype, not a few float32 ones."""
  assert_matches_emulation(np.asarray(y).reshape(want.shape), want, what,
                           rounded_inside=x_dtype if cast_mode == "llama"
                           else None)


# ------------------------------------------------------------ 1. cast modes --

# (x dtype, scale dtype): scale in x's dtype or float32.
CAST_CASES = [(BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F32, F32)]


CAST_PARAMS = ([(d, m, 0.0) for d in CAST_CASES for m in ("float32", "llama")]
               # Gemma's (1 + scale): the offset is added in the product
               # dtype, so bf16 and float32 cover both of its roundings.
               + [(d, m, 1.0) for d in ((BF16, BF16), (F32, F32))
                  for m in ("float32", "llama")])


@backends
@pytest.mark.parametrize(
    "dtypes,cast_mode,scale_offset", CAST_PARAMS,
    ids=[f"x_{d[0].name}-scale_{d[1].name}-{m}{'-gemma' if o else ''}"
         for d, m, o in CAST_PARAMS])
def test_cast_mode_forward_and_gradients(dtypes, cast_mode, scale_offset,
                                         backend_id):
  x_dt, s_dt = dtypes
  backend = fu.make_backend(backend_id)
  rng = rng_for("cast", dtypes, cast_mode, scale_offset)
  x = random(rng, SHAPE, x_dt, mean=0.1)
  # Gemma's zeros-initialized scale trains around 0, (1 + scale) around 1.
  scale = random(rng, SHAPE[-1:], s_dt, mean=0.0 if scale_offset else 1.0,
                 scale=0.3)
  out_dt = fu.default_out_dtype(x_dt, s_dt, cast_mode)
  dy = random(rng, SHAPE, out_dt)
  kw = dict(eps=EPS, scale_offset=scale_offset, cast_mode=cast_mode)

  def run():
    return jax.jit(lambda x, s, dy: jax.vjp(
        lambda x, s: rj.rms_norm(x, s, backend=backend, **kw), x, s)[1](dy)
                   + (rj.rms_norm(x, s, backend=backend, **kw),))(x, scale, dy)

  reason = fu.unserved(backend, "rms_norm", SHAPE, x_dt,
                       scale_shape=SHAPE[-1:], scale_dtype=s_dt, **kw)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, run)
    return
  dx, dscale, y = run()
  # The documented default output dtype of each mode.
  assert y.dtype == out_dt
  want = reference.emulate(np.asarray(x).reshape(-1, SHAPE[-1]),
                           np.asarray(scale), eps=EPS,
                           scale_offset=scale_offset, cast_mode=cast_mode)
  _assert_matches_emulation(y, want,
                            f"y {cast_mode}", x_dt, cast_mode)

  # Eagerly: each operation rounds to its dtype (a compiled program may keep
  # excess precision across a 16-bit conversion).
  _, vjp = jax.vjp(lambda x, s: _formula(
      x, s, None, scale_offset=scale_offset, cast_mode=cast_mode,
      out_dtype=out_dt), x, scale)
  dx_want, dscale_want = vjp(dy)
  assert dx.dtype == x_dt and dscale.dtype == s_dt
  assert dscale.shape == scale.shape
  assert_close(dx, dx_want, tol(x_dt), f"dx {cast_mode}")
  assert_close(dscale, dscale_want, tol(s_dt), f"dscale {cast_mode}")


@backends
def test_cast_modes_differ_exactly_where_they_should(backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("differ")
  outs = {}
  for dt in (BF16, F32):
    x = random(rng, SHAPE, dt, mean=0.1)
    scale = random(rng, SHAPE[-1:], dt, mean=1.0, scale=0.3)
    reason = fu.unserved(backend, "rms_norm", SHAPE, dt,
                         scale_shape=SHAPE[-1:], scale_dtype=dt,
                         cast_mode="llama")
    run = lambda: jax.jit(lambda x, s: [
        rj.rms_norm(x, s, eps=EPS, cast_mode=m, backend=backend)
        for m in ("float32", "llama")])(x, scale)
    if reason is not None:
      fu.assert_unserved_error(backend, reason, run)
      return
    outs[dt] = (x, scale, run())
  # bf16 x and scale: llama rounds x_hat to bf16, then the bf16 product
  # again; float32 rounds once. A measurable share of elements must differ,
  # and each mode must match its own emulation, not the other's.
  x, scale, (y32, yll) = outs[BF16]
  differ = 1.0 - identical_fraction(y32, yll)
  assert differ > 0.05, f"only {differ:.4f} of elements differ"
  x2, s2 = np.asarray(x).reshape(-1, SHAPE[-1]), np.asarray(scale)
  want_ll = reference.emulate(x2, s2, eps=EPS, cast_mode="llama")
  want_32 = reference.emulate(x2, s2, eps=EPS, cast_mode="float32")
  yll2 = np.asarray(yll).reshape(want_ll.shape)
  assert_matches_emulation(yll2, want_ll, "llama")
  assert identical_fraction(yll2, want_32) < 0.95
  # float32 x and scale: no rounding differs, so the modes agree bit for bit.
  _, _, (y32, yll) = outs[F32]
  np.testing.assert_array_equal(np.asarray(y32), np.asarray(yll))


@backends
def test_llama_out_dtype_overrides_the_result_type(backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("llama_out_dtype")
  x = random(rng, SHAPE, BF16)
  scale = random(rng, SHAPE[-1:], F32, mean=1.0, scale=0.3)
  run = lambda: rj.rms_norm(x, scale, eps=EPS, cast_mode="llama",
                            out_dtype=jnp.bfloat16, backend=backend)
  reason = fu.unserved(backend, "rms_norm", SHAPE, BF16,
                       scale_shape=SHAPE[-1:], scale_dtype=F32,
                       cast_mode="llama", out_dtype=BF16)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, run)
    return
  y = run()
  # The float32 product of the llama order, rounded once more to bfloat16.
  want = reference.emulate(np.asarray(x).reshape(-1, SHAPE[-1]),
                           np.asarray(scale), eps=EPS, cast_mode="llama",
                           out_dtype=jnp.bfloat16)
  _assert_matches_emulation(y, want, "y",
                            BF16, "llama")


@backends
def test_llama_residual_default_dtype_and_values(backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("llama_residual")
  x = random(rng, SHAPE, BF16)
  res = random(rng, SHAPE, BF16, mean=0.3)
  scale = random(rng, SHAPE[-1:], F32, mean=1.0, scale=0.3)
  run = lambda: rj.rms_norm_residual(x, res, scale, eps=EPS,
                                     cast_mode="llama", backend=backend)
  reason = fu.unserved(backend, "rms_norm_residual", SHAPE, BF16,
                       scale_shape=SHAPE[-1:], scale_dtype=F32,
                       cast_mode="llama")
  if reason is not None:
    fu.assert_unserved_error(backend, reason, run)
    return
  y, h = run()
  h_want = (np.asarray(x, np.float32) + np.asarray(res, np.float32)).astype(
      BF16)
  np.testing.assert_array_equal(np.asarray(h), h_want)
  # llama with bf16 residual and float32 scale: result_type is float32.
  assert y.dtype == F32 and h.dtype == BF16
  want = reference.emulate(h_want.reshape(-1, SHAPE[-1]), np.asarray(scale),
                           eps=EPS, cast_mode="llama")
  _assert_matches_emulation(y, want, "y",
                            BF16, "llama")


# ------------------------------------------------------------------ 2. bias --

@backends
@pytest.mark.parametrize("x_dt,fn", [(BF16, "rms_norm"),
                                     (F32, "rms_norm_residual")],
                         ids=["bfloat16-rms_norm", "float32-rms_norm_residual"])
def test_bias_values_gradients_and_determinism(x_dt, fn, backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("bias", x_dt, fn)
  x = random(rng, SHAPE, x_dt)
  res = random(rng, SHAPE, x_dt, mean=0.3)
  scale = random(rng, SHAPE[-1:], F32, mean=1.0, scale=0.3)
  bias = random(rng, SHAPE[-1:], F32, scale=0.5)
  dy = random(rng, SHAPE, x_dt)

  if fn == "rms_norm":
    f = lambda x, r, s, b: rj.rms_norm(x, s, b, eps=EPS, backend=backend)
  else:
    f = lambda x, r, s, b: rj.rms_norm_residual(x, r, s, b, eps=EPS,
                                                backend=backend)[0]
  grads = jax.jit(lambda x, r, s, b, dy: jax.vjp(f, x, r, s, b)[1](dy)
                  + (f(x, r, s, b),))
  reason = fu.unserved(backend, fn, SHAPE, x_dt, scale_shape=SHAPE[-1:],
                       scale_dtype=F32, has_bias=True)
  if reason is not None:
    fu.assert_unserved_error(backend, reason,
                             lambda: grads(x, res, scale, bias, dy))
    return
  dx, dres, dscale, dbias, y = grads(x, res, scale, bias, dy)
  # The norm's input: x, or h = x + residual rounded to the stream's dtype.
  h = (np.asarray(x) if fn == "rms_norm" else
       (np.asarray(x, np.float32) + np.asarray(res, np.float32)).astype(x_dt))
  y_ref, _ = reference.rms_norm(h, scale, eps=EPS)
  y_ref = y_ref + np.asarray(bias, np.float64)
  assert y.dtype == x_dt
  assert_close(y, y_ref, tol(x_dt), "y")
  dx_ref, dscale_ref = reference.rms_norm_grad(h, scale, dy, eps=EPS)
  dbias_ref = np.sum(np.asarray(dy, np.float64).reshape(-1, SHAPE[-1]), 0)
  assert dbias.dtype == F32 and dbias.shape == bias.shape
  # dscale and dbias are float32 sums of 52 rows: ~1e-7 relative.
  assert_close(dbias, dbias_ref, tol(F32), "dbias")
  assert_close(dscale, dscale_ref, tol(F32), "dscale")
  assert_close(dx, dx_ref, tol(x_dt), "dx")
  if fn == "rms_norm_residual":
    np.testing.assert_array_equal(np.asarray(dres), np.asarray(dx))
  # Deterministic: a fresh trace and run gives the same bits.
  again = jax.jit(lambda x, r, s, b, dy: jax.vjp(f, x, r, s, b)[1](dy))(
      x, res, scale, bias, dy)
  for a, b in zip(again, (dx, dres, dscale, dbias)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@backends
def test_bias_with_llama_matches_emulation(backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("bias_llama")
  x = random(rng, SHAPE, BF16)
  scale = random(rng, SHAPE[-1:], BF16, mean=1.0, scale=0.3)
  bias = random(rng, SHAPE[-1:], BF16, scale=0.5)
  run = lambda: rj.rms_norm(x, scale, bias, eps=EPS, cast_mode="llama",
                            backend=backend)
  reason = fu.unserved(backend, "rms_norm", SHAPE, BF16,
                       scale_shape=SHAPE[-1:], scale_dtype=BF16,
                       has_bias=True, cast_mode="llama")
  if reason is not None:
    fu.assert_unserved_error(backend, reason, run)
    return
  y = run()
  want = reference.emulate(np.asarray(x).reshape(-1, SHAPE[-1]),
                           np.asarray(scale), np.asarray(bias), eps=EPS,
                           cast_mode="llama")
  _assert_matches_emulation(y, want, "y",
                            BF16, "llama")


@backends
def test_layers_use_bias(backend_id):
  x_dt = BF16  # flax promotes it with the float32 params
  backend = fu.make_backend(backend_id)
  rng = rng_for("layers")
  hidden = SHAPE[-1]
  x = random(rng, SHAPE, x_dt)
  res = random(rng, SHAPE, x_dt, mean=0.3)
  scale = random(rng, (hidden,), F32, mean=1.0, scale=0.3)
  bias = random(rng, (hidden,), F32, scale=0.5)
  key = jax.random.key(0)

  lin = rlinen.RMSNorm(epsilon=EPS, use_bias=True, backend=backend)
  lin_res = rlinen.RMSNormResidual(epsilon=EPS, use_bias=True,
                                   backend=backend)
  nnx_layer = rnnx.RMSNorm(hidden, epsilon=EPS, use_bias=True,
                           backend=backend, rngs=fnnx.Rngs(0))
  nnx_res = rnnx.RMSNormResidual(hidden, epsilon=EPS, use_bias=True,
                                 backend=backend, rngs=fnnx.Rngs(0))
  # Parameters: names, shapes, dtypes and the zeros init of bias (shapes by
  # eval_shape of the XLA layers: they do not depend on the backend).
  for layer, args in ((lin.clone(backend="xla"), (x,)),
                      (lin_res.clone(backend="xla"), (x, res))):
    p = jax.eval_shape(layer.init, key, *args)["params"]
    assert set(p) == {"scale", "bias"}
    assert p["bias"].shape == (hidden,) and p["bias"].dtype == F32
  for layer in (nnx_layer, nnx_res):
    assert layer.bias[...].shape == (hidden,)
    np.testing.assert_array_equal(np.asarray(layer.bias[...]),
                                  np.zeros(hidden, np.float32))
  assert not rlinen.RMSNorm().use_bias
  assert "bias" not in rlinen.RMSNorm().init(key, x)["params"]

  reason = fu.unserved(backend, "rms_norm", SHAPE, x_dt,
                       scale_shape=(hidden,), scale_dtype=F32, has_bias=True,
                       out_dtype=F32)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, lambda: lin.init(key, x))
    return
  init = lin.init(key, x)["params"]
  np.testing.assert_array_equal(np.asarray(init["bias"]),
                                np.zeros(hidden, np.float32))
  params = {"params": {"scale": scale, "bias": bias}}
  y_lin = lin.apply(params, x)
  y_res, h = lin_res.apply(params, x, res)
  nnx_layer.scale[...], nnx_layer.bias[...] = scale, bias
  nnx_res.scale[...], nnx_res.bias[...] = scale, bias
  y_nnx = nnx_layer(x)
  y_nnx_res, h_nnx = nnx_res(x, res)
  # flax's output dtype: x promoted with the float32 params.
  flax_dt = fnn.RMSNorm().apply({"params": {"scale": scale}}, x).dtype
  assert flax_dt == F32
  for y in (y_lin, y_res, y_nnx, y_nnx_res):
    assert y.dtype == flax_dt and y.shape == SHAPE
  want = rj.rms_norm(x, scale, bias, eps=EPS, out_dtype=F32, backend=backend)
  np.testing.assert_array_equal(np.asarray(y_lin), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(h), np.asarray(h_nnx))
  np.testing.assert_array_equal(np.asarray(y_res), np.asarray(y_nnx_res))
  y_ref, _ = reference.rms_norm(np.asarray(h), scale, eps=EPS)
  assert_close(y_res, y_ref + np.asarray(bias, np.float64), tol(F32),
               "residual layer y")


# -------------------------------------------------------- 3. per-head scale --

@backends
@pytest.mark.parametrize("heads,head_dim,lead", [
    (1, 64, (7,)), (4, 128, (3, 5)), (8, 64, (2, 3)), (8, 128, (5,))],
    ids=lambda v: str(v))
def test_per_head_scale(heads, head_dim, lead, backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("per_head", heads, head_dim, lead)
  shape = lead + (heads, head_dim)
  x_dt = BF16 if heads != 8 or head_dim != 128 else F32
  x = random(rng, shape, x_dt, mean=0.1)
  scale = random(rng, (heads, head_dim), F32, mean=1.0, scale=0.3)
  dy = random(rng, shape, x_dt)
  f = lambda x, s: rj.rms_norm(x, s, eps=EPS, backend=backend)
  run = jax.jit(lambda x, s, dy: jax.vjp(f, x, s)[1](dy) + (f(x, s),))
  reason = fu.unserved(backend, "rms_norm", shape, x_dt,
                       scale_shape=(heads, head_dim), scale_dtype=F32)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, lambda: run(x, scale, dy))
    return
  dx, dscale, y = run(x, scale, dy)
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  y_ref, rstd = reference.rms_norm(x64, scale, eps=EPS)
  dx_ref, _ = reference.rms_norm_grad(x64, scale, dy64, eps=EPS)
  dscale_ref = np.sum((dy64 * x64 * rstd[..., None]).reshape(
      -1, heads, head_dim), axis=0)
  assert y.dtype == x_dt and dx.dtype == x_dt
  assert dscale.shape == (heads, head_dim) and dscale.dtype == F32
  assert_close(y, y_ref, tol(x_dt), "y")
  assert_close(dx, dx_ref, tol(x_dt), "dx")
  assert_close(dscale, dscale_ref, tol(F32), "dscale")


def test_per_head_wrong_shapes_name_the_argument():
  rng = rng_for("per_head_errors")
  x = random(rng, (3, 4, 64), F32)
  for bad in [(5, 64), (64, 4), (4, 32), (3, 4, 64)]:
    with pytest.raises(ValueError, match=r"scale must have shape") as e:
      rj.rms_norm(x, random(rng, bad, F32))
    assert str(bad) in str(e.value) and "(4, 64)" in str(e.value)
  with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
    rj.rms_norm(x, random(rng, (4, 64), F32), random(rng, (4, 64), F32))
  with pytest.raises(ValueError, match=r"scale must have shape"):
    rj.rms_norm_residual(x, x, random(rng, (5, 64), F32))


# ------------------------------------------------------- 4. quantized output --

def _dequant_bound(q, q_scale, qdt):
  """Half a quantization step per element, in y's units (float64)."""
  qs = np.asarray(q_scale, np.float64)
  if qdt == I8:
    return 0.5 * np.broadcast_to(qs, q.shape)
  return 0.5 * fu.float8_ulp(q) * qs


@backends
@pytest.mark.parametrize("qdt", [I8, E4M3, E5M2], ids=lambda d: d.name)
def test_quantized(qdt, backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("quant", qdt)
  qmax = float(jnp.finfo(qdt).max) if qdt != I8 else 127.0
  x = random(rng, SHAPE, BF16, scale=2.0)
  res = random(rng, SHAPE, BF16, mean=0.3)
  scale = random(rng, SHAPE[-1:], F32, mean=1.0, scale=0.3)
  # The deliberate zero row: x's row 0 zero, and residual's row 1 the
  # negation of x's, so h's row 1 is exactly zero too.
  x = x.at[0, 0].set(0)
  res = res.at[0, 1].set(-x[0, 1])
  # Static scales: one that keeps every value in range (|y| stays below
  # ~6 for these inputs: normal values times a scale near 1), and one that
  # puts most values out of range (|y| above 0.08 saturates).
  static = jnp.float32(10.0 / qmax)
  tiny = jnp.float32(4.0 / qmax / 50)
  kw = dict(eps=EPS, quant_dtype=qdt, backend=backend)

  # The static scales are arguments of the jitted function, as a model's
  # calibrated scales would be (see test_static_scale_constant for a
  # constant one).
  def quantized(x, res, s, static, tiny):
    plain = [rj.rms_norm_quantized(x, s, quant_scale=qs, **kw)
             for qs in (None, static, tiny)]
    fused = [rj.rms_norm_quantized(x, s, quant_scale=qs, residual=res, **kw)
             for qs in (None, static)]
    return plain, fused

  def norms(x, res, s):
    y = rj.rms_norm(x, s, eps=EPS, out_dtype=jnp.float32, backend=backend)
    yh, h = rj.rms_norm_residual(x, res, s, eps=EPS, out_dtype=jnp.float32,
                                 backend=backend)
    return y, yh, h

  reason = fu.unserved(backend, "rms_norm_quantized", SHAPE, BF16,
                       scale_shape=SHAPE[-1:], scale_dtype=F32,
                       quant_dtype=qdt)
  if reason is not None:
    fu.assert_unserved_error(backend, reason,
                             lambda: quantized(x, res, scale, static, tiny))
    return
  (plain, fused), (y, yh, h) = jax.jit(
      lambda x, res, s, static, tiny: (quantized(x, res, s, static, tiny),
                                       norms(x, res, s)))(
          x, res, scale, static, tiny)
  quantize = jax.jit(base.quantize, static_argnums=1)
  hidden = SHAPE[-1]
  if isinstance(backend, PallasGpu):
    # The own y below is rms_norm's, (x * rstd) * scale: the Triton kernel
    # on a persistent grid computes a dynamic scale's y as rstd * (x * scale)
    # (tests/test_gpu_features.py checks that launch).
    for op in ("quantized_forward", "quantized_residual_forward"):
      assert not backend.resolved_config(op, SHAPE[0] * SHAPE[1], hidden,
                                         BF16).persistent, op
  y2, yh2 = np.asarray(y).reshape(-1, hidden), np.asarray(yh).reshape(
      -1, hidden)
  h64 = np.asarray(h, np.float64)
  ref = {False: reference.rms_norm(np.asarray(x, np.float64), scale,
                                   eps=EPS)[0].reshape(-1, hidden),
         True: reference.rms_norm(h64, scale, eps=EPS)[0].reshape(-1, hidden)}
  cases = [(plain[0], None, False), (plain[1], static, False),
           (fused[0], None, True), (fused[1], static, True)]
  for out, qs, with_res in cases:
    what = f"{'static' if qs is not None else 'dynamic'}" \
           f"{' residual' if with_res else ''}"
    q, q_scale = out[0], out[1]
    assert q.dtype == qdt and q.shape == SHAPE, what
    assert q_scale.dtype == F32 and q_scale.shape == SHAPE[:-1] + (1,), what
    if with_res:
      np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(h))
    # Bit for bit: base.quantize (the documented rule) of the same
    # backend's own float32 y, scale and values.
    y_own = yh2 if with_res else y2
    q_want, s_want = quantize(jnp.asarray(y_own), qdt, qs)
    q2 = np.asarray(q).reshape(-1, hidden)
    np.testing.assert_array_equal(q2.view(np.uint8),
                                  np.asarray(q_want).view(np.uint8),
                                  err_msg=what)
    s2 = np.asarray(q_scale).reshape(-1, 1)
    np.testing.assert_array_equal(s2, np.asarray(s_want), err_msg=what)
    # And q is y times the row's float32 reciprocal of q_scale (ties to
    # even, saturating) with the returned scale, as NumPy computes it. The
    # dynamic scale is max|y| times the float32 reciprocal of qmax (see
    # test_dynamic_scale_is_the_documented_product).
    inv = (np.float32(1.0) / s2).astype(np.float32)
    q_np, _ = reference.emulate_quantize(y_own * inv, qdt, 1.0)
    np.testing.assert_array_equal(q2.view(np.uint8), q_np.view(np.uint8),
                                  err_msg=what)
    _, s_np = reference.emulate_quantize(y_own, qdt, None if qs is None
                                         else float(qs))
    assert ulps_apart(s2, s_np) <= 1, what
    # Dequantized within half a step of the float64 reference, plus the
    # float32 computation of y itself (a few float32 ulps, 1e-6 relative).
    deq = q2.astype(np.float64) * np.asarray(q_scale, np.float64).reshape(
        -1, 1)
    err = np.abs(deq - ref[with_res])
    bound = _dequant_bound(q2, np.asarray(q_scale).reshape(-1, 1), qdt) \
        + 1e-6 * np.abs(ref[with_res]) + 1e-30
    assert np.all(err <= bound), (what, float(np.max(err / bound)))
    # The zero row (row 0 of x, row 1 of h): scale 1 (dynamic) and q 0.
    zero_row = 1 if with_res else 0
    assert np.all(q2[zero_row].astype(np.float32) == 0), what
    if qs is None:
      assert float(np.asarray(q_scale).reshape(-1)[zero_row]) == 1.0, what
    else:
      np.testing.assert_array_equal(np.asarray(q_scale),
                                    np.full(q_scale.shape, qs))
  # A static scale far too small saturates at +-qmax, never inf or NaN.
  q_sat = np.asarray(plain[2][0]).astype(np.float64).reshape(-1, hidden)
  over = np.abs(y2 / float(tiny)) > qmax
  assert over.mean() > 0.5
  np.testing.assert_array_equal(q_sat[over], np.sign(y2[over]) * qmax)
  assert np.all(np.abs(q_sat) <= qmax)


def test_dynamic_scale_is_the_documented_product():
  # max|y| * float32(1 / qmax), bit for bit, and within one float32 ulp of
  # the true quotient.
  rng = rng_for("true_division")
  x = random(rng, (256, 128), F32)
  y = rj.rms_norm(x, backend="xla")
  _, q_scale = rj.rms_norm_quantized(x, backend="xla")
  _, want = reference.emulate_quantize(np.asarray(y), I8)
  np.testing.assert_array_equal(np.asarray(q_scale), want)
  amax = np.max(np.abs(np.asarray(y, np.float32)), axis=-1, keepdims=True)
  assert ulps_apart(np.asarray(q_scale), amax / np.float32(127)) <= 1


def test_near_rule_check_allows_only_flips_next_to_a_midpoint():
  # The GPU tests' allowance for two programs' float32 y differing by an
  # ulp: a flip of y / q_scale within a few ulps of a midpoint (or on it)
  # passes; a far value or a jump of two steps fails.
  y = np.array([[np.nextafter(np.float32(2.5), np.float32(3)), 2.5, 7.3,
                 -40.0]], np.float32)
  q, _ = reference.emulate_quantize(y, I8, 1.0)
  np.testing.assert_array_equal(q, [[3, 2, 7, -40]])
  for j, flipped, passes in ((0, 2, True), (1, 3, True), (2, 8, False),
                             (3, -42, False)):
    got = q.copy()
    got[0, j] = flipped
    if passes:
      assert assert_quantized_near_rule(got, y, I8, 1.0) == 1
    else:
      with pytest.raises(AssertionError, match="away from a rounding"):
        assert_quantized_near_rule(got, y, I8, 1.0)
  assert assert_quantized_near_rule(q, y, I8, 1.0) == 0


@backends
def test_static_scale_constant(backend_id):
  """A Python float quant_scale: q is still y / quant_scale, rounded."""
  backend = fu.make_backend(backend_id)
  rng = rng_for("static_constant")
  x = random(rng, (16, 128), F32)
  scale = random(rng, (128,), F32, mean=1.0, scale=0.3)
  qs = 0.0371  # not a power of two: its reciprocal is inexact
  reason = fu.unserved(backend, "rms_norm_quantized", x.shape, F32,
                       scale_shape=(128,), scale_dtype=F32, quant_dtype=I8)
  run = lambda: jax.jit(lambda x, s: rj.rms_norm_quantized(
      x, s, quant_scale=qs, backend=backend))(x, scale)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, run)
    return
  q, _ = run()
  y = rj.rms_norm(x, scale, out_dtype=jnp.float32, backend=backend)
  q_np, _ = reference.emulate_quantize(np.asarray(y), I8, qs)
  np.testing.assert_array_equal(np.asarray(q), q_np)


@backends
def test_quantized_is_not_differentiable(backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("quant_grad")
  x = random(rng, (8, 128), F32)
  scale = random(rng, (128,), F32, mean=1.0)
  f = lambda x, s: rj.rms_norm_quantized(x, s, backend=backend)[1].sum()
  reason = fu.unserved(backend, "rms_norm_quantized", x.shape, F32,
                       scale_shape=(128,), scale_dtype=F32, quant_dtype=I8)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, lambda: jax.grad(f)(x, scale))
    return
  with pytest.raises(TypeError, match="forward-only"):
    jax.grad(f, argnums=(0, 1))(x, scale)
  # A float8 q carries a gradient, and so raises too; an int8 q does not
  # (JAX's rule for integer outputs, as for x.astype(jnp.int8)): zeros.
  for qdt, raises in ((E4M3, True), (I8, False)):
    g = lambda x, s, qdt=qdt: rj.rms_norm_quantized(
        x, s, quant_dtype=qdt, backend=backend)[0].astype(F32).sum()
    if raises:
      with pytest.raises(TypeError, match="forward-only"):
        jax.grad(g)(x, scale)
    else:
      assert not np.any(np.asarray(jax.grad(g)(x, scale)))


def test_quantized_bad_arguments_name_them():
  rng = rng_for("quant_errors")
  x = random(rng, (4, 64), F32)
  for bad in (jnp.int16, jnp.float16, jnp.uint8, "int4"):
    with pytest.raises(ValueError, match="quant_dtype"):
      rj.rms_norm_quantized(x, quant_dtype=bad)
  for bad in (jnp.ones((2,), jnp.float32), jnp.ones((4, 1), jnp.float32),
              jnp.int32(3)):
    with pytest.raises(ValueError, match="quant_scale"):
      rj.rms_norm_quantized(x, quant_scale=bad)
  for bad in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="quant_scale"):
      rj.rms_norm_quantized(x, quant_scale=bad)


# ------------------------------------------------------- 5. named residuals --

def _saved(f, *args):
  """print_saved_residuals' lines for ``f`` (what the backward keeps)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  return [l for l in buf.getvalue().splitlines() if l.strip()]


@backends
@pytest.mark.parametrize("fn", ["rms_norm", "rms_norm_residual"])
def test_named_residuals_under_checkpoint_policies(fn, backend_id):
  backend = fu.make_backend(backend_id)
  rng = rng_for("names", fn)
  shape = (6, 128)
  x = random(rng, shape, BF16)
  res = random(rng, shape, BF16)
  scale = random(rng, (128,), F32, mean=1.0, scale=0.3)

  # The norm's input is an intermediate (x * 3 rounded), so saving it is a
  # choice of the policy, unlike saving f's own arguments.
  def f(x, res, s):
    if fn == "rms_norm":
      y = rj.rms_norm(x * 3, s, eps=EPS, backend=backend)
    else:
      y = rj.rms_norm_residual(x * 3, res, s, eps=EPS, backend=backend)[0]
    return jnp.sum(y.astype(jnp.float32) ** 2)

  reason = fu.unserved(backend, fn, shape, BF16, scale_shape=(128,),
                       scale_dtype=F32)
  if reason is not None:
    fu.assert_unserved_error(backend, reason, lambda: f(x, res, scale))
    return
  only_rstd = jax.checkpoint(
      f, policy=jax.checkpoint_policies.save_only_these_names("rmsnorm_rstd"))
  saved = _saved(only_rstd, x, res, scale)
  named = [l for l in saved if "named" in l]
  assert len(named) == 1 and "named 'rmsnorm_rstd'" in named[0], saved
  assert named[0].startswith("f32[6]"), saved
  # Nothing of x's shape is kept except f's own arguments.
  big = [l for l in saved if l.startswith("bf16[6,128]")]
  assert all("from the argument" in l for l in big), saved
  # Without a policy the backward keeps the norm's input under its name.
  saved = _saved(f, x, res, scale)
  assert any(l.startswith("bf16[6,128] named 'rmsnorm_input'")
             for l in saved), saved
  assert any(l.startswith("f32[6] named 'rmsnorm_rstd'") for l in saved)
  # Recomputing the rest gives the same gradients (checked once: the fused
  # op saves the same two names through the same custom_vjp).
  if fn == "rms_norm_residual":
    return
  g_plain = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, res, scale)
  g_remat = jax.jit(jax.grad(only_rstd, argnums=(0, 1, 2)))(x, res, scale)
  for a, b in zip(g_plain, g_remat):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -------------------------------------------- the parameters' weight_dtype --

# (function, cast mode, x dtype, weight_dtype, per-head scale).
WEIGHT_CASES = [("rms_norm", "float32", BF16, BF16, False),
                ("rms_norm", "llama", F32, F16, True),
                ("rms_norm_residual", "llama", BF16, BF16, False),
                ("rms_norm_quantized", "float32", F16, F16, False)]


@backends
@pytest.mark.parametrize(
    "fn,cast_mode,x_dt,wdt,per_head", WEIGHT_CASES,
    ids=[f"{c[0]}-{c[1]}-x_{c[2].name}-w_{c[3].name}{'-per_head' * c[4]}"
         for c in WEIGHT_CASES])
def test_weight_dtype_is_the_cast_of_the_parameters(fn, cast_mode, x_dt,
                                                    wdt, per_head,
                                                    backend_id):
  # float32 parameters with weight_dtype give bit for bit the call on the
  # parameters cast to it: the outputs and the input's gradient. The
  # parameters' gradients are float32 sums, which the cast's transpose
  # rounds to wdt unless XLA drops that rounding as excess precision: equal
  # once both are rounded.
  backend = fu.make_backend(backend_id)
  rng = rng_for("weight_dtype", fn, cast_mode, x_dt, wdt, per_head)
  x = random(rng, SHAPE, x_dt)
  res = random(rng, SHAPE, x_dt, mean=0.3)
  scale = random(rng, SHAPE[-2:] if per_head else SHAPE[-1:], F32,
                 mean=1.0, scale=0.3)
  bias = None if per_head else random(rng, SHAPE[-1:], F32, scale=0.5)
  dy = random(rng, SHAPE, x_dt)
  kw = dict(eps=EPS, cast_mode=cast_mode, backend=backend)

  def call(x, s, b, **extra):
    if fn == "rms_norm":
      return rj.rms_norm(x, s, b, **kw, **extra)
    if fn == "rms_norm_residual":
      return rj.rms_norm_residual(x, res, s, b, **kw, **extra)[0]
    return rj.rms_norm_quantized(x, s, bias=b, **kw, **extra)

  reason = fu.unserved(backend, fn, SHAPE, x_dt, scale_shape=scale.shape,
                       has_bias=bias is not None, cast_mode=cast_mode,
                       scale_dtype=wdt)
  if reason is not None:
    fu.assert_unserved_error(backend, reason,
                             lambda: call(x, scale, bias, weight_dtype=wdt))
    return
  cast = lambda a: None if a is None else a.astype(wdt)
  folded_fn = lambda x, s, b: call(x, s, b, weight_dtype=wdt)
  precast_fn = lambda x, s, b: call(x, cast(s), cast(b))
  primals = (x, scale, bias)
  if fn == "rms_norm_quantized":
    folded, precast = (jax.jit(f)(*primals) for f in (folded_fn, precast_fn))
  else:
    folded, grads = outputs_and_vjp(folded_fn, primals, dy)
    precast, grads_want = outputs_and_vjp(precast_fn, primals, dy)
  unrounded = jax.jit(call)(*primals)
  for got, want in zip(jax.tree.leaves(folded), jax.tree.leaves(precast)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(want, np.float32))
  # The rounding matters for these inputs: without it the result differs.
  assert any(not np.array_equal(np.asarray(a, np.float32),
                                np.asarray(b, np.float32))
             for a, b in zip(jax.tree.leaves(folded),
                             jax.tree.leaves(unrounded)))
  if fn == "rms_norm_quantized":
    return
  (dx, *param_grads), (dx_want, *param_grads_want) = grads, grads_want
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx_want, np.float32))
  for g, w in zip(param_grads, param_grads_want):
    if w is not None:
      assert g.dtype == F32
      np.testing.assert_array_equal(np.asarray(cast(g), np.float32),
                                    np.asarray(cast(w), np.float32))


def test_weight_dtype_reaches_a_kernel_that_does_not_fold_it_as_a_cast():
  # An implementation without folds_weight_cast gets scale and bias cast
  # to weight_dtype, and a Norm without it.
  seen = []

  class CastFirst(base.Xla):
    folds_weight_cast = False

    def forward(self, x, scale, bias, *, norm):
      seen.append((scale.dtype, bias.dtype, norm.weight_dtype))
      return super().forward(x, scale, bias, norm=norm)

  rng = rng_for("cast_first")
  x = random(rng, (8, 128), BF16)
  scale = random(rng, (128,), F32, mean=1.0, scale=0.3)
  bias = random(rng, (128,), F32)
  y = rj.rms_norm(x, scale, bias, weight_dtype=jnp.bfloat16,
                  backend=CastFirst())
  assert seen == [(BF16, BF16, None)]
  want = rj.rms_norm(x, scale.astype(BF16), bias.astype(BF16))
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(want, np.float32))


def test_weight_dtype_is_checked_and_dropped_where_it_changes_nothing():
  x = jnp.ones((2, 8), BF16)
  scale = jnp.full((8,), 1.5, F32)
  for bad in (jnp.int8, jnp.float8_e4m3fn, "weight"):
    with pytest.raises(TypeError, match="weight_dtype must be None or one of"):
      rj.rms_norm(x, scale, weight_dtype=bad)
  # The parameters' own dtype (or no parameters) is the call without it.
  for s, w in ((scale, F32), (None, BF16)):
    f = lambda x: rj.rms_norm(x, s, weight_dtype=w)
    g = lambda x: rj.rms_norm(x, s)
    assert str(jax.make_jaxpr(f)(x)) == str(jax.make_jaxpr(g)(x))


@backends
def test_weight_dtype_of_float64_parameters_is_their_cast(backend_id):
  # Under x64, float64 scale and bias with weight_dtype give what their
  # cast gives, bit for bit, however XLA rounds that cast: the scale's
  # values here sit just above a 16-bit rounding midpoint by less than a
  # float32 ulp, where one rounding from float64 goes up and two (through
  # float32, as jaxlib 0.10.2's CPU backend converts) go down.
  backend = fu.make_backend(backend_id)
  rng = rng_for("weight_dtype_f64")
  with jax.enable_x64(True):
    x = random(rng, (16, 256), F32)
    for wdt, half_ulp in ((BF16, 2.0 ** -8), (F16, 2.0 ** -11), (F32, 0.0)):
      # 1 + k * 2 ulp + half an ulp + 2**-40: halfway points, nudged up.
      k = rng.integers(0, 8, size=256)
      scale = jnp.asarray(1.0 + k * 4 * half_ulp + half_ulp + 2.0 ** -40,
                          jnp.float64)
      bias = jnp.asarray(0.3 * rng.normal(size=(256,)), jnp.float64)
      got = rj.rms_norm(x, scale, bias, weight_dtype=wdt, backend=backend)
      want = rj.rms_norm(x, scale.astype(wdt), bias.astype(wdt),
                         backend=backend)
      assert got.dtype == want.dtype == F32
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=wdt.name)
