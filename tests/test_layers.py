"""The linen and nnx layers against flax's own RMSNorm."""

import flax.linen as fnn
from flax import nnx as fnnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import linen as rlinen
from rmsnorm_jax import nnx as rnnx

from numerics_util import assert_close, random, tol

CONFIGS = [
    dict(),
    dict(dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16),
    dict(dtype=jnp.float32, param_dtype=jnp.bfloat16),
    dict(use_scale=False),
    dict(epsilon=1e-3, scale_init=fnn.initializers.normal(0.5)),
    dict(reduction_axes=(-2, -1), feature_axes=-1),
    dict(reduction_axes=-1, feature_axes=(-2, -1)),
    dict(force_float32_reductions=False),
]
INPUT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _ids(c):
  return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items()) \
      or "defaults"


def _out_tol(y):
  return tol(y.dtype)


@pytest.mark.parametrize("x_dtype", INPUT_DTYPES,
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_linen_matches_flax(config, x_dtype):
  rng = np.random.default_rng(7)
  x = random(rng, (2, 6, 48), x_dtype, mean=0.2)
  ours, theirs = rlinen.RMSNorm(**config), fnn.RMSNorm(**config)
  key = jax.random.key(3)
  p_ours, p_theirs = ours.init(key, x), theirs.init(key, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), p_theirs)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
    np.testing.assert_array_equal(a, b)
  dy = random(rng, x.shape, jax.eval_shape(theirs.apply, p_theirs, x).dtype)

  # Both layers, forward and backward, in one program.
  @jax.jit
  def both(p, x, dy):
    y_ours, vjp_ours = jax.vjp(ours.apply, p, x)
    y_theirs, vjp_theirs = jax.vjp(theirs.apply, p, x)
    return y_ours, y_theirs, vjp_ours(dy), vjp_theirs(dy)

  y_ours, y_theirs, g_ours, g_theirs = both(p_theirs, x, dy)
  assert y_ours.dtype == y_theirs.dtype and y_ours.shape == x.shape
  assert_close(y_ours, y_theirs, _out_tol(y_theirs), "y")
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    assert a.dtype == b.dtype
    assert_close(a, b, tol(b.dtype, y_theirs.dtype), "grad")


@pytest.mark.parametrize("x_dtype", INPUT_DTYPES,
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", [c for c in CONFIGS
                                    if "force_float32_reductions" not in c
                                    and "feature_axes" not in c], ids=_ids)
def test_nnx_matches_flax(config, x_dtype):
  rng = np.random.default_rng(8)
  x = random(rng, (3, 5, 40), x_dtype, mean=-0.1)
  ours = rnnx.RMSNorm(40, rngs=fnnx.Rngs(0), **config)
  theirs = fnnx.RMSNorm(40, rngs=fnnx.Rngs(0), **config)
  assert isinstance(ours, fnnx.RMSNorm)
  s_ours, s_theirs = fnnx.state(ours, fnnx.Param), fnnx.state(theirs,
                                                             fnnx.Param)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), s_ours) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), s_theirs)
  # A random projection: sum(y**2) would have an identically zero dx.
  proj = random(rng, x.shape, jnp.float32)

  def loss(model, x):
    y = model(x)
    return jnp.sum(y.astype(jnp.float32) * proj), y

  # Both layers, outputs and gradients, in one program.
  @fnnx.jit
  def both(ours, theirs, x):
    grad = fnnx.grad(loss, argnums=(0, 1), has_aux=True)
    return grad(ours, x), grad(theirs, x)

  (g_ours, y_ours), (g_theirs, y_theirs) = both(ours, theirs, x)
  assert y_ours.dtype == y_theirs.dtype
  assert_close(y_ours, y_theirs, _out_tol(y_theirs), "y")
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    assert a.dtype == b.dtype
    assert_close(a, b, tol(b.dtype, y_theirs.dtype), "grad")


def test_linen_mask_and_axis_name_follow_flax():
  rng = np.random.default_rng(9)
  x = random(rng, (4, 3, 32), jnp.float32)
  mask = jnp.asarray(rng.random((4, 3, 32)) > 0.3)
  ours, theirs = rlinen.RMSNorm(), fnn.RMSNorm()
  params = theirs.init(jax.random.key(0), x)
  assert_close(ours.apply(params, x, mask=mask),
               theirs.apply(params, x, mask=mask), 1e-6, "mask")
  ours, theirs = rlinen.RMSNorm(axis_name="b"), fnn.RMSNorm(axis_name="b")
  run = lambda m: jax.vmap(lambda xi: m.apply(params, xi), axis_name="b")(x)
  assert_close(run(ours), run(theirs), 1e-6, "axis_name")


def test_linen_gemma_offset_equals_flax_with_shifted_scale():
  rng = np.random.default_rng(10)
  x = random(rng, (8, 64), jnp.bfloat16)
  ours = rlinen.RMSNorm(scale_offset=1.0, scale_init=fnn.initializers.zeros)
  p = ours.init(jax.random.key(0), x)
  p = jax.tree.map(lambda s: s + 0.1 * jnp.arange(64, dtype=s.dtype), p)
  shifted = jax.tree.map(lambda s: s + 1.0, p)
  assert_close(ours.apply(p, x), fnn.RMSNorm().apply(shifted, x),
               tol(jnp.float32), "gemma")


def test_layers_run_under_jit_and_in_a_transformer_block():
  class Block(fnn.Module):
    @fnn.compact
    def __call__(self, x, res):
      y, res = rlinen.RMSNormResidual()(x, res)
      return fnn.Dense(x.shape[-1])(y), res

  rng = np.random.default_rng(11)
  x = random(rng, (2, 4, 32), jnp.float32)
  params = Block().init(jax.random.key(0), x, x)
  out, res = jax.jit(Block().apply)(params, x, x)
  assert out.shape == x.shape
  assert_close(res, 2 * np.asarray(x), 1e-7, "residual")


def _linen_lifted(norm):
  class Block(fnn.Module):
    @fnn.compact
    def __call__(self, h, _):
      y = norm(scale_init=fnn.initializers.normal(1.0))(h)
      return h + jnp.tanh(fnn.Dense(h.shape[-1])(y)), None

  class Model(fnn.Module):
    @fnn.compact
    def __call__(self, h):
      stack = fnn.scan(fnn.remat(Block), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=3)
      h = stack()(h, None)[0]
      per_row = fnn.vmap(norm, variable_axes={"params": 0},
                         split_rngs={"params": True})
      return per_row(scale_init=fnn.initializers.normal(1.0))(h)
  return Model()


def _nnx_lifted(norm, x):
  @fnnx.split_rngs(splits=3)
  @fnnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return norm(x.shape[-1], scale_init=fnnx.initializers.normal(1.0),
                rngs=rngs)

  @fnnx.scan(in_axes=(fnnx.Carry, 0), out_axes=fnnx.Carry)
  @fnnx.remat
  def step(h, layer):
    return h + jnp.tanh(layer(h)).astype(h.dtype)

  layers = make(fnnx.Rngs(0))
  y = fnnx.jit(step)(x, layers)
  grads = fnnx.grad(lambda m: jnp.sum(step(x, m) ** 2))(layers)
  return y, jax.tree.leaves(fnnx.state(grads, fnnx.Param))


def test_layers_under_flax_lifted_transforms_match_flax():
  # Stacked layers as models build them: nn.scan of nn.remat blocks and
  # nn.vmap (linen), nnx.vmap-created layers under nnx.scan of nnx.remat
  # (nnx). Same parameters, outputs and gradients as flax's RMSNorm.
  rng = np.random.default_rng(5)
  x = random(rng, (4, 6, 32), jnp.float32)
  ours, theirs = _linen_lifted(rlinen.RMSNorm), _linen_lifted(fnn.RMSNorm)
  params = theirs.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
          == jax.tree.map(jnp.shape, params))
  loss = lambda m: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1)))
  for got, want in zip(jax.tree.leaves(loss(ours)(params, x)),
                       jax.tree.leaves(loss(theirs)(params, x))):
    assert_close(got, want, 1e-5, "linen scan/remat/vmap")
  (y, g), (y_ref, g_ref) = _nnx_lifted(rnnx.RMSNorm, x), _nnx_lifted(
      fnnx.RMSNorm, x)
  assert_close(y, y_ref, 1e-5, "nnx scan/remat output")
  assert len(g) == len(g_ref) == 1
  assert_close(g[0], g_ref[0], 1e-5, "nnx scan/remat dscale")


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_residual_layers_equal_function(dtype):
  rng = np.random.default_rng(12)
  x = random(rng, (3, 4, 96), dtype)
  r = random(rng, (3, 4, 96), jnp.float32)
  lin = rlinen.RMSNormResidual(epsilon=1e-5)
  p = lin.init(jax.random.key(0), x, r)
  p = jax.tree.map(lambda s: s * 1.5, p)
  y_lin, h_lin = lin.apply(p, x, r)
  y_fn, h_fn = rj.rms_norm_residual(x, r, p["params"]["scale"], eps=1e-5)
  np.testing.assert_array_equal(y_lin, y_fn)
  np.testing.assert_array_equal(h_lin, h_fn)
  mod = rnnx.RMSNormResidual(96, epsilon=1e-5, rngs=fnnx.Rngs(0))
  mod.scale[...] = p["params"]["scale"]
  y_nnx, h_nnx = mod(x, r)
  np.testing.assert_array_equal(y_nnx, y_fn)
  np.testing.assert_array_equal(h_nnx, h_fn)
  assert h_nnx.dtype == jnp.float32 and y_nnx.dtype == jnp.float32


def test_layer_errors_name_the_argument():
  with pytest.raises(TypeError, match="x must have a real floating-point"):
    rlinen.RMSNorm().init(jax.random.key(0), jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="residual must have the same shape"):
    rnnx.RMSNormResidual(4, rngs=fnnx.Rngs(0))(jnp.ones((2, 4)),
                                               jnp.ones((2, 5)))


def _top_level_eqns(fn, *args):
  return jax.make_jaxpr(fn)(*args).eqns


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16],
                         ids=lambda d: np.dtype(d).name)
def test_nnx_exact_promotion_does_not_cast_x(x_dtype):
  # flax.nnx's default promotes 16-bit activations to the float32 params
  # before the norm: an exact cast, so x reaches the function uncast (one
  # kernel reading 16-bit x, not a float32 copy of x first).
  layer = rnnx.RMSNorm(64, rngs=fnnx.Rngs(0))
  x = random(np.random.default_rng(2), (4, 64), x_dtype)
  eqns = _top_level_eqns(lambda x: layer(x), x)
  assert not [e for e in eqns if e.primitive.name == "convert_element_type"]
  (call,) = [e for e in eqns if "custom_vjp" in e.primitive.name]
  assert [v.aval.dtype for v in call.invars[:2]] == [x_dtype, jnp.float32]
  assert layer(x).dtype == jnp.float32


def test_nnx_rounding_promotion_is_folded_into_the_call():
  # dtype=bfloat16 with float32 params rounds scale and bias to bfloat16 in
  # flax. That rounding changes values, so it stays, as the call's
  # weight_dtype: the float32 params reach the call uncast (no separate cast
  # kernel before it), and the values are those of the cast params.
  init = fnnx.initializers.normal(1.0)
  layer = rnnx.RMSNorm(64, dtype=jnp.bfloat16, use_bias=True,
                       scale_init=init, bias_init=init, rngs=fnnx.Rngs(0))
  x = random(np.random.default_rng(3), (4, 64), jnp.bfloat16)
  eqns = _top_level_eqns(lambda x: layer(x), x)
  assert not [e for e in eqns if e.primitive.name == "convert_element_type"]
  (call,) = [e for e in eqns if "custom_vjp" in e.primitive.name]
  assert [v.aval.dtype for v in call.invars[:3]] == [
      jnp.bfloat16, jnp.float32, jnp.float32]
  scale, bias = layer.scale[...], layer.bias[...]
  want = rj.rms_norm(x, scale.astype(jnp.bfloat16), bias.astype(jnp.bfloat16))
  assert not np.array_equal(np.asarray(scale.astype(jnp.bfloat16), np.float32),
                            np.asarray(scale))
  np.testing.assert_array_equal(np.asarray(layer(x), np.float32),
                                np.asarray(want, np.float32))


@pytest.mark.parametrize("param_dtype,dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.float32, None),
    (jnp.float32, jnp.bfloat16), (jnp.bfloat16, None)],
    ids=["bf16_params-f32", "f32_params-default", "f32_params-bf16",
         "bf16_params-default"])
def test_nnx_llama_mode_computes_on_the_promoted_arrays(param_dtype, dtype):
  # Under cast_mode="llama" x's dtype rounds x_hat and the parameters' sets
  # the products, so even an exact widening by promote_dtype changes the
  # result: the layer must equal rms_norm on the promoted arrays (the two
  # widening cases differed by a bfloat16 rounding before).
  layer = rnnx.RMSNorm(256, cast_mode="llama", dtype=dtype,
                       param_dtype=param_dtype,
                       scale_init=fnnx.initializers.normal(1.0),
                       rngs=fnnx.Rngs(0))
  x = random(np.random.default_rng(7), (8, 256), jnp.bfloat16)
  y = layer(x)
  px, ps = layer.promote_dtype((x, layer.scale[...]), dtype=dtype)
  want = rj.rms_norm(px, ps, cast_mode="llama", out_dtype=y.dtype)
  assert y.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(want, np.float32))


def test_nnx_custom_promote_dtype_is_followed():
  def to_bf16(args, *, dtype=None, inexact=True):
    del dtype, inexact
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16)
                 for a in args)
  rng = np.random.default_rng(4)
  x = random(rng, (3, 40), jnp.float32)
  kw = dict(promote_dtype=to_bf16, scale_init=fnnx.initializers.normal(1.0))
  ours = rnnx.RMSNorm(40, rngs=fnnx.Rngs(0), **kw)
  theirs = fnnx.RMSNorm(40, rngs=fnnx.Rngs(0), **kw)
  y_ours, y_theirs = ours(x), theirs(x)
  assert y_ours.dtype == y_theirs.dtype == jnp.bfloat16
  assert_close(y_ours, y_theirs, tol(jnp.bfloat16), "y")
