"""A drop-in works in the settings real JAX code runs in.

Each check runs on every implementation that runs on CPU (XLA, and the TPU
and GPU kernels in interpret mode) through the public functions and both
Flax layers: rank promotion "raise", strict dtype promotion, x64, debug_nans
and debug_infs, leak checking, eval_shape, nested vmap, donated inputs, and
shape-polymorphic export for cpu, cuda and tpu at once.
"""

import flax.linen as fnn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax.kernels.gpu import TRITON_CALL_TARGET

from implementations import IMPLEMENTATIONS
from gpu_test_util import hopper
from numerics_util import assert_close, random, tol

BACKENDS = [pytest.param(make, id=name) for name, make in IMPLEMENTATIONS]
# Triton calls carry no serialization-compatibility guarantee; exporting them
# is the caller's explicit choice.
UNSTABLE_OK = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]


def _inputs(seed, shape=(2, 3, 40), dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  x = random(rng, shape, dtype)
  res = random(rng, shape, dtype, mean=0.5)
  scale = random(rng, shape[-1:], jnp.float32, mean=1.0, scale=0.3)
  return x, res, scale


def _every_entry_point(backend, x, res, scale):
  """Forward, backward, fused and both layers; returns their outputs."""
  f32 = lambda a: a.astype(jnp.float32)
  outs = {"fwd": rj.rms_norm(x, scale, backend=backend),
          "fwd_no_scale": rj.rms_norm(x, backend=backend),
          "fused": rj.rms_norm_residual(x, res, scale, backend=backend)}
  outs["grad"] = jax.grad(
      lambda x, s: f32(rj.rms_norm(x, s, backend=backend)).sum(),
      argnums=(0, 1))(x, scale)
  # Second order: the kernels' backward differentiated again (grad of
  # grad reaches the primitive's JVP rule).
  outs["grad_of_grad"] = jax.grad(
      lambda x, s: sum(jnp.sum(f32(g) ** 2) for g in jax.grad(
          lambda x, s: jnp.sum(jnp.sin(f32(rj.rms_norm(
              x, s, backend=backend)))), argnums=(0, 1))(x, s)),
      argnums=(0, 1))(x, scale)
  outs["fused_grad"] = jax.grad(
      lambda x, r, s: sum(f32(o).sum() for o in rj.rms_norm_residual(
          x, r, s, backend=backend)), argnums=(0, 1, 2))(x, res, scale)
  linen = rj.linen.RMSNorm(backend=backend)
  params = linen.init(jax.random.key(0), x)
  outs["linen"] = linen.apply(params, x)
  outs["linen_grad"] = jax.grad(
      lambda p: f32(linen.apply(p, x)).sum())(params)
  outs["linen_fused"] = rj.linen.RMSNormResidual(backend=backend).apply(
      params, x, res)
  nnx_norm = rj.nnx.RMSNorm(x.shape[-1], backend=backend, rngs=nnx.Rngs(0))
  outs["nnx"] = nnx_norm(x)
  outs["nnx_fused"] = rj.nnx.RMSNormResidual(
      x.shape[-1], backend=backend, rngs=nnx.Rngs(0))(x, res)
  # float32 params rounded to x's dtype as the kernel loads them
  # (weight_dtype), forward and backward.
  mixed = rj.nnx.RMSNorm(x.shape[-1], dtype=x.dtype, backend=backend,
                         scale_init=nnx.initializers.constant(1.3),
                         rngs=nnx.Rngs(0))
  outs["nnx_weight_dtype"] = mixed(x)
  outs["nnx_weight_dtype_grad"] = nnx.grad(lambda m: f32(m(x)).sum())(mixed)
  return outs


def _assert_same(got, want, what):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape, what
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(w, np.float32), err_msg=what)


@pytest.mark.parametrize("make", BACKENDS)
def test_rank_promotion_raise_and_strict_dtype_promotion(make):
  x, res, scale = _inputs(0)
  want = _every_entry_point(make(), x, res, scale)
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    got = _every_entry_point(make(), x, res, scale)
  _assert_same(got, want, "rank 'raise' / strict promotion")


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_checked_jaxprs_lower_under_strict_promotion(platform):
  # With jax_enable_checks on, jax evaluates the primitive's abstract
  # results again while lowering, outside the public functions, under the
  # caller's strict promotion: the product dtype of bfloat16 x and a
  # float32 scale raised there. So did dispatch.explain, which a caller runs
  # directly.
  s = jax.ShapeDtypeStruct
  x, w = s((64, 768), jnp.bfloat16), s((768,), jnp.float32)

  def calls(x, w):
    loss = lambda x, w, mode: jnp.sum(
        rj.rms_norm(x, w, cast_mode=mode).astype(jnp.float32))
    return (jax.grad(loss, argnums=(0, 1))(x, w, "float32"),
            jax.grad(loss, argnums=(0, 1))(x, w, "llama"),
            rj.rms_norm_residual(x, x, w), rj.rms_norm_quantized(x, w))

  with jax.enable_checks(True), jax.numpy_dtype_promotion("strict"), \
      jax.numpy_rank_promotion("raise"):
    jax.jit(calls).trace(x, w).lower(lowering_platforms=(platform,))
    assert rj.dispatch.explain(platform=platform, shape=(64, 768),
                               dtype=jnp.bfloat16, scale_dtype=jnp.float32,
                               cast_mode="llama")


@pytest.mark.parametrize("make", BACKENDS)
def test_x64_keeps_results_and_serves_float64(make):
  x, res, scale = _inputs(1)
  want = _every_entry_point(make(), x, res, scale)
  with jax.enable_x64(True):
    got = _every_entry_point(make(), x, res, scale)
    _assert_same(got, want, "x64 on")
    # float64 is XLA's: "auto" serves it, statistics in float64.
    x64 = jnp.asarray(np.asarray(x, np.float64) * 3.0)
    y = rj.rms_norm(x64, jnp.asarray(scale, jnp.float64))
    assert y.dtype == jnp.float64
    assert_close(y, reference.rms_norm(x64, scale)[0], tol(jnp.float64),
                 "float64")


@pytest.mark.parametrize("make", BACKENDS)
def test_x64_llama_with_float64_scale_multiplies_in_float64(make):
  # The llama order multiplies in result_type(scale, x): float64 for a
  # float64 scale. Kernels multiply in float32, so they must decline the
  # call (an explicit kernel names why) rather than return float32 products
  # widened to float64.
  backend = make()
  x, _, scale = _inputs(4)
  with jax.enable_x64(True):
    s64 = jnp.asarray(scale, jnp.float64) + 1e-9  # not a float32 value
    want = rj.rms_norm(x, s64, cast_mode="llama", backend="xla")
    assert want.dtype == jnp.float64
    if isinstance(backend, base.Xla):
      got = rj.rms_norm(x, s64, cast_mode="llama", backend=backend)
    else:
      with pytest.raises(ValueError, match="float64 products"):
        rj.rms_norm(x, s64, cast_mode="llama", backend=backend)
      got = rj.rms_norm(x, s64, cast_mode="llama")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("make", BACKENDS)
def test_debug_nans_and_infs_raise_no_false_alarm(make):
  # Ragged rows and a hidden size that is not a power of two or of 128:
  # every kernel pads or masks here.
  x, res, scale = _inputs(2, shape=(5, 3, 100), dtype=jnp.float16)
  with jax.debug_nans(True), jax.debug_infs(True):
    outs = _every_entry_point(make(), x, res, scale)
  for leaf in jax.tree.leaves(outs):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize("make", BACKENDS)
def test_leak_checking_eval_shape_nested_vmap_and_donation(make):
  backend = make()
  x, res, scale = _inputs(3, shape=(2, 3, 4, 64), dtype=jnp.float32)
  with jax.checking_leaks():
    y = jax.jit(lambda x, s: rj.rms_norm(x, s, backend=backend))(x, scale)
  shapes = jax.eval_shape(
      lambda x, r, s: rj.rms_norm_residual(x, r, s, backend=backend),
      x, res, scale)
  assert [(s.shape, s.dtype) for s in shapes] == [(x.shape, x.dtype)] * 2
  nested = jax.vmap(jax.vmap(lambda a: rj.rms_norm(a, scale,
                                                   backend=backend)))(x)
  assert_close(nested, y, tol(jnp.float32), "vmap of vmap")
  # Per-example scales and gradients under vmap of vmap.
  scales = jnp.broadcast_to(scale, (2, 3, 64)) * jnp.arange(
      1, 7, dtype=jnp.float32).reshape(2, 3, 1)
  grads = jax.vmap(jax.vmap(jax.grad(
      lambda a, s: rj.rms_norm(a, s, backend=backend).sum(), argnums=1)))(
          x, scales)
  for i in range(2):
    for j in range(3):
      want = jax.grad(lambda s: rj.rms_norm(x[i, j], s, backend="xla").sum())(
          scales[i, j])
      assert_close(grads[i, j], want, tol(jnp.float32), "per-example dscale")
  donated = jax.jit(lambda x, s: rj.rms_norm(x, s, backend=backend),
                    donate_argnums=0)(jnp.array(x), scale)
  assert_close(donated, y, 0.0, "donated x")


def _poly_export(fn, spec, hidden, backend_platforms=("cpu", "cuda", "tpu")):
  dims = jax.export.symbolic_shape(spec)
  args = (jax.ShapeDtypeStruct((*dims, hidden), jnp.float32),
          jax.ShapeDtypeStruct((hidden,), jnp.float32))
  exp = jax.export.export(jax.jit(fn), platforms=list(backend_platforms),
                          disabled_checks=UNSTABLE_OK)(*args)
  return jax.export.deserialize(exp.serialize())


@pytest.mark.parametrize("op", ["fwd", "grad", "grad_of_grad", "fused",
                                "linen", "nnx", "weight_dtype"])
def test_symbolic_leading_dims_export_for_three_platforms(op):
  hidden = 96
  linen = rj.linen.RMSNorm()
  params = {"params": {"scale": jnp.linspace(0.5, 1.5, hidden)}}
  nnx_norm = rj.nnx.RMSNorm(hidden, rngs=nnx.Rngs(0))
  fns = {
      "fwd": lambda x, s: rj.rms_norm(x, s),
      "grad": lambda x, s: jax.grad(lambda x, s: rj.rms_norm(x, s).sum(),
                                    argnums=(0, 1))(x, s),
      "grad_of_grad": lambda x, s: jax.grad(lambda x, s: sum(
          jnp.sum(g ** 2) for g in jax.grad(
              lambda x, s: jnp.sum(jnp.sin(rj.rms_norm(x, s))),
              argnums=(0, 1))(x, s)), argnums=(0, 1))(x, s),
      "fused": lambda x, s: rj.rms_norm_residual(x, x * 0.5, s),
      "linen": lambda x, s: linen.apply(
          {"params": {"scale": s}}, x),
      "nnx": lambda x, s: nnx_norm(x) * s,
      "weight_dtype": lambda x, s: jax.grad(
          lambda s: rj.rms_norm(x, s, weight_dtype=jnp.bfloat16).sum())(s),
  }
  exp = _poly_export(fns[op], "b, s", hidden)
  assert exp.platforms == ("cpu", "cuda", "tpu")
  for shape in [(2, 3), (5, 7)]:
    rng = np.random.default_rng(sum(shape))
    x = random(rng, (*shape, hidden), jnp.float32)
    s = params["params"]["scale"]
    _assert_same(exp.call(x, s), jax.jit(fns[op])(x, s),
                 f"exported {op} at {shape}")


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
def test_explicit_kernel_names_the_symbolic_dim_it_cannot_take(name):
  with pytest.raises(ValueError, match=rf"{name}.*symbolic.*b\*s|{name}.*"
                     r"symbolic.*s\*b"):
    _poly_export(lambda x, s: rj.rms_norm(x, s, backend=name), "b, s", 128)


def test_flax_layers_export_like_flax_does():
  # flax's own layer is the yardstick: it exports with symbolic dims.
  hidden = 64
  theirs = fnn.RMSNorm()
  ours = rj.linen.RMSNorm()
  params = theirs.init(jax.random.key(0), jnp.ones((1, hidden)))
  exp_theirs = _poly_export(lambda x, s: theirs.apply(
      {"params": {"scale": s}}, x), "b", hidden, ("cpu",))
  exp_ours = _poly_export(lambda x, s: ours.apply(
      {"params": {"scale": s}}, x), "b", hidden, ("cpu",))
  x = random(np.random.default_rng(4), (9, hidden), jnp.float32)
  s = params["params"]["scale"]
  assert_close(exp_ours.call(x, s), exp_theirs.call(x, s), tol(jnp.float32),
               "ours vs flax, exported")


def _feature_calls(backend, x, res, scale):
  """bias, per-head scale, the llama order and the quantized output."""
  bias = scale * 0.5 - 0.25
  heads = jnp.broadcast_to(scale, (x.shape[-2], x.shape[-1])) * 1.5
  return {
      "bias_llama": rj.rms_norm(x, scale, bias, cast_mode="llama",
                                backend=backend),
      "per_head": rj.rms_norm(x, heads, backend=backend),
      "per_head_grad": jax.grad(lambda s: rj.rms_norm(
          x, s, backend=backend).astype(jnp.float32).sum())(heads),
      "bias_grad": jax.grad(lambda b: rj.rms_norm_residual(
          x, res, scale, b, backend=backend)[0].astype(jnp.float32).sum())(
              bias),
      "quantized": rj.rms_norm_quantized(x, scale, residual=res,
                                         quant_dtype=jnp.int8,
                                         backend=backend),
  }


@pytest.mark.parametrize("make", BACKENDS)
def test_features_under_promotion_raise_strict_and_x64(make):
  x, res, scale = _inputs(5)
  want = _feature_calls(make(), x, res, scale)
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    _assert_same(_feature_calls(make(), x, res, scale), want,
                 "features under rank 'raise' / strict promotion")
  with jax.enable_x64(True):
    _assert_same(_feature_calls(make(), x, res, scale), want,
                 "features under x64")


def test_quantized_output_exports_with_symbolic_dims():
  hidden = 96
  fn = lambda x, s: rj.rms_norm_quantized(x, s, quant_dtype=jnp.int8)
  exp = _poly_export(fn, "b, s", hidden)
  for shape in [(2, 3), (5, 7)]:
    rng = np.random.default_rng(sum(shape))
    x = random(rng, (*shape, hidden), jnp.float32)
    s = jnp.linspace(0.5, 1.5, hidden)
    _assert_same(exp.call(x, s), jax.jit(fn)(x, s), f"quantized at {shape}")


# The default call's GPU routes ("auto" on a Hopper GPU), a shape each, and
# the kernels its forward, fused forward and gradient lower to there ("xla":
# none). The routes are gpu.py's and mosaic_gpu.py's tables
# (tests/test_dispatch.py, tests/test_mosaic_gpu_wide.py); pinning them here
# keeps the check below on every route.
T, M = "triton", "mosaic_gpu"
HOPPER_ROUTES = [
    pytest.param((8, 16384), ({"xla"}, {T}, {M}), id="few_wide_rows"),
    pytest.param((257, 4096), ({T}, {T}, {T}), id="triton"),
    pytest.param((4096, 5120), ({T}, {T}, {T, M}), id="model_width"),
    pytest.param((300, 16384), ({T}, {M}, {T, M}), id="wide_bwd"),
    pytest.param((256, 12288), ({T}, {M}, {T, M}), id="fused_per_row"),
    pytest.param((384, 12288), ({M}, {M}, {M}), id="fwd_per_row_cta"),
    pytest.param((384, 32768), ({M}, {T}, {M}), id="wide_fwd"),
    pytest.param((1024, 32768), ({M}, {M}, {M}), id="wide_split"),
    pytest.param((64, 65536), ({M}, {M}, {M}), id="fwd_per_row"),
]


def _kernels(fn, *args) -> set[str]:
  text = jax.jit(fn).trace(*args).lower().as_text()
  found = {name for name, mark in ((M, "mosaic_gpu"),
                                   (T, TRITON_CALL_TARGET))
           if mark in text}
  return found or {"xla"}


def _routes(x, res, scale):
  """The kernels of the forward, the fused forward and the gradient."""
  grad = jax.grad(lambda x, s: rj.rms_norm(x, s).astype(jnp.float32).sum(),
                  argnums=(0, 1))
  return (_kernels(lambda x, s: rj.rms_norm(x, s), x, scale),
          _kernels(lambda x, s: rj.rms_norm_residual(x, res, s), x, scale),
          _kernels(grad, x, scale))


@hopper
@pytest.mark.parametrize("shape,routes", HOPPER_ROUTES)
def test_default_gpu_routes_under_strict_settings_match(shape, routes):
  # Compiled, on the kernels "auto" picks: rank promotion "raise", strict
  # dtype promotion, x64, debug_nans and debug_infs together change neither
  # the route nor a bit of any entry point's outputs and gradients, and
  # raise no false alarm (the wide kernels leave out-of-bounds tile reads
  # undefined and mask them).
  rng = np.random.default_rng(shape[0] * 7 + shape[1])
  x = random(rng, shape, jnp.bfloat16, mean=0.3)
  res = random(rng, shape, jnp.bfloat16, mean=0.5)
  scale = random(rng, shape[-1:], jnp.bfloat16, mean=1.0, scale=0.3)
  assert _routes(x, res, scale) == routes
  want = _every_entry_point("auto", x, res, scale)
  with jax.numpy_rank_promotion("raise"), \
      jax.numpy_dtype_promotion("strict"), jax.enable_x64(True), \
      jax.debug_nans(True), jax.debug_infs(True):
    got = _every_entry_point("auto", x, res, scale)
    assert _routes(x, res, scale) == routes
  _assert_same(got, want, f"strict settings, routes {routes}")
  for leaf in jax.tree.leaves(got):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
