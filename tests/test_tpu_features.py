"""PallasTpu's features on CPU: bias, cast_mode "llama", per-head scale,
quantized output; their TPU lowering; determinism of the sums.

The kernels run in interpret mode: Pallas's TPU interpreter
(``tpu_interpreter=True``: TPU memory semantics, outputs poisoned with NaN so
an element never written shows) where blocks are ragged or a path is
special, the faster generic interpreter elsewhere. Each case is compared with

* ``reference.emulate`` (NumPy, the reference library's exact order of
  float32 operations and roundings): 16-bit outputs must be identical in
  at least 99.9% of elements (a one-ulp flip happens where
  the float32 sum of squares, summed in another order, or rsqrt against
  1 / sqrt, moves rstd by an ulp and a value across a rounding boundary:
  observed with these cases 99.976% to 100% identical per case, 99.993% of
  all 55016 16-bit outputs); float32 outputs within 4 ulps;
* ``base.Xla``, the reference semantics of every feature, for forward
  outputs and gradients: one ulp relative error in norm (float32
  computations of one formula in a different summation order, so float32
  results agree to ~1e-6; 16-bit results differ by one ulp where a value
  straddles a rounding boundary);
* the float64 NumPy reference (float32 mode only; the llama mode's extra
  roundings are what ``emulate`` checks).
All bounds are ``numerics_util.TOLERANCE``'s.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax.kernels import tpu_config as cfg
from rmsnorm_jax.kernels.tpu import PallasTpu

from numerics_util import assert_close, assert_matches_emulation
from numerics_util import identical_fraction, random, rng_for, tol, xla_tol

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(
    jnp.float16)
I8, E4M3, E5M2 = (np.dtype(jnp.int8), np.dtype(jnp.float8_e4m3fn),
                  np.dtype(jnp.float8_e5m2))
EPS = 1e-5
TPU_INTERP = dict(interpret=True, tpu_interpreter=True)
GENERIC = dict(interpret=True)


def _assert_matches_emulation(got, want, what, bias=None):
  """``numerics_util.assert_matches_emulation``, float32 ulps taken about
  |y| + |bias|: y = a + bias may cancel to far below the terms, whose
  rounding is what differs."""
  mag = None
  if bias is not None:
    mag = np.abs(np.asarray(want, np.float32)) + np.abs(
        np.asarray(bias, np.float32))
  assert_matches_emulation(got, want, what, magnitude=mag)


def _finite(*arrays):
  for a in arrays:
    if a is not None and np.dtype(a.dtype) != F16:
      assert np.all(np.isfinite(np.asarray(a, np.float32))), (
          "an output element was never written (NaN poison survived)")


def _per_row(w, rows):
  """A (hidden,) or (heads, hidden) float64 array as (rows, hidden)."""
  w = np.asarray(w, np.float64)
  if w.ndim == 1:
    return np.broadcast_to(w, (rows, w.shape[0]))
  return np.tile(w, (rows // w.shape[0], 1))


# --------------------------------------------------- forward and backward --

@functools.lru_cache(maxsize=None)
def _fwd_bwd(impl, norm, residual):
  """One jitted program: (residual) forward, then backward from its rstd,
  of impl and of XLA side by side."""
  def f(impl, x, res, scale, bias, dy, dh):
    if residual:
      y, h, rstd = impl.residual_forward(x, res, scale, bias, norm=norm)
      g = impl.residual_backward(h, scale, bias, rstd, dy, dh, norm=norm)
    else:
      y, rstd = impl.forward(x, scale, bias, norm=norm)
      h = x
      g = impl.backward(x, scale, bias, rstd, dy, norm=norm)
    return (y, h, rstd) + tuple(g)
  return jax.jit(lambda *a: (f(impl, *a), f(base.Xla(), *a)))


def _case(name, shape, x_dtype, *, scale=(), scale_dtype=None, bias=None,
          mode="float32", offset=0.0, out_dtype=None, config=None,
          residual=None):
  return pytest.param(
      dict(shape=shape, x_dtype=x_dtype, scale=scale,
           scale_dtype=scale_dtype or x_dtype, bias=bias, mode=mode,
           offset=offset, out_dtype=out_dtype, config=config or {},
           residual=residual), id=name)


# ``scale``: None, "vec" ((hidden,)) or a head count (per-head (heads,
# hidden)); ``bias``: its dtype or None; ``residual``: its dtype or None.
FWD_BWD_CASES = [
    _case("bias-f32mode-bf16-f32scale-ragged", (37, 300), BF16,
          scale="vec", scale_dtype=F32, bias=F32, offset=1.0,
          config=dict(block_rows=16)),
    _case("bias-no_scale-f16", (20, 129), F16, scale=None, bias=F16,
          config=dict(block_rows=16)),
    # Gemma's offset and a float32 bias, both rounded to bfloat16 (the
    # product dtype) before use.
    _case("llama-bf16-bf16scale-offset-f32bias-ragged", (33, 256), BF16,
          scale="vec", bias=F32, mode="llama", offset=1.0,
          config=dict(TPU_INTERP, block_rows=16)),
    _case("llama-f16-f16scale", (24, 200), F16, scale="vec", mode="llama"),
    _case("llama-f32-offset", (16, 128), F32, scale="vec", mode="llama",
          offset=1.0),
    _case("llama-bf16-f32scale-f32out", (16, 384), BF16, scale="vec",
          scale_dtype=F32, mode="llama", out_dtype=F32),
    _case("llama-bias-2pass-bf16", (20, 300), BF16, scale="vec", bias=BF16,
          mode="llama", config=dict(hidden_block=128)),
    _case("heads1-hd128-7rows-f32", (7, 128), F32, scale=1),
    _case("heads4-hd64-ragged-bf16", (36, 64), BF16, scale=4,
          config=dict(TPU_INTERP, block_rows=16)),
    _case("heads8-hd256-llama-bias-f16", (40, 256), F16, scale=8, bias=F16,
          mode="llama"),
    _case("heads8-hd128-f32scale-bf16", (48, 128), BF16, scale=8,
          scale_dtype=F32, offset=1.0),
    _case("heads8-hd256-2pass-f32", (24, 256), F32, scale=8, bias=F32,
          config=dict(TPU_INTERP, hidden_block=128, block_rows=8)),
    _case("residual-heads4-llama-bias-bf16+f32", (24, 128), BF16, scale=4,
          bias=BF16, mode="llama", residual=F32,
          config=dict(TPU_INTERP, block_rows=8)),
    _case("residual-bias-f32mode-f16", (17, 200), F16, scale="vec",
          scale_dtype=F32, bias=F32, residual=F16),
]


@pytest.mark.parametrize("c", FWD_BWD_CASES)
def test_forward_backward_features(c):
  rng = rng_for("fb", repr(c))
  rows, hidden = c["shape"]
  x = random(rng, (rows, hidden), c["x_dtype"], mean=0.2)
  res = (random(rng, (rows, hidden), c["residual"], mean=-0.3)
         if c["residual"] else None)
  src_dt = np.dtype(c["residual"] or c["x_dtype"])
  scale = None
  if c["scale"] == "vec":
    scale = random(rng, (hidden,), c["scale_dtype"], mean=1.0, scale=0.5)
  elif c["scale"] is not None:
    scale = random(rng, (c["scale"], hidden), c["scale_dtype"], mean=1.0,
                   scale=0.5)
  bias = (random(rng, (hidden,), c["bias"], scale=0.5) if c["bias"]
          else None)
  probe = base.Norm(eps=EPS, cast_mode=c["mode"])
  pdt = probe.product_dtype(src_dt, None if scale is None else scale.dtype)
  out_dt = np.dtype(c["out_dtype"] or (pdt if c["mode"] == "llama"
                                       else src_dt))
  norm = base.Norm(eps=EPS, scale_offset=c["offset"], cast_mode=c["mode"],
                   out_dtype=out_dt)
  dy = random(rng, (rows, hidden), out_dt)
  dh = random(rng, (rows, hidden), src_dt) if res is not None else None
  impl = PallasTpu(**{**GENERIC, **c["config"]})
  residual = res is not None
  (y, h, rstd, dx, dscale, dbias), (xy, xh, xr, xdx, xds, xdb) = _fwd_bwd(
      impl, norm, residual)(x, res, scale, bias, dy, dh)
  _finite(y, h, rstd, dx, dscale, dbias)
  assert y.dtype == out_dt and dx.dtype == src_dt and rstd.shape == (rows,)
  assert (dscale is None) == (scale is None)
  assert (dbias is None) == (bias is None)

  # The reference library's order of operations, bit for bit.
  want = reference.emulate(h, scale, bias, eps=EPS, scale_offset=c["offset"],
                           cast_mode=c["mode"], out_dtype=out_dt)
  _assert_matches_emulation(y, want, "y vs emulate", bias)

  # The XLA implementation: the reference semantics, gradients included.
  if residual:
    np.testing.assert_array_equal(np.asarray(h, np.float32),
                                  np.asarray(xh, np.float32))
  assert_close(y, xy, xla_tol(out_dt), "y vs xla")
  assert_close(rstd, xr, xla_tol(F32), "rstd vs xla")
  assert_close(dx, xdx, xla_tol(src_dt), "dx vs xla")
  if scale is not None:
    assert dscale.dtype == F32 and dscale.shape == scale.shape
    assert_close(dscale, xds, xla_tol(F32), "dscale vs xla")
  if bias is not None:
    assert dbias.dtype == F32 and dbias.shape == (hidden,)
    assert_close(dbias, xdb, xla_tol(F32), "dbias vs xla")

  # float64: dbias is the column sum of the cotangent as the product dtype
  # sees it; in float32 mode the rest is the plain formula.
  dy_p = np.asarray(jnp.asarray(dy).astype(pdt), np.float64)
  if bias is not None:
    assert_close(dbias, dy_p.sum(0), tol(F32), "dbias vs float64")
  if c["mode"] == "float32":
    h64 = np.asarray(h, np.float64)
    w = (None if scale is None
         else _per_row(scale, rows) + c["offset"])
    y64, r64 = reference.rms_norm(h64, w, eps=EPS)
    if bias is not None:
      y64 = y64 + np.asarray(bias, np.float64)
    assert_close(y, y64, tol(out_dt), "y vs float64")
    dx64, _ = reference.rms_norm_grad(h64, w, dy_p, eps=EPS)
    if residual:
      dx64 = dx64 + np.asarray(dh, np.float64)
    assert_close(dx, dx64, tol(src_dt, out_dt), "dx vs float64")
    if scale is not None:
      contrib = dy_p * h64 * r64[:, None]
      ds64 = contrib.reshape((-1,) + tuple(scale.shape)).sum(0)
      assert_close(dscale, ds64, tol(F32), "dscale vs float64")


def test_llama_and_float32_modes_differ():
  # bfloat16 x and scale: llama rounds x_hat to bfloat16 before the product
  # (two roundings), float32 mode rounds once; each matches its emulation
  # and they disagree on some elements.
  rng = rng_for("modes")
  x = random(rng, (16, 512), BF16)
  scale = random(rng, (512,), BF16, mean=1.0, scale=0.5)
  outs = {}
  for mode in ("float32", "llama"):
    norm = base.Norm(eps=EPS, cast_mode=mode, out_dtype=BF16)
    outs[mode], _ = jax.jit(functools.partial(
        PallasTpu(**GENERIC).forward, norm=norm))(x, scale, None)
    _assert_matches_emulation(
        outs[mode], reference.emulate(x, scale, eps=EPS, cast_mode=mode,
                                      out_dtype=BF16), mode)
  assert identical_fraction(outs["float32"], outs["llama"]) < 0.99


# ------------------------------------------------------------- quantized --

@functools.lru_cache(maxsize=None)
def _quantized(impl, norm, static, residual):
  """quantized_forward and the same kernel's float32 forward of its input."""
  fnorm = base.Norm(eps=norm.eps, scale_offset=norm.scale_offset,
                    cast_mode=norm.cast_mode, out_dtype=F32)

  def f(x, res, scale, bias, qs):
    q, q_scale, h = impl.quantized_forward(
        x, res if residual else None, scale, bias, qs if static else None,
        norm=norm)
    y, _ = impl.forward(h if residual else x, scale, bias, norm=fnorm)
    want = base.quantize(y, norm.quant_dtype, qs if static else None)
    return q, q_scale, h, y, want
  return jax.jit(f)


# Static scales small enough that some elements saturate.
STATIC_SCALE = {I8: 0.015, E4M3: 0.004, E5M2: 4e-5}


@pytest.mark.parametrize("residual", [False, True],
                         ids=["plain", "residual"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("qdt", [I8, E4M3, E5M2],
                         ids=["int8", "e4m3fn", "e5m2"])
def test_quantized_forward(qdt, static, residual):
  rng = rng_for("q", qdt.name, static, residual)
  rows, hidden = 40, 256
  x = np.array(random(rng, (rows, hidden), BF16))
  if not residual:
    x[5] = 0  # A row of zeros: scale 1, q all zero.
  x = jnp.asarray(x)
  res = random(rng, (rows, hidden), BF16, mean=0.1)
  if residual:
    res = res.at[5].set(-x[5])
  scale = random(rng, (hidden,), F32, mean=1.0, scale=0.5)
  bias = random(rng, (hidden,), F32, scale=0.1) if static else None
  qs_in = jnp.float32(STATIC_SCALE[qdt])
  norm = base.Norm(eps=EPS, quant_dtype=qdt,
                   cast_mode="llama" if residual else "float32")
  # block_rows=32 over 40 rows: a ragged last block (8-bit q tiles by 32),
  # under the TPU interpreter (unwritten outputs poisoned) for int8.
  config = dict(TPU_INTERP if (residual and qdt == I8) else GENERIC,
                block_rows=32)
  q, q_scale, h, y, (q_want, s_want) = _quantized(
      PallasTpu(**config), norm, static, residual)(x, res, scale, bias, qs_in)
  assert q.dtype == qdt and q.shape == (rows, hidden)
  assert q_scale.dtype == F32 and q_scale.shape == (rows, 1)
  assert (h is None) == (not residual)
  if residual:
    np.testing.assert_array_equal(
        np.asarray(h, np.float32),
        (np.asarray(x, np.float32) + np.asarray(res, np.float32)).astype(
            jnp.bfloat16).astype(np.float32))
  # Exactly base.quantize of the same kernels' float32 y.
  np.testing.assert_array_equal(np.asarray(q_scale), np.asarray(s_want))
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                np.asarray(q_want).view(np.uint8))
  if not static:
    assert float(q_scale[5, 0]) == 1.0
    assert not np.any(np.asarray(q[5]).astype(np.float32))
  # Dequantized, within half a quantization step of the float64 value
  # (elements not saturated); the step of a float8 value is its spacing.
  src = np.asarray(h if residual else x, np.float64)
  y64, _ = reference.rms_norm(src, scale, eps=EPS)
  # y's own error against float64 scales with its terms, not with y (the
  # bias may cancel the product): float32 rounding, or in llama mode (the
  # residual cases) x_hat rounded to bfloat16 (2**-9 relative).
  slack = (2**-8 if residual else 1e-5) * np.abs(y64)
  if bias is not None:
    y64 = y64 + np.asarray(bias, np.float64)
    slack = slack + 1e-6 * np.abs(np.asarray(bias, np.float64))
  s = np.asarray(q_scale, np.float64)
  qf = np.asarray(q).astype(np.float64)
  deq = qf * s
  qmax = base.QUANT_MAX[qdt]
  inside = np.abs(y64 / s) < qmax * (1 - 1e-3)
  if static:
    assert not inside.all(), "the static scale was meant to saturate some"
    assert np.all(np.abs(qf[~inside]) >= qmax * (1 - 2**-3))
  step = np.ones_like(qf) if qdt == I8 else _f8_spacing(qf, qdt)
  err = np.abs(deq - y64)
  assert np.all(err[inside] <= (0.5 * step * s + slack)[inside] * (1 + 1e-6))


def _f8_spacing(v, qdt):
  """The float8 quantization step at each (already quantized) value."""
  mant = {E4M3: 3, E5M2: 2}[qdt]
  min_exp = {E4M3: -6, E5M2: -14}[qdt]
  a = np.abs(v)
  e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
  e = np.maximum(e, min_exp)
  # Below a power of two the step halves: take the smaller neighbour's.
  return 2.0 ** (e - mant)


# --------------------------------------------------------- determinism --

def test_sums_are_bitwise_deterministic():
  # Per-head dscale, dbias and dx (fixed-order partials, a fixed reduction,
  # no atomics) over repeated calls and compilations.
  rng = rng_for("det")
  x = random(rng, (40, 128), BF16)
  scale = random(rng, (4, 128), F32, mean=1.0)
  bias = random(rng, (128,), F32)
  dy = random(rng, (40, 128), BF16)
  # Repeated calls of one program, then a second trace and compile.
  norm = base.Norm(eps=EPS, cast_mode="llama", out_dtype=F32)
  impl = PallasTpu(**GENERIC, block_rows=16)
  rstd = impl.forward(x, scale, bias, norm=norm)[1]
  runs = []
  for fresh in (True, False, False, True):
    if fresh:
      fn = jax.jit(lambda *a: impl.backward(*a, norm=norm))
    runs.append([np.asarray(v) for v in fn(x, scale, bias, rstd, dy)])
  for run in runs[1:]:
    for got, first, name in zip(run, runs[0], ["dx", "dscale", "dbias"]):
      np.testing.assert_array_equal(got.view(np.uint8),
                                    first.view(np.uint8), err_msg=name)


# ------------------------------------------------------------ serving --

def test_cannot_serve_names_what_is_missing():
  impl = PallasTpu()
  norm = base.Norm(eps=EPS)
  call = lambda **kw: base.Call(**{**dict(
      op="forward", rows=64, hidden=512, dtype=BF16, scale_shape=(512,),
      norm=norm), **kw})
  for served in (call(has_bias=True), call(scale_shape=(8, 512)),
                 call(norm=base.Norm(eps=EPS, cast_mode="llama")),
                 call(op="quantized_forward",
                      norm=base.Norm(eps=EPS, quant_dtype=E4M3))):
    assert impl.cannot_serve(served) is None, served
  assert "not float64" in impl.cannot_serve(call(dtype=np.dtype(np.float64)))
  sym = jax.export.symbolic_shape("b")[0]
  assert "symbolic dimension b" in impl.cannot_serve(call(rows=sym))
  # Quantizing needs whole rows in VMEM; v4's (assumed when the chip is
  # unknown) does not hold 1M-wide float32 rows.
  wide = call(op="quantized_forward", hidden=1 << 20, dtype=F32,
              scale_shape=(1 << 20,), norm=base.Norm(eps=EPS, quant_dtype=I8))
  assert "quantizes whole rows" in impl.cannot_serve(wide)


def test_quantized_wide_rows_fall_back_to_two_pass_and_xla_quantize():
  # Called directly anyway, a too-wide row still gives the right answer.
  rng = rng_for("qwide")
  x = random(rng, (3, 300), F32)
  impl = PallasTpu(**GENERIC, hidden_block=128)
  norm = base.Norm(eps=EPS, quant_dtype=I8)
  q, q_scale, _ = impl.quantized_forward(x, None, None, None, None, norm=norm)
  y, _ = impl.forward(x, None, None, norm=base.Norm(eps=EPS))
  q_want, s_want = base.quantize(y, I8)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(q_want))
  np.testing.assert_array_equal(np.asarray(q_scale), np.asarray(s_want))


def test_per_head_blocks_hold_whole_head_tiles():
  # 12 heads with bfloat16: blocks and groups are multiples of lcm(16, 12).
  b = PallasTpu(block_rows=20).blocking("backward", 600, 256, [BF16] * 3,
                                        heads=12)
  assert b.block_rows % 48 == 0 and b.group_rows % 48 == 0
  # Rows not a multiple of the tile: the block ends past the array (16
  # rows for 12, two float32 tiles of two groups of four heads), never a
  # block of exactly 12 rows.
  assert PallasTpu().blocking("forward", 12, 128, [F32] * 2,
                              heads=4).block_rows == 16
  assert cfg.row_tile([2, 1], 4) == 32


# ---------------------------------------------------------- TPU lowering --

def _export_tpu(fn, *args):
  exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  text = exp.mlir_module()
  assert "tpu_custom_call" in text, "the Pallas kernel was not lowered"
  return text


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("mode", ["float32", "llama"])
@pytest.mark.parametrize("scale_shape,config", [
    ((4096,), {}), ((8, 128), {}), ((4, 256), dict(hidden_block=128))],
    ids=["vec", "heads8", "heads4-2pass"])
def test_lowering_for_tpu(scale_shape, config, mode):
  impl = PallasTpu(**config)
  hidden = scale_shape[-1]
  rows = 1024
  a, r = _sds((rows, hidden), BF16), _sds((rows,), F32)
  s, b = _sds(scale_shape, BF16), _sds((hidden,), F32)
  norm = base.Norm(eps=EPS, cast_mode=mode, out_dtype=BF16)
  _export_tpu(lambda x, s, b: impl.forward(x, s, b, norm=norm), a, s, b)
  _export_tpu(lambda x, s, b, r, dy: impl.backward(x, s, b, r, dy, norm=norm),
              a, s, b, r, a)
  _export_tpu(lambda x, res, s, b: impl.residual_forward(
      x, res, s, b, norm=norm), a, _sds((rows, hidden), F32), s, b)
  _export_tpu(lambda h, s, b, r, dy, dh: impl.residual_backward(
      h, s, b, r, dy, dh, norm=norm), a, s, b, r, a, a)


@pytest.mark.parametrize("scale_shape,config", [
    ((256,), {}), ((256,), dict(hidden_block=128)), ((8, 128), {}),
    ((12, 128), {}), ((4, 256), dict(hidden_block=128))],
    ids=["vec", "vec-2pass", "heads8", "heads12", "heads4-2pass"])
def test_partials_sum_in_one_reduction_per_shape(scale_shape, config):
  # The kernels write dscale's (and dbias') partials per grid slice. A
  # per-head scale's partials hold a tile of its rows: one reduction sums
  # the slices and the tile's copies of each head together (two had each
  # written their result to HBM on chips that keep small arrays there: v2,
  # v3 and v5p, docs/tpu_aot.md). A (hidden,) scale's and the bias'
  # partials share a shape: one variadic reduction sums both (one op where
  # two had run, with float32 or 16-bit parameters alike, on every
  # generation's compiler). A per-head dbias takes its own. Both the
  # one-pass and the two-pass backward kernels.
  impl = PallasTpu(**config)
  hidden = scale_shape[-1]
  heads = scale_shape[0] if len(scale_shape) == 2 else 1
  rows = 96 * heads
  a, r = _sds((rows, hidden), BF16), _sds((rows,), F32)
  s, b = _sds(scale_shape, BF16), _sds((hidden,), BF16)
  norm = base.Norm(eps=EPS, out_dtype=BF16)
  for bias in (None, b):
    text = _export_tpu(
        lambda x, s, r, dy, *b: impl.backward(x, s, *(b or (None,)), r, dy,
                                              norm=norm),
        a, s, r, a, *([] if bias is None else [bias]))
    separate = bias is not None and heads > 1
    assert text.count("stablehlo.reduce(") == 1 + separate, text
    variadic = bias is not None and heads == 1
    assert text.count(":2 = stablehlo.reduce(") == variadic, text


@pytest.mark.parametrize("qdt", [I8, E4M3, E5M2],
                         ids=["int8", "e4m3fn", "e5m2"])
def test_quantized_lowering_for_tpu(qdt):
  impl = PallasTpu()
  a = _sds((1000, 2880), BF16)
  s, b = _sds((2880,), BF16), _sds((2880,), BF16)
  for mode in ("float32", "llama"):
    norm = base.Norm(eps=EPS, cast_mode=mode, quant_dtype=qdt)
    text = _export_tpu(lambda x, s: impl.quantized_forward(
        x, None, s, None, None, norm=norm), a, s)
    assert text.count("tpu_custom_call") == 1  # one pass: one kernel
    _export_tpu(lambda x, res, s, b, qs: impl.quantized_forward(
        x, res, s, b, qs, norm=norm), a, a, s, b, _sds((), F32))
