"""PallasGpu's features beyond the plain norm: bias, cast_mode "llama",
per-head scale, quantized output; determinism; Triton lowering.

Each check calls the Implementation methods on 2-D row views, in two modes:
``interpret`` (the Pallas interpreter, on CPU in CI: small shapes) and
``compiled`` (Triton on a CUDA GPU, marked ``gpu`` and skipped elsewhere with
the reason). Every output starts as NaN (``poison_outputs``), so an element
the kernel never writes fails the checks. Inputs are fresh random normals
with nonzero means (never zeros, except the deliberate zero row of the
quantization test).

References and tolerances:

* ``base.Xla`` computes the same formulas with XLA (the numerics every
  kernel must follow): outputs in 16-bit dtypes may differ by one ulp where
  the float32 value sits at a rounding boundary (the sum of squares is added
  in another order), so the tolerance on ``||got - want|| / ||want||`` is
  one ulp relative; float32 results differ by reduction order only.
* the float64 reference (float32 cast mode), of the dtypes an output passed
  through (one rounding to each).
* ``reference.emulate`` (each cast mode's formula with the reference
  libraries' roundings): 16-bit outputs identical in at least 99.9% of the
  elements (one-ulp flips from the order of the float32 sum of squares are
  the only allowed difference); float32 outputs within a few ulps.
All bounds are ``numerics_util.TOLERANCE``'s.
* quantized: ``q`` equal, bit for bit, to ``base.quantize`` of the same
  kernel's own float32 ``y``; dequantized ``q * q_scale`` within half a
  quantization step of the float64 reference (plus the float32 error of y).
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax.kernels import gpu_kernels
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import TRITON_CALL_TARGET, PallasGpu

from gpu_test_util import COMPILED, MODES, impl_for
from numerics_util import assert_close, assert_matches_emulation
from numerics_util import identical_fraction, random, rng_for
from numerics_util import TOLERANCE, tol, xla_tol

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(
    jnp.float16)
QUANT_DTYPES = [np.dtype(jnp.int8), np.dtype(jnp.float8_e4m3fn),
                np.dtype(jnp.float8_e5m2)]




def _f64(a):
  return None if a is None else np.asarray(np.asarray(a, np.float32),
                                           np.float64)


def _scale_rows(w, rows):
  return w[None, :] if w.ndim == 1 else np.tile(w, (rows // w.shape[0], 1))


def _reference64(x, scale, bias, dy, eps, offset=0.0):
  """Float64 (y, dx, dscale, dbias) of the float32 cast mode."""
  x, dy = _f64(x), _f64(dy)
  rows, hidden = x.shape
  r = 1.0 / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps)
  xhat = x * r
  w = np.ones((1, hidden)) if scale is None else _scale_rows(
      _f64(scale) + offset, rows)
  y = xhat * w + (0.0 if bias is None else _f64(bias)[None, :])
  g = dy * w
  dx = r * (g - xhat * np.mean(g * xhat, axis=1, keepdims=True))
  dscale = None
  if scale is not None:
    dscale = (dy * xhat).reshape(-1, *np.shape(scale)).sum(0)
  dbias = None if bias is None else dy.sum(0)
  return y, dx, dscale, dbias


def _inputs(key, rows, hidden, dtype, *, scale_shape, scale_dtype,
            bias_dtype=None, out_dtype=None):
  rng = rng_for(*key)
  x = random(rng, (rows, hidden), dtype, mean=0.3)
  scale = None if scale_shape is None else random(
      rng, scale_shape, scale_dtype, mean=1.0, scale=0.5)
  bias = None if bias_dtype is None else random(rng, (hidden,), bias_dtype,
                                                mean=0.1, scale=0.5)
  dy = random(rng, (rows, hidden), out_dtype or dtype)
  return x, scale, bias, dy


def _run(impl, x, scale, bias, dy, norm):
  y, rstd = jax.jit(functools.partial(impl.forward, norm=norm))(
      x, scale, bias)
  dx, dscale, dbias = jax.jit(functools.partial(impl.backward, norm=norm))(
      x, scale, bias, rstd, dy)
  return y, rstd, dx, dscale, dbias


def _check_against_xla(impl, x, scale, bias, dy, norm):
  """Forward and gradients against base.Xla; returns the kernel's results."""
  got = _run(impl, x, scale, bias, dy, norm)
  want = _run(base.Xla(), x, scale, bias, dy, norm)
  y, _, dx, dscale, dbias = got
  assert y.dtype == np.dtype(norm.out_dtype) and dx.dtype == x.dtype
  assert_close(y, want[0], xla_tol(y.dtype), "y vs xla")
  # dx is a difference of terms of size ||rstd * dy * w||, so its error is
  # judged against that size (it cancels for tiny rows).
  assert_close(dx, want[2], xla_tol(x.dtype, dy.dtype), "dx vs xla",
               magnitude=float(np.linalg.norm(_f64(dy)) * 2))
  for name, a, b in (("dscale", dscale, want[3]), ("dbias", dbias, want[4])):
    if b is None:
      assert a is None, name
      continue
    assert a.dtype == F32 and a.shape == b.shape, name
    assert_close(a, b, xla_tol(x.dtype, dy.dtype), f"{name} vs xla")
  return got


# ----------------------------------------------------------- cannot_serve --

@pytest.mark.parametrize("op", ["forward", "backward", "residual_forward",
                                "residual_backward", "quantized_forward"])
def test_serves_every_feature(op):
  impl = PallasGpu(interpret=True)
  for dtype in (F32, BF16, F16):
    for norm in (base.Norm(eps=1e-6, cast_mode="llama", quant_dtype=np.dtype(
        jnp.float8_e4m3fn)), base.Norm(eps=1e-6)):
      call = base.Call(op=op, rows=64, hidden=128, dtype=dtype,
                       scale_shape=(8, 128), has_bias=True, norm=norm)
      assert impl.cannot_serve(call) is None
  reason = impl.cannot_serve(base.Call(op=op, rows=jax.export.symbolic_shape(
      "b")[0], hidden=128, dtype=BF16))
  assert reason is not None and "symbolic" in reason


# ------------------------------------------------------------------ bias --

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,config", [
    (BF16, dict(block_rows=2, num_sms=2, cache_scale=False)),
    (F16, dict(block_cols=64)),
    # 16 of a row's columns per thread: the forward keeps the scale in
    # registers and reloads the bias per row block
    # (gpu_kernels.Geometry.cache_bias).
    (BF16, dict(block_rows=2, num_warps=1, num_sms=2, persistent=True,
                hidden=300)),
    # The default launch of the forward with a bias on 16-bit rows of 8192
    # columns (gpu_tiling.FWD_BIAS_LAUNCH: two rows a block), ragged rows.
    (F16, dict(hidden=8192)),
], ids=["bf16_persistent_uncached", "f16_chunked", "bf16_bias_reloaded",
        "f16_bias_launch"])
def test_bias(mode, dtype, config):
  config = dict(config)
  rows, hidden = 45, config.pop("hidden", 200)
  impl = impl_for(mode, **config)
  x, scale, bias, dy = _inputs(("bias", dtype.name, config), rows, hidden,
                               dtype, scale_shape=(hidden,), scale_dtype=F32,
                               bias_dtype=dtype)
  norm = base.Norm(eps=1e-5, scale_offset=0.5, out_dtype=dtype)
  y, _, dx, dscale, dbias = _check_against_xla(impl, x, scale, bias, dy, norm)
  y64, dx64, ds64, db64 = _reference64(x, scale, bias, dy, 1e-5, 0.5)
  assert_close(y, y64, tol(dtype), "y")
  assert_close(dx, dx64, tol(dtype), "dx",
               magnitude=float(np.linalg.norm(_f64(dy)) * 2))
  assert_close(dscale, ds64, tol(dtype), "dscale")
  assert_close(dbias, db64, tol(dtype), "dbias")
  if "cache_scale" not in config:
    # No scale, bias only.
    _check_against_xla(impl, x, None, bias, dy, norm)


@pytest.mark.parametrize("mode", MODES)
def test_bias_with_residual(mode):
  impl = impl_for(mode)
  rows, hidden = 19, 257
  x, scale, bias, dy = _inputs(("bias_res",), rows, hidden, BF16,
                               scale_shape=(hidden,), scale_dtype=F32,
                               bias_dtype=F32)
  res = random(rng_for("bias_res_r"), (rows, hidden), BF16, mean=0.5)
  dh = random(rng_for("bias_res_dh"), (rows, hidden), BF16)
  norm = base.Norm(eps=1e-6, out_dtype=BF16)

  def run(impl):
    y, h, rstd = jax.jit(functools.partial(impl.residual_forward, norm=norm))(
        x, res, scale, bias)
    return (y, h) + tuple(jax.jit(functools.partial(
        impl.residual_backward, norm=norm))(h, scale, bias, rstd, dy, dh))

  y, h, dres, dscale, dbias = run(impl)
  y_x, h_x, dres_x, ds_x, db_x = run(base.Xla())
  np.testing.assert_array_equal(np.asarray(h, np.float32),
                                np.asarray(h_x, np.float32))
  assert_close(y, y_x, xla_tol(BF16), "y vs xla")
  assert_close(dres, dres_x, xla_tol(BF16), "dresidual vs xla")
  assert_close(dscale, ds_x, 1e-5, "dscale vs xla")
  assert_close(dbias, db_x, 1e-5, "dbias vs xla")
  y64, _, _, db64 = _reference64(h, scale, bias, dy, 1e-6)
  assert_close(y, y64, tol(BF16), "y")
  assert_close(dbias, db64, tol(BF16), "dbias")


# ----------------------------------------------------------------- llama --

LLAMA_CASES = [(BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F32, F32)]


# Interpret mode: tests/test_features.py (each dtype pair, with and without
# a bias, through the public API).
@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize("x_dtype,scale_dtype", LLAMA_CASES,
                         ids=[f"{a.name}-{b.name}" for a, b in LLAMA_CASES])
def test_llama_cast_mode(mode, x_dtype, scale_dtype):
  impl = impl_for(mode)
  rows, hidden = 64, 384
  x, scale, bias, dy = _inputs(("llama", x_dtype.name, scale_dtype.name),
                               rows, hidden, x_dtype, scale_shape=(hidden,),
                               scale_dtype=scale_dtype, bias_dtype=F32)
  # With and without a bias, alternately over the cases.
  b = bias if LLAMA_CASES.index((x_dtype, scale_dtype)) % 2 == 0 else None
  norm = base.Norm(eps=1e-6, cast_mode="llama", out_dtype=norm_pdt(
      x_dtype, scale_dtype))
  y = _check_against_xla(impl, x, scale, b, dy.astype(norm.out_dtype),
                         norm)[0]
  want = reference.emulate(np.asarray(x), np.asarray(scale),
                           None if b is None else np.asarray(b), eps=1e-6,
                           cast_mode="llama")
  # Against the size of the terms (|x_hat * w| + |bias|): the bias may
  # cancel the product.
  size = np.abs(want) + (0.0 if b is None else 2 * np.abs(
      np.asarray(b, np.float64))[None, :])
  assert_matches_emulation(y, want, "y", magnitude=size,
                           rounded_inside=x_dtype)


def norm_pdt(x_dtype, scale_dtype):
  return base.Norm(eps=0.0, cast_mode="llama").product_dtype(x_dtype,
                                                             scale_dtype)


@pytest.mark.parametrize("mode", MODES)
def test_llama_and_float32_modes_differ(mode):
  # bf16 x with a bf16 scale: llama rounds x_hat to bf16 before the product,
  # float32 rounds once at the end; some outputs must differ.
  impl = impl_for(mode)
  x, scale, _, _ = _inputs(("modes",), 32, 256, BF16, scale_shape=(256,),
                           scale_dtype=BF16)
  y = {m: jax.jit(functools.partial(impl.forward, norm=base.Norm(
      eps=1e-6, cast_mode=m, out_dtype=BF16)))(x, scale, None)[0]
       for m in base.CAST_MODES}
  assert identical_fraction(y["llama"], y["float32"]) < 0.99
  want = reference.emulate(np.asarray(x), np.asarray(scale), eps=1e-6,
                           cast_mode="float32")
  assert_matches_emulation(y["float32"], want, "float32 mode")


@pytest.mark.parametrize("mode", MODES)
def test_llama_chunked_and_residual(mode):
  impl = impl_for(mode, block_cols=64)
  rows, hidden = 12, 300
  x, scale, bias, dy = _inputs(("llama_chunk",), rows, hidden, BF16,
                               scale_shape=(hidden,), scale_dtype=BF16,
                               bias_dtype=BF16)
  norm = base.Norm(eps=1e-6, scale_offset=1.0, cast_mode="llama",
                   out_dtype=BF16)
  _check_against_xla(impl, x, scale, bias, dy, norm)
  res = random(rng_for("llama_chunk_r"), (rows, hidden), BF16, mean=0.5)
  y, h, rstd = jax.jit(functools.partial(impl.residual_forward, norm=norm))(
      x, res, scale, bias)
  y_x, h_x, _ = base.Xla().residual_forward(x, res, scale, bias, norm=norm)
  np.testing.assert_array_equal(np.asarray(h, np.float32),
                                np.asarray(h_x, np.float32))
  assert identical_fraction(y, y_x) >= TOLERANCE[BF16].identical, "y vs xla"
  got = jax.jit(functools.partial(impl.residual_backward, norm=norm))(
      h, scale, bias, rstd, dy, dy)
  want = base.Xla().residual_backward(h, scale, bias, rstd, dy, dy,
                                      norm=norm)
  for name, a, b in zip(("dh", "dscale", "dbias"), got, want):
    assert_close(a, b, xla_tol(BF16), f"{name} vs xla",
                 magnitude=float(np.linalg.norm(_f64(dy)) * 2))


# -------------------------------------------------------------- per-head --

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads,head_dim,tokens", [
    (1, 64, 7), (4, 128, 5), (8, 256, 3), (8, 64, 9)])
def test_per_head_scale(mode, heads, head_dim, tokens):
  impl = impl_for(mode)
  rows = tokens * heads
  x, scale, bias, dy = _inputs(("heads", heads, head_dim), rows, head_dim,
                               BF16, scale_shape=(heads, head_dim),
                               scale_dtype=F32, bias_dtype=F32)
  if head_dim != 256:
    norm = base.Norm(eps=1e-6, out_dtype=BF16)
    y, _, dx, dscale, _ = _check_against_xla(impl, x, scale, None, dy, norm)
    assert dscale.shape == (heads, head_dim)
    y64, dx64, ds64, _ = _reference64(x, scale, None, dy, 1e-6)
    assert_close(y, y64, tol(BF16), "y")
    assert_close(dx, dx64, tol(BF16), "dx",
                 magnitude=float(np.linalg.norm(_f64(dy)) * 2))
    assert_close(dscale, ds64, tol(BF16), "dscale")
    assert_matches_emulation(y, reference.emulate(
        np.asarray(x), np.asarray(scale), eps=1e-6), "y")
  else:
    # With a bias and llama's cast order.
    llama = base.Norm(eps=1e-6, cast_mode="llama", out_dtype=F32)
    y, _, _, dscale, dbias = _check_against_xla(impl, x, scale, bias,
                                                dy.astype(F32), llama)
    assert dscale.shape == (heads, head_dim) and dbias.shape == (head_dim,)


@pytest.mark.parametrize("mode", MODES)
def test_per_head_tilings(mode):
  # Persistent walks over several ragged blocks of folded tokens, each
  # head's window apart, and the chunked tiling, with the fused residual
  # ops.
  rows, heads, head_dim = 4 * 11, 4, 96
  x, scale, _, dy = _inputs(("heads_tiling",), rows, head_dim, F16,
                            scale_shape=(heads, head_dim), scale_dtype=F16)
  res = random(rng_for("heads_res"), (rows, head_dim), F16, mean=0.5)
  norm = base.Norm(eps=1e-6, out_dtype=F16)
  # The persistent tiling with the plain ops, the chunked one with the
  # fused residual ops.
  _check_against_xla(impl_for(mode, block_rows=2, num_sms=3, persistent=True),
                     x, scale, None, dy, norm)
  # Each head's window on a second grid axis (block_cols below the folded
  # width of a token).
  _check_against_xla(impl_for(mode, block_cols=128, block_rows=4), x, scale,
                     None, dy, norm)
  impl = impl_for(mode, block_cols=32, block_rows=4)
  y, h, rstd = jax.jit(functools.partial(impl.residual_forward, norm=norm))(
      x, res, scale, None)
  y_x, h_x, _ = base.Xla().residual_forward(x, res, scale, None, norm=norm)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(h_x))
  assert_close(y, y_x, xla_tol(F16), "y vs xla")
  got = jax.jit(functools.partial(impl.residual_backward, norm=norm))(
      h, scale, None, rstd, dy, dy)
  want = base.Xla().residual_backward(h, scale, None, rstd, dy, dy,
                                      norm=norm)
  assert_close(got[0], want[0], xla_tol(F16), "dh vs xla",
               magnitude=float(np.linalg.norm(_f64(dy)) * 2))
  assert_close(got[1], want[1], xla_tol(F16), "dscale vs xla")


@pytest.mark.parametrize("op", ["forward", "backward", "residual_backward",
                                "quantized_forward"])
@pytest.mark.parametrize("heads,head_dim", [(8, 64), (32, 128), (5, 256)])
def test_per_head_tiles_like_whole_rows(op, heads, head_dim):
  # A token's heads are one tile: the per-head kernels tile like the plain
  # kernels on rows of next_pow2(heads) * head_dim columns (the same tile
  # and grid; the same warps except the wide folded forward's, doubled),
  # with no second grid axis.
  tokens = 4096
  split = gpu_tiling.resolve(gpu_tiling.Config(num_sms=132), op,
                             tokens * heads, head_dim, heads=heads,
                             device_kind=None)
  cols = gpu_tiling.next_pow2(heads) * head_dim
  plain = gpu_tiling.resolve(gpu_tiling.Config(num_sms=132), op, tokens,
                             cols, device_kind=None)
  if op == "forward" and cols >= gpu_tiling.FOLD_FWD_WIDE_COLS:
    plain = dataclasses.replace(plain, num_warps=min(
        gpu_tiling.MAX_WARPS, 2 * plain.num_warps))
  assert split == plain
  g_split = gpu_kernels.Geometry(split, tokens, head_dim, heads)
  g_plain = gpu_kernels.Geometry(plain, tokens, cols)
  assert g_split.fold and g_split.head_programs == 1
  assert g_split.tile_shape == (plain.block_rows, cols // head_dim, head_dim)
  assert (g_split.grid, g_split.steps) == (g_plain.grid, g_plain.steps)


def test_per_head_wide_tokens_tile_each_head():
  # Tokens wider than gpu_tiling.FOLD_MAX_COLS (and a user block_cols below
  # the folded width) tile each head apart, on a second grid axis.
  heads, head_dim, tokens = 64, 512, 64
  assert gpu_tiling.fold_cols(head_dim, heads) > gpu_tiling.FOLD_MAX_COLS
  for config, cols in ((gpu_tiling.Config(num_sms=132), head_dim),
                       (gpu_tiling.Config(num_sms=132, block_cols=256), 256)):
    c = gpu_tiling.resolve(config, "backward", tokens * heads, head_dim,
                           heads=heads, device_kind=None)
    g = gpu_kernels.Geometry(c, tokens, head_dim, heads)
    assert not g.fold and g.head_programs == heads
    assert g.tile_shape == (c.block_rows, cols)
  narrow = gpu_tiling.resolve(gpu_tiling.Config(num_sms=132, block_cols=128),
                              "forward", 4 * 64, 128, heads=4,
                              device_kind=None)
  assert not gpu_kernels.Geometry(narrow, 64, 128, 4).fold


# ------------------------------------------------------------- quantized --

def _own_y(impl, x, scale, factored, eps=1e-6):
  """The quantized forward's own float32 y without a residual or a bias.

  Two float32 products of x, rstd and scale, with the rstd of the forward
  whose layout is the quantized call's, that of a bfloat16 y (a float32 y
  is laid out for 4-byte elements, whose row sums may differ in the last
  bit: rms_norm_quantized's docstring): ``rstd * (x * scale)`` where the
  kernel factors a dynamic scale's max out of y (a persistent grid:
  ``gpu_kernels._Math.can_factor_max``), else ``(x * rstd) * scale``.
  """
  _, rstd = jax.jit(functools.partial(impl.forward, norm=base.Norm(
      eps=eps, out_dtype=BF16)))(x, scale, None)
  xf, rf = np.asarray(x, np.float32), np.asarray(rstd)[:, None]
  sf = np.asarray(scale, np.float32)
  with np.errstate(invalid="ignore"):  # inf * 0 in the non-finite rows
    return rf * (xf * sf) if factored else (xf * rf) * sf


def _half_step(q, q_scale, dtype):
  """Half a quantization step at each element of q (float64)."""
  q_scale = _f64(q_scale)
  if dtype == np.dtype(jnp.int8):
    return 0.5 * q_scale * np.ones(q.shape)
  info = ml_dtypes.finfo(dtype)
  v = np.abs(np.asarray(q, np.float64))
  exp = np.floor(np.log2(np.maximum(v, float(info.smallest_normal))))
  return 0.5 * q_scale * 2.0 ** (exp - info.nmant)


# Interpret mode: tests/test_features.py (each dtype, dynamic and static,
# with and without residual, through the public API); the tilings below.
@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize("qdt", QUANT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_residual", [False, True],
                         ids=["plain", "residual"])
@pytest.mark.parametrize("persistent", [False, True],
                         ids=["one_block", "persistent"])
def test_quantized_forward(mode, qdt, static, with_residual, persistent):
  # A persistent grid of 2 SMs walks several row blocks a program.
  impl = impl_for(mode, persistent=persistent,
                  num_sms=2 if persistent else None)
  rows, hidden = 21, 160
  x, scale, bias, _ = _inputs(("quant", qdt.name, static, with_residual),
                              rows, hidden, BF16, scale_shape=(hidden,),
                              scale_dtype=BF16, bias_dtype=F32)
  if not with_residual:
    # An all-zero row (without a bias, y is zero there): dynamic scale 1.
    x, bias = x.at[3].set(0), None
  res = random(rng_for("quant_r", qdt.name), (rows, hidden), F32,
               mean=0.5) if with_residual else None
  quant_scale = jnp.float32(0.02) if static else None
  norm = base.Norm(eps=1e-6, quant_dtype=qdt)
  q, q_scale, h = jax.jit(functools.partial(impl.quantized_forward,
                                            norm=norm))(
      x, res, scale, bias, quant_scale)
  assert q.dtype == qdt and q.shape == (rows, hidden)
  assert q_scale.dtype == F32 and q_scale.shape == (rows, 1)
  h_x = None
  if with_residual:
    h_x = base.Xla().quantized_forward(x, res, scale, bias, quant_scale,
                                       norm=norm)[2]
    assert h.dtype == res.dtype
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_x))
  else:
    assert h is None
  # The quantized call's own float32 y, quantized by the rule. With a
  # residual, the fused forward's: a float32 residual sets both layouts, so
  # the same float32 sums and the same y bit for bit.
  normed = x if res is None else h
  f32_norm = base.Norm(eps=1e-6, out_dtype=F32)
  if res is None:
    y = _own_y(impl, x, scale, factored=persistent and not static)
  else:
    y = jax.jit(functools.partial(impl.residual_forward, norm=f32_norm))(
        x, res, scale, bias)[0]
  # The rule as NumPy computes it (IEEE float32 products, ml_dtypes' direct
  # round-to-nearest-even float8 conversion): XLA's own GPU conversion of
  # float32 to float8 was seen one float8 ulp off in 1 of 3360 elements.
  q_want, s_want = reference.emulate_quantize(
      np.asarray(y), qdt, None if quant_scale is None else float(quant_scale))
  np.testing.assert_array_equal(np.asarray(q_scale), s_want)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                q_want.view(np.uint8))
  if static:
    assert np.all(np.asarray(q_scale) == np.float32(0.02))
  elif not with_residual:
    assert float(q_scale[3, 0]) == 1.0 and not np.any(np.asarray(
        q[3], np.float32))
  # Dequantized: within half a step of the float64 value (saturated where
  # a static scale clips), plus y's float32 error.
  y64 = _reference64(normed, scale, bias, np.zeros_like(normed), 1e-6)[0]
  qmax = base.QUANT_MAX[qdt]
  y64c = np.clip(y64, -qmax * _f64(q_scale), qmax * _f64(q_scale))
  deq = np.asarray(q, np.float64) * _f64(q_scale)
  err = np.abs(deq - y64c)
  bound = _half_step(q, q_scale, qdt) + 1e-5 * np.abs(y64) + 1e-6
  assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("qdt", QUANT_DTYPES[:2], ids=lambda d: d.name)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quantized_non_finite_rows_as_xla(mode, qdt, static):
  # Rows holding an infinity or a NaN, and then a scale with an infinite
  # column, and one with a NaN column: q and q_scale are XLA's quantization
  # (base.quantize) of the kernel's own float32 y, NaN elements included
  # (int8 0, float8 NaN, as XLA's cast; a NaN once became -qmax in the
  # compiled kernels), except that with a NaN y beside finite ones in a row
  # (the NaN scale element) the kernel's dynamic row max skips the NaN where
  # XLA's is NaN (q_scale 1): there q_scale is the max of the finite |y|,
  # and q the same rule with it.
  impl = impl_for(mode, block_rows=2, num_sms=2, persistent=True)
  rows, hidden = 6, 160
  x, scale, _, _ = _inputs(("quant_non_finite", qdt.name, static), rows,
                           hidden, BF16, scale_shape=(hidden,),
                           scale_dtype=F32)
  x = x.at[1, 5].set(jnp.inf).at[2, 7].set(jnp.nan).at[3].set(0)
  x = x.at[4, 9].set(-jnp.inf)
  quant_scale = jnp.float32(0.002) if static else None
  norm = base.Norm(eps=1e-6, quant_dtype=qdt)
  for w in (scale, scale.at[11].set(jnp.inf), scale.at[13].set(jnp.nan)):
    q, q_scale, _ = jax.jit(functools.partial(impl.quantized_forward,
                                              norm=norm))(
        x, None, w, None, quant_scale)
    y = _own_y(impl, x, w, factored=not static)
    q_want, s_want = base.quantize(y, qdt, quant_scale)
    if not static and np.isnan(w).any():
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        amax = np.nanmax(np.abs(y), axis=-1, keepdims=True)
      s_want = jnp.where(amax > 0, amax * base.inverse_qmax(qdt),
                         np.float32(1))
      # The rule with each row's scale: base.quantize's, a row at a time.
      q_want = np.concatenate([np.asarray(base.quantize(
          y[i:i + 1], qdt, s_want[i, 0])[0], np.float32) for i in range(rows)])
    assert np.isnan(y).any()
    np.testing.assert_array_equal(np.asarray(q_scale), np.asarray(s_want))
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(q_want, np.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", [dict(block_cols=64),
                                    dict(block_rows=2, num_sms=2,
                                         persistent=True),
                                    dict(block_rows=1, num_warps=1,
                                         persistent=False,
                                         cache_scale=False)],
                         ids=["chunked", "persistent", "one_warp"])
def test_quantized_tilings_and_per_head(mode, config):
  impl = impl_for(mode, **config)
  heads, head_dim, tokens = 4, 100, 5
  rows = heads * tokens
  x, scale, _, _ = _inputs(("quant_tiling", config), rows, head_dim, F16,
                           scale_shape=(heads, head_dim), scale_dtype=F32)
  res = random(rng_for("quant_tiling_r"), (rows, head_dim), F16, mean=0.5)
  # Each tiling with two of the quantized dtypes, one with a residual.
  combos = [(QUANT_DTYPES[0], None), (QUANT_DTYPES[2], res)]
  if "block_cols" not in config:
    combos = [(QUANT_DTYPES[1], None), (QUANT_DTYPES[0], res)]
  for qdt, r in combos:
    norm = base.Norm(eps=1e-6, cast_mode="llama", quant_dtype=qdt)
    q, q_scale, h = jax.jit(functools.partial(impl.quantized_forward,
                                              norm=norm))(
        x, r, scale, None, None)
    normed = x if r is None else h
    y, _ = jax.jit(functools.partial(impl.forward, norm=dataclasses.replace(
        norm, out_dtype=F32, quant_dtype=None)))(normed, scale, None)
    q_want, s_want = base.quantize(y, qdt)
    np.testing.assert_array_equal(np.asarray(q_scale), np.asarray(s_want))
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                  np.asarray(q_want).view(np.uint8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cast_mode", ["float32", "llama"])
def test_quantized_chunked_row_max_sees_rounded_values(mode, cast_mode):
  # Row blocks of 16 rows in 256-column chunks, the second one ragged, no
  # scale, with a residual: the row max of |y| must be over y as it is
  # rounded (h to the residual's dtype; llama's x_hat to it too). In the
  # interpreter on CPU a YNNPACK reduction had skipped those roundings
  # (conftest.py), so q_scale came out one bfloat16 ulp (0.1-0.7%) off in
  # most rows. Against XLA, whose sum of squares runs in another order,
  # q_scale may differ by a float32 ulp or two (rtol 1e-6) and q by one
  # step next to a rounding midpoint.
  impl = impl_for(mode, block_cols=256, block_rows=16, num_sms=4)
  rows, hidden = 100, 300
  rng = rng_for("quant_chunk_rounding", cast_mode)
  x = random(rng, (rows, hidden), BF16, mean=0.2)
  res = random(rng, (rows, hidden), BF16)
  norm = base.Norm(eps=1e-5, cast_mode=cast_mode, quant_dtype=QUANT_DTYPES[0])
  for r in (None, res):
    q, q_scale, h = jax.jit(functools.partial(impl.quantized_forward,
                                              norm=norm))(x, r, None, None,
                                                          None)
    want_q, want_scale, want_h = base.Xla().quantized_forward(
        x, r, None, None, None, norm=norm)
    np.testing.assert_allclose(np.asarray(q_scale), np.asarray(want_scale),
                               rtol=1e-6)
    steps = np.abs(np.asarray(q, np.int32) - np.asarray(want_q, np.int32))
    assert steps.max() <= 1 and np.mean(steps > 0) < 1e-3, steps.max()
    if r is not None:
      np.testing.assert_array_equal(np.asarray(h), np.asarray(want_h))


def test_float16_bias_backward_launch():
  # The float16 backward with a bias on 8192-wide rows runs 8 warps, the
  # fused backward 32; the same calls in bfloat16 or without a bias, other
  # widths and other ops keep the heuristic's launch.
  impl = PallasGpu()
  for op, warps in (("backward", gpu_tiling.BWD_F16_BIAS_WARPS),
                    ("residual_backward",
                     gpu_tiling.FUSED_BWD_F16_BIAS_WARPS)):
    got = impl.resolved_config(op, 2048, 8192, F16, bias=True)
    plain = impl.resolved_config(op, 2048, 8192, F16)
    assert got.num_warps == warps != plain.num_warps, op
    assert got == dataclasses.replace(plain, num_warps=got.num_warps), op
  for op, hidden, dtype in [("backward", 8192, BF16), ("backward", 4096, F16),
                            ("residual_backward", 8192, BF16)]:
    assert impl.resolved_config(op, 2048, hidden, dtype, bias=True) == (
        impl.resolved_config(op, 2048, hidden, dtype)), (op, hidden, dtype)


def test_bias_forward_launch():
  # The forward with a bias on 16-bit rows of 8192 columns runs two rows of
  # 32 warps, one program an SM, over the tuning file's launch of the
  # forward without one; other widths, float32 rows, the ops beside it and
  # a user's knobs keep theirs.
  impl = PallasGpu()
  for dtype in (BF16, F16):
    got = impl.resolved_config("forward", 4096, 8192, dtype, bias=True)
    assert {k: getattr(got, k) for k in gpu_tiling.FWD_BIAS_LAUNCH} == (
        gpu_tiling.FWD_BIAS_LAUNCH), got
    assert got != impl.resolved_config("forward", 4096, 8192, dtype)
  # Few rows still cover the SMs: the row block shrinks with its warps.
  few = impl.resolved_config("forward", 64, 8192, BF16, bias=True)
  assert (few.block_rows, few.num_warps) == (1, 16), few
  for op, hidden, dtype in [("forward", 2048, BF16), ("forward", 8192, F32),
                            ("residual_forward", 8192, BF16),
                            ("quantized_forward", 8192, BF16)]:
    assert impl.resolved_config(op, 4096, hidden, dtype, bias=True) == (
        impl.resolved_config(op, 4096, hidden, dtype)), (op, hidden, dtype)
  user = PallasGpu(config=gpu_tiling.Config(num_warps=8, block_rows=1))
  got = user.resolved_config("forward", 4096, 8192, BF16, bias=True)
  assert (got.num_warps, got.block_rows) == (8, 1)


@pytest.mark.parametrize("mode", COMPILED)
def test_float16_bias_fused_backward_wide_launch(mode):
  # The 32-warp fused backward with a bias (FUSED_BWD_F16_BIAS_WARPS)
  # computes what XLA does; ragged row count.
  impl = impl_for(mode)
  rows, hidden = 301, 8192
  assert impl.resolved_config("residual_backward", rows, hidden, F16,
                              bias=True).num_warps == (
                                  gpu_tiling.FUSED_BWD_F16_BIAS_WARPS)
  h, scale, bias, dy = _inputs(("f16_bias_fused_wide",), rows, hidden, F16,
                               scale_shape=(hidden,), scale_dtype=F16,
                               bias_dtype=F16)
  dh = random(rng_for("f16_bias_fused_wide_dh"), (rows, hidden), F16)
  norm = base.Norm(eps=1e-6, out_dtype=F16)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(h.astype(F32)), axis=1) + 1e-6)

  def run(impl):
    return jax.jit(functools.partial(impl.residual_backward, norm=norm))(
        h, scale, bias, rstd, dy, dh)

  dres, dscale, dbias = run(impl)
  dres_x, ds_x, db_x = run(base.Xla())
  assert_close(dres, dres_x, xla_tol(F16), "dresidual vs xla")
  assert_close(dscale, ds_x, 1e-5, "dscale vs xla")
  assert_close(dbias, db_x, 1e-5, "dbias vs xla")


def test_quantized_residual_launch_is_resolved_apart(monkeypatch):
  # The residual variant asks gpu_tiling for its own op key, so that a
  # tuning file can give it another launch than the plain quantized forward.
  asked = []
  resolve = gpu_tiling.resolve

  def spy(config, op, *a, **kw):
    asked.append(op)
    return resolve(config, op, *a, **kw)
  monkeypatch.setattr(gpu_tiling, "resolve", spy)
  impl = PallasGpu(interpret=True)
  x, scale, _, _ = _inputs(("quant_key",), 8, 128, BF16, scale_shape=(128,),
                           scale_dtype=BF16)
  norm = base.Norm(eps=1e-6, quant_dtype=np.dtype(jnp.int8))
  impl.quantized_forward(x, None, scale, None, None, norm=norm)
  impl.quantized_forward(x, x, scale, None, None, norm=norm)
  assert asked == ["quantized_forward", gpu_tiling.QUANTIZED_RESIDUAL_OP]


# ---------------------------------------------------------- weight_dtype --

@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize("cast_mode", ["float32", "llama"])
def test_weight_dtype_rounds_as_the_kernel_loads(mode, cast_mode):
  # float32 scale and bias with Norm.weight_dtype give, bit for bit, what
  # the same kernels give for the bfloat16 arrays, but for the order of the
  # parameters' float32 sums (the interpret mode runs this through the
  # public API in tests/test_features.py).
  impl = impl_for(mode)
  rows, hidden = 2048, 4096
  x, scale, bias, dy = _inputs(("weight_dtype", cast_mode), rows, hidden,
                               BF16, scale_shape=(hidden,), scale_dtype=F32,
                               bias_dtype=F32)
  res = random(rng_for("weight_dtype_res"), (rows, hidden), BF16)
  norm = base.Norm(eps=1e-6, cast_mode=cast_mode, out_dtype=BF16)
  folded = dataclasses.replace(norm, weight_dtype=BF16)
  cast = lambda a: a.astype(BF16)

  def run(s, b, n):
    y, rstd = jax.jit(functools.partial(impl.forward, norm=n))(x, s, b)
    grads = jax.jit(functools.partial(impl.backward, norm=n))(
        x, s, b, rstd, dy)
    fused = jax.jit(functools.partial(impl.residual_forward, norm=n))(
        x, res, s, b)
    return (y, rstd) + tuple(grads) + tuple(fused)

  got, want = run(scale, bias, folded), run(cast(scale), cast(bias), norm)
  names = ("y", "rstd", "dx", "dscale", "dbias", "fused y", "h", "fused rstd")
  for name, a, b in zip(names, got, want):
    if name in ("dscale", "dbias"):
      # The same partials, summed by XLA in one variadic reduction for
      # float32 parameters and one reduction each for bfloat16 ones
      # (common.leading_sums): float32 sums in two orders.
      assert_close(a, b, tol(F32), name)
      continue
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32), err_msg=name)


# ------------------------------------------------------------ determinism --

@pytest.mark.parametrize("mode", MODES)
def test_backward_is_deterministic(mode):
  # Partial sums per program and a fixed reduction, no atomics: repeated
  # calls give the same bits (several programs, several steps each).
  config = dict(block_rows=2, num_sms=2) if mode == "interpret" else {}
  impl = impl_for(mode, **config)
  rows, hidden = (40, 96) if mode == "interpret" else (8192, 4096)
  x, scale, bias, dy = _inputs(("determinism", mode), rows, hidden, BF16,
                               scale_shape=(hidden,), scale_dtype=F32,
                               bias_dtype=F32)
  norm = base.Norm(eps=1e-6, out_dtype=BF16)
  _, rstd = impl.forward(x, scale, bias, norm=norm)
  bwd = jax.jit(functools.partial(impl.backward, norm=norm))
  first = [np.asarray(a).tobytes() for a in bwd(x, scale, bias, rstd, dy)]
  for _ in range(3):
    again = [np.asarray(a).tobytes() for a in bwd(x, scale, bias, rstd, dy)]
    assert again == first


# --------------------------------------------------------------- lowering --

_LOWER_CASES = {
    "forward": ("forward", {}),
    "forward_bias_llama": ("forward", dict(bias=True, cast_mode="llama")),
    "forward_per_head": ("forward", dict(heads=8, bias=True)),
    "forward_chunked": ("forward", dict(hidden=40000, bias=True,
                                        cast_mode="llama")),
    "backward_bias_llama": ("backward", dict(bias=True, cast_mode="llama")),
    "backward_per_head": ("backward", dict(heads=8, bias=True)),
    "backward_chunked": ("backward", dict(hidden=40000, bias=True)),
    "residual_forward": ("residual_forward", dict(bias=True)),
    "residual_backward": ("residual_backward", dict(heads=4)),
    "quantized_int8": ("quantized_forward", dict(quant=jnp.int8)),
    "quantized_e4m3_static": ("quantized_forward",
                              dict(quant=jnp.float8_e4m3fn, static=True)),
    "quantized_e5m2_residual": ("quantized_forward",
                                dict(quant=jnp.float8_e5m2, residual=True,
                                     heads=8)),
    "quantized_chunked": ("quantized_forward",
                          dict(quant=jnp.int8, hidden=40000)),
    # float32 parameters rounded as loaded (inline PTX): bfloat16 weights
    # forward, float16 ones backward.
    "forward_weight_bfloat16": ("forward", dict(bias=True, weight=BF16)),
    "backward_weight_float16": ("backward", dict(bias=True, weight=F16)),
}


@pytest.mark.parametrize("case", sorted(_LOWER_CASES))
@pytest.mark.usefixtures("cuda_target")
def test_lowers_to_triton(case):
  # The Triton lowering (what jax hands to XLA's Triton compiler) runs on
  # any machine: this catches an operation Pallas cannot lower to Triton
  # before a GPU sees the kernel.
  op, kw = _LOWER_CASES[case]
  hidden, heads = kw.get("hidden", 128), kw.get("heads", 1)
  rows = 256 * heads if hidden < 16384 else 4
  impl = PallasGpu(config=gpu_tiling.Config(num_sms=132))
  norm = base.Norm(eps=1e-6, cast_mode=kw.get("cast_mode", "float32"),
                   out_dtype=BF16, quant_dtype=kw.get("quant"),
                   weight_dtype=kw.get("weight"))
  sds = jax.ShapeDtypeStruct
  x = sds((rows, hidden), BF16)
  scale = sds((hidden,) if heads == 1 else (heads, hidden),
              F32 if kw.get("weight") else BF16)
  bias = sds((hidden,), F32) if kw.get("bias") else None
  rstd = sds((rows,), F32)
  if op == "forward":
    f, args = (lambda x, s, b: impl.forward(x, s, b, norm=norm)), (
        x, scale, bias)
  elif op == "backward":
    f, args = (lambda x, s, b, r, d: impl.backward(x, s, b, r, d, norm=norm)
               ), (x, scale, bias, rstd, x)
  elif op == "residual_forward":
    f, args = (lambda x, r, s, b: impl.residual_forward(x, r, s, b, norm=norm)
               ), (x, x, scale, bias)
  elif op == "residual_backward":
    f, args = (lambda h, s, b, r, d, dh: impl.residual_backward(
        h, s, b, r, d, dh, norm=norm)), (x, scale, bias, rstd, x, x)
  else:
    res = x if kw.get("residual") else None
    qs = sds((), F32) if kw.get("static") else None
    f, args = (lambda x, r, s, b, q: impl.quantized_forward(
        x, r, s, b, q, norm=norm)), (x, res, scale, bias, qs)
  exported = jax.export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
          TRITON_CALL_TARGET)])(*args)
  text = exported.mlir_module()
  assert text.count(TRITON_CALL_TARGET) >= 1
