"""Gradients and JAX transformations of the public functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rmsnorm_jax as rj
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.tpu import PallasTpu

from numerics_util import assert_close, random


def plain_rms_norm(x, scale, eps=1e-6, offset=0.0):
  """The formula, for autodiff to differentiate."""
  xf = x.astype(jnp.float32)
  ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
  return xf * jax.lax.rsqrt(ms + eps) * (scale.astype(jnp.float32) + offset)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_check_grads_float64(x64):
  del x64
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float64)
  res = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float64)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(7,)), jnp.float64)
  assert rj.rms_norm(x, scale).dtype == jnp.float64
  check_grads(lambda x, s: rj.rms_norm(x, s, scale_offset=0.5), (x, scale),
              order=1, modes=["rev"])
  check_grads(lambda x: rj.rms_norm(x), (x,), order=1, modes=["rev"])
  check_grads(lambda x, r, s: rj.rms_norm_residual(x, r, s), (x, res, scale),
              order=1, modes=["rev"])


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_grads_equal_autodiff_of_formula_float32(offset):
  rng = np.random.default_rng(1)
  x = random(rng, (16, 96), jnp.float32, mean=0.2)
  scale = random(rng, (96,), jnp.float32, scale=0.5)
  dy = random(rng, (16, 96), jnp.float32)
  ours = jax.vjp(lambda x, s: rj.rms_norm(x, s, scale_offset=offset),
                 x, scale)[1](dy)
  auto = jax.vjp(lambda x, s: plain_rms_norm(x, s, offset=offset),
                 x, scale)[1](dy)
  for a, b, name in zip(ours, auto, ("dx", "dscale")):
    assert_close(a, b, 1e-5, name)


def test_residual_grads_equal_autodiff_float32():
  rng = np.random.default_rng(2)
  x, r, dy, dh = (random(rng, (8, 64), jnp.float32) for _ in range(4))
  scale = random(rng, (64,), jnp.float32)
  ours = jax.vjp(rj.rms_norm_residual, x, r, scale)[1]((dy, dh))
  plain = lambda x, r, s: (plain_rms_norm(x + r, s), x + r)
  auto = jax.vjp(plain, x, r, scale)[1]((dy, dh))
  for a, b, name in zip(ours, auto, ("dx", "dresidual", "dscale")):
    assert_close(a, b, 1e-5, name)


def _loss(x, scale):
  # Weighted by position: sum(y**2) alone has an identically zero dx.
  w = jnp.cos(jnp.arange(x.shape[-1], dtype=jnp.float32))
  return jnp.sum(rj.rms_norm(x, scale).astype(jnp.float32) * w)


def test_jit_vmap_grad_agree():
  rng = np.random.default_rng(3)
  x = random(rng, (4, 6, 32), jnp.bfloat16)
  scale = random(rng, (32,), jnp.float32)
  per_example = jax.vmap(jax.grad(_loss), in_axes=(0, None))(x, scale)
  whole = jax.jit(jax.grad(_loss))(x[1], scale)
  assert_close(per_example[1], whole, 1e-6, "vmap(grad) vs jit(grad)")
  y_v = jax.vmap(lambda a: rj.rms_norm(a, scale))(x)
  assert_close(y_v, rj.rms_norm(x, scale), 1e-6, "vmap fwd")


def test_vmap_over_scale():
  rng = np.random.default_rng(4)
  x = random(rng, (3, 5, 16), jnp.float32)
  scales = random(rng, (3, 16), jnp.float32)
  got = jax.vmap(rj.rms_norm)(x, scales)
  want = jnp.stack([rj.rms_norm(x[i], scales[i]) for i in range(3)])
  assert_close(got, want, 1e-6, "vmap over scale")


def test_checkpoint_and_scan_over_layers():
  rng = np.random.default_rng(5)
  x = random(rng, (4, 64), jnp.float32)
  scales = random(rng, (3, 64), jnp.float32, mean=1.0, scale=0.1)
  dense = random(rng, (3, 64, 64), jnp.float32, scale=0.1)

  def block(h, params):
    s, w = params
    y, h = rj.rms_norm_residual(h @ w, h, s)
    return h + jnp.tanh(y), None

  def model(x, scales, dense, remat):
    step = jax.checkpoint(block) if remat else block
    h, _ = jax.lax.scan(step, x, (scales, dense))
    return jnp.sum(h ** 2)

  g_plain = jax.grad(model, (1, 2))(x, scales, dense, False)
  g_remat = jax.jit(jax.grad(model, (1, 2)), static_argnums=3)(
      x, scales, dense, True)
  for a, b in zip(g_plain, g_remat):
    assert_close(a, b, 1e-6, "checkpoint+scan")


def test_forward_mode_raises_with_reason():
  x = jnp.ones((2, 8))
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jvp(rj.rms_norm, (x,), (x,))
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jacfwd(lambda x: rj.rms_norm_residual(x, x)[0])(x)


@pytest.mark.parametrize("backend", [
    "auto",  # on CPU: XLA here, the TPU and GPU kernels in the primitive
    pytest.param(PallasGpu(interpret=True), id="pallas_gpu_interpret"),
    pytest.param(PallasTpu(interpret=True), id="pallas_tpu_interpret")])
def test_second_order_derivatives_match_xla(backend):
  # The first-order backward is the kernels' (custom_vjp); differentiating
  # it again reaches the primitive's JVP rule: grad of grad, jax.hessian
  # (forward over reverse) and a Hessian-vector product under vmap. The
  # reference is the same loss on backend="xla", plain jax.numpy that JAX
  # differentiates itself. Tolerance: float32 rounding of terms up to 2e5
  # (rows near zero), relative.
  rng = np.random.default_rng(7)
  x = random(rng, (2, 5, 24), jnp.float32)
  res = random(rng, (2, 5, 24), jnp.float32)
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=(24,)), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.1, size=(24,)), jnp.float32)
  head_scale = jnp.asarray(rng.normal(1.0, 0.3, size=(5, 24)), jnp.float32)

  def losses(be):
    return {
        "bias": lambda x, s: jnp.sum(jnp.sin(rj.rms_norm(x, s, bias,
                                                         backend=be))),
        "residual": lambda x, s: jnp.sum(
            jnp.cos(rj.rms_norm_residual(x, res, s, backend=be)[0])
            + rj.rms_norm_residual(x, res, s, backend=be)[1] ** 2),
        "per_head": lambda x, s: jnp.sum(jnp.sin(rj.rms_norm(
            x, s * head_scale, scale_offset=0.5, backend=be))),
    }

  def second_order(loss):
    gg = jax.grad(lambda x, s: sum(
        jnp.sum(g ** 2) for g in jax.grad(loss, (0, 1))(x, s)), (0, 1))
    hess = jax.hessian(loss, (0, 1))
    hvp = jax.vmap(lambda v: jax.grad(lambda x: jnp.vdot(
        jax.grad(loss)(x, scale), v))(x))
    return (jax.jit(gg)(x, scale), jax.jit(hess)(x, scale),
            jax.jit(hvp)(jnp.stack([x, res])))

  ours, want = losses(backend), losses("xla")
  for name in ours:
    for got, ref in zip(jax.tree.leaves(second_order(ours[name])),
                        jax.tree.leaves(second_order(want[name]))):
      assert_close(got, ref, 1e-5, f"{name}: second order")


def test_saved_residuals_are_input_scale_and_rstd():
  # The backward needs x, scale and a float32 rstd per row; the normalized
  # output is never kept alive for it.
  x = jnp.ones((4, 128), jnp.bfloat16) * jnp.arange(128, dtype=jnp.bfloat16)
  scale = jnp.ones((128,), jnp.bfloat16)
  # The vjp closure's leaves are exactly what the backward keeps alive.
  _, vjp_fn = jax.vjp(lambda x, s: rj.rms_norm(x, s), x, scale)
  saved = sorted((tuple(a.shape), str(a.dtype))
                 for a in jax.tree.leaves(vjp_fn))
  assert saved == sorted([((128,), "bfloat16"), ((4,), "float32"),
                          ((4, 128), "bfloat16")]), saved
