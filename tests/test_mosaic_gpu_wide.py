"""The wide-row Mosaic GPU backward and forward (kernels/mosaic_gpu_wide.py).

* Any host: the launch plan (shared memory, grid, limits), argument errors,
  and ``jax.export`` for the ``cuda`` platform, which builds the Mosaic GPU
  module and checks its shared memory against the 227 KB a Hopper block may
  use, without a GPU. jax 0.10.2's lowering does not run jax 0.11's layout
  inference (docs/mosaic_gpu.md); the Hopper tests catch what that rejects.
* Hopper (compute capability 9.x; skipped elsewhere with the reason): dx and
  dscale against the float64 NumPy reference on fresh random inputs with a
  nonzero mean, on ragged row counts (a last CTA with fewer rows, fewer rows
  than SMs, more CTAs than SMs). Tolerances (numerics_util.TOLERANCE): dx is
  one rounding to its dtype away from the float32 result; dscale stays
  float32 (a float32 sum of products of the same rounded inputs), and
  rstd is the reference's rounded to float32, so both are held to float32's
  2e-5. The forward's y is one rounding of a float32 product (held to
  ``tol(dtype)`` in norm and to one unit of the dtype's epsilon element by
  element), rstd to float32's 2e-5, and the fused forward's h is XLA's
  ``x + residual`` in the residual's dtype bit for bit (one rounding of an
  exact sum).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import dispatch
from rmsnorm_jax import reference
from rmsnorm_jax.kernels import mosaic_gpu as mg
from rmsnorm_jax.kernels import mosaic_gpu_wide as mw
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu

from gpu_test_util import hopper, needs_triton_target
from numerics_util import assert_close, dx_magnitude, random, rng_for, tol

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _name(dt):
  return np.dtype(dt).name


# ------------------------------------------------------------- any host --

@pytest.mark.parametrize("hidden,dtype,fused,split,stages", [
    (16384, BF16, True, 1, 2), (16384, F16, True, 1, 2),
    # The plain backward of 16384 16-bit columns: 2 CTAs a row
    # (BWD_SPLIT2_COLS), each with half the row, so four stages fit.
    (16384, BF16, False, 2, 4), (16384, F16, False, 2, 4),
    (8192, F32, False, 1, 2), (8192, BF16, False, 1, 4),
    (12288, BF16, False, 1, 2), (4096, F32, False, 1, 4)])
def test_plan_fits_shared_memory(hidden, dtype, fused, split, stages):
  p = mw.plan(4096, hidden, x_dtype=dtype, sms=132, fused=fused)
  size = np.dtype(dtype).itemsize

  def used(st):
    return mw.smem_bytes(hidden, st, mw.rstd_rows(p.cta_rows), x_size=size,
                         dy_size=size, scale_size=size, split=split)

  assert (p.split, p.stages) == (split, stages)
  assert used(p.stages) <= mw.SMEM_LIMIT
  # One more stage would not fit (or the plan is at MAX_STAGES already).
  assert p.stages == mw.MAX_STAGES or used(p.stages + 1) > mw.SMEM_LIMIT
  assert (p.block_rows, p.group_rows, p.kind) == (1, 1, "wide")
  assert (hidden // split) % p.chunk == 0
  assert p.chunk // 128 <= mw.CHUNK_VALUES


@pytest.mark.parametrize("rows", [1, 5, 37, 1000, 4096, 4099, 16764, 33793,
                                  100000])
def test_plan_covers_every_row_once(rows):
  p = mw.plan(rows, 16384, x_dtype=BF16, sms=132)
  # CTAs cover the rows exactly; none is empty.
  assert p.grid * p.steps >= rows > (p.grid - 1) * p.steps
  assert p.steps <= mw.MAX_CTA_ROWS
  assert p.grid <= 132 or p.steps == mw.MAX_CTA_ROWS
  # As even as the clusters allow: one row fewer a cluster would need more
  # clusters than fit.
  clusters = 132 // p.split
  assert p.steps == mw.MAX_CTA_ROWS or -(-rows // (p.steps - 1 or 1)) > (
      clusters) or p.steps == 1
  # The rstd copy, from the 16-byte boundary at or before a CTA's first row,
  # holds all its rows, in one piece of at most MAX_CTA_ROWS (16764 rows:
  # 254 a cluster and 3 ahead would not fit; 256 do).
  assert (p.steps + mw.rstd_lead(p.steps) <= mw.rstd_rows(p.steps)
          <= mw.MAX_CTA_ROWS)
  assert mw.rstd_lead(p.steps) == (3 if p.steps % 4 else 0)


@pytest.mark.parametrize("hidden,kw,match", [
    (17408, dict(x_dtype=BF16), "float32 dscale registers"),
    (16384, dict(x_dtype=F32, split=1), "shared memory"),
    (16384, dict(x_dtype=BF16, scale_dtype=F32, split=1), "shared memory"),
    (16384, dict(x_dtype=BF16, dy_dtype=F32, split=1), "shared memory"),
    (20480, dict(x_dtype=BF16, has_scale=False, split=1), "shared memory"),
    (16384 + 512, dict(x_dtype=BF16), "multiple of 1024"),
    (8192, dict(x_dtype=BF16, stages=5), "stages=5"),
    (8192, dict(x_dtype=BF16, chunk=1536), "chunk=1536"),
    (131072, dict(x_dtype=BF16), "split=4: rows of hidden=131072 need 256"),
    (16384, dict(x_dtype=BF16, split=3), "split must be one of"),
    (16384, dict(x_dtype=BF16, ctas_per_sm=3), "ctas_per_sm must be 1 or 2"),
    (16384, dict(x_dtype=BF16, split=1, ctas_per_sm=2), "a CTA has 115712"),
])
def test_plan_names_what_does_not_fit(hidden, kw, match):
  with pytest.raises(ValueError, match=match):
    mw.plan(64, hidden, sms=132, **kw)


def test_shape_reason_names_the_limit():
  assert "dscale registers" in mw.shape_reason(64, 17408, BF16)
  assert "dscale registers" in mw.shape_reason(64, 131072, BF16)
  assert "shared memory" in mw.shape_reason(64, 65536, F32)
  assert "float64" in mw.shape_reason(8, 16384, np.float64)


def test_shape_reason_serves_the_wide_rows():
  assert mw.shape_reason(4096, 16384, BF16) is None
  assert mw.shape_reason(2048, 16384, F16, has_scale=False) is None
  assert mw.shape_reason(2048, 8192, F32) is None
  # Split over a cluster: 2 CTAs a row at 32768 16-bit columns (or with a
  # float32 scale at 16384), 4 at 65536.
  assert mw.shape_reason(2048, 32768, BF16) is None
  assert mw.shape_reason(1024, 65536, F16) is None
  assert mw.shape_reason(64, 16384, BF16, F32) is None


@pytest.mark.parametrize("rows,hidden,dtype,kw,split", [
    (4096, 16384, BF16, dict(fused=True), 1), (2048, 32768, BF16, {}, 2),
    (1024, 65536, BF16, {}, 4), (1024, 16384, F32, {}, 2),
    (1024, 32768, F32, {}, 4), (4096, 16384, BF16, dict(split=2), 2),
    (4096, 16384, BF16, dict(split=4, ctas_per_sm=2), 4),
    (2048, 32768, F16, dict(has_scale=False), 2),
    # Fewer SMs than a cluster's CTAs: one cluster at a time.
    (100, 65536, BF16, dict(sms=1), 4),
    # Clusters of 4 that fit at once: 26 on 132 SMs.
    (5000, 65536, BF16, {}, 4)])
def test_plan_splits_rows_over_the_fewest_ctas(rows, hidden, dtype, kw,
                                               split):
  kw = dict(kw)
  sms = kw.pop("sms", 132)
  p = mw.plan(rows, hidden, x_dtype=dtype, sms=sms, **kw)
  cps = kw.get("ctas_per_sm", 1)
  size = np.dtype(dtype).itemsize
  scale_size = size if kw.get("has_scale", True) else None
  assert p.split == split
  cols = hidden // split
  assert cols % p.chunk == 0 and cols // 128 <= mw.MAX_CARRY_VALUES
  used = mw.smem_bytes(hidden, p.stages, mw.rstd_rows(p.cta_rows),
                       x_size=size, dy_size=size, scale_size=scale_size,
                       split=split)
  assert used <= mw.smem_budget(cps)
  # Clusters cover the rows exactly, and fill the SMs at most once over.
  assert p.grid * p.steps >= rows > (p.grid - 1) * p.steps
  assert p.grid * split <= max(sms * cps, split)
  if split == 4 and cps == 1:
    assert p.grid <= max(1, mw.CLUSTERS4_PER_132_SMS * sms // 132)
  if "split" not in kw and split > 1:
    with pytest.raises(ValueError):  # the fewest CTAs that fit
      mw.plan(rows, hidden, x_dtype=dtype, sms=sms, split=split // 2,
              **{k: v for k, v in kw.items() if k != "split"})


def test_plan_splits_the_plain_backward_of_16384_16bit_columns_in_two():
  # Measured faster than one CTA a row though one holds it (BWD_SPLIT2_COLS);
  # the fused backward and other widths keep the fewest CTAs.
  for dtype in (BF16, F16):
    assert mw.plan(4096, 16384, x_dtype=dtype, sms=132).split == 2
    assert mw.plan(4096, 16384, x_dtype=dtype, sms=132, fused=True).split == 1
  assert mw.plan(4096, 12288, x_dtype=BF16, sms=132).split == 1
  assert mw.plan(4096, 8192, x_dtype=F32, sms=132).split == 1
  # Overrides that 2 CTAs a row serve keep it; others fall back.
  assert mw.plan(64, 16384, x_dtype=BF16, sms=132, chunk=4096).split == 2
  p = mw.plan(64, 16384, x_dtype=BF16, sms=132, ctas_per_sm=2)
  assert p.split == 4  # two CTAs a SM fit only from 4 CTAs a row


def test_backward_names_bad_arguments():
  x = jnp.ones((4, 1024), BF16)
  r = jnp.ones((4,), F32)
  with pytest.raises(ValueError, match="x must be 2-D"):
    mw.backward(x[0], None, r, x[0])
  with pytest.raises(ValueError, match="dy must have x's shape"):
    mw.backward(x, None, r, x[:2])
  with pytest.raises(ValueError, match="rstd must be float32 of shape"):
    mw.backward(x, None, r.astype(BF16), x)
  with pytest.raises(ValueError, match="scale must have shape"):
    mw.backward(x, jnp.ones((512,), BF16), r, x)
  with pytest.raises(ValueError, match="fence must be None"):
    mw.backward(x, None, r, x, fence="full")
  with pytest.raises(TypeError, match="dy must be float32, bfloat16"):
    mw.backward(x, None, r, x.astype(jnp.int8))
  with pytest.raises(ValueError, match="dh must have x's shape"):
    mw.backward(x, None, r, x, x[:2])
  with pytest.raises(TypeError, match="dh must have x's dtype"):
    mw.backward(x, None, r, x, x.astype(F16))


def _export(rows, hidden, dtype, scale_dtype, **kw):
  # kw["fused"]: the fused backward (a dh argument).
  kw = dict(kw)
  fused = kw.pop("fused", False)
  s = jax.ShapeDtypeStruct
  x = s((rows, hidden), dtype)
  w = None if scale_dtype is None else s((hidden,), scale_dtype)

  def f(x, w, r, dy, dh):
    return mw.backward(x, w, r, dy, dh if fused else None, scale_offset=1.0,
                       num_sms=132, **kw)

  return jax.export.export(jax.jit(f), platforms=["cuda"])(
      x, w, s((rows,), F32), x, x)


@pytest.mark.parametrize("rows,hidden,dtype,scale_dtype,kw", [
    (4096, 16384, BF16, BF16, {}),
    (8192, 16384, BF16, BF16, dict(overlap_scale=False)),
    (2048, 16384, F16, F16, dict(chunk=4096)),
    (37, 16384, F16, None, {}),
    (40000, 16384, BF16, BF16, {}),
    (300, 8192, F32, F32, {}),
    (129, 8192, F32, BF16, {}),
    (33, 13312, BF16, BF16, {}),
    (1000, 4096, BF16, BF16, {}),
    (4096, 16384, BF16, BF16, dict(fence=None, pass1_loop=False)),
    (4096, 16384, BF16, BF16, dict(fence="sync", pass1_loop=False)),
    (37, 16384, F16, None, dict(fence="sync")),
    (4096, 16384, BF16, BF16, dict(fused=True)),
    (37, 16384, F16, None, dict(fused=True)),
    (300, 8192, F32, F32, dict(fused=True)),
    # Rows split over a cluster of CTAs.
    (2048, 32768, BF16, BF16, {}),
    (1024, 65536, BF16, BF16, dict(fused=True)),
    (37, 32768, F32, F32, {}),
    (300, 16384, F16, None, dict(split=2, ctas_per_sm=2)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_lowers_for_cuda(rows, hidden, dtype, scale_dtype, kw):
  exp = _export(rows, hidden, dtype, scale_dtype, **kw)
  text = exp.mlir_module()
  assert "mosaic_gpu" in text
  # dx keeps x's dtype and shape; dscale is float32 (hidden,).
  avals = [(a.shape, np.dtype(a.dtype)) for a in exp.out_avals]
  want = [((rows, hidden), np.dtype(dtype))]
  if scale_dtype is not None:
    want.append(((hidden,), np.dtype(F32)))
  assert avals == want


# --------------------------------------------------------------- Hopper --

def _case(rows, hidden, dtype, scale_dtype, seed_tag):
  rng = rng_for("wide", rows, hidden, _name(dtype), seed_tag)
  x = random(rng, (rows, hidden), dtype, mean=0.3)
  scale = (None if scale_dtype is None else
           random(rng, (hidden,), scale_dtype, mean=0.0, scale=0.5))
  dy = random(rng, (rows, hidden), dtype)
  return x, scale, dy


@hopper
@pytest.mark.parametrize("rows,hidden,dtype,scale_dtype,kw", [
    (4099, 16384, BF16, BF16, {}),
    (4099, 16384, BF16, BF16, dict(overlap_scale=False)),
    (1000, 16384, F16, F16, {}),
    (37, 16384, F16, F16, dict(chunk=4096)),
    (5, 16384, BF16, None, {}),
    (300, 8192, F32, F32, {}),
    (129, 8192, F32, BF16, {}),
    (33, 13312, BF16, BF16, {}),
    (1100, 1024, BF16, BF16, dict(num_sms=4)),  # more CTAs than SMs
    (257, 4096, F16, F16, {}),
    (4099, 16384, BF16, BF16, dict(pass1_loop=False)),
    (1000, 16384, F16, F16, dict(fence="sync")),
    (129, 16384, BF16, BF16, dict(fence=None, pass1_loop=False)),
    (33, 13312, BF16, BF16, dict(fence="sync", pass1_loop=False)),
    (5, 16384, F16, None, dict(fence=None)),
    (4099, 16384, BF16, BF16, dict(fused=True)),
    (1000, 16384, F16, F16, dict(fused=True, pass1_loop=False)),
    (5, 12288, BF16, None, dict(fused=True)),
    (300, 8192, F32, F32, dict(fused=True)),
    (1100, 1024, F16, F16, dict(fused=True, num_sms=4)),
    # Rows split over a cluster: 2 CTAs a row at 32768 16-bit columns, 4 at
    # 65536, forced on narrower rows, more clusters than SMs.
    (1000, 32768, BF16, BF16, {}),
    (5, 32768, BF16, None, dict(fused=True)),
    (37, 65536, F16, F16, dict(fused=True)),
    (130, 65536, BF16, BF16, {}),
    (129, 16384, BF16, BF16, dict(split=4)),
    (300, 16384, F32, F32, {}),
    # A float32 scale (flax's float32 parameters) on split 16-bit rows.
    (1000, 32768, BF16, F32, {}),
    (129, 32768, F16, F32, dict(fused=True)),
    (1100, 16384, F16, F16, dict(split=2, num_sms=4)),
    (257, 8192, BF16, BF16, dict(split=2, ctas_per_sm=2, fused=True)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_matches_float64(rows, hidden, dtype, scale_dtype, kw):
  # kw["fused"]: the fused backward, dx = the norm's gradient + dh.
  kw = dict(kw)
  fused = kw.pop("fused", False)
  eps, offset = 1e-5, 1.0
  x, scale, dy = _case(rows, hidden, dtype, scale_dtype, repr(kw) + repr(fused))
  dh = (random(rng_for("wide dh", rows, hidden, _name(dtype)), (rows, hidden),
               dtype) if fused else None)
  _, rstd = reference.rms_norm(x, eps=eps)
  rstd = jnp.asarray(rstd.astype(np.float32))
  fn = jax.jit(lambda x, w, r, dy, dh: mw.backward(
      x, w, r, dy, dh, scale_offset=offset, **kw))
  dx, dscale = fn(x, scale, rstd, dy, dh)
  assert dx.dtype == x.dtype and dx.shape == x.shape
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy, eps=eps,
                                           scale_offset=offset)
  magnitude = dx_magnitude(x, scale, dy, eps=eps, scale_offset=offset)
  if fused:
    # dh enters the float32 sum before dx's one rounding.
    dx_ref = dx_ref + np.asarray(dh, np.float64)
    magnitude = max(magnitude, float(np.linalg.norm(np.asarray(dh,
                                                               np.float64))))
  assert_close(dx, dx_ref, tol(dtype), "dx", magnitude)
  # Every row was written: a skipped row would leave zeros or garbage that
  # the norm above could hide under a loose tolerance on a large array.
  row_err = np.linalg.norm(np.asarray(dx, np.float64) - dx_ref, axis=1)
  row_ref = np.linalg.norm(dx_ref, axis=1)
  assert np.all(row_err <= 4 * tol(dtype) * row_ref), (
      np.argmax(row_err / row_ref))
  if scale is None:
    assert dscale is None
  else:
    assert dscale.dtype == jnp.float32 and dscale.shape == (hidden,)
    assert_close(dscale, ds_ref, tol(F32), "dscale")


@hopper
@pytest.mark.parametrize("hidden,split", [(16384, 1), (32768, 2),
                                          (16384, 4)])
def test_dscale_is_deterministic(hidden, split):
  x, scale, dy = _case(4099, hidden, BF16, BF16, "det")
  _, rstd = reference.rms_norm(x, eps=1e-6)
  rstd = jnp.asarray(rstd.astype(np.float32))
  fn = jax.jit(lambda x, w, r, dy: mw.backward(x, w, r, dy, split=split))
  a = fn(x, scale, rstd, dy)
  b = fn(x, scale, rstd, dy)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


# ------------------------------------------------ through MosaicGpu / auto --

def _call(op, hidden, dtype=BF16, *, scale_dtype=None, **kw):
  dt = np.dtype(dtype)
  return base.Call(op=op, rows=4096, hidden=hidden, dtype=dt,
                   scale_shape=(hidden,), norm=base.Norm(eps=1e-6,
                                                         out_dtype=dt),
                   scale_dtype=np.dtype(scale_dtype or dtype), **kw)


def test_auto_takes_the_wide_backward_with_a_float32_scale():
  # Split rows (32768 16-bit columns) for the backward, from 16384 for the
  # fused backward; dy (the output dtype) in x's dtype only.
  impl = MosaicGpu()
  wide = lambda op, hidden, dtype=BF16: impl.auto_declines(
      _call(op, hidden, dtype, scale_dtype=F32))
  for dtype in (BF16, F16):
    assert wide("backward", 32768, dtype) is None
    assert wide("residual_backward", 16384, dtype) is None
    assert wide("residual_backward", 32768, dtype) is None
  assert wide("backward", 16384) is not None
  assert wide("residual_backward", 8192) is not None
  f32_dy = dataclasses.replace(_call("backward", 32768, scale_dtype=F32),
                               norm=base.Norm(eps=1e-6, out_dtype=F32))
  assert impl.auto_declines(f32_dy) is not None


def test_mosaic_gpu_serves_the_plain_backward_of_wide_rows():
  impl = MosaicGpu()
  for hidden, dtype in ((12288, BF16), (16384, BF16), (16384, F16),
                        (8192, F32)):
    assert impl.cannot_serve(_call("backward", hidden, dtype)) is None
    assert mg.wide_backward_reason(4096, hidden, dtype,
                                   scale_dtype=dtype) is None
  # Module plans keep what they serve below the wide kernel's widths.
  assert "plan" in mg.wide_backward_reason(4096, 4096, BF16)
  # What the wide kernel does not compute stays declined at 16384, with
  # both reasons.
  reason = impl.cannot_serve(_call("backward", 16384, has_bias=True))
  assert "shared memory" in reason and "bias" in reason
  # A float32 scale beside 16-bit rows of 16384 columns: split over 2 CTAs;
  # not timed against Triton, so "auto" keeps Triton.
  call = _call("backward", 16384, scale_dtype=F32)
  assert impl.cannot_serve(call) is None
  assert "not timed" in impl.auto_declines(call)


def test_mosaic_gpu_serves_the_fused_backward_of_wide_rows():
  # dx over dh's row: the fused backward fits wherever the plain one does.
  impl = MosaicGpu()
  for hidden, dtype in ((12288, BF16), (16384, BF16), (16384, F16),
                        (8192, F32)):
    call = _call("residual_backward", hidden, dtype)
    assert impl.cannot_serve(call) is None
    assert mg.wide_backward_reason(4096, hidden, dtype, scale_dtype=dtype,
                                   has_dh=True) is None
  # The module's fused plan holds float32 rows up to 5120 columns and 16-bit
  # rows up to 9216, where it measured ahead of the wide kernel.
  assert "plan" in mg.wide_backward_reason(4096, 4096, F32, has_dh=True)
  assert "plan" in mg.wide_backward_reason(4096, 8192, BF16, has_dh=True)
  assert mg.wide_backward_reason(4096, 8192, BF16) is None
  reason = impl.cannot_serve(_call("residual_backward", 16384,
                                   has_bias=True))
  assert "shared memory" in reason and "bias" in reason
  # Split over a cluster of 2 CTAs at 32768 columns, of 4 at 65536; not
  # beyond.
  assert impl.cannot_serve(_call("residual_backward", 32768)) is None
  assert impl.cannot_serve(_call("residual_backward", 65536)) is None
  assert "dscale registers" in impl.cannot_serve(
      _call("residual_backward", 131072))


def test_auto_takes_the_wide_backward_where_it_measured_faster():
  impl = MosaicGpu()
  for hidden, dtype in ((12288, BF16), (16384, BF16), (16384, F16),
                        (32768, BF16), (32768, F16), (16384, F32),
                        (65536, BF16)):
    assert impl.auto_declines(_call("backward", hidden, dtype)) is None
  assert mw.plan(4096, 65536, x_dtype=BF16).split == 4
  # A tie with the Triton kernel at 8192 16-bit columns and in float32.
  assert "8192 columns" in impl.auto_declines(_call("backward", 8192))
  assert "8192 columns" in impl.auto_declines(_call("backward", 8192, F32))


def test_auto_takes_the_wide_fused_backward_where_it_measured_faster():
  impl = MosaicGpu()
  for hidden, dtype in ((12288, BF16), (16384, BF16), (16384, F16),
                        (8192, F32), (32768, BF16), (16384, F32),
                        (65536, F16)):
    assert impl.auto_declines(_call("residual_backward", hidden, dtype)) is None
  # At 8192 16-bit columns the module's plan measured ahead of both the
  # wide kernel and Triton (the model-width rule of mosaic_gpu._auto_mid);
  # float32 rows of 6144 were not timed; a float32 scale beside bfloat16
  # rows was not timed either.
  assert mg.wide_backward_reason(4096, 8192, BF16, has_dh=True) is not None
  assert impl.auto_declines(_call("residual_backward", 8192)) is None
  for call in (_call("residual_backward", 6144, F32),
               _call("residual_backward", 12288, scale_dtype=F32)):
    assert "Triton" in impl.auto_declines(call)


@pytest.mark.parametrize("op,has_bias", [
    ("forward", False), ("backward", False), ("residual_backward", False),
    ("residual_backward", True)])
def test_auto_declines_symbolic_rows_with_a_reason(op, has_bias):
  # int() of a symbolic dimension raises InconclusiveDimensionOperation,
  # not TypeError: the wide rules must say "not static", not raise.
  rows, = jax.export.symbolic_shape("b")
  dt = np.dtype(BF16)
  call = base.Call(op=op, rows=rows, hidden=32768, dtype=dt,
                   scale_shape=(32768,), norm=base.Norm(eps=1e-6,
                                                        out_dtype=dt),
                   scale_dtype=dt, has_bias=has_bias)
  reason = MosaicGpu().auto_declines(call)
  if has_bias:
    assert "not static" in reason
  else:
    assert "not static" in mg._wide_call_reason(call)
    assert reason is not None


def test_auto_backward_of_wide_rows_lowers_for_cuda():
  # "auto" runs the forward of 16384 columns on the Triton kernel and the
  # backward on Mosaic GPU; the module's own plans stop at 12288 16-bit
  # columns, so the Mosaic GPU kernel in the export is the wide one.
  s = jax.ShapeDtypeStruct
  loss = lambda x, w: jnp.sum(rj.rms_norm(x, w).astype(jnp.float32))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
      s((4096, 16384), BF16), s((16384,), BF16)).lower(
          lowering_platforms=("cuda",))
  assert "custom_call @mosaic_gpu" in lowered.as_text()
  assert dispatch.explain("auto", platform="cuda", shape=(4096, 16384),
                          dtype=BF16, op="backward") == "mosaic_gpu"


def test_auto_fused_backward_of_wide_rows_lowers_for_cuda():
  # The fused forward of 16384 columns is the wide forward (one row a
  # CTA), its backward the wide backward (dx over dh): two Mosaic GPU
  # calls, no Triton kernel.
  s = jax.ShapeDtypeStruct

  def loss(x, r, w):
    y, h = rj.rms_norm_residual(x, r, w)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      s((4096, 16384), BF16), s((4096, 16384), BF16),
      s((16384,), BF16)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("custom_call @mosaic_gpu") == 2
  assert "triton" not in text.lower()
  for op in ("residual_forward", "residual_backward"):
    assert dispatch.explain("auto", platform="cuda", shape=(4096, 16384),
                            dtype=BF16, op=op) == "mosaic_gpu"


@hopper
@pytest.mark.parametrize("rows,hidden,dtype,backends", [
    (300, 16384, BF16, ("auto",)),
    (77, 12288, F16, ("mosaic_gpu", "auto")),
    (300, 32768, BF16, ("mosaic_gpu", "auto")),
    (64, 65536, BF16, ("mosaic_gpu", "auto"))])
def test_public_api_backward_matches_float64(rows, hidden, dtype, backends):
  # Through rms_norm's vjp: "auto", which takes the wide kernel for the
  # backward at these widths, and backend="mosaic_gpu" where its forward
  # serves the width too (up to 12288 16-bit columns).
  x, scale, dy = _case(rows, hidden, dtype, dtype, "public")
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy)
  for backend in backends:
    _, vjp = jax.vjp(jax.jit(lambda x, w: rj.rms_norm(x, w,
                                                      backend=backend)),
                     x, scale)
    dx, dscale = vjp(dy)
    assert_close(dx, dx_ref, tol(dtype), f"dx {backend}",
                 dx_magnitude(x, scale, dy))
    assert_close(dscale, ds_ref, tol(dtype), f"dscale {backend}")


# ---------------------------------------------------------------- forward --

@pytest.mark.parametrize("hidden,dtype,residual,stages", [
    (32768, BF16, False, 2), (32768, F16, False, 2), (16384, BF16, False, 4),
    (16384, BF16, True, 2), (16384, F32, False, 2), (12288, F16, True, 4)])
def test_forward_plan_fits_shared_memory(hidden, dtype, residual, stages):
  # The persistent grid: as many stages as fit.
  p = mw.forward_plan(2048, hidden, x_dtype=dtype, has_residual=residual,
                      sms=132, per_row=False)
  size = np.dtype(dtype).itemsize

  def used(st):
    return mw.forward_smem_bytes(hidden, st, x_size=size, scale_size=size,
                                 has_residual=residual)

  assert p.stages == stages and used(p.stages) <= mw.SMEM_LIMIT
  assert p.stages == mw.MAX_STAGES or used(p.stages + 1) > mw.SMEM_LIMIT
  assert (p.block_rows, p.kind, p.split) == (1, "wide", 1)
  assert p.grid * p.steps >= 2048 > (p.grid - 1) * p.steps


@pytest.mark.parametrize("rows,hidden,dtype,kw,split,grid", [
    (1024, 65536, BF16, dict(per_row=False), 2, 64),
    (2048, 32768, BF16, dict(has_residual=True, per_row=False), 2, 64),
    (2048, 32768, BF16, dict(split=2, ctas_per_sm=2), 2, 128),
    (4096, 16384, BF16, dict(ctas_per_sm=2), 1, 256),
    (100, 16384, F16, dict(split=4), 4, 25)])
def test_forward_plan_splits_rows_over_a_cluster(rows, hidden, dtype, kw,
                                                 split, grid):
  p = mw.forward_plan(rows, hidden, x_dtype=dtype, sms=132, **kw)
  size = np.dtype(dtype).itemsize
  assert (p.split, p.grid) == (split, grid)
  assert p.grid * p.steps >= rows > (p.grid - 1) * p.steps
  assert mw.forward_smem_bytes(
      hidden, p.stages, x_size=size, scale_size=size,
      has_residual=kw.get("has_residual", False),
      split=split) <= mw.smem_budget(kw.get("ctas_per_sm", 1))
  assert (hidden // split) % p.chunk == 0


@pytest.mark.parametrize("rows,hidden,dtype,kw,split", [
    # The measured defaults: 16-bit fused rows from 12288 columns, the
    # forward at 65536, at most PER_ROW_CTA_COLS columns a CTA.
    (4096, 12288, BF16, dict(has_residual=True), 1),
    (4096, 16384, BF16, dict(has_residual=True), 1),
    (2048, 32768, F16, dict(has_residual=True), 2),
    (1000, 24576, BF16, dict(has_residual=True), 2),
    (1024, 65536, BF16, dict(has_residual=True), 4),
    (1024, 65536, F16, {}, 4),
    (7, 65536, BF16, dict(has_scale=False), 4),
    # The forward of 12288-16384 columns, one row a CTA.
    (4096, 16384, BF16, {}, 1),
    (2048, 12288, F16, {}, 1),
    (384, 13312, BF16, dict(has_scale=False), 1),
    # The forward of 17408-65535 columns on PER_ROW_WIDE_MIN_ROWS rows.
    (2048, 32768, BF16, {}, 2),
    (1024, 32768, BF16, {}, 2),
    (384, 20480, F16, {}, 2),
    # Asked for: a split, two stages.
    (300, 32768, BF16, dict(per_row=True, split=4), 4),
    (300, 16384, F16, dict(per_row=True, stages=2), 1),
])
def test_forward_plan_launches_one_row_a_cluster(rows, hidden, dtype, kw,
                                                 split):
  p = mw.forward_plan(rows, hidden, x_dtype=dtype, sms=132, **kw)
  assert (p.split, p.grid, p.steps) == (split, rows, 1)
  assert p.stages == kw.get("stages", 1)
  size = np.dtype(dtype).itemsize
  assert mw.forward_smem_bytes(
      hidden, p.stages, x_size=size,
      scale_size=size if kw.get("has_scale", True) else None,
      has_residual=kw.get("has_residual", False),
      split=split) <= mw.SMEM_LIMIT
  assert (hidden // split) % p.chunk == 0


@pytest.mark.parametrize("rows,hidden,dtype,kw", [
    (383, 20480, F16, {}),  # on fewer than PER_ROW_WIDE_MIN_ROWS rows
    (4096, 11264, BF16, dict(has_residual=True)),
    # A float32 scale: one row a CTA measured behind the persistent grid.
    (2048, 16384, BF16, dict(scale_dtype=F32)),
    (1024, 16384, F32, dict(has_residual=True)),
    (1024, 16384, BF16, dict(has_residual=True, scale_dtype=F32)),
    # 17408 columns split in two are not whole vectors of the warpgroup.
    (300, 17408, BF16, dict(has_residual=True)),
    (2048, 131072, BF16, {}),  # 32768 columns a CTA: not measured
    # A launch override asks for the persistent grid.
    (2048, 32768, BF16, dict(has_residual=True, split=2)),
    (2048, 32768, BF16, dict(has_residual=True, ctas_per_sm=2)),
])
def test_forward_plan_keeps_the_persistent_grid(rows, hidden, dtype, kw):
  p = mw.forward_plan(rows, hidden, x_dtype=dtype, sms=132, **kw)
  assert p.grid <= 132 * kw.get("ctas_per_sm", 1) and p.stages >= 2
  assert p.grid * p.steps >= rows > (p.grid - 1) * p.steps


def test_forward_plan_per_row_names_what_does_not_apply():
  with pytest.raises(ValueError, match=r"per_row=True .* grid \(7\)"):
    mw.forward_plan(100, 32768, x_dtype=BF16, per_row=True, grid=7)
  with pytest.raises(ValueError, match=r"ctas_per_sm \(2\)"):
    mw.forward_plan(100, 32768, x_dtype=BF16, per_row=True, ctas_per_sm=2)


def test_forward_shape_reason_names_the_limit():
  assert mw.forward_shape_reason(2048, 32768, BF16) is None
  # Split over 2 CTAs: 65536 columns, or a float32 scale at 32768.
  assert mw.forward_shape_reason(2048, 65536, BF16) is None
  assert mw.forward_shape_reason(2048, 32768, BF16, scale_dtype=F32) is None
  assert "split=4: rows of hidden=262144" in mw.forward_shape_reason(
      2048, 262144, BF16)
  assert "232448" in mw.forward_shape_reason(2048, 131072, BF16,
                                             has_residual=True)
  assert "out_dtype float32" in mw.forward_shape_reason(
      8, 32768, BF16, out_dtype=F32)
  assert "residual dtype float32" in mw.forward_shape_reason(
      8, 16384, BF16, has_residual=True, residual_dtype=F32)
  assert "multiple of 1024" in mw.forward_shape_reason(8, 16000, BF16)
  assert "float64" in mw.forward_shape_reason(8, 8192, jnp.float64)


def test_forward_names_bad_arguments():
  x = jnp.ones((4, 16384), BF16)
  with pytest.raises(ValueError, match="2-D"):
    mw.forward(x[0], None)
  with pytest.raises(ValueError, match=r"scale must have shape \(16384,\)"):
    mw.forward(x, jnp.ones((8192,), BF16))
  with pytest.raises(ValueError, match="residual must have x's shape"):
    mw.forward(x, None, jnp.ones((2, 16384), BF16))
  with pytest.raises(TypeError, match="residual must have x's dtype"):
    mw.forward(x, None, jnp.ones((4, 16384), F32))
  with pytest.raises(TypeError, match="x must be float32"):
    mw.forward(x.astype(jnp.int8), None)
  with pytest.raises(ValueError, match="stages=8 does not fit"):
    mw.forward(x, None, stages=8)


@pytest.mark.parametrize("rows,hidden,dtype,scale_dtype,residual", [
    (300, 32768, BF16, BF16, False), (37, 16384, F16, None, True),
    (65, 8192, F32, F32, False), (300, 65536, BF16, BF16, False),
    (37, 32768, BF16, BF16, True)])
def test_forward_lowers_for_cuda(rows, hidden, dtype, scale_dtype, residual):
  s = jax.ShapeDtypeStruct
  fn = lambda x, w, r: mw.forward(x, w, r, num_sms=132)
  exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(
      s((rows, hidden), dtype),
      None if scale_dtype is None else s((hidden,), scale_dtype),
      s((rows, hidden), dtype) if residual else None)
  assert "mosaic_gpu" in exp.mlir_module()
  want = [s((rows, hidden), dtype)] * (1 + residual) + [s((rows,), F32)]
  assert [s(a.shape, a.dtype) for a in exp.out_avals] == want


@needs_triton_target
def test_mosaic_gpu_serves_the_wide_forward_and_auto_takes_it_at_32768():
  impl = MosaicGpu()
  for op, hidden in (("forward", 16384), ("forward", 32768),
                     ("residual_forward", 16384)):
    assert impl.cannot_serve(_call(op, hidden)) is None, (op, hidden)
  assert mg.wide_forward_reason(2048, 32768, BF16) is None
  assert "plan" in mg.wide_forward_reason(2048, 8192, BF16)
  # The forward of rows wider than 16384 columns and the fused forward from
  # 12288 (one row a cluster) measured faster than Triton.
  for hidden in (20480, 24576, 32768):
    assert impl.auto_declines(_call("forward", hidden)) is None, hidden
  assert impl.auto_declines(_call("forward", 32768, F16)) is None
  # From 12288 columns to 16384 the forward runs one row a CTA, which
  # measured faster than Triton with the scale in x's dtype; "auto" keeps
  # the Triton kernel for narrower rows and a float32 scale there.
  assert mg.wide_forward_reason(2048, 12288, BF16) is None
  for hidden in (12288, 13312, 16384):
    assert impl.auto_declines(_call("forward", hidden)) is None, hidden
  assert "Triton" in impl.auto_declines(_call("forward", 8192))
  assert "Triton" in impl.auto_declines(
      _call("forward", 16384, scale_dtype=F32))
  for hidden in (12288, 16384, 20480):
    assert impl.auto_declines(_call("residual_forward", hidden)) is None
  assert "Triton" in impl.auto_declines(_call("residual_forward", 8192))
  # What the wide forward does not compute, or cannot hold, stays declined.
  assert "bias" in impl.cannot_serve(_call("forward", 32768, has_bias=True))
  assert "232448" in impl.cannot_serve(_call("forward", 262144))
  # Rows split over a cluster: the forward of 65536 columns and the fused
  # forward of 32768, both faster than Triton.
  assert impl.cannot_serve(_call("forward", 65536)) is None
  assert impl.auto_declines(_call("forward", 65536)) is None
  assert impl.cannot_serve(_call("residual_forward", 32768)) is None
  assert impl.auto_declines(_call("residual_forward", 32768)) is None
  # The fused forward of 65536 columns (4 CTAs a row), which no Triton
  # tiling holds whole: "auto" takes it for 16-bit rows.
  for dtype in (BF16, F16):
    assert impl.auto_declines(_call("residual_forward", 65536, dtype)) is None
  assert impl.auto_declines(
      _call("residual_forward", 65536, scale_dtype=F32)) is not None
  assert dispatch.explain("auto", platform="cuda", shape=(1024, 65536),
                          dtype=BF16, op="residual_forward") == "mosaic_gpu"
  # A float32 scale with y in x's dtype (flax's float32 parameters with
  # dtype=bfloat16): the forward at 32768 columns too; a float32 y never.
  assert impl.auto_declines(_call("forward", 32768, scale_dtype=F32)) is None
  f32_y = dataclasses.replace(_call("forward", 32768, scale_dtype=F32),
                              norm=base.Norm(eps=1e-6, out_dtype=F32))
  assert impl.auto_declines(f32_y) is not None
  # The same through dispatch.explain: float32 parameters, y in bfloat16 or
  # (flax's defaults) in float32, where XLA runs it.
  explain = functools.partial(dispatch.explain, "auto", platform="cuda",
                              shape=(2048, 32768), dtype=BF16,
                              scale_dtype=F32)
  assert explain() == "mosaic_gpu"
  assert "float32 output" in explain(out_dtype=F32)
  assert explain(op="backward", out_dtype=F32).startswith("xla")
  assert dispatch.explain("auto", platform="cuda", shape=(2048, 32768),
                          dtype=BF16, op="forward") == "mosaic_gpu"
  assert dispatch.explain("auto", platform="cuda", shape=(2048, 16384),
                          dtype=BF16, op="forward") == "mosaic_gpu"
  assert dispatch.explain("auto", platform="cuda", shape=(2048, 8192),
                          dtype=BF16, op="forward").startswith("pallas_gpu")


@pytest.mark.parametrize("op,hidden,least", [
    ("residual_forward", 12288, 256), ("residual_forward", 16384, 256),
    ("residual_forward", 24576, 512), ("forward", 20480, 384),
    ("residual_forward", 32768, 512), ("residual_forward", 65536, 1),
    ("forward", 32768, 384), ("forward", 65536, 1), ("forward", 16384, 384),
    ("forward", 12288, 384)])
@needs_triton_target
def test_auto_leaves_few_rows_of_the_wide_forward_to_triton(op, hidden,
                                                           least):
  impl = MosaicGpu()
  rows = lambda n: dataclasses.replace(_call(op, hidden), rows=n)
  assert impl.auto_declines(rows(least)) is None
  assert impl.auto_declines(rows(4 * least)) is None
  if least > 1:
    reason = impl.auto_declines(rows(least - 1))
    assert f"fewer than {least} rows of {hidden} columns" in reason
    assert dispatch.explain("auto", platform="cuda", shape=(least - 1, hidden),
                            dtype=BF16, op=op).startswith("pallas_gpu")


def _fwd_case(rows, hidden, dtype, scale_dtype, residual, tag):
  rng = rng_for("wide_fwd", rows, hidden, _name(dtype), tag)
  x = random(rng, (rows, hidden), dtype, mean=0.3)
  scale = (None if scale_dtype is None else
           random(rng, (hidden,), scale_dtype, mean=0.0, scale=0.5))
  r = random(rng, (rows, hidden), dtype) if residual else None
  return x, scale, r


@hopper
@pytest.mark.parametrize("rows,hidden,dtype,scale_dtype,residual,kw", [
    (300, 32768, BF16, BF16, False, {}),
    (2051, 32768, F16, F16, False, {}),
    # Rows split over a cluster of CTAs.
    (300, 65536, BF16, BF16, False, {}),
    (300, 65536, BF16, BF16, True, {}),  # "auto"'s fused forward: 4 CTAs
    (300, 32768, BF16, F32, False, {}),  # "auto"'s with float32 params
    (133, 65536, F16, F16, True, {}),
    (2051, 32768, BF16, BF16, True, {}),
    (129, 16384, F16, F16, False, dict(split=4, ctas_per_sm=2)),
    (1000, 32768, F16, None, False, dict(split=2, grid=7)),
    (77, 16384, BF16, F32, True, dict(split=2, store_chunks=True)),
    (37, 16384, BF16, BF16, False, {}),
    (133, 16384, F16, F32, False, {}),
    (65, 8192, F32, F32, False, {}),
    (270, 32768, F16, None, False, {}),
    (101, 16384, BF16, BF16, True, {}),
    (300, 12288, F16, F16, True, {}),  # one row a CTA
    (301, 12288, BF16, BF16, False, {}),  # the forward, one row a CTA
    (1537, 20480, BF16, BF16, False, {}),  # one row a cluster of 2 CTAs
    (129, 13312, F16, F16, False, {}),  # 13 chunks of 1024 columns
    (257, 20480, BF16, BF16, False, {}),  # "auto"'s forward past 16384
    (129, 24576, F16, F32, False, {}),
    (1000, 32768, BF16, BF16, False, dict(grid=7)),  # many rows a CTA
    # The persistent grid where one row a cluster is the default, and one
    # row a cluster asked for with other splits and stages.
    (300, 65536, BF16, BF16, True, dict(per_row=False)),
    (2051, 32768, F16, F16, True, dict(per_row=False)),
    (257, 32768, F16, F16, True, dict(per_row=True, split=4)),
    (129, 16384, BF16, None, False, dict(per_row=True, stages=2)),
    (33, 32768, BF16, F32, True, dict(per_row=True)),
    (257, 16384, BF16, BF16, True, dict(stages=2, chunk=2048)),
    (129, 32768, BF16, BF16, False, dict(store_chunks=True)),
    (5, 16384, BF16, F32, True, dict(store_chunks=True)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_forward_matches_float64(rows, hidden, dtype, scale_dtype, residual,
                                 kw):
  eps, offset = 1e-5, 1.0
  x, scale, r = _fwd_case(rows, hidden, dtype, scale_dtype, residual,
                          repr(kw))
  fn = jax.jit(lambda x, w, r: mw.forward(x, w, r, eps=eps,
                                          scale_offset=offset, **kw))
  outs = fn(x, scale, r)
  y, rstd = outs[0], outs[-1]
  h = x if r is None else x + r
  if r is not None:
    np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(h))
  y_ref, rstd_ref = reference.rms_norm(h, scale, eps=eps, scale_offset=offset)
  assert y.dtype == x.dtype and rstd.dtype == jnp.float32
  assert_close(y, y_ref, tol(dtype), "y")
  assert_close(rstd, rstd_ref, tol(F32), "rstd")
  # Element by element, every row written: at most one unit of the dtype's
  # epsilon relative to |y| (one rounding, plus float32's rstd), or one
  # step of the dtype's subnormals near zero (float16's start at 6e-5).
  fi = jnp.finfo(dtype)
  err = np.abs(np.asarray(y, np.float64) - y_ref)
  bound = (float(fi.eps) * np.abs(y_ref)
           + float(fi.smallest_normal) * float(fi.eps))
  if dtype == F32:
    # rstd's float32 sum over up to 32768 squares, in chunk order.
    bound = 1e-5 * np.abs(y_ref) + 1e-30
  assert np.all(err <= bound), np.unravel_index(np.argmax(err / bound),
                                                err.shape)
  again = fn(x, scale, r)
  for a, b in zip(outs, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@hopper
def test_public_api_forward_of_32768_columns_matches_float64():
  # "auto" runs the forward on the wide kernel here and the backward on
  # the wide backward split over 2 CTAs a row.
  x, scale, _ = _fwd_case(300, 32768, BF16, BF16, False, "public")
  dy = random(rng_for("wide_fwd_dy"), x.shape, BF16)
  y, vjp = jax.vjp(jax.jit(lambda x, w: rj.rms_norm(x, w)), x, scale)
  y_ref, _ = reference.rms_norm(x, scale)
  assert_close(y, y_ref, tol(BF16), "y")
  dx, dscale = vjp(dy)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy)
  assert_close(dx, dx_ref, tol(BF16), "dx", dx_magnitude(x, scale, dy))
  assert_close(dscale, ds_ref, tol(BF16), "dscale")


@hopper
@pytest.mark.parametrize("rows,hidden,dtype,backend", [
    (77, 16384, BF16, "mosaic_gpu"), (300, 16384, BF16, "auto"),
    (129, 12288, F16, "auto"), (129, 32768, BF16, "auto"),
    (77, 32768, BF16, "mosaic_gpu"), (40, 65536, F16, "auto")])
def test_public_api_fused_matches_float64(rows, hidden, dtype, backend):
  # rms_norm_residual's forward and vjp. backend="mosaic_gpu" runs the wide
  # fused forward (h over the residual's row) and the wide fused backward
  # (dx over dh's row) at 16384 columns; "auto" the Triton forward and the
  # wide fused backward.
  x, scale, r = _fwd_case(rows, hidden, dtype, dtype, True, "public")
  rng = rng_for("wide_fused_cotangents", rows, hidden)
  dy, dh = (random(rng, x.shape, dtype) for _ in range(2))
  (y, h), vjp = jax.vjp(jax.jit(lambda x, r, w: rj.rms_norm_residual(
      x, r, w, backend=backend)), x, r, scale)
  h_ref = np.asarray(x + r)  # one rounding of an exact sum, as XLA's add
  np.testing.assert_array_equal(np.asarray(h), h_ref)
  assert_close(y, reference.rms_norm(h_ref, scale)[0], tol(dtype), "y")
  dx, dr, dscale = vjp((dy, dh))
  dx_ref, ds_ref = reference.rms_norm_grad(h_ref, scale, dy)
  dx_ref = dx_ref + np.asarray(dh, np.float64)
  for name, got in (("dx", dx), ("dresidual", dr)):
    assert_close(got, dx_ref, tol(dtype), name,
                 max(dx_magnitude(h_ref, scale, dy),
                     float(np.linalg.norm(np.asarray(dh, np.float64)))))
  assert_close(dscale, ds_ref, tol(dtype), "dscale")
