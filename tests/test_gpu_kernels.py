"""PallasGpu kernels against the float64 reference and the XLA path.

Every check runs in two modes:

* ``interpret``: the Pallas interpreter on whatever backend JAX has (CI: CPU);
* ``compiled``: Triton-compiled on a CUDA GPU, marked ``gpu`` and skipped,
  with the reason, where there is none (``pytest -m gpu`` runs only these).

The checks call the Implementation methods (``forward``/``backward``,
``residual_forward``/``residual_backward``) on 2-D row views, jitted, with
``poison_outputs=True`` so that every kernel output starts as NaN: an
element the kernel failed to write fails the finiteness check inside
``rel_error``. Inputs are fresh random
normals (never zeros), with a nonzero mean so that the mean-square is not
trivially 1.

Tolerances (``numerics_util.TOLERANCE``) are on ``||got - want|| /
||want||``: against the float64 reference, float32 arithmetic plus one
rounding of each output to its dtype (gradients pass two roundings, dy and
dx); against XLA (same float32 formula, different summation order), one ulp
relative, since an output rounded to half precision may land one ulp apart
where its float32 value sits near a rounding boundary.

In interpret mode, the default configuration on ``shapes.CORRECTNESS`` is
tested through the public API by tests/test_numerics.py (which also compares
with XLA); this module adds, in interpret mode, what only a kernel test
reaches (rows wider than the resident tiling, tiling overrides, mixed
dtypes) and runs everything compiled on a GPU.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import reference
from rmsnorm_jax import shapes
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import gpu_kernels
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu

from gpu_test_util import (COMPILED, GPU_HINT, MODES, has_cuda, impl_for,
                           needs_triton_target)
from numerics_util import assert_close, assert_residual_matches_reference
from numerics_util import dx_magnitude, random, residual_inputs, rng_for
from numerics_util import tol, xla_tol



DTYPES = [pytest.param(d, id=np.dtype(d).name) for d in shapes.DTYPES]
# Compiled only: interpret mode runs these through tests/test_numerics.py.
SHAPES = [pytest.param(s, id="x".join(map(str, s)))
          for s in shapes.CORRECTNESS]
# Only compiled: sizes that need a real SM count to exercise multi-step
# persistent programs, rows wider than the resident limit, and the tuned
# launches of a few hundred wide rows (the H200 file's 256-row entries).
GPU_SHAPES = [pytest.param(s, id="x".join(map(str, s)))
              for s in ((4099, 1024), (300, 16384), (257, 12288), (5, 32771),
                        (2, 65536))]


def _rows_view(shape):
  # The methods take 2-D row views: leading dims flattened, as api.py does.
  return (int(np.prod(shape[:-1])), shape[-1])


def _check_norm(impl, shape, dtype, scale_dtype, *, scale_offset=0.0,
                eps=1e-5, out_dtype=None, key=()):
  """Forward and both gradients vs float64 and vs XLA."""
  rng = rng_for("norm", shape, np.dtype(dtype).name, key)
  shape = _rows_view(shape)
  hidden = shape[-1]
  x = random(rng, shape, dtype, mean=0.3)
  scale = None if scale_dtype is None else random(
      rng, (hidden,), scale_dtype, mean=0.0 if scale_offset else 1.0,
      scale=0.5)
  y_dtype = np.dtype(out_dtype or dtype)
  dy = random(rng, shape, y_dtype)

  norm = base.Norm(eps=eps, scale_offset=scale_offset, out_dtype=y_dtype)

  def run(impl, x, scale, dy):
    y, rstd = impl.forward(x, scale, None, norm=norm)
    dx, dscale, dbias = impl.backward(x, scale, None, rstd, dy, norm=norm)
    assert dbias is None
    return y, dx, dscale

  # The kernel and XLA side by side in one program.
  (y, dx, dscale), (y_x, dx_x, ds_x) = jax.jit(
      lambda *a: (run(impl, *a), run(base.Xla(), *a)))(x, scale, dy)
  assert y.dtype == y_dtype and dx.dtype == x.dtype
  y_ref, _ = reference.rms_norm(x, scale, eps=eps, scale_offset=scale_offset)
  dx_ref, ds_ref = reference.rms_norm_grad(x, scale, dy, eps=eps,
                                           scale_offset=scale_offset)
  assert_close(y, y_ref, tol(y_dtype), "y")
  assert_close(dx, dx_ref, tol(dtype, y_dtype), "dx",
               dx_magnitude(x, scale, dy, eps=eps, scale_offset=scale_offset))
  assert_close(y, y_x, xla_tol(y_dtype), "y vs xla")
  assert_close(dx, dx_x, xla_tol(dtype, y_dtype), "dx vs xla",
               dx_magnitude(x, scale, dy, eps=eps, scale_offset=scale_offset))
  if scale is None:
    assert dscale is None
  else:
    assert dscale.dtype == jnp.float32 and dscale.shape == scale.shape
    assert_close(dscale, ds_ref, tol(scale.dtype, y_dtype), "dscale")
    assert_close(dscale, ds_x, xla_tol(scale.dtype), "dscale vs xla")


def _check_residual(impl, shape, x_dtype, res_dtype, key=()):
  """Fused residual forward and backward vs float64 and vs XLA."""
  rng = rng_for("res", shape, np.dtype(x_dtype).name, np.dtype(res_dtype).name,
             key)
  shape = _rows_view(shape)
  inputs = residual_inputs(rng, shape, x_dtype, res_dtype)
  x, res, scale, dy, dh = inputs

  norm = base.Norm(eps=1e-6, out_dtype=np.dtype(res_dtype))

  def run(impl, x, res, scale, dy, dh):
    y, h, rstd = impl.residual_forward(x, res, scale, None, norm=norm)
    dres, dscale, dbias = impl.residual_backward(h, scale, None, rstd, dy, dh,
                                                 norm=norm)
    assert dbias is None and dres.dtype == res.dtype
    # The gradient of x and of residual is the same (h = x + residual).
    return y, h, dres.astype(x.dtype), dres, dscale

  # The kernel and XLA side by side in one program.
  (y, h, dx, dres, dscale), (y_x, h_x, dx_x, dres_x, ds_x) = jax.jit(
      lambda *a: (run(impl, *a), run(base.Xla(), *a)))(*inputs)
  assert_residual_matches_reference(inputs, (y, h, dx, dres, dscale))
  np.testing.assert_array_equal(np.asarray(h, np.float32),
                                np.asarray(h_x, np.float32))
  assert_close(y, y_x, xla_tol(res_dtype), "y vs xla")
  # The norm's part of the gradient cancels almost exactly for tiny hidden,
  # so it is judged against the size of its terms (plus dh's).
  mag = dx_magnitude(h, scale, dy) + float(
      np.linalg.norm(np.asarray(dh, np.float64).ravel()))
  assert_close(dres, dres_x, xla_tol(res_dtype), "dresidual vs xla", mag)
  assert_close(dscale, ds_x, xla_tol(jnp.float32, res_dtype),
               "dscale vs xla")


# ------------------------------------------------------------------ tests --

@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_and_residual(mode, shape, dtype):
  impl = impl_for(mode)
  _check_norm(impl, shape, dtype, dtype)
  _check_residual(impl, shape, dtype, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s)))
                                   for s in shapes.WIDE])
def test_rows_wider_than_resident(mode, shape, dtype):
  impl = impl_for(mode)
  _check_norm(impl, shape, dtype, dtype)
  _check_residual(impl, shape, dtype, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_large_shapes(mode, shape, dtype):
  if mode == "interpret":
    pytest.skip("large shapes are only run compiled (interpret is slow)")
  impl = impl_for(mode)
  _check_norm(impl, shape, dtype, dtype)
  _check_residual(impl, shape, dtype, dtype)


# Interpret mode: tests/test_numerics.py through the public API (a float32
# scale with an offset and a float32 output; no scale).
@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["f32_scale_offset", "no_scale",
                                     "f32_out"])
def test_scale_and_output_variants(mode, dtype, variant):
  impl = impl_for(mode)
  if variant == "f32_scale_offset":
    _check_norm(impl, (37, 300), dtype, jnp.float32, scale_offset=1.0)
  elif variant == "no_scale":
    _check_norm(impl, (37, 300), dtype, None)
  else:
    _check_norm(impl, (37, 300), dtype, dtype, out_dtype=jnp.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", [
    # Chunked (two-loop) tiling on a small ragged row.
    dict(block_cols=64),
    dict(block_cols=32, block_rows=4),
    # Persistent backward: several ragged row blocks per program.
    dict(block_rows=2, programs_per_sm=1, num_sms=3),
    dict(block_rows=8, num_warps=2, num_sms=1),
    dict(block_rows=4, num_sms=2, prefetch=False, cache_scale=False),
    dict(block_rows=2, num_sms=2, persistent=True, programs_per_sm=2),
    dict(block_rows=2, num_sms=2, persistent=True, prefetch=False,
         cache_scale=False),
    # Backward reading x and dy again after the reduction (wide rows).
    dict(block_rows=2, num_sms=3, reload=True, prefetch=False,
         cache_scale=False),
    dict(block_rows=4, num_sms=2, reload=True),
    # One warp a row, the scale re-read per row (tune's one-warp candidate).
    dict(block_rows=1, num_warps=1, persistent=False, cache_scale=False),
], ids=["chunk64", "chunk32_rows4", "persistent", "one_program",
        "no_prefetch_no_cache", "persistent_fwd", "persistent_fwd_plain",
        "reload", "reload_prefetch_cached", "one_warp"])
def test_tiling_overrides(mode, config):
  impl = impl_for(mode, **config)
  _check_norm(impl, (45, 200), jnp.bfloat16, jnp.float32, key=config)
  _check_residual(impl, (45, 200), jnp.bfloat16, jnp.float32, key=config)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_residual_dtypes(mode):
  _check_residual(impl_for(mode), (19, 257), jnp.bfloat16, jnp.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="the deprecation warnings come "
                    "from lowering GPU kernels, which needs a CUDA GPU"
                    + GPU_HINT)
def test_default_calls_lower_without_deprecation_warnings():
  # As a user's suite run with -W error::DeprecationWarning sees them: the
  # default calls of every op lower (and run) without one. 4096 columns
  # take the Mosaic GPU backward on Hopper, 1536 the Triton kernels.
  rng = rng_for("deprecation")
  for rows, hidden in ((96, 4096), (67, 1536)):
    x, r, dy = (random(rng, (rows, hidden), jnp.bfloat16) for _ in range(3))
    s, b = (random(rng, (hidden,), jnp.bfloat16, mean=1.0) for _ in range(2))

    def f(x, r, s, b, dy):
      y, vjp = jax.vjp(lambda x, s: rj.rms_norm(x, s), x, s)
      yr, h = rj.rms_norm_residual(x, r, s)
      _, vjp_r = jax.vjp(lambda h, s, b: rj.rms_norm(h, s, b), h, s, b)
      q = rj.rms_norm_quantized(x, s)
      return y, vjp(dy), yr, vjp_r(dy), q

    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      jax.block_until_ready(jax.jit(f)(x, r, s, b, dy))


def _tile_loads(kernel):
  # The loads of whole row tiles (x, residual, dy, dh): 2-D tensors of
  # pointers, where the scale, bias and rstd are 1-D or single columns.
  # Pallas lowers a store to a ref as a swap, whose load of the old values
  # (an output's window) is dead; those loads are left out.
  lines = kernel.ir.splitlines()
  stored = set(re.findall(r"tt\.store (%\w+)", kernel.ir))
  return [line for line in lines
          if "tt.load" in line
          and re.search(r"tensor<\d+x\d{3,}x!tt\.ptr", line)
          and re.search(r"tt\.load (%\w+)", line).group(1) not in stored]


@needs_triton_target
def test_row_inputs_load_past_l1():
  # Config.bypass_l1, read in the Triton IR the calls lower to for CUDA on
  # any host: every row input of the forward, backward, fused and quantized
  # kernels is an ld.global.cg, and bypass_l1=False turns it off.
  from rmsnorm_jax.bench import triton_ir  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)

  def calls(backend):
    def f(x, r, s, dy):
      _, vjp = jax.vjp(lambda x, s: rj.rms_norm(x, s, backend=backend), x, s)
      _, vjp_r = jax.vjp(lambda x, r, s: rj.rms_norm_residual(
          x, r, s, backend=backend), x, r, s)
      q = rj.rms_norm_quantized(x, s, backend=backend)
      qr = rj.rms_norm_quantized(x, s, residual=r, backend=backend)
      return vjp(dy), vjp_r((dy, dy)), q, qr
    return triton_ir.triton_kernels(f, x, x, s, x)

  kernels = calls(PallasGpu())
  assert sorted(k.name for k in kernels) == sorted([
      "rmsnorm_forward", "rmsnorm_backward", "rmsnorm_residual_forward",
      "rmsnorm_residual_backward", "rmsnorm_quantized_forward",
      "rmsnorm_quantized_residual_forward"])
  for k in kernels:
    loads = _tile_loads(k)
    assert loads, k.ir
    assert all("cacheModifier = cg" in line for line in loads), (k.name,
                                                                 loads)
  # Rows read twice (the backward of 16384 columns) carry L2 eviction
  # policies, which ptxas does not take beside .cg: those loads keep L1.
  wide = jax.ShapeDtypeStruct((64, 16384), jnp.bfloat16)
  (bwd,) = [k for k in triton_ir.triton_kernels(
      jax.grad(lambda x, s: rj.rms_norm(x, s, backend=PallasGpu()).astype(
          jnp.float32).sum()), wide, jax.ShapeDtypeStruct(
              (16384,), jnp.bfloat16)) if k.name == "rmsnorm_backward"]
  loads = [line for line in bwd.ir.splitlines() if "tt.load" in line]
  assert any("evictionPolicy" in line for line in loads), bwd.ir
  assert not any("evictionPolicy" in line and "cacheModifier" in line
                 for line in loads), loads
  off = calls(PallasGpu(config=gpu_tiling.Config(bypass_l1=False)))
  assert not any("cacheModifier" in line for k in off for line in
                 _tile_loads(k))


def test_config_switches_take_only_bools():
  for knob in gpu_tiling.BOOL_KNOBS:
    with pytest.raises(ValueError, match=f"Config.{knob} must be True, "
                       "False or None; got 1"):
      gpu_tiling.Config(**{knob: 1})


@pytest.mark.parametrize("backend", ["pallas_gpu", "mosaic_gpu"])
@pytest.mark.parametrize("per_head", [False, True], ids=["scale", "per_head"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@needs_triton_target
def test_dscale_and_dbias_partials_sum_in_one_reduction(backend, per_head,
                                                        param_dtype):
  # The backward kernels write dscale's and dbias' per-program partials;
  # with float32 parameters one variadic reduction sums both (one kernel
  # where a sum each took two, docs/bench_h200_features.md). 16-bit
  # parameters keep a reduction each, since XLA fuses their casts only into
  # a single reduction, and so does a per-head scale, whose dbias sums over
  # the heads too; its dscale takes one reduction over the programs and
  # the copies of each head (Mosaic GPU's had taken two, and its dbias
  # two). Lowered for cuda on any host.
  s = jax.ShapeDtypeStruct
  x = s((4096, 8, 128) if per_head else (4096, 1024), jnp.bfloat16)
  w = s(x.shape[1:] if per_head else (1024,), param_dtype)
  b = s((x.shape[-1],), param_dtype)

  def loss(x, w, b):
    return jnp.sum(rj.rms_norm(x, w, b, backend=backend).astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = grad.trace(x, w, b).lower(lowering_platforms=("cuda",)).as_text()
  one = param_dtype == jnp.float32 and not per_head
  assert text.count(":2 = stablehlo.reduce(") == int(one), text
  assert text.count("stablehlo.reduce(") == (1 if one else 2), text


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, None],
                         ids=["f32", "bf16", "any"])
def test_leading_sums_checks_shapes_and_sums_each_partial(param_dtype):
  rng = rng_for("leading_sums")
  a, b = (random(rng, (37, 3, 5), jnp.float32) for _ in range(2))
  got = common.leading_sums([a, b], param_dtype)
  for g, p in zip(got, (a, b)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(p, np.float64).sum(0),
                               rtol=1e-5)
  with pytest.raises(ValueError, match="one shape"):
    common.leading_sums([a, b[:, :2]], param_dtype)


@pytest.mark.parametrize("heads", [0, 1, 3])
def test_head_sums_fold_programs_and_tile_copies(heads):
  # Partials of 5 programs x a tile of 6 rows: row i of a tile is head
  # i % heads (heads 0: every row into one (hidden,) sum).
  rng = rng_for("head_sums", heads)
  p = random(rng, (5, 6, 7), jnp.float32)
  got = np.asarray(common.head_sums(p, heads))
  flat = np.asarray(p, np.float64).reshape(30, 7)
  want = (flat.sum(0) if not heads else
          np.stack([flat[h::heads].sum(0) for h in range(heads)]))
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="multiple of heads=4"):
    common.head_sums(p, 4)


def _call(op, rows, hidden, dtype, **kw):
  kw.setdefault("norm", base.Norm(eps=1e-6, out_dtype=np.dtype(dtype)))
  return base.Call(op=op, rows=rows, hidden=hidden, dtype=np.dtype(dtype),
                   scale_shape=(hidden,), **kw)


def test_float64_cannot_be_served():
  impl = PallasGpu(interpret=True)
  for op in ("forward", "backward", "residual_forward", "residual_backward"):
    reason = impl.cannot_serve(_call(op, 4096, 4096, jnp.float64))
    assert reason is not None and "float64" in reason
    assert impl.cannot_serve(_call(op, 4096, 4096, jnp.bfloat16)) is None


def test_auto_declines_crossover():
  # The measured crossover (gpu.py): the kernel from one row up, except few
  # rows of very wide rows, where XLA's backward is faster.
  impl = PallasGpu()

  def preferred(rows, hidden, dtype):
    return impl.auto_declines(_call("forward", rows, hidden, dtype)) is None

  assert preferred(1, 768, jnp.float32)
  assert preferred(1, 4096, jnp.bfloat16)
  assert preferred(64, 768, jnp.float32)
  assert preferred(8192, 4096, jnp.bfloat16)
  assert preferred(32768, 128, jnp.bfloat16)
  assert not preferred(1, 16384, jnp.bfloat16)
  assert not preferred(4, 16384, jnp.bfloat16)
  # The forward of up to 48 such rows too, of 8 rows from 32768 columns;
  # the fused forward of 8 stays.
  assert not preferred(8, 16384, jnp.bfloat16)
  assert "fewer than 49 rows of 16384" in impl.auto_declines(
      _call("forward", 48, 16384, jnp.bfloat16))
  assert preferred(49, 16384, jnp.bfloat16)
  assert "fewer than 9 rows of 32768" in impl.auto_declines(
      _call("forward", 8, 32768, jnp.bfloat16))
  assert preferred(9, 32768, jnp.bfloat16)
  assert preferred(16, 65536, jnp.bfloat16)
  assert impl.auto_declines(
      _call("residual_forward", 8, 16384, jnp.bfloat16)) is None
  assert "fewer than 8 rows" in impl.auto_declines(
      _call("residual_forward", 7, 16384, jnp.bfloat16))
  assert not preferred(2, 65536, jnp.float32)
  assert preferred(4096, 16384, jnp.bfloat16)
  assert not preferred(2**20, 2**12, jnp.bfloat16)  # > 2**31 elems
  # Chunked rows (wider than 32768 16-bit or 16384 float32 columns): the
  # forward stays on the kernel; the backward and the fused ops measured
  # faster on XLA. 16-bit rows of 32768 are resident: the kernel.
  assert preferred(2048, 32768, jnp.bfloat16)
  assert preferred(1024, 65536, jnp.bfloat16)
  for op in ("backward", "residual_backward", "residual_forward"):
    assert impl.auto_declines(_call(op, 1024, 65536, jnp.bfloat16))
    assert impl.auto_declines(_call(op, 2048, 32768, jnp.float32))
    assert impl.auto_declines(_call(op, 2048, 32768, jnp.bfloat16)) is None
    assert impl.auto_declines(_call(op, 4096, 16384, jnp.bfloat16)) is None
  # A float32 output (flax's default layer over bfloat16 x: a float32 y and
  # dy): XLA from 32768 columns, for the four ops; the kernel at 16384. A
  # float32 scale with y in x's dtype: XLA only on chunked rows.
  f32 = np.dtype(jnp.float32)
  for op in ("forward", "residual_forward", "backward", "residual_backward"):
    for dtype in (jnp.bfloat16, jnp.float16):
      f32_out = lambda rows, hidden: impl.auto_declines(_call(
          op, rows, hidden, dtype, scale_dtype=f32,
          norm=base.Norm(eps=1e-6, out_dtype=f32)))
      assert "float32 output" in f32_out(2048, 32768)
      assert "float32 output" in f32_out(2048, 20000)  # padded to 32768
      assert f32_out(4096, 16384) is None
    assert impl.auto_declines(_call(op, 4096, 16384, f32)) is None
  f32_scale = lambda hidden: impl.auto_declines(_call(
      "forward", 1024, hidden, jnp.bfloat16, scale_dtype=f32,
      norm=base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.bfloat16))))
  assert "float32 scale" in f32_scale(65536)
  assert f32_scale(32768) is None
  # Per-head forward (rows are tokens x heads): XLA from 32 MiB of x up;
  # the per-head backward and a plain forward of the same size: the kernel.
  heads = dict(scale_shape=(32, 128))
  per_head = lambda op, tokens: impl.auto_declines(base.Call(
      op=op, rows=tokens * 32, hidden=128, dtype=np.dtype(jnp.bfloat16),
      **heads))
  assert "per-head forward" in per_head("forward", 4096)
  assert "per-head forward" in per_head("forward", 16384)
  assert per_head("forward", 4095) is None
  assert per_head("backward", 16384) is None
  assert preferred(4096 * 32, 128, jnp.bfloat16)


def test_registered_and_platforms():
  from rmsnorm_jax import kernels
  assert kernels.BY_NAME["pallas_gpu"] is PallasGpu
  assert PallasGpu in kernels.BY_PLATFORM["cuda"]
  assert PallasGpu().lowering_platforms() == ("cuda",)
  assert "cpu" in PallasGpu(interpret=True).lowering_platforms()


def _geometry(op, rows, hidden, itemsize=2):
  # The heuristic's tiling (device_kind=None: no tuning file applies).
  config = gpu_tiling.resolve(gpu_tiling.Config(num_sms=132), op, rows,
                              hidden, itemsize=itemsize, device_kind=None)
  assert config.resolved
  return gpu_kernels.Geometry(config, rows, hidden)


@pytest.mark.parametrize("rows,hidden", [
    (1, 768), (1, 4096), (64, 4096), (8192, 4096), (32768, 128),
    (4096, 16384), (3, 65536), (1000, 129), (7, 100)])
@pytest.mark.parametrize("op", ["forward", "backward", "residual_backward"])
def test_tiling_covers_every_row(op, rows, hidden):
  launch = _geometry(op, rows, hidden)
  assert launch.block_rows & (launch.block_rows - 1) == 0
  assert launch.block_cols & (launch.block_cols - 1) == 0
  assert launch.grid * launch.steps * launch.block_rows >= rows
  # No program is left with only empty row blocks.
  assert (launch.grid - 1) * launch.block_rows < rows
  if launch.resident:
    assert launch.block_cols >= hidden
  # Small row counts still spread over many programs; a persistent grid
  # (steps > 1) may drop a few programs when that leaves steps unchanged.
  row_blocks = -(-rows // launch.block_rows)
  assert launch.grid >= 0.9 * min(row_blocks, 132)
  assert launch.grid >= min(rows, 132) or launch.block_rows == 1 or (
      launch.steps > 1)


def test_wide_backward_tiling_follows_the_sweep():
  # 16-bit rows of 16384 columns: 32 warps; the plain backward caches the
  # scale, the fused one (which also reads dh) does not; float32 keeps 16.
  bwd16 = _geometry("backward", 4096, 16384).config
  fused16 = _geometry("residual_backward", 4096, 16384).config
  bwd32 = _geometry("backward", 4096, 16384, itemsize=4).config
  assert (bwd16.num_warps, bwd16.cache_scale, bwd16.reload) == (32, True, True)
  assert (fused16.num_warps, fused16.cache_scale) == (32, False)
  assert (bwd32.num_warps, bwd32.cache_scale) == (16, False)
  narrower = _geometry("backward", 8192, 4096).config
  assert narrower.num_warps == 16


def test_tiling_rejects_unknown_op():
  with pytest.raises(ValueError, match="op must be one of .* got 'bwd'"):
    gpu_tiling.resolve(gpu_tiling.Config(num_sms=132), "bwd", 8, 128)


def test_user_config_is_kept_and_completed():
  # A partial config: the given knobs survive, the rest are chosen.
  user = gpu_tiling.Config(block_rows=3, num_warps=2, prefetch=False)
  got = gpu_tiling.resolve(user, "backward", 1000, 129)
  assert got.resolved and (got.block_rows, got.num_warps, got.prefetch) == (
      4, 2, False)
  assert got == gpu_tiling.resolve(got, "backward", 1000, 129)
  with pytest.raises(ValueError, match="block_rows must be a positive int"):
    gpu_tiling.Config(block_rows=0)
  with pytest.raises(TypeError, match="gpu_tiling.Config"):
    PallasGpu(config=dict(block_rows=4))
