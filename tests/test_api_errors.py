"""Bad input gets an error that names the argument, the expected and the given."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj

X = jnp.ones((4, 16), jnp.float32) * jnp.arange(1, 17, dtype=jnp.float32)


@pytest.mark.parametrize("fn", [
    lambda s: rj.rms_norm(X, s),
    lambda s: rj.rms_norm_residual(X, X, s),
], ids=["rms_norm", "rms_norm_residual"])
@pytest.mark.parametrize("bad", [(15,), (16, 1), (1, 16), ()])
def test_scale_shape(fn, bad):
  with pytest.raises(ValueError, match=r"scale must have shape \(16,\).*got "
                     + "shape " + "\\" + str(bad).replace(")", "\\)")):
    fn(jnp.ones(bad, jnp.float32))


def test_residual_shape():
  with pytest.raises(ValueError,
                     match=r"residual must have the same shape as x, \(4, 16\)"
                     r"; got shape \(4, 8\)"):
    rj.rms_norm_residual(X, jnp.ones((4, 8)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_floating_x(dtype):
  with pytest.raises(TypeError, match=r"x must have a real floating-point "
                     r"dtype .*got shape \(4, 16\) and dtype " +
                     np.dtype(dtype).name):
    rj.rms_norm(jnp.ones((4, 16), dtype))


def test_non_floating_scale_and_residual():
  with pytest.raises(TypeError, match="scale must have a real floating"):
    rj.rms_norm(X, jnp.ones((16,), jnp.int32))
  with pytest.raises(TypeError, match="residual must have a real floating"):
    rj.rms_norm_residual(X, jnp.ones((4, 16), jnp.int8))


@pytest.mark.parametrize("eps,exc,msg", [
    (-1e-6, ValueError, r"eps must be >= 0; got -1e-06"),
    (float("nan"), ValueError, r"eps must be finite; got nan"),
    (float("inf"), ValueError, r"eps must be finite; got inf"),
    ("1e-6", TypeError, r"eps must be a Python float .*got '1e-6' of type str"),
    (jnp.float32(1e-6), TypeError, r"eps must be a Python float"),
])
def test_bad_eps(eps, exc, msg):
  with pytest.raises(exc, match=msg):
    rj.rms_norm(X, eps=eps)
  with pytest.raises(exc, match=msg):
    rj.rms_norm_residual(X, X, eps=eps)


def test_eps_traced_inside_jit_is_rejected():
  with pytest.raises(TypeError, match="eps must be a Python float"):
    jax.jit(lambda x, e: rj.rms_norm(x, eps=e))(X, 1e-6)


def test_zero_dim_x():
  with pytest.raises(ValueError, match=r"x must have at least one dimension.*"
                     r"got a 0-d array of dtype float32"):
    rj.rms_norm(jnp.float32(3.0))


def test_unknown_backend():
  with pytest.raises(ValueError, match=r"backend must be one of \(.*'auto', "
                     r"'xla', 'pallas'.*; got 'cudnn'"):
    rj.rms_norm(X, backend="cudnn")
  with pytest.raises(ValueError, match="backend must be one of"):
    rj.rms_norm_residual(X, X, backend=None)


def test_explicit_backend_without_kernel_for_platform_is_an_error():
  # A CPU has no Pallas kernel; asking for one explicitly must not silently
  # run XLA instead.
  # (Rows of 128 float32 columns, which a GPU kernel serves on a host with
  # no GPU under any jax: Mosaic GPU, where jax 0.11 has no GPU to lower the
  # Triton kernels for. "pallas" needs a kernel for every kernel platform.)
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU platform")
  x = jnp.ones((4, 128), jnp.float32)
  with pytest.raises(ValueError, match=r"backend='pallas' has no "
                     r"implementation for platform 'cpu'"):
    jax.jit(lambda x: rj.rms_norm(x, backend="pallas"))(x)
  with pytest.raises(ValueError, match=r"for platform 'cpu'"):
    rj.rms_norm_residual(x, x, backend="pallas")


def test_scale_offset_needs_scale():
  with pytest.raises(ValueError, match=r"scale_offset applies to scale.*got "
                     r"scale=None with scale_offset=1.0"):
    rj.rms_norm(X, scale_offset=1.0)


def test_bad_out_dtype():
  with pytest.raises(TypeError, match="out_dtype must be a floating dtype; "
                     "got int32"):
    rj.rms_norm(X, out_dtype=jnp.int32)


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16), (4, 0)])
def test_empty_arrays_give_empty_results(shape):
  x = jnp.ones(shape, jnp.bfloat16)
  scale = jnp.ones((shape[-1],), jnp.float32)
  y = rj.rms_norm(x, scale)
  assert y.shape == shape and y.dtype == jnp.bfloat16
  y, h = rj.rms_norm_residual(x, x, scale)
  assert y.shape == shape and h.shape == shape
  g = jax.grad(lambda s: rj.rms_norm(x, s).astype(jnp.float32).sum())(scale)
  assert g.shape == scale.shape


@pytest.mark.parametrize("bad", [(15,), (4, 16), ()])
def test_bias_shape(bad):
  with pytest.raises(ValueError, match=r"bias must have shape \(16,\).*got "
                     r"shape " + re.escape(str(bad))):
    rj.rms_norm(X, None, jnp.ones(bad, jnp.float32))
  with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
    rj.rms_norm_residual(X, X, None, jnp.ones(bad, jnp.float32))


def test_per_head_scale_shape_is_named():
  x = jnp.ones((2, 4, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"scale must have shape \(8,\).*or, "
                     r"per head, \(4, 8\); got shape \(3, 8\)"):
    rj.rms_norm(x, jnp.ones((3, 8)))


@pytest.mark.parametrize("mode", ["Llama", "bf16", None, 1])
def test_unknown_cast_mode(mode):
  with pytest.raises(ValueError, match=r"cast_mode must be one of \('float32'"
                     r", 'llama'\); got " + re.escape(repr(mode))):
    rj.rms_norm(X, cast_mode=mode)


def test_explicit_kernel_gives_its_reason():
  # float64 is XLA's; an explicit kernel says why it cannot serve it.
  with jax.enable_x64(True):
    x = jnp.ones((4, 16), jnp.float64)
    for name in ("pallas_gpu", "pallas_tpu"):
      with pytest.raises(ValueError, match=rf"backend='{name}' cannot serve "
                         r"this call: .*not float64"):
        rj.rms_norm(x, backend=name)
