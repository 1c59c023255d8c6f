"""MosaicGpu (Pallas Mosaic GPU) kernels: lowering on any host, numerics on Hopper.

* Lowering tests run everywhere (CI: CPU): ``jax.export`` for the ``cuda``
  platform builds the Mosaic GPU module, which catches layout, shape and
  shared-memory errors without a GPU (the PTX compile happens on the device).
  jax 0.10.2's lowering does not run the layout inference of jax 0.11's
  Mosaic GPU, which rejected layouts that lower here (docs/mosaic_gpu.md);
  the Hopper tests catch those.
* Numerics tests need a Hopper GPU (compute capability 9.x) and are skipped,
  with the reason, elsewhere. They go through the public API
  (``rmsnorm_jax.rms_norm`` / ``rms_norm_residual`` with ``jax.vjp``) and check
  y, dx and dscale against the float64 NumPy reference on fresh random inputs
  with a nonzero mean, at the tolerances of ``numerics_util.TOLERANCE`` (float32
  arithmetic plus one rounding per output, two for gradients), on ragged row
  counts that leave a partial last block and CTAs with fewer blocks.
"""


import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax.kernels import mosaic_gpu as mg
from rmsnorm_jax.kernels import mosaic_gpu_kernels as mk
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

from gpu_test_util import HOPPER_REASON, hopper, needs_triton_target
from numerics_util import assert_close, assert_matches_emulation
from numerics_util import assert_quantized_near_rule
from numerics_util import assert_residual_matches_reference
from numerics_util import dx_magnitude, outputs_and_vjp, random
from numerics_util import residual_inputs, rng_for, tol, xla_tol


DTYPES = [pytest.param(d, id=np.dtype(d).name)
          for d in (jnp.float32, jnp.bfloat16, jnp.float16)]
# Ragged rows (partial last block, uneven CTAs), narrow and wide layouts.
SHAPES = [(1, 128), (37, 128), (300, 768), (129, 896), (67, 1024),
          (19, 4096), (1000, 2048), (45, 320),
          # Model widths in the wide layout with 8- and 4-byte vectors.
          (37, 4608), (21, 5376)]


def _ids(shapes):
  return [pytest.param(s, id="x".join(map(str, s))) for s in shapes]


# The fused residual checks: shapes, and (x, residual stream) dtypes.
RESIDUAL_SHAPES = pytest.mark.parametrize(
    "shape", _ids([(37, 128), (300, 768), (19, 4096), (1000, 2048),
                   (37, 4608), (21, 5376), (19, 7168)]))
RESIDUAL_DTYPES = pytest.mark.parametrize("x_dtype,res_dtype", [
    (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32),
    (jnp.float32, jnp.float32)], ids=["bf16", "f16+f32", "f32"])


# ------------------------------------------------------------- any host --

@pytest.mark.parametrize("shape", _ids([(8192, 4096), (32768, 128),
                                        (37, 768), (5, 1024), (5, 320),
                                        (7, 96)]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowers_for_cuda(shape, dtype):
  _lowered_ops(shape, dtype)


def _lowered_ops(shape, dtype):
  """Exports each op MosaicGpu serves at this shape for ``cuda``; returns
  the ops lowered."""
  impl = MosaicGpu(num_sms=132)
  rows, hidden = shape
  s = jax.ShapeDtypeStruct
  x, w = s(shape, dtype), s((hidden,), dtype)
  rs = s((rows,), jnp.float32)
  calls = {
      "fwd": (lambda x, w: impl.forward_kernel(x, w, eps=1e-6, scale_offset=0.0,
                                        out_dtype=x.dtype), (x, w)),
      "bwd": (lambda x, w, r, dy: impl.backward_kernel(x, w, r, dy,
                                                scale_offset=1.0),
              (x, w, rs, x)),
      "residual_fwd": (lambda x, r, w: impl.residual_forward_kernel(
          x, r, w, eps=1e-6, scale_offset=0.0, out_dtype=x.dtype), (x, x, w)),
      "residual_bwd": (lambda h, w, r, dy, dh: impl.residual_backward_kernel(
          h, w, r, dy, dh, scale_offset=0.0), (x, w, rs, x, x)),
  }
  lowered = []
  for op, (fn, args) in calls.items():
    if impl.shape_reason(rows, hidden, dtype, op) is not None:
      continue
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module()
    lowered.append(op)
  return lowered


@pytest.mark.parametrize("shape", _ids([(300, 4608), (7, 3584),
                                        (33, 5376)]))
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_model_widths_lower_for_cuda(shape, dtype):
  # 16-bit rows of widths that are not whole 16-byte vectors of the 128
  # threads (Gemma's 4608, Qwen's 3584, 5376) run the wide layout with
  # narrower vectors. (Their float32 backward takes one-row groups, which
  # jax 0.10.2 does not lower: see FEATURE_SHAPES.)
  rows, hidden = shape
  for kind, ins, outs in (("fwd", 1, 1), ("bwd", 2, 1), ("fwd", 2, 2),
                          ("bwd", 3, 1)):
    p = mg.plan(kind, rows, hidden, in_sizes=[2] * ins, out_sizes=[2] * outs,
                sms=132, scale_size=2)
    assert p.kind == "wide" and hidden % (128 * p.vec) == 0
    assert p.vec == {4608: 4, 3584: 4, 5376: 2}[hidden]
  assert _lowered_ops(shape, dtype) == ["fwd", "bwd", "residual_fwd",
                                        "residual_bwd"]


@pytest.mark.parametrize("hidden", [4608, 5120])
@needs_triton_target
def test_model_width_default_grads_lower_under_strict_settings(hidden):
  # "auto" picks the Mosaic GPU backward and fused backward at these widths
  # (_auto_mid): the default calls' gradients lower for cuda under rank
  # promotion "raise", strict dtype promotion and x64, as users run them.
  s = jax.ShapeDtypeStruct
  x, w = s((4096, hidden), jnp.bfloat16), s((hidden,), jnp.bfloat16)

  def loss(x, w):
    return jnp.sum(rj.rms_norm(x, w).astype(jnp.float32))

  def loss_res(x, r, w):
    y, h = rj.rms_norm_residual(x, r, w)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

  for fn, args in ((loss, (x, w)), (loss_res, (x, x, w))):
    grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))
    with jax.numpy_rank_promotion("raise"), \
        jax.numpy_dtype_promotion("strict"), jax.enable_x64(True):
      text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @mosaic_gpu" in text, fn.__name__


QUANT_DTYPES = [pytest.param(np.dtype(d), id=np.dtype(d).name)
                for d in (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)]
# Narrow and wide layouts, one- and two-row backward groups (4096 float32
# columns), a ragged last block. (jax 0.10.2 does not lower the one-row
# backward of 8192 16-bit columns, with or without the features: it cannot
# slice the (1, hidden) scale's 4096-column chunks, which jax 0.11.2 does;
# the Hopper tests run that shape.)
FEATURE_SHAPES = [(37, 128), (300, 1024), (19, 4096)]


def _export(fn, *args):
  exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  assert "mosaic_gpu" in exp.mlir_module()


@pytest.mark.parametrize("shape", _ids(FEATURE_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cast_mode", ["float32", "llama"])
def test_bias_and_llama_lower_for_cuda(shape, dtype, cast_mode):
  impl = MosaicGpu(num_sms=132)
  rows, hidden = shape
  s = jax.ShapeDtypeStruct
  x, w = s(shape, dtype), s((hidden,), dtype)
  b, rs = s((hidden,), jnp.float32), s((rows,), jnp.float32)
  norm = base.Norm(eps=1e-6, scale_offset=1.0, cast_mode=cast_mode,
                   out_dtype=np.dtype(dtype))
  served = lambda op: impl.shape_reason(rows, hidden, dtype, op,
                                        has_bias=True) is None
  # Without a bias, the float32 mode is test_lowers_for_cuda's.
  for bias in (b, None) if cast_mode == "llama" else (b,):
    if served("fwd"):
      _export(lambda x, w, b: impl.forward(x, w, b, norm=norm), x, w, bias)
    if served("bwd"):
      _export(lambda x, w, b, r, dy: impl.backward(x, w, b, r, dy,
                                                   norm=norm),
              x, w, bias, rs, x)
      # A bias without a scale: dbias alone.
      _export(lambda x, b, r, dy: impl.backward(x, None, b, r, dy,
                                                norm=norm), x, bias, rs, x)
    if served("residual_fwd"):
      _export(lambda x, r, w, b: impl.residual_forward(x, r, w, b, norm=norm),
              x, x, w, bias)
    if served("residual_bwd"):
      _export(lambda h, w, b, r, dy, dh: impl.residual_backward(
          h, w, b, r, dy, dh, norm=norm), x, w, bias, rs, x, x)


@pytest.mark.parametrize("shape", _ids([(37, 128), (300, 1024), (19, 4096)]))
@pytest.mark.parametrize("qdt", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_lowers_for_cuda(shape, qdt, dtype):
  impl = MosaicGpu(num_sms=132)
  rows, hidden = shape
  if impl.shape_reason(rows, hidden, dtype, "quantized_fwd",
                       has_bias=True) is not None:
    pytest.skip(impl.shape_reason(rows, hidden, dtype, "quantized_fwd",
                                  has_bias=True))
  s = jax.ShapeDtypeStruct
  x, w = s(shape, dtype), s((hidden,), jnp.float32)
  b, qs = s((hidden,), dtype), s((), jnp.float32)
  for cast_mode in ("float32", "llama"):
    norm = base.Norm(eps=1e-6, cast_mode=cast_mode, quant_dtype=qdt)
    _export(lambda x, w, b: impl.quantized_forward(x, None, w, b, None,
                                                   norm=norm), x, w, b)
    _export(lambda x, r, w, q: impl.quantized_forward(x, r, w, None, q,
                                                      norm=norm), x, x, w, qs)


@pytest.mark.parametrize("heads,head_dim,dtype", [
    (1, 128, jnp.bfloat16), (4, 64, jnp.float16), (8, 128, jnp.float32),
    (8, 256, jnp.bfloat16), (3, 128, jnp.float16)],
    ids=lambda v: np.dtype(v).name if not isinstance(v, int) else str(v))
def test_per_head_lowers_for_cuda(heads, head_dim, dtype):
  impl = MosaicGpu(num_sms=132)
  rows = heads * 37
  s = jax.ShapeDtypeStruct
  x, w = s((rows, head_dim), dtype), s((heads, head_dim), dtype)
  b, rs = s((head_dim,), dtype), s((rows,), jnp.float32)
  norm = base.Norm(eps=1e-6, scale_offset=1.0, out_dtype=np.dtype(dtype))
  for bias in (b, None):
    _export(lambda x, w, b: impl.forward(x, w, b, norm=norm), x, w, bias)
    _export(lambda x, w, b, r, dy: impl.backward(x, w, b, r, dy, norm=norm),
            x, w, bias, rs, x)
    _export(lambda x, r, w, b: impl.residual_forward(x, r, w, b, norm=norm),
            x, x, w, bias)
    _export(lambda h, w, b, r, dy, dh: impl.residual_backward(
        h, w, b, r, dy, dh, norm=norm), x, w, bias, rs, x, x)
  if head_dim % 128 == 0:
    qnorm = base.Norm(eps=1e-6, quant_dtype=np.dtype(jnp.int8))
    _export(lambda x, w: impl.quantized_forward(x, None, w, None, None,
                                                norm=qnorm), x, w)


def test_per_head_plan():
  # Blocks are whole multiples of the tiled scale's rows (a multiple of
  # the heads and of the row groups), so every block starts at head 0.
  for heads, hidden, size in ((4, 64, 2), (8, 128, 2), (3, 128, 4),
                              (32, 128, 2), (4, 1024, 2)):
    for kind, n in (("fwd", 1), ("bwd", 2)):
      p = mg.plan(kind, heads * 1000, hidden, in_sizes=[size] * n,
                  out_sizes=[size], sms=132, scale_size=size, heads=heads)
      assert p.head_rows % heads == 0 and p.head_rows % p.group_rows == 0
      assert p.block_rows % p.head_rows == 0, p
  with pytest.raises(ValueError, match="multiple of 12"):
    mg.plan("fwd", 300, 128, in_sizes=[2], out_sizes=[2], sms=132,
            heads=3, block_rows=16)


@pytest.mark.parametrize("shape", _ids([(300, 1024), (64, 16384),
                                        (64, 32768)]))
@needs_triton_target
def test_kernels_lower_for_cuda_under_x64(shape):
  # With jax_enable_x64 on, every op (the wide kernels at 16384 and 32768
  # columns) traces and lowers, with the outputs it has with x64 off.
  impl = MosaicGpu(num_sms=132)
  rows, hidden = shape
  s = jax.ShapeDtypeStruct
  x, w = s(shape, jnp.bfloat16), s((hidden,), jnp.bfloat16)
  rs = s((rows,), jnp.float32)
  calls = [
      ("forward", lambda x, w: impl.forward_kernel(
          x, w, eps=1e-6, scale_offset=0.0, out_dtype=x.dtype), (x, w)),
      ("backward", lambda x, w, r: impl.backward_kernel(
          x, w, r, x, scale_offset=0.0), (x, w, rs)),
      ("residual_forward", lambda x, w: impl.residual_forward_kernel(
          x, x, w, eps=1e-6, scale_offset=0.0, out_dtype=x.dtype), (x, w)),
      ("residual_backward", lambda x, w, r: impl.residual_backward_kernel(
          x, w, r, x, x, scale_offset=0.0), (x, w, rs)),
      ("quantized_forward", lambda x, w: rj.rms_norm_quantized(
          x, w, backend=impl), (x, w)),
  ]
  lowered = []
  for op, fn, args in calls:
    if impl.cannot_serve(base.Call(
        op=op, rows=rows, hidden=hidden,
        dtype=np.dtype(jnp.bfloat16), scale_shape=(hidden,),
        norm=base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.bfloat16),
                       quant_dtype=(np.dtype(jnp.int8)
                                    if op == "quantized_forward" else None)),
        scale_dtype=np.dtype(jnp.bfloat16), has_residual=False)):
      continue
    want = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    with jax.enable_x64(True):
      got = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in got.mlir_module(), op
    assert got.out_avals == want.out_avals, op
    lowered.append(op)
  # The forward is served at every width here; at 1024 columns every op.
  assert "forward" in lowered
  assert hidden > 1024 or len(lowered) == len(calls)
  # At 32768 columns the wide kernels split rows over a cluster of 2 CTAs:
  # the backward, fused backward and fused forward.
  assert hidden != 32768 or {"backward", "residual_backward",
                             "residual_forward"} <= set(lowered)
  # And the default call's gradient, as a user with x64 on makes it:
  # "auto" runs Mosaic GPU kernels at 16384 (backward) and 32768 (forward)
  # columns, the Triton kernels at 1024.
  loss = lambda x, w: jnp.sum(rj.rms_norm(x, w).astype(jnp.float32))
  with jax.enable_x64(True):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
  assert ("custom_call @mosaic_gpu" in text) == (hidden >= 16384)


def test_public_api_lowers_for_cuda():
  # Forward and both gradients through rms_norm / rms_norm_residual, as a
  # user selects the implementation.
  impl = MosaicGpu(num_sms=132)
  s = jax.ShapeDtypeStruct
  x, w = s((300, 1024), jnp.bfloat16), s((1024,), jnp.float32)

  def loss(x, w):
    return jnp.sum(rj.rms_norm(x, w, backend=impl).astype(jnp.float32))

  def loss_f32_out(x, w):
    # float32 y (and so float32 dy) from 16-bit x, with scale_offset.
    return jnp.sum(rj.rms_norm(x, w, scale_offset=1.0, out_dtype=jnp.float32,
                               backend=impl))

  def loss_res(x, r, w):
    y, h = rj.rms_norm_residual(x, r, w, backend=impl)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

  for fn, args in ((jax.grad(loss, argnums=(0, 1)), (x, w)),
                   (jax.grad(loss_f32_out, argnums=(0, 1)), (x, w)),
                   (jax.grad(loss, argnums=(0, 1)),
                    (s((37, 128), jnp.float16), s((128,), jnp.bfloat16))),
                   (jax.grad(loss_res, argnums=(0, 1, 2)), (x, x, w))):
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert exp.mlir_module().count("mosaic_gpu") >= 2


def test_cannot_serve_names_the_reason():
  impl = MosaicGpu()
  assert impl.shape_reason(8192, 4096, jnp.bfloat16) is None
  assert "float64" in impl.shape_reason(8, 4096, jnp.float64)
  assert "128-byte" in impl.shape_reason(8, 100, jnp.bfloat16)
  wide = impl.shape_reason(8, 65536, jnp.float32)
  assert wide is not None and "shared memory" in wide


def test_cannot_serve_calls():
  impl = MosaicGpu()
  call = lambda **kw: base.Call(**{**dict(
      op="forward", rows=64, hidden=1024, dtype=np.dtype(jnp.bfloat16),
      scale_shape=(1024,)), **kw})
  quant = base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.float32),
                    quant_dtype=np.dtype(jnp.float8_e4m3fn))
  llama = base.Norm(eps=1e-6, cast_mode="llama")
  if HOPPER_REASON is None or "no CUDA GPU" in HOPPER_REASON:
    assert impl.cannot_serve(call()) is None
    for op in ("forward", "backward", "residual_forward",
               "residual_backward"):
      assert impl.cannot_serve(call(op=op, has_bias=True)) is None, op
    assert impl.cannot_serve(call(op="quantized_forward", has_bias=True,
                                  norm=quant)) is None
    for op in ("forward", "backward", "residual_forward",
               "residual_backward"):
      assert impl.cannot_serve(call(op=op, norm=llama)) is None, op
      assert impl.cannot_serve(call(op=op, scale_shape=(8, 128),
                                    hidden=128)) is None, op
    # Judged as the kernels plan them when the call says: a quantized
    # forward without a residual holds no h, a 16-bit bias takes 2 bytes of
    # shared memory a column; unsaid, the larger of each.
    q = call(op="quantized_forward", hidden=6144, scale_shape=(6144,),
             norm=quant, scale_dtype=np.dtype(jnp.float32))
    assert impl.cannot_serve(dataclasses.replace(q, has_residual=False)) \
        is None
    for has_residual in (None, True):
      assert "shared memory" in impl.cannot_serve(
          dataclasses.replace(q, has_residual=has_residual))
    b = call(hidden=10240, scale_shape=(10240,), has_bias=True,
             norm=base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.bfloat16)))
    assert "shared memory" in impl.cannot_serve(b)
    assert impl.cannot_serve(dataclasses.replace(
        b, bias_dtype=np.dtype(jnp.bfloat16))) is None
  # 1-byte q rows are whole 128-byte pieces only from 128 columns.
  assert "128-byte" in impl.cannot_serve(call(
      op="quantized_forward", hidden=320, scale_shape=(320,), norm=quant))
  assert "shared memory" in impl.cannot_serve(
      call(op="residual_forward", hidden=16384))
  # A float32 output beside 16-bit rows takes more shared memory: 12288
  # bfloat16 columns fit the forward (shape_reason), not with a float32 y.
  assert impl.shape_reason(64, 12288, jnp.bfloat16, "fwd") is None
  assert "shared memory" in impl.cannot_serve(call(
      hidden=12288, scale_shape=(12288,),
      norm=base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.float32))))


@needs_triton_target
def test_x_wider_than_the_residual_stream_is_judged_at_its_own_size():
  # The fused ops run in the residual stream's dtype (base.Call.dtype), but
  # the fused and quantized forwards hold x's rows too. A float32 x beside
  # a bfloat16 stream, judged at 2 bytes an element, passed cannot_serve
  # and then failed the plan at trace time; base.Call.x_dtype carries it.
  impl = MosaicGpu()
  bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
  fused = base.Call(op="residual_forward", rows=64, hidden=6144, dtype=bf16,
                    scale_shape=(6144,), norm=base.Norm(eps=1e-6,
                                                        out_dtype=bf16),
                    scale_dtype=bf16)
  quant = dataclasses.replace(
      fused, op="quantized_forward", hidden=5120, scale_shape=(5120,),
      has_residual=True, norm=base.Norm(eps=1e-6, out_dtype=f32,
                                        quant_dtype=np.dtype(jnp.int8)))
  for call in (fused, quant):
    if HOPPER_REASON is None or "no CUDA GPU" in HOPPER_REASON:
      assert impl.cannot_serve(call) is None, call.op
    assert "shared memory" in impl.cannot_serve(
        dataclasses.replace(call, x_dtype=f32)), call.op
  # The public calls that took that path now lower for cuda (the fused
  # forward on a kernel that holds a float32 x, or XLA), gradient included.
  s = jax.ShapeDtypeStruct
  for shape in ((4096, 16384), (512, 32768)):
    x, r, w = s(shape, f32), s(shape, bf16), s(shape[-1:], bf16)

    def loss(x, r, w):
      y, h = rj.rms_norm_residual(x, r, w)
      return jnp.sum(y.astype(f32)) + jnp.sum(h.astype(f32))

    for fn in (jax.grad(loss, argnums=(0, 1, 2)),
               lambda x, r, w: rj.rms_norm_quantized(x, w, residual=r)):
      jax.jit(fn).trace(x, r, w).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("hidden,dtype", [
    (8192, jnp.bfloat16), (7168, jnp.bfloat16), (6144, jnp.float16)])
@needs_triton_target
def test_one_row_backward_groups_lower_or_are_declined(hidden, dtype):
  # jax 0.10 cannot lower the chunks of a one-row backward group
  # (mosaic_gpu.ONE_ROW_CHUNKS_LOWER), which the fused backward of these
  # widths takes. The default call's gradient must lower for cuda all the
  # same (on the Triton kernel there), and backend="mosaic_gpu" must say
  # why it cannot serve instead of failing inside the lowering.
  s = jax.ShapeDtypeStruct
  x, w = s((2048, hidden), dtype), s((hidden,), dtype)

  def grad(backend):
    def loss(x, r, w):
      y, h = rj.rms_norm_residual(x, r, w, backend=backend)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  grad("auto").trace(x, x, w).lower(lowering_platforms=("cuda",))
  if mg.ONE_ROW_CHUNKS_LOWER:
    text = grad("mosaic_gpu").trace(x, x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "custom_call @mosaic_gpu" in text
  else:
    with pytest.raises(ValueError, match="does not lower"):
      grad("mosaic_gpu").trace(x, x, w)


def _auto_call(op, hidden, dtype=jnp.bfloat16, *, rows=8192, has_bias=False,
               scale=None, out=None):
  """The ``base.Call`` that "auto" asks MosaicGpu about: a (hidden,) scale
  and the output in x's dtype unless ``scale`` or ``out`` say otherwise."""
  return base.Call(op=op, rows=rows, hidden=hidden, dtype=np.dtype(dtype),
                   scale_shape=(hidden,), has_bias=has_bias,
                   norm=base.Norm(eps=1e-6, out_dtype=np.dtype(out or dtype)),
                   scale_dtype=np.dtype(scale or dtype))


def test_auto_keeps_triton_where_it_measured_faster():
  impl = MosaicGpu()
  call = _auto_call
  # Measured on an H200 (docs/mosaic_gpu.md): the backward of wide rows up
  # to 4096 columns as fast or faster; rows of 8192 or 128 columns, the
  # forward and the fused ops slower or no faster.
  assert impl.auto_declines(call("backward", 4096)) is None
  assert impl.auto_declines(call("backward", 4096, jnp.float32)) is None
  assert "8192 columns" in impl.auto_declines(call("backward", 8192))
  # Fewer rows: the Triton kernel was as fast or faster (bench_h200.md).
  for rows in (1, 64, 2048):
    few = dataclasses.replace(call("backward", 4096), rows=rows)
    assert "rows" in impl.auto_declines(few), rows
  assert "128 columns" in impl.auto_declines(call("backward", 128))
  for op in ("forward", "residual_forward", "residual_backward"):
    assert op in impl.auto_declines(call(op, 4096))
  # With a bias the fused backward measured faster on 16-bit rows of
  # 1024-8192 columns; the other bias ops, llama and the quantized forward
  # slower or no faster (docs/mosaic_gpu.md).
  for hidden in (1024, 4096, 8192):
    assert impl.auto_declines(call("residual_backward", hidden,
                                   has_bias=True)) is None
  # The plain backward with a bias: bfloat16 rows of 2048 columns from
  # 8192 rows (3-5% faster); not fewer rows, other widths, float16.
  for rows in (8192, 16384):
    assert impl.auto_declines(dataclasses.replace(
        call("backward", 2048, has_bias=True), rows=rows)) is None
  for c in (call("residual_backward", 4096, jnp.float32, has_bias=True),
            call("residual_backward", 128, has_bias=True),
            call("residual_backward", 4096, has_bias=True,
                 scale=jnp.float32),
            call("backward", 4096, has_bias=True),
            call("backward", 1024, rows=32768, has_bias=True),
            call("backward", 2048, rows=4096, has_bias=True),
            call("backward", 2048, jnp.float16, rows=16384, has_bias=True),
            call("backward", 2048, rows=16384, has_bias=True,
                 scale=jnp.float32),
            call("forward", 4096, has_bias=True),
            call("residual_forward", 4096, has_bias=True),
            call("quantized_forward", 4096)):
    assert impl.auto_declines(c) is not None, c.op
  # Served, not timed: the per-head scale, and llama's backward.
  per_head = dataclasses.replace(call("backward", 1024), scale_shape=(2, 1024))
  assert "per-head" in impl.auto_declines(per_head)
  llama = base.Norm(eps=1e-6, cast_mode="llama")
  for c in (call("backward", 4096),
            call("residual_backward", 4096, has_bias=True)):
    assert "llama" in impl.auto_declines(dataclasses.replace(c, norm=llama))
  # Mixed dtypes were not timed: Triton keeps them.
  assert "dtype" in impl.auto_declines(call("backward", 4096,
                                            scale=jnp.float32))
  assert "dtype" in impl.auto_declines(call("backward", 4096,
                                            out=jnp.float32))


def test_auto_takes_mosaic_at_model_widths_where_it_measured_faster():
  # H200 (docs/mosaic_gpu.md, "Model widths"): the backward of 4608-7168
  # 16-bit columns (8-byte vectors or wider) on 4096 rows or more, and up to
  # 5120 columns on 2048; the fused backward of 4608-8192 columns on 4096
  # rows or more, up to 6144 on 2048.
  impl = MosaicGpu()

  def call(op, rows, hidden, dtype=jnp.bfloat16, **kw):
    return _auto_call(op, hidden, dtype, rows=rows, **kw)

  taken = [("backward", 8192, h) for h in (4608, 5120, 6144, 7168)]
  taken += [("backward", 2048, h) for h in (4608, 5120)]
  taken += [("residual_backward", 4096, h)
            for h in (4608, 5120, 5376, 6144, 7168, 8192)]
  taken += [("residual_backward", 2048, h) for h in (4608, 6144)]
  for op, rows, hidden in taken:
    assert impl.auto_declines(call(op, rows, hidden)) is None, (op, rows,
                                                                hidden)
    assert impl.auto_declines(call(op, rows, hidden, jnp.float16)) is None
  kept = [("backward", 8192, 5376),  # 4-byte vectors
          ("backward", 8192, 3584), ("residual_backward", 8192, 3584),
          ("backward", 2048, 6144), ("residual_backward", 2048, 7168),
          ("backward", 1024, 4608), ("residual_backward", 1024, 4608),
          ("forward", 8192, 5120), ("residual_forward", 8192, 5120)]
  for op, rows, hidden in kept:
    assert impl.auto_declines(call(op, rows, hidden)) is not None, (op, rows,
                                                                    hidden)
  # float32 rows, a float32 scale and a bias were not timed there.
  for c in (call("backward", 8192, 5120, jnp.float32),
            call("residual_backward", 8192, 5120, scale=jnp.float32),
            call("backward", 8192, 5120, has_bias=True)):
    assert impl.auto_declines(c) is not None
  # Symbolic rows decline with a reason rather than raise.
  sym = jax.export.symbolic_shape("n")[0]
  for op in ("backward", "residual_backward"):
    assert impl.auto_declines(call(op, sym, 5120)) is not None


@hopper
@pytest.mark.parametrize("x_dtype,scale_dtype,out_dtype", [
    (jnp.bfloat16, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32),
    (jnp.float16, jnp.float16, jnp.float32)], ids=["bf16-f32", "bf16-f32-out32",
                                                   "f16-out32"])
def test_mixed_dtypes_match_float64(x_dtype, scale_dtype, out_dtype):
  # A float32 scale (flax's default parameter dtype) beside 16-bit rows,
  # and a float32 output (so a float32 dy), forward and backward.
  impl = MosaicGpu()
  rng = rng_for("mixed", np.dtype(x_dtype).name, np.dtype(scale_dtype).name,
             np.dtype(out_dtype).name)
  x = random(rng, (1000, 4096), x_dtype, mean=0.3)
  scale = random(rng, (4096,), scale_dtype, mean=1.0, scale=0.5)
  dy = random(rng, x.shape, out_dtype)
  f = lambda x, s: rj.rms_norm(x, s, out_dtype=out_dtype, backend=impl)
  y, vjp = jax.vjp(jax.jit(f), x, scale)
  dx, dscale = vjp(dy)
  assert y.dtype == out_dtype and dx.dtype == x_dtype
  y_ref, _ = reference.rms_norm(x, scale)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy)
  assert_close(y, y_ref, tol(out_dtype), "y")
  assert_close(dx, dx_ref, tol(x_dtype, out_dtype), "dx",
               dx_magnitude(x, scale, dy))
  assert_close(dscale, ds_ref, tol(scale_dtype, out_dtype), "dscale")


def test_plan_covers_rows_and_limits():
  for rows, hidden, size in ((1, 128, 2), (8193, 4096, 2), (1000, 4096, 4)):
    p = mg.plan("fwd", rows, hidden, in_sizes=[size], out_sizes=[size],
                sms=132)
    assert p.grid * p.steps * p.block_rows >= rows
    assert (p.grid - 1) * p.steps < p.row_blocks  # no CTA without work
    assert p.cta_rows % 4 == 0 and hidden % p.chunk == 0
    assert hidden % p.k == 0 and p.k <= 256 and p.stages >= 2
  # Rows that are not whole 32-lane vectors of 16 bytes take narrower
  # vectors (a row split over fewer lanes fails jax 0.11's layout
  # inference): 128 bfloat16 columns in vectors of 4, 96 float32 in 1.
  for hidden, size, vec in ((128, 2, 4), (320, 2, 2), (96, 4, 1),
                            (768, 2, 8)):
    p = mg.plan("bwd", 37, hidden, in_sizes=[size] * 2, out_sizes=[size],
                sms=132)
    assert (p.kind, p.lanes, p.vec) == ("narrow", 32, vec)
  # From WIDE_NARROW_VEC_MIN_COLS columns such rows take the wide layout
  # with 8- or 4-byte vectors instead (the narrow layout's four-row tiles
  # left no room for two stages at 8192x3584 bf16).
  for hidden, size, vec in ((3584, 2, 4), (4608, 2, 4), (5376, 2, 2)):
    p = mg.plan("bwd", 8192, hidden, in_sizes=[size] * 2, out_sizes=[size],
                sms=132)
    assert (p.kind, p.vec) == ("wide", vec), hidden
  # float32 rows keep the narrow layout there (not run on a GPU in the
  # wide one): 5376 float32 columns do not fit its two backward stages.
  with pytest.raises(ValueError, match="5376 columns"):
    mg.plan("bwd", 8192, 5376, in_sizes=[4] * 2, out_sizes=[4], sms=132)
  # The backward with a scale keeps two-row groups where two stages fit.
  p = mg.plan("bwd", 8192, 4096, in_sizes=[2] * 3, out_sizes=[2], sms=132,
              scale_size=2)
  assert p.group_rows == 2 and not p.row_scale
  with pytest.raises(ValueError, match="hidden=100"):
    mg.plan("fwd", 8, 100, in_sizes=[2], out_sizes=[2], sms=132)


def test_rejects_float64():
  with pytest.raises(TypeError, match="x of shape"):
    MosaicGpu().forward_kernel(np.ones((4, 128)), None, eps=1e-6, scale_offset=0.0,
                        out_dtype=np.float64)


# --------------------------------------------------------------- Hopper --

def _run_norm(backend, x, scale, dy, *, eps, scale_offset):
  def f(x, scale):
    return rj.rms_norm(x, scale, eps=eps, scale_offset=scale_offset,
                       backend=backend)
  if scale is None:
    y, vjp = jax.vjp(jax.jit(lambda x: f(x, None)), x)
    return (y, *vjp(dy), None)
  y, vjp = jax.vjp(jax.jit(f), x, scale)
  return (y, *vjp(dy))


@hopper
@pytest.mark.parametrize("shape", _ids(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "noscale"])
def test_norm_matches_float64(shape, dtype, with_scale):
  impl = MosaicGpu()
  if impl.shape_reason(*shape, dtype) is not None:
    pytest.skip(impl.shape_reason(*shape, dtype))
  rng = rng_for("norm", shape, np.dtype(dtype).name, with_scale)
  x = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (shape[1],), dtype, mean=0.0, scale=0.5) \
      if with_scale else None
  offset = 1.0 if with_scale else 0.0
  dy = random(rng, shape, dtype)
  y, dx, dscale = _run_norm(impl, x, scale, dy, eps=1e-5, scale_offset=offset)
  assert y.dtype == x.dtype and dx.dtype == x.dtype
  y_ref, _ = reference.rms_norm(x, scale, eps=1e-5, scale_offset=offset)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy, eps=1e-5,
                                           scale_offset=offset)
  assert_close(y, y_ref, tol(dtype), "y")
  assert_close(dx, dx_ref, tol(dtype), "dx",
               dx_magnitude(x, scale, dy, eps=1e-5, scale_offset=offset))
  if with_scale:
    assert dscale.dtype == scale.dtype
    assert_close(dscale, ds_ref, tol(dtype), "dscale")


@hopper
@RESIDUAL_SHAPES
@RESIDUAL_DTYPES
def test_residual_matches_float64(shape, x_dtype, res_dtype):
  impl = MosaicGpu()
  # The dispatcher asks cannot_serve with the residual stream's dtype.
  _skip_unserved(impl, shape, res_dtype, ("residual_fwd", "residual_bwd"),
                 has_bias=False)
  rng = rng_for("res", shape, np.dtype(x_dtype).name, np.dtype(res_dtype).name)
  inputs = residual_inputs(rng, shape, x_dtype, res_dtype)
  x, res, scale, dy, dh = inputs
  f = jax.jit(lambda x, r, s: rj.rms_norm_residual(x, r, s, backend=impl))
  (y, h), vjp = jax.vjp(f, x, res, scale)
  outs = (y, h, *vjp((dy, dh)))
  assert_residual_matches_reference(inputs, outs)


@hopper
@pytest.mark.parametrize("shape", _ids([(19, 7168), (37, 4608), (21, 5376)]))
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_residual_backward_at_model_widths_matches_float64(shape, dtype):
  # "auto" runs this fused backward at model widths where the module's
  # fused forward does not fit (7168 columns), so it is checked on its own:
  # dx = the norm's gradient + dh, and dscale, from a saved rstd.
  impl = MosaicGpu()
  _skip_unserved(impl, shape, dtype, ("residual_bwd",), has_bias=False)
  rng = rng_for("res_bwd", shape, np.dtype(dtype).name)
  h = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (shape[1],), dtype, mean=1.0, scale=0.5)
  dy, dh = random(rng, shape, dtype), random(rng, shape, dtype)
  norm = base.Norm(eps=1e-5, out_dtype=np.dtype(dtype))
  rstd = base.Xla().forward(h, scale, None, norm=norm)[1]
  dx, dscale = jax.jit(lambda *a: impl.residual_backward(*a, norm=norm)[:2])(
      h, scale, None, rstd, dy, dh)
  assert dx.dtype == h.dtype
  dx_ref, ds_ref = reference.rms_norm_grad(h, scale, dy, eps=1e-5)
  assert_close(dx, dx_ref + np.asarray(dh, np.float64), tol(dtype), "dx",
               dx_magnitude(h, scale, dy, eps=1e-5))
  assert_close(dscale, ds_ref, tol(dtype), "dscale")


@hopper
def test_dscale_is_deterministic():
  impl = MosaicGpu()
  rng = rng_for("det")
  x = random(rng, (4099, 1024), jnp.bfloat16, mean=0.3)
  scale = random(rng, (1024,), jnp.float32, mean=1.0, scale=0.3)
  dy = random(rng, (4099, 1024), jnp.bfloat16)
  a = _run_norm(impl, x, scale, dy, eps=1e-6, scale_offset=0.0)[2]
  b = _run_norm(impl, x, scale, dy, eps=1e-6, scale_offset=0.0)[2]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------- Hopper: features --
# Ragged rows, both layouts, one- and two-row backward groups, and rows
# enough for "auto" to take the bias backward (AUTO_BIAS_BWD_MIN_ROWS).
FEATURE_RUN_SHAPES = [(37, 128), (129, 896), (300, 1024), (19, 4096),
                      (1000, 2048), (8192, 2048), (9, 8192)]


def _f64(a):
  return np.asarray(np.asarray(a, np.float32), np.float64)


def _skip_unserved(impl, shape, dtype, ops, has_bias=True, **kw):
  for op in ops:
    reason = impl.shape_reason(*shape, dtype, op, has_bias=has_bias, **kw)
    if reason is not None:
      pytest.skip(reason)


@hopper
@pytest.mark.parametrize("shape", _ids(FEATURE_RUN_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_matches_float64(shape, dtype):
  impl = MosaicGpu()
  _skip_unserved(impl, shape, dtype, ("fwd", "bwd"))
  rng = rng_for("bias", shape, np.dtype(dtype).name)
  x = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (shape[1],), dtype, scale=0.5)
  bias = random(rng, (shape[1],), dtype, mean=0.1, scale=0.5)
  dy = random(rng, shape, dtype)
  f = lambda x, s, b: rj.rms_norm(x, s, b, eps=1e-5, scale_offset=1.0,
                                  backend=impl)
  y, (dx, dscale, dbias) = outputs_and_vjp(f, (x, scale, bias), dy)
  assert y.dtype == x.dtype and dbias.dtype == bias.dtype
  y_ref, _ = reference.rms_norm(x, scale, eps=1e-5, scale_offset=1.0)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy, eps=1e-5,
                                           scale_offset=1.0)
  db_ref = _f64(dy).sum(axis=0)
  assert_close(y, y_ref + _f64(bias), tol(dtype), "y")
  assert_close(dx, dx_ref, tol(dtype), "dx",
               dx_magnitude(x, scale, dy, eps=1e-5, scale_offset=1.0))
  assert_close(dscale, ds_ref, tol(dtype), "dscale")
  assert_close(dbias, db_ref, tol(dtype), "dbias")
  # A bias without a scale: dbias is the backward's only sum.
  g = lambda x, b: rj.rms_norm(x, None, b, eps=1e-5, backend=impl)
  y, (dx, dbias) = outputs_and_vjp(g, (x, bias), dy)
  y_ref, _ = reference.rms_norm(x, eps=1e-5)
  dx_ref, _ = reference.rms_norm_grad(x, None, dy, eps=1e-5)
  assert_close(y, y_ref + _f64(bias), tol(dtype), "y (bias only)")
  assert_close(dx, dx_ref, tol(dtype), "dx (bias only)",
               dx_magnitude(x, None, dy, eps=1e-5))
  assert_close(dbias, db_ref, tol(dtype), "dbias (bias only)")


@hopper
@RESIDUAL_SHAPES
@RESIDUAL_DTYPES
def test_bias_residual_matches_float64(shape, x_dtype, res_dtype):
  impl = MosaicGpu()
  _skip_unserved(impl, shape, res_dtype, ("residual_fwd", "residual_bwd"))
  rng = rng_for("bias_res", shape, np.dtype(x_dtype).name,
                np.dtype(res_dtype).name)
  x, res, scale, dy, dh = residual_inputs(rng, shape, x_dtype, res_dtype)
  bias = random(rng, (shape[1],), jnp.float32, mean=0.1, scale=0.5)
  f = lambda x, r, s, b: rj.rms_norm_residual(x, r, s, b, backend=impl)
  (y, h), (dx, dres, dscale, dbias) = outputs_and_vjp(
      f, (x, res, scale, bias), (dy, dh))
  assert h.dtype == res.dtype and y.dtype == res.dtype
  assert_close(h, _f64(x) + _f64(res), tol(res_dtype), "h")
  # The norm sees h rounded to the residual's dtype, exactly as returned.
  y_ref, _ = reference.rms_norm(h, scale)
  dh_ref, ds_ref = reference.rms_norm_grad(h, scale, dy)
  dh_ref = dh_ref + _f64(dh)
  assert_close(y, y_ref + _f64(bias), tol(res_dtype), "y")
  assert_close(dres, dh_ref, tol(res_dtype), "dresidual")
  assert_close(dx, dh_ref, tol(res_dtype, x_dtype), "dx")
  assert_close(dscale, ds_ref, tol(res_dtype), "dscale")
  assert_close(dbias, _f64(dy).sum(axis=0), tol(res_dtype), "dbias")


@hopper
@pytest.mark.parametrize("shape", _ids(FEATURE_RUN_SHAPES))
@pytest.mark.parametrize("x_dtype,scale_dtype", [
    (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16),
    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32)],
    ids=["bf16", "f16", "bf16-f32scale", "f32"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_llama_matches_emulation(shape, x_dtype, scale_dtype, with_bias):
  # The forward against reference.emulate (Hugging Face's order of
  # roundings), the gradients against base.Xla (the same formula compiled
  # by XLA), with a scale offset.
  impl = MosaicGpu()
  pdt = jnp.result_type(x_dtype, scale_dtype)
  _skip_unserved(impl, shape, x_dtype, ("fwd", "bwd"), has_bias=with_bias,
                 scale_dtype=scale_dtype, out_dtype=pdt)
  rng = rng_for("llama", shape, np.dtype(x_dtype).name,
                np.dtype(scale_dtype).name, with_bias)
  x = random(rng, shape, x_dtype, mean=0.3)
  scale = random(rng, (shape[1],), scale_dtype, scale=0.5)
  bias = random(rng, (shape[1],), x_dtype, mean=0.1, scale=0.5) \
      if with_bias else None
  dy = random(rng, shape, pdt)
  norm = base.Norm(eps=1e-5, scale_offset=1.0, cast_mode="llama",
                   out_dtype=np.dtype(pdt))

  def run(impl, x, scale, bias, dy):
    y, rstd = impl.forward(x, scale, bias, norm=norm)
    return (y, *impl.backward(x, scale, bias, rstd, dy, norm=norm))

  y, dx, dscale, dbias = jax.jit(functools.partial(run, impl))(
      x, scale, bias, dy)
  _, dx_x, ds_x, db_x = jax.jit(functools.partial(run, base.Xla()))(
      x, scale, bias, dy)
  assert y.dtype == pdt and dx.dtype == x.dtype
  b = None if bias is None else np.asarray(bias)
  want = reference.emulate(np.asarray(x), np.asarray(scale), b, eps=1e-5,
                           scale_offset=1.0, cast_mode="llama")
  # A float32 y + bias that cancels is judged by its terms' ulp.
  terms = np.abs(reference.emulate(
      np.asarray(x), np.asarray(scale), eps=1e-5, scale_offset=1.0,
      cast_mode="llama")).astype(np.float32)
  if b is not None:
    terms = terms + np.abs(b.astype(np.float32))
  assert_matches_emulation(y, want, "y", rounded_inside=x_dtype,
                           magnitude=terms)
  assert_close(dx, dx_x, xla_tol(x_dtype, pdt), "dx vs xla",
               dx_magnitude(x, scale, dy, eps=1e-5, scale_offset=1.0))
  assert_close(dscale, ds_x, xla_tol(x_dtype, pdt), "dscale vs xla")
  if with_bias:
    assert_close(dbias, db_x, xla_tol(pdt), "dbias vs xla")
  else:
    assert dbias is None


def test_int8_rounding_is_half_to_even_at_exact_ties():
  # The kernels' int8 rounding (adding 1.5 * 2**23, keeping the low byte),
  # the same float32 operations on CPU: ties to even, saturation, and the
  # floats next to a tie.
  arith = mk.Arith(quant_dtype=np.dtype(jnp.int8))
  v = np.array([-1000, -127.5, -126.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5,
                3.5, 126.5, 127.5, 1000,
                np.nextafter(np.float32(0.5), np.float32(0)),
                np.nextafter(np.float32(2.5), np.float32(3))], np.float32)
  q = jax.jit(arith.quantize)(jnp.asarray(v), jnp.float32(1.0))
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q),
                                np.round(np.clip(v, -127, 127)))


def _quant_inputs(shape, dtype, qdt, static, with_residual):
  rng = rng_for("quant", shape, np.dtype(dtype).name, qdt.name, static,
                with_residual)
  x = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (shape[1],), jnp.float32, mean=1.0, scale=0.5)
  res = bias = None
  if with_residual:
    res = random(rng, shape, dtype, mean=0.5)
    bias = random(rng, (shape[1],), dtype, mean=0.1, scale=0.5)
  else:
    # An all-zero row (without a bias, y is zero there): dynamic scale 1.
    x = x.at[3].set(0)
  quant_scale = None
  if static:
    # Below the largest |y| / qmax, so that the largest values saturate.
    ymax = 4.0 * 1.5 + 1.0
    quant_scale = jnp.float32(0.5 * ymax / base.QUANT_MAX[qdt])
  return x, res, scale, bias, quant_scale


@hopper
@pytest.mark.parametrize("shape", _ids([(37, 128), (300, 1024), (19, 4096)]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdt", QUANT_DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_residual", [False, True],
                         ids=["plain", "residual"])
def test_quantized_matches_rule(shape, dtype, qdt, static, with_residual):
  # q is the quantization rule (base.quantize) of the float32 y of the
  # forward with a float32 output, with the same q_scale; q may differ
  # only next to a rounding midpoint (assert_quantized_near_rule).
  impl = MosaicGpu()
  # As the dispatcher asks: a float32 scale and y.
  _skip_unserved(impl, shape, dtype, ("quantized_fwd", "fwd",
                                      "residual_fwd"),
                 has_bias=with_residual, bias_dtype=dtype,
                 has_residual=with_residual, scale_dtype=jnp.float32,
                 out_dtype=jnp.float32)
  x, res, scale, bias, quant_scale = _quant_inputs(shape, dtype, qdt, static,
                                                   with_residual)

  def run(x, res, scale, bias, quant_scale):
    kw = dict(eps=1e-6, backend=impl)
    outs = rj.rms_norm_quantized(x, scale, quant_dtype=qdt,
                                 quant_scale=quant_scale, residual=res,
                                 bias=bias, **kw)
    if res is None:
      y = rj.rms_norm(x, scale, bias, out_dtype=jnp.float32, **kw)
      return outs + (None, y)
    y, _ = rj.rms_norm_residual(x, res, scale, bias, out_dtype=jnp.float32,
                                **kw)
    return outs + (y,)

  q, q_scale, h, y = jax.jit(run)(x, res, scale, bias, quant_scale)
  rows = shape[0]
  assert q.dtype == qdt and q.shape == shape
  assert q_scale.dtype == np.float32 and q_scale.shape == (rows, 1)
  if with_residual:
    h_want = (_f64(x) + _f64(res)).astype(np.float32).astype(res.dtype)
    np.testing.assert_array_equal(np.asarray(h), h_want)
  # The rule in NumPy (IEEE float32 products, ml_dtypes' round-to-nearest-
  # even float8 conversion) and as base.quantize compiles it.
  _, s_want = reference.emulate_quantize(
      np.asarray(y), qdt, None if quant_scale is None else float(quant_scale))
  np.testing.assert_array_equal(np.asarray(q_scale), s_want)
  assert_quantized_near_rule(q, y, qdt, quant_scale)
  if qdt == np.dtype(jnp.int8):
    # The rule as XLA compiles it on the GPU: the same q_scale, and q as
    # the emulation's but next to a midpoint (on the H200 XLA's q matched
    # the kernel's where both differed from the emulation).
    q_x, s_x = jax.jit(base.quantize, static_argnums=1)(y, qdt, quant_scale)
    np.testing.assert_array_equal(np.asarray(s_x), s_want)
    assert_quantized_near_rule(q_x, y, qdt, quant_scale)
  if static:
    assert np.all(np.asarray(q_scale) == np.float32(quant_scale))
    assert np.any(np.abs(np.asarray(q, np.float32)) == base.QUANT_MAX[qdt])
  elif not with_residual:
    assert float(q_scale[3, 0]) == 1.0
    assert not np.any(np.asarray(q[3], np.float32))
  # The float32 y itself: the float64 norm (plus bias) of what it saw.
  normed = x if res is None else h
  y_ref, _ = reference.rms_norm(normed, scale, eps=1e-6)
  if bias is not None:
    y_ref = y_ref + _f64(bias)
  assert_close(y, y_ref, tol(jnp.float32), "y")


@hopper
@pytest.mark.parametrize("heads", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_matches_float64(heads, head_dim, dtype):
  # Row r uses scale[r % heads]; dscale has the scale's shape. With a bias,
  # ragged token counts (a partial last block), forward, backward and the
  # fused residual ops.
  impl = MosaicGpu()
  tokens = 1000 + heads  # not a whole number of blocks
  rows = tokens * heads
  shape = (rows, head_dim)
  rng = rng_for("per_head", heads, head_dim, np.dtype(dtype).name)
  x = random(rng, shape, dtype, mean=0.3)
  scale = random(rng, (heads, head_dim), dtype, mean=1.0, scale=0.5)
  bias = random(rng, (head_dim,), dtype, mean=0.1, scale=0.5)
  dy = random(rng, shape, dtype)
  res = random(rng, shape, dtype, mean=0.5)
  dh = random(rng, shape, dtype)
  norm = base.Norm(eps=1e-5, out_dtype=np.dtype(dtype))

  def run(x, scale, bias, dy, res, dh):
    y, rstd = impl.forward(x, scale, bias, norm=norm)
    dx, dscale, dbias = impl.backward(x, scale, bias, rstd, dy, norm=norm)
    yr, h, rstd_r = impl.residual_forward(x, res, scale, bias, norm=norm)
    dhr, dscale_r, dbias_r = impl.residual_backward(h, scale, bias, rstd_r,
                                                    dy, dh, norm=norm)
    return y, dx, dscale, dbias, yr, h, dhr, dscale_r, dbias_r

  y, dx, dscale, dbias, yr, h, dhr, dscale_r, dbias_r = jax.jit(run)(
      x, scale, bias, dy, res, dh)
  assert dscale.shape == scale.shape and dscale.dtype == np.float32
  w = np.tile(_f64(scale), (tokens, 1))  # row r: scale[r % heads]
  for name, normed, got_y, got_dx, got_ds, got_db, extra in (
      ("", x, y, dx, dscale, dbias, 0.0),
      ("residual ", h, yr, dhr, dscale_r, dbias_r, _f64(dh))):
    xf = _f64(normed)
    r = 1.0 / np.sqrt(np.mean(xf * xf, axis=1, keepdims=True) + 1e-5)
    xhat = xf * r
    g = _f64(dy) * w
    dx_ref = r * (g - xhat * np.mean(g * xhat, axis=1, keepdims=True))
    ds_ref = (_f64(dy) * xhat).reshape(tokens, heads, head_dim).sum(0)
    assert_close(got_y, xhat * w + _f64(bias), tol(dtype), name + "y")
    assert_close(got_dx, dx_ref + extra, tol(dtype), name + "dx",
                 float(np.linalg.norm((r * g).ravel())))
    assert_close(got_ds, ds_ref, tol(dtype), name + "dscale")
    assert_close(got_db, _f64(dy).sum(0), tol(dtype), name + "dbias")
  if head_dim % 128 == 0:
    # The quantized forward: the rule applied to the forward's float32 y.
    qnorm = base.Norm(eps=1e-5, quant_dtype=np.dtype(jnp.int8))
    q, q_scale, _ = jax.jit(functools.partial(
        impl.quantized_forward, norm=qnorm))(x, None, scale, bias, None)
    y32, _ = jax.jit(functools.partial(impl.forward, norm=base.Norm(
        eps=1e-5)))(x, scale, bias)
    _, s_want = reference.emulate_quantize(np.asarray(y32), jnp.int8)
    np.testing.assert_array_equal(np.asarray(q_scale), s_want)
    assert_quantized_near_rule(q, y32, jnp.int8)


@hopper
@pytest.mark.parametrize("shape", _ids([(8192, 4096), (300, 16384),
                                        (300, 32768)]))
def test_public_api_under_x64_matches_x64_off(shape):
  # The default call with jax_enable_x64 on: the same kernels ("auto" takes
  # the Mosaic GPU backward at 8192x4096, the wide backward at 16384 and the
  # wide forward at 32768 columns), the same bits.
  rng = rng_for("x64", *shape)
  x = random(rng, shape, jnp.bfloat16, mean=0.3)
  w = random(rng, shape[-1:], jnp.bfloat16, mean=1.0, scale=0.3)
  dy = random(rng, shape, jnp.bfloat16)
  f = lambda x, w: rj.rms_norm(x, w)
  want = outputs_and_vjp(f, (x, w), dy)
  with jax.enable_x64(True):
    got = outputs_and_vjp(f, (x, w), dy)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(e, np.float32))


@hopper
def test_weight_dtype_reaches_the_kernels_as_cast_parameters():
  # The Mosaic GPU kernels do not fold weight_dtype: they get the cast
  # scale, so the call is bit for bit the one on the cast parameters, but
  # for dscale, a float32 sum that the cast's transpose rounds to bfloat16
  # (or not, where XLA drops the rounding as excess precision, as it did on
  # an H200): equal once both are rounded.
  rng = rng_for("mosaic_weight_dtype")
  x = random(rng, (8192, 4096), jnp.bfloat16)
  scale = random(rng, (4096,), jnp.float32, mean=1.0, scale=0.3)
  dy = random(rng, (8192, 4096), jnp.bfloat16)
  f = lambda s, w: rj.rms_norm(x, s, weight_dtype=w, backend="mosaic_gpu")
  got = outputs_and_vjp(lambda s: f(s, jnp.bfloat16), (scale,), dy)
  want = outputs_and_vjp(lambda s: f(s.astype(jnp.bfloat16), None),
                         (scale,), dy)
  (y, (dscale,)), (y_want, (dscale_want,)) = got, want
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y_want, np.float32))
  assert dscale.dtype == jnp.float32
  np.testing.assert_array_equal(
      np.asarray(dscale.astype(jnp.bfloat16), np.float32),
      np.asarray(dscale_want.astype(jnp.bfloat16), np.float32))
