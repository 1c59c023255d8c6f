"""PallasTpu on CPU: interpret-mode numerics, TPU lowering, TPU compilation.

The verification ladder, all of it runnable without a TPU:

1. **Numerics** in interpret mode, against the float64 NumPy reference and
   against the XLA implementation. Cases where a wrong block or a skipped
   element would show (ragged row blocks, the two-pass wide-row path, the
   fused residual kernels) run under Pallas's TPU interpreter
   (``PallasTpu(interpret=True, tpu_interpreter=True)``): TPU memory
   semantics, and output buffers filled with NaN before the kernel runs
   (``InterpretParams`` default ``uninitialized_memory="nan"``), so an element
   a kernel never writes fails the finiteness checks (float16 outputs travel
   as uint16 bits, which have no NaN; the comparisons cover them). The
   broad shape sweep and the public API use the faster generic interpreter.
2. **Lowering**: ``jax.export(..., platforms=["tpu"])`` runs the Pallas TPU
   lowering (block-shape rules, Mosaic MLIR) of every kernel variant.
3. **Compilation** (marker ``tpu_aot``, needs libtpu): the real TPU compiler
   compiles the kernels for each TPU generation; those tests live in
   tests/test_tpu_aot.py.

Tolerances are relative errors in norm, ``||got - want|| / ||want||``:

Both bounds are ``numerics_util.TOLERANCE``'s.

* against the float64 reference. The kernels compute
  in float32, so a float32 output is off by float32 accumulation only
  (~1e-6; 2e-5 allowed); bfloat16 and float16 outputs are dominated by the
  one rounding of the result (8 and 11 significant bits: ~2e-3 and ~3e-4 in
  norm; 1e-2 and 2e-3 allowed, leaving room for gradients that pass through
  two roundings).
* against XLA, which rounds the same float32 math once. Both are
  float32 computations of the same formula with different summation order,
  so float32 outputs agree to ~1e-6 (1e-5 allowed); half-precision outputs
  differ where the float32 values straddle a rounding boundary, one unit in
  the last place for a few elements (at most one ulp relative in norm).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import kernels
from rmsnorm_jax import reference
from rmsnorm_jax import shapes
from rmsnorm_jax import tpu_aot
from rmsnorm_jax import dispatch
from rmsnorm_jax.kernels import tpu_config as cfg
from rmsnorm_jax.kernels import tpu_kernels as tk
from rmsnorm_jax.kernels.tpu import PallasTpu

from numerics_util import assert_close, dx_magnitude, random, rng_for, tol
from numerics_util import xla_tol

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
EPS = 1e-5
TPU_INTERP = dict(interpret=True, tpu_interpreter=True)
GENERIC = dict(interpret=True)


def _norm(offset=0.0, out_dtype=F32, **kw):
  return base.Norm(eps=EPS, scale_offset=offset,
                   out_dtype=np.dtype(out_dtype), **kw)


def _finite(*arrays):
  for a in arrays:
    if a is not None and np.dtype(a.dtype) != np.dtype(F16):
      assert np.all(np.isfinite(np.asarray(a, np.float32))), (
          "an output element was never written (NaN poison survived)")


def _fwd_bwd(impl, offset, x, scale, dy):
  """Forward, then backward from its rstd."""
  norm = _norm(offset, x.dtype)
  y, rstd = impl.forward(x, scale, None, norm=norm)
  dx, dscale, dbias = impl.backward(x, scale, None, rstd, dy, norm=norm)
  assert dbias is None
  return y, rstd, dx, dscale


@functools.lru_cache(maxsize=None)
def _fwd_bwd_fn(impl, offset):
  """One jitted program: ``_fwd_bwd`` of impl and of XLA side by side."""
  return jax.jit(lambda *a: (_fwd_bwd(impl, offset, *a),
                             _fwd_bwd(base.Xla(), offset, *a)))


def _check_fwd_bwd(impl, x, scale, dy, offset=0.0):
  """Kernel vs float64 reference and vs XLA for forward and backward."""
  dtype = x.dtype
  (y, rstd, dx, dscale), (xy, xr, xdx, xds) = _fwd_bwd_fn(impl, offset)(
      x, scale, dy)
  _finite(y, rstd, dx, dscale)
  assert y.dtype == dtype and dx.dtype == dtype and rstd.dtype == F32
  assert y.shape == x.shape and dx.shape == x.shape
  assert rstd.shape == (x.shape[0],)
  y_ref, rstd_ref = reference.rms_norm(x, scale, eps=EPS, scale_offset=offset)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy, eps=EPS,
                                           scale_offset=offset)
  mag = dx_magnitude(x, scale, dy, eps=EPS, scale_offset=offset)
  assert_close(y, y_ref, tol(dtype), "y")
  assert_close(rstd, rstd_ref, tol(F32), "rstd")
  assert_close(dx, dx_ref, tol(dtype), "dx", mag)
  assert_close(y, xy, xla_tol(dtype), "y vs xla")
  assert_close(rstd, xr, xla_tol(F32), "rstd vs xla")
  assert_close(dx, xdx, xla_tol(dtype), "dx vs xla", mag)
  if scale is None:
    assert dscale is None
  else:
    assert dscale.dtype == F32 and dscale.shape == scale.shape
    # dscale is a float32 sum of float32 products of the (rounded) inputs.
    assert_close(dscale, ds_ref, tol(F32), "dscale")
    assert_close(dscale, xds, xla_tol(F32), "dscale vs xla")


# ---------------------------------------------------------------- numerics --

def _dtype_cycle(cases):
  """Pairs each case with one dtype, cycling float32, bfloat16, float16.

  Interpret-mode compilation dominates this file's run time, so the
  kernel-specific checks here take each shape once; every dtype still meets
  ragged rows, odd hidden sizes and tiny rows. The full product of
  shapes.CORRECTNESS and dtypes runs through the public API against the
  float64 reference in tests/test_numerics.py (``pallas_tpu_interpret``).
  """
  return [pytest.param(c, d, id=f"{'x'.join(map(str, c))}-{np.dtype(d).name}")
          for c, d in zip(cases, shapes.DTYPES * len(cases))]


# shapes.CORRECTNESS: ragged row counts (1, 3, 7, 17, 33, 1000 rows), hidden
# sizes that are not multiples of 128 (100, 129, 2880, 5184), tiny rows (1,
# 8), and leading dims (flattened to rows here; the public API tests below
# keep them).
@pytest.mark.parametrize("shape,dtype", _dtype_cycle(shapes.CORRECTNESS))
def test_forward_backward(shape, dtype):
  rng = rng_for("fb", shape, np.dtype(dtype).name)
  hidden = shape[-1]
  rows = math.prod(shape[:-1])
  x = random(rng, (rows, hidden), dtype, mean=0.3)
  # scale in x's dtype here; float32 scales in test_scale_variants.
  scale = random(rng, (hidden,), dtype, mean=1.0, scale=0.5)
  dy = random(rng, (rows, hidden), dtype)
  _check_fwd_bwd(PallasTpu(**GENERIC), x, scale, dy)


@pytest.mark.parametrize("variant,dtype", [
    pytest.param("f32_scale_offset", F32, id="f32_scale_offset-float32"),
    pytest.param("f32_scale_offset", BF16, id="f32_scale_offset-bfloat16"),
    pytest.param("f32_scale_offset", F16, id="f32_scale_offset-float16"),
    pytest.param("no_scale", F16, id="no_scale-float16"),
])
def test_scale_variants(dtype, variant):
  rng = rng_for("scale", variant, np.dtype(dtype).name)
  x = random(rng, (37, 300), dtype)
  dy = random(rng, (37, 300), dtype)
  if variant == "no_scale":
    scale, offset = None, 0.0
  else:
    scale, offset = random(rng, (300,), F32, scale=0.1), 1.0
  _check_fwd_bwd(PallasTpu(**GENERIC, block_rows=16), x, scale, dy,
                 offset)


# Ragged row blocks (rows not a multiple of the block; an odd number of
# blocks, so the backward's second grid slice has a step past the end), the
# two-pass path with ragged lane chunks, and both at once. float32 scale
# with an offset, so scale_offset reaches every kernel variant. Each dtype
# meets ragged rows and the two-pass path; 16-bit dtypes tile rows by 16
# and float32 by 8, so both alignments see a ragged last block.
def _blocking(shape, config, dtype, name):
  return pytest.param(shape, config, dtype,
                      id=f"{name}-{np.dtype(dtype).name}")


CONFIGS = [
    _blocking((40, 256), dict(block_rows=16), F32, "3_row_blocks"),
    _blocking((40, 256), dict(block_rows=16), F16, "3_row_blocks"),
    _blocking((1000, 128), dict(block_rows=64), BF16, "ragged_16_blocks"),
    _blocking((9, 5184), dict(block_rows=8), F16, "5184_ragged"),
    _blocking((7, 300), dict(hidden_block=128), BF16, "2pass_300"),
    _blocking((33, 129), dict(hidden_block=128, block_rows=16), F32,
              "2pass_129_ragged_rows"),
    _blocking((33, 129), dict(hidden_block=128, block_rows=16), F16,
              "2pass_129_ragged_rows"),
    _blocking((33, 129), dict(hidden_block=128, block_rows=16), BF16,
              "2pass_129_ragged_rows"),
]


@pytest.mark.parametrize("shape,config,dtype", CONFIGS)
def test_blockings(shape, config, dtype):
  rng = rng_for("cfg", shape, repr(config), np.dtype(dtype).name)
  x = random(rng, shape, dtype, mean=-0.2)
  scale = random(rng, (shape[1],), F32, mean=1.0, scale=0.5)
  dy = random(rng, shape, dtype)
  _check_fwd_bwd(PallasTpu(**TPU_INTERP, **config), x, scale, dy, 0.5)


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"),
                                   pytest.param(BF16, id="bfloat16")])
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s)))
                                   for s in shapes.WIDE])
def test_wide_rows(shape, dtype):
  # Blocks chosen for an unknown chip (v4's 16 MiB VMEM): 64K-wide rows take
  # the one-pass forward and the two-pass backward.
  impl = PallasTpu(**TPU_INTERP)
  chip = cfg.detect_chip()
  assert not chip.known
  assert impl.blocking("forward", *shape, [dtype] * 2, chip=chip
                       ).hidden_block is None
  blk = impl.blocking("backward", *shape, [dtype] * 3, chip=chip)
  assert blk.hidden_block is not None and blk.hidden_block < shape[1], blk
  rng = rng_for("wide", shape, np.dtype(dtype).name)
  x = random(rng, shape, dtype)
  scale = random(rng, (shape[1],), dtype, mean=1.0, scale=0.5)
  dy = random(rng, shape, dtype)
  _check_fwd_bwd(impl, x, scale, dy)


def _residual_fwd_bwd(impl, x, res, scale, dy, dh):
  norm = _norm(out_dtype=res.dtype)
  y, h, rstd = impl.residual_forward(x, res, scale, None, norm=norm)
  g, dscale, dbias = impl.residual_backward(h, scale, None, rstd, dy, dh,
                                            norm=norm)
  assert dbias is None
  return y, h, rstd, g, dscale


@functools.lru_cache(maxsize=None)
def _residual_fn(impl):
  """One jitted program: impl's and XLA's fused residual side by side."""
  return jax.jit(lambda *a: (_residual_fwd_bwd(impl, *a),
                             _residual_fwd_bwd(base.Xla(), *a)))


def _residual_case(impl, shape, x_dtype, res_dtype, with_scale=True):
  rng = rng_for("res", shape, np.dtype(x_dtype).name, np.dtype(res_dtype).name,
             repr(impl))
  x = random(rng, shape, x_dtype)
  res = random(rng, shape, res_dtype, mean=0.5)
  scale = (random(rng, (shape[1],), F32, mean=1.0, scale=0.3)
           if with_scale else None)
  dy = random(rng, shape, res_dtype)
  dh = random(rng, shape, res_dtype)
  (y, h, rstd, g, dscale), (xy, xh, xr, xg, xds) = _residual_fn(impl)(
      x, res, scale, dy, dh)
  _finite(y, h, rstd, g, dscale)
  assert y.dtype == res_dtype and h.dtype == res_dtype
  assert g.dtype == res_dtype
  h_ref = np.asarray(x, np.float64) + np.asarray(res, np.float64)
  assert_close(h, h_ref, tol(res_dtype), "h")
  y_ref, _ = reference.rms_norm(h, scale, eps=EPS)
  g_ref, ds_ref = reference.rms_norm_grad(h, scale, dy, eps=EPS)
  g_ref = g_ref + np.asarray(dh, np.float64)
  assert_close(y, y_ref, tol(res_dtype), "y")
  assert_close(g, g_ref, tol(res_dtype), "dh_total")
  # h is one float32 add rounded once on both paths: identical.
  np.testing.assert_array_equal(np.asarray(h, np.float32),
                                np.asarray(xh, np.float32))
  assert_close(rstd, xr, xla_tol(F32), "rstd vs xla")
  assert_close(y, xy, xla_tol(res_dtype), "y vs xla")
  assert_close(g, xg, xla_tol(res_dtype), "dh_total vs xla")
  if with_scale:
    assert_close(dscale, ds_ref, tol(F32), "dscale")
    assert_close(dscale, xds, xla_tol(F32), "dscale vs xla")
  else:
    assert dscale is None


def _res(shape, config, x_dtype, res_dtype, name):
  dt = lambda d: {F32: "f32", BF16: "bf16", F16: "f16"}[d]
  return pytest.param(shape, config, x_dtype, res_dtype,
                      id=f"{name}-{dt(x_dtype)}+{dt(res_dtype)}")


# Every dtype pair of x and residual the API allows, one-pass with ragged
# row blocks and two-pass; a single tiny row.
@pytest.mark.parametrize("shape,config,x_dtype,res_dtype", [
    _res((1, 8), {}, F32, F32, "1x8"),
    _res((37, 129), dict(block_rows=16), BF16, BF16, "37x129_blocks"),
    _res((37, 129), dict(block_rows=16), BF16, F32, "37x129_blocks"),
    _res((37, 129), dict(block_rows=16), F32, F16, "37x129_blocks"),
    _res((20, 384), dict(hidden_block=256, block_rows=8), F16, F16,
         "2pass_20x384"),
    _res((20, 384), dict(hidden_block=256, block_rows=8), BF16, F32,
         "2pass_20x384"),
])
def test_residual(shape, config, x_dtype, res_dtype):
  _residual_case(PallasTpu(**TPU_INTERP, **config), shape, x_dtype,
                 res_dtype)


def test_residual_no_scale():
  _residual_case(PallasTpu(**TPU_INTERP), (6, 200), BF16, BF16,
                 with_scale=False)


def test_residual_wide_two_pass_auto():
  # The fused kernels on 64K-wide float32 rows do not fit v4's VMEM in one
  # pass, forward or backward.
  impl = PallasTpu(**TPU_INTERP)
  chip = cfg.detect_chip()
  for op in ("residual_forward", "residual_backward"):
    assert impl.blocking(op, 3, 65536, [F32] * 4,
                         chip=chip).hidden_block is not None, op
  _residual_case(impl, (3, 65536), F32, F32)


def test_nonfinite_rows_stay_local():
  x = np.array(random(rng_for("nan"), (20, 256), F32))
  x[1] = 0.0
  x[3, 7] = np.nan
  scale = random(rng_for("nan-s"), (256,), F32)
  y, _ = PallasTpu(**TPU_INTERP, block_rows=8).forward(
      jnp.asarray(x), scale, None, norm=_norm())
  y = np.asarray(y)
  np.testing.assert_array_equal(y[1], 0.0)
  assert np.all(np.isnan(y[3]))
  good = np.delete(np.arange(20), 3)
  assert np.all(np.isfinite(y[good]))


# ------------------------------------------------------------- public API --

@pytest.mark.parametrize("shape", [(2, 3, 256), (4, 5, 6, 64), (300,)],
                         ids=["2x3x256", "4x5x6x64", "300"])
def test_public_api_grad(shape):
  rng = rng_for("api", shape)
  hidden = shape[-1]
  x = random(rng, shape, BF16)
  scale = random(rng, (hidden,), F32, mean=1.0, scale=0.2)
  impl = PallasTpu(interpret=True)

  def loss(x, scale, backend):
    y = rj.rms_norm(x, scale, eps=EPS, scale_offset=1.0, backend=backend)
    return jnp.sum(y.astype(F32) * jnp.cos(jnp.arange(hidden, dtype=F32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  gx, gs = grad(x, scale, impl)
  rx, rs = grad(x, scale, "xla")
  assert gx.shape == shape and gx.dtype == BF16 and gs.dtype == F32
  assert_close(gx, rx, xla_tol(BF16), "dx")
  assert_close(gs, rs, xla_tol(F32), "dscale")
  x2 = np.asarray(x, np.float64).reshape(-1, hidden)
  # The cotangent reaching the kernel is y's: cos rounded to bfloat16.
  dy = np.broadcast_to(np.asarray(jnp.cos(jnp.arange(hidden, dtype=F32)
                                          ).astype(BF16), np.float64),
                       x2.shape)
  dx_ref, ds_ref = reference.rms_norm_grad(x2, scale, dy, eps=EPS,
                                           scale_offset=1.0)
  assert_close(np.asarray(gx, np.float64).reshape(x2.shape), dx_ref,
               tol(BF16), "dx vs reference")
  assert_close(gs, ds_ref, tol(F32), "dscale vs reference")


def test_public_api_residual_grad():
  rng = rng_for("api-res")
  x = random(rng, (2, 9, 256), BF16)
  res = random(rng, (2, 9, 256), F32)
  scale = random(rng, (256,), F32, mean=1.0, scale=0.2)

  def loss(x, res, scale, backend):
    y, h = rj.rms_norm_residual(x, res, scale, backend=backend)
    return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  got = grad(x, res, scale, PallasTpu(interpret=True, block_rows=8))
  want = grad(x, res, scale, "xla")
  for g, w, name in zip(got, want, ["dx", "dres", "dscale"]):
    assert g.dtype == w.dtype
    assert_close(g, w, xla_tol(g.dtype), name)


def test_x64_gives_the_same_bits_where_the_kernels_loop_over_row_groups():
  # Under jax_enable_x64 the row-group loop and the block index maps keep
  # int32 indices (tpu_kernels._ZERO): an int64 index beside Mosaic's int32
  # grid indices did not compile (test_tpu_aot compiles these calls).
  # Here, interpreted as the other gradient tests are (under jax.grad the
  # TPU interpreter's ordered callbacks raise a KeyError in jax 0.10.2):
  # the same bits with x64 on as off, at 64 rows, which the kernels walk in
  # row groups.
  impl = PallasTpu(interpret=True)
  rng = rng_for("tpu_x64")
  x, res = (random(rng, (64, 768), BF16) for _ in range(2))
  scale = random(rng, (768,), BF16, mean=1.0, scale=0.3)
  f32 = lambda a: a.astype(F32)

  @jax.jit
  def calls(x, res, scale):
    grad = jax.grad(lambda x, s: f32(rj.rms_norm(x, s, backend=impl)).sum(),
                    argnums=(0, 1))
    fused = jax.grad(lambda x, r, s: sum(
        f32(o).sum() for o in rj.rms_norm_residual(x, r, s, backend=impl)),
                     argnums=(0, 1, 2))
    return (grad(x, scale), fused(x, res, scale),
            rj.rms_norm_quantized(x, scale, residual=res, backend=impl))

  want = calls(x, res, scale)
  with jax.enable_x64(True):
    got = calls(x, res, scale)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(w, np.float32))


def test_float64_is_rejected_and_not_preferred():
  impl = PallasTpu(interpret=True)
  call = base.Call("forward", 4096, 4096, np.dtype(jnp.float64), (4096,))
  assert "not float64" in impl.cannot_serve(call)
  assert impl.cannot_serve(base.Call("forward", 4096, 4096,
                                     np.dtype(BF16), (4096,))) is None
  with jax.enable_x64(True):
    x = jnp.ones((4, 8), jnp.float64) * 0.5
    with pytest.raises(ValueError, match=r"backend='pallas_tpu' cannot serve "
                       r"this call: pallas_tpu supports .*not float64"):
      rj.rms_norm(x, backend=impl)
    with pytest.raises(ValueError, match=r"cannot serve.*float64"):
      rj.rms_norm_residual(x.astype(F32), x, backend=impl)
  # "auto" keeps float64 on XLA even where the TPU kernel is registered.
  route = dispatch.route("auto", call)
  assert isinstance(route.impl("tpu"), base.Xla)
  assert "not float64" in route.describe("tpu")


def test_registry():
  assert kernels.BY_NAME["pallas_tpu"] is PallasTpu
  assert kernels.BY_PLATFORM["tpu"] == (PallasTpu,)
  assert "pallas_tpu" in rj.backend_names()
  assert PallasTpu().lowering_platforms() == ("tpu",)
  assert "cpu" in PallasTpu(**TPU_INTERP).lowering_platforms()


# ---------------------------------------------------------- float16 bits --

def test_float16_bit_conversions_match_numpy():
  bits = np.arange(1 << 16, dtype=np.uint16)
  want = bits.view(np.float16).astype(np.float32)
  got = np.asarray(jax.jit(tk.f16_bits_to_f32)(jnp.asarray(bits)))
  same = (got == want) | (np.isnan(got) & np.isnan(want))
  assert same.all(), bits[~same][:10]

  rng = np.random.default_rng(0)
  # Every float16 value, midpoints between neighbours (ties to even), and
  # random float32 across the whole exponent range incl. overflow.
  f16 = bits.view(np.float16)
  finite = np.sort(f16[np.isfinite(f16)].astype(np.float64))
  mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
  rand = (rng.standard_normal(200_000) * np.exp2(
      rng.uniform(-30, 20, 200_000))).astype(np.float32)
  special = np.array([np.inf, -np.inf, np.nan, 65504, 65519.99, 65520,
                      -65520, 1e-8, 2.0**-25, 2.0**-24 * 1.5, 0.0, -0.0],
                     np.float32)
  vals = np.concatenate([want[np.isfinite(want)], mids, rand, special])
  got = np.asarray(jax.jit(tk.f32_to_f16_bits)(jnp.asarray(vals)))
  with np.errstate(over="ignore"):  # Overflow to inf is what is tested.
    want_bits = vals.astype(np.float16).view(np.uint16)
  nan = np.isnan(vals)
  assert np.array_equal(got[~nan], want_bits[~nan]), (
      vals[~nan][got[~nan] != want_bits[~nan]][:10])
  assert np.all(np.isnan(got[nan].view(np.float16)))


# ------------------------------------------------------------ block choice --

V2 = cfg.Chip("v2", 16 * cfg.MIB, 358e9, True)
V3 = cfg.Chip("v3", 16 * cfg.MIB, 450e9, True)
V4 = cfg.Chip("v4", 16 * cfg.MIB, 600e9, True)
V6E = cfg.Chip("v6e", 128 * cfg.MIB, 1640e9, True)


def test_block_choice_rules():
  b = PallasTpu().blocking("forward", 8192, 4096, [BF16, BF16], chip=V6E)
  assert b.block_rows % 16 == 0 and b.hidden_block is None
  assert b.footprint_bytes <= 0.75 * V6E.vmem_bytes
  assert b.vmem_limit_bytes <= V6E.vmem_bytes
  # At least MIN_PIPELINE_STEPS steps when each still moves MIN_STEP_BYTES.
  assert cfg.num_blocks(8192, b.block_rows) >= cfg.MIN_PIPELINE_STEPS
  # Fewer rows than a block: one block of all rows (legal for any count).
  assert PallasTpu().blocking("forward", 7, 100, [F32, F32],
                              chip=V4).block_rows == 7
  # The unknown chip is treated as the smallest (v4).
  assert cfg.detect_chip().vmem_bytes == cfg.FALLBACK_VMEM_BYTES
  # More VMEM, larger blocks (or equal when the step-size target binds).
  for op, n in (("forward", 2), ("backward", 3), ("residual_forward", 4),
                ("residual_backward", 4)):
    small = PallasTpu().blocking(op, 8192, 16384, [F32] * n, chip=V4)
    large = PallasTpu().blocking(op, 8192, 16384, [F32] * n, chip=V6E)
    assert small.footprint_bytes <= 0.75 * V4.vmem_bytes, (op, small)
    assert small.block_rows <= large.block_rows, op
  # Rows too wide for v4 VMEM in one pass: two passes, lane-aligned chunks.
  wide = PallasTpu().blocking("residual_backward", 64, 65536, [F32] * 4,
                              chip=V4)
  assert wide.hidden_block % 128 == 0 and wide.hidden_block < 65536
  assert wide.footprint_bytes <= 0.75 * V4.vmem_bytes
  assert PallasTpu().blocking("residual_backward", 64, 65536, [F32] * 4,
                              chip=V6E).hidden_block is None


def test_quantized_forward_counts_the_row_group_copies():
  # The quantized forward keeps float32 copies of a whole row group live
  # (tk.QUANTIZED_GROUP_COPIES): 32 rows (int8's tile) x 65536 lanes x 4
  # bytes each, counted in its footprint and so in its VMEM limit; the
  # plain forward's group copies are not.
  streams, align = (4, 1), cfg.row_tile((4, 1), 1)
  base_fp = cfg.footprint(32, 65536, streams, align=align, vectors=1)
  with_copies = cfg.footprint(32, 65536, streams, align=align, vectors=1,
                              group_copies=2)
  assert with_copies - base_fp == 2 * 32 * 65536 * 4
  q = PallasTpu().blocking("quantized_forward", 2048, 65536,
                           [F32, np.dtype(jnp.int8)], chip=V6E)
  plain = PallasTpu().blocking("forward", 2048, 65536, [F32, F32], chip=V6E)
  row_group = 32 * 65536 * 4
  assert q.footprint_bytes >= cfg.footprint(
      q.block_rows, 65536, streams, align=align, vectors=1) + 2 * row_group
  assert q.vmem_limit_bytes >= q.footprint_bytes + cfg.VMEM_HEADROOM_BYTES
  assert plain.footprint_bytes == cfg.footprint(
      plain.block_rows, 65536, (4, 4), align=8, vectors=1)


def test_block_rows_override():
  # Rounded up to the sublane tile: 16 rows for bfloat16, 8 for float32.
  assert PallasTpu(block_rows=20).blocking(
      "backward", 1000, 512, [BF16] * 3, chip=V4).block_rows == 32
  assert PallasTpu(block_rows=20).blocking(
      "backward", 1000, 512, [F32] * 3, chip=V4).block_rows == 24
  # More than the rows: one block of all rows.
  assert PallasTpu(block_rows=4096).blocking(
      "forward", 100, 512, [F32] * 2, chip=V4).block_rows == 100
  # And the kernels use it: 40 rows in blocks of 16 is a grid of 3 steps,
  # split over the backward's two slices as (2, 2).
  impl = PallasTpu(interpret=True, block_rows=16)
  x, s = jnp.ones((40, 256), F32), jnp.ones((256,), F32)

  def f(x, s):
    y, r = impl.forward(x, s, None, norm=_norm())
    return impl.backward(x, s, None, r, y, norm=_norm())

  calls = [e.params["grid_mapping"] for e in jax.make_jaxpr(f)(x, s).eqns
           if e.primitive.name == "pallas_call"]
  assert [tuple(g.grid) for g in calls] == [(3,), (2, 2)]
  x_block = calls[0].block_mappings[0].block_shape
  assert [getattr(d, "block_size", d) for d in x_block] == [16, 256]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(block_rows=0), ValueError,
     r"PallasTpu\(block_rows=\.\.\.\) must be an int >= 1 \(rows per grid "
     r"step\); got 0\."),
    (dict(block_rows=-8), ValueError, r"block_rows.*got -8"),
    (dict(block_rows=16.0), TypeError,
     r"PallasTpu\(block_rows=\.\.\.\) must be an int .*got 16\.0 of type "
     r"float"),
    (dict(block_rows=True), TypeError, r"block_rows.*got True of type bool"),
    (dict(block_rows="16"), TypeError, r"block_rows.*got '16' of type str"),
    (dict(hidden_block=100), ValueError,
     r"hidden_block=\.\.\.\) must be a positive multiple of 128 .*got 100"),
    (dict(vmem_limit_bytes=4096), ValueError, r"vmem_limit_bytes.*got 4096"),
])
def test_bad_config_is_rejected_when_made(kwargs, error, match):
  with pytest.raises(error, match=match):
    PallasTpu(**kwargs)


def test_bad_block_rows_through_public_api():
  x = jnp.ones((4, 128), F32)
  with pytest.raises(ValueError, match=r"block_rows=\.\.\.\) must be an int"):
    rj.rms_norm(x, backend=PallasTpu(interpret=True, block_rows=0))
  # The config that tpu_config.choose takes checks too, when made.
  with pytest.raises(ValueError, match=r"Config\(block_rows=\.\.\.\) must be "
                     r"an int >= 1 \(rows per grid step\); got 0"):
    cfg.Config(block_rows=0)
  with pytest.raises(ValueError, match=r"Config\(hidden_block=\.\.\.\) must be "
                     "a positive multiple of 128 .*got 100"):
    cfg.Config(hidden_block=100)
  # A block that cannot fit the target chip's VMEM names the argument.
  with pytest.raises(ValueError, match=r"block_rows=4096 needs \d+\.\d MiB of "
                     r"VMEM per grid step \(4096 x 4096 blocks of 3 operands"
                     r".*more than v4's 16 MiB"):
    PallasTpu(block_rows=4096).blocking("backward", 8192, 4096, [F32] * 3,
                                        chip=V4)
  # Blocks that fit but leave less than the headroom for the kernel's
  # temporaries: the TPU compiler ran out of v3's and v2's 16 MiB of VMEM
  # (17.6 and 17.4 MiB used) for these, found by compiling random
  # programs; they now fail here, naming the argument.
  for chip, op, rows, hidden, br, bias in ((V3, "backward", 32768, 32768, 16,
                                            True),
                                           (V2, "backward", 100, 20000, 32,
                                            False)):
    with pytest.raises(ValueError, match=rf"block_rows={br} needs 1\d\.\d "
                       r"MiB .* and 4 MiB for the kernel's temporaries, more "
                       rf"than {chip.name}'s 16 MiB"):
      PallasTpu(block_rows=br).blocking(op, rows, hidden, [F32] * 3,
                                        chip=chip, has_bias=bias)
    # One tile of rows fewer fits.
    PallasTpu(block_rows=br // 2).blocking(op, rows, hidden, [F32] * 3,
                                           chip=chip, has_bias=bias)


# ----------------------------------------------------------- TPU lowering --

def _export_tpu(fn, *args):
  exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  text = exp.mlir_module()
  assert "tpu_custom_call" in text, "the Pallas kernel was not lowered"
  return text


# Each kernel variant: one-pass and two-pass, ragged rows, odd and tiny
# hidden, with and without scale, residual and x of different dtypes.
def _lower(config, shape, dtype, name):
  return pytest.param(config, shape, dtype,
                      id=f"{name}-{np.dtype(dtype).name}")


LOWER_CASES = [
    _lower(dict(), (1024, 4096), F32, "one_pass"),
    _lower(dict(), (1024, 4096), BF16, "one_pass"),
    _lower(dict(), (1024, 4096), F16, "one_pass"),
    _lower(dict(), (33, 129), F16, "ragged_odd_hidden"),
    _lower(dict(), (3, 8), F32, "tiny_hidden"),
    _lower(dict(), (16, 65536), F32, "wide_auto_two_pass_bwd"),
    _lower(dict(), (16, 65536), BF16, "wide_auto_two_pass_bwd"),
    _lower(dict(hidden_block=512, block_rows=16), (40, 1000), F16,
           "two_pass_forced"),
]


@pytest.mark.parametrize("config,shape,dtype", LOWER_CASES)
def test_lowering_for_tpu(config, shape, dtype):
  impl = PallasTpu(**config)
  rows, hidden = shape
  a = jax.ShapeDtypeStruct(shape, dtype)
  a32 = jax.ShapeDtypeStruct(shape, F32)
  s = jax.ShapeDtypeStruct((hidden,), dtype)
  r = jax.ShapeDtypeStruct((rows,), F32)
  _export_tpu(lambda x, s: impl.forward(x, s, None,
                                        norm=_norm(out_dtype=x.dtype)), a, s)
  _export_tpu(lambda x: impl.forward(x, None, None, norm=_norm()), a)
  _export_tpu(lambda x, s, r, dy: impl.backward(x, s, None, r, dy,
                                                norm=_norm(1.0)), a, s, r, a)
  _export_tpu(lambda x, r, dy: impl.backward(x, None, None, r, dy,
                                             norm=_norm()), a, r, a)
  _export_tpu(lambda x, res, s: impl.residual_forward(
      x, res, s, None, norm=_norm(out_dtype=res.dtype)), a, a32, s)
  _export_tpu(lambda h, r, dy, dh: impl.residual_backward(
      h, None, None, r, dy, dh, norm=_norm()), a, r, a, a)
  _export_tpu(lambda h, s, r, dy, dh: impl.residual_backward(
      h, s, None, r, dy, dh, norm=_norm()), a, s, r, a, a)


def test_auto_export_picks_kernel_for_tpu_only():
  x = jax.ShapeDtypeStruct((4, 16, 512), BF16)
  s = jax.ShapeDtypeStruct((512,), BF16)

  def f(x, s):
    return jax.grad(lambda x, s: rj.rms_norm(x, s).astype(F32).sum(),
                    argnums=(0, 1))(x, s)

  tpu = jax.export.export(jax.jit(f), platforms=["tpu"])(x, s).mlir_module()
  assert tpu.count("tpu_custom_call") >= 2  # forward and backward kernels
  cpu = jax.export.export(jax.jit(f), platforms=["cpu"])(x, s).mlir_module()
  assert "tpu_custom_call" not in cpu


# ------------------------------------------------- HBM byte accounting --

_HLO = """HloModule m, entry_computation_layout={(f32[8,128], bf16[3,128])->f32[8,128]}

%fc (a: f32[8,128], b: bf16[3,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  ROOT %n = f32[8,128]{1,0} negate(%a)
}

ENTRY %main (p0: f32[8,128], p1: bf16[3,128]) -> f32[8,128] {
  %p0 = f32[8,128]{1,0:T(8,128)} parameter(0)
  %p1 = bf16[3,128]{1,0:T(16,128)(2,1)} parameter(1)
  %copy-start = (bf16[3,128]{1,0:T(16,128)(2,1)S(1)}, bf16[3,128]{1,0:T(16,128)(2,1)}, u32[]{:S(2)}) copy-start(%p1)
  %copy-done = bf16[3,128]{1,0:T(16,128)(2,1)S(1)} copy-done(%copy-start)
  %slice-start = ((f32[8,128]{1,0:T(8,128)}), f32[4,128]{1,0:T(8,128)S(3)}, s32[]{:S(2)}) slice-start(%p0), slice={[0:4], [0:128]}
  %slice-done = f32[4,128]{1,0:T(8,128)S(3)} slice-done(%slice-start)
  %s = f32[3,128]{1,0:T(8,128)S(1)} convert(%copy-done)
  ROOT %fusion = f32[8,128]{1,0:T(8,128)} fusion(%p0, %copy-done, %s), kind=kLoop, calls=%fc
}
"""


def test_hbm_bytes_counts_hbm_operands_and_results_once():
  # copy-start: bf16[3,128] padded to its (16, 128) tile, read from HBM into
  # VMEM (S(1)): 16*128*2 bytes read, nothing written to HBM. slice-start:
  # f32[4,128] padded to (8, 128) read into S(3): 8*128*4. The "-done" ops
  # move nothing more. The convert lives in VMEM: 0. The fusion reads p0
  # (8*128*4) and VMEM operands (0) and writes 8*128*4. Instructions of
  # other computations do not count.
  assert tpu_aot.hbm_bytes(_HLO) == 16 * 128 * 2 + 3 * 8 * 128 * 4
  assert shapes.min_bytes("fwd", 10, 128, BF16) == (
      2 * 10 * 128 * 2 + 4 * 10 + 128 * 2)
  assert shapes.min_bytes("res_bwd", 10, 128, F32) == (
      4 * 10 * 128 * 4 + 4 * 10 + 128 * 4 + 128 * 4)
