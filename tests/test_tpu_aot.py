"""Deviceless TPU compilation (marker ``tpu_aot``, needs libtpu).

The real TPU compiler, Mosaic included, compiles the kernels for each TPU
generation from a deviceless topology (odd shapes here; the full shape sweep
is ``python -m rmsnorm_jax.tpu_aot``), and the sharded public API for a
4-chip mesh. Skipped where libtpu is not installed (.ci/tpu_aot.sh installs
it).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsnorm_jax as rj
from rmsnorm_jax import shapes
# Imported before any TPU compilation: it sets libtpu's environment defaults.
from rmsnorm_jax import tpu_aot
from rmsnorm_jax.kernels.tpu import PallasTpu

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
EPS = 1e-5

needs_libtpu = pytest.mark.skipif(
    not tpu_aot.libtpu_available(),
    reason=f'needs libtpu: pip install "jax[tpu]=={jax.__version__}" '
           "(.ci/tpu_aot.sh)")


def _all_ops(impl, with_scale):
  """Forward, backward, fused forward and fused backward in one program."""
  def f(x, res, scale, rstd, dy, dh):
    s = scale if with_scale else None
    offset = 1.0 if with_scale else 0.0
    out = impl.forward(x, s, eps=EPS, scale_offset=offset, out_dtype=x.dtype)
    out += impl.backward(x, s, rstd, dy, scale_offset=offset)
    out += impl.residual_forward(x, res, s, eps=EPS, scale_offset=offset,
                                 out_dtype=res.dtype)
    out += impl.residual_backward(res, s, rstd, dh, dh, scale_offset=offset)
    return out
  return f


def _kernel_calls(hlo_text):
  return hlo_text.count('custom_call_target="tpu_custom_call"')


# (rows, hidden), x dtype, residual dtype, scale, config: ragged rows with
# odd hidden, tiny rows, float16 with a float32 residual, no scale, a user
# block_rows, and the forced two-pass path (ragged lane chunks).
AOT_CASES = [
    pytest.param((1000, 2880), BF16, BF16, True, {}, id="1000x2880_bf16"),
    pytest.param((1, 1), F16, F16, True, {}, id="1x1_f16"),
    pytest.param((3, 8), F32, F32, False, {}, id="3x8_f32_no_scale"),
    pytest.param((33, 129), F16, F32, True, dict(block_rows=16),
                 id="33x129_f16+f32_block16"),
    pytest.param((37, 100), F32, BF16, True, {}, id="37x100_f32+bf16"),
    pytest.param((40, 1000), BF16, BF16, True,
                 dict(hidden_block=256, block_rows=16), id="2pass_40x1000"),
]
GENS = [pytest.param(g, id=g.split(":")[0]) for g in shapes.TPU_GENERATIONS]


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen", GENS)
@pytest.mark.parametrize("shape,x_dtype,res_dtype,with_scale,config",
                         AOT_CASES)
def test_aot_compiles_kernel_variants(gen, shape, x_dtype, res_dtype,
                                      with_scale, config):
  mesh = tpu_aot.single_device_mesh(gen)
  sh = NamedSharding(mesh, P())
  rows, hidden = shape
  arr = lambda d: jax.ShapeDtypeStruct(shape, d, sharding=sh)
  args = (arr(x_dtype), arr(res_dtype),
          jax.ShapeDtypeStruct((hidden,), F32, sharding=sh),
          jax.ShapeDtypeStruct((rows,), F32, sharding=sh),
          arr(x_dtype), arr(res_dtype))
  compiled = tpu_aot.compile_fn(_all_ops(PallasTpu(**config), with_scale),
                                args, mesh)
  # One Mosaic kernel per op, two per op on the two-pass path.
  want = 8 if "hidden_block" in config else 4
  assert _kernel_calls(compiled.as_text()) == want


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen,two_pass_ops", [("v4:2x2x1", 3),
                                              ("v5e:2x2", 0)])
def test_aot_block_choice_follows_target_vmem(gen, two_pass_ops):
  # 64K-wide float32 rows: on v4 (16 MiB VMEM per core) the backward and both
  # fused kernels take two passes; v5e (128 MiB) runs all four in one. The
  # chip is read from the mesh being compiled for, not from the host.
  mesh = tpu_aot.single_device_mesh(gen)
  sh = NamedSharding(mesh, P())
  rows, hidden = 16, 65536
  a = jax.ShapeDtypeStruct((rows, hidden), F32, sharding=sh)
  args = (a, a, jax.ShapeDtypeStruct((hidden,), F32, sharding=sh),
          jax.ShapeDtypeStruct((rows,), F32, sharding=sh), a, a)
  compiled = tpu_aot.compile_fn(_all_ops(PallasTpu(), True), args, mesh)
  assert _kernel_calls(compiled.as_text()) == 4 + two_pass_ops


@pytest.mark.tpu_aot
@needs_libtpu
def test_aot_sweep_and_report():
  # The sweep on one shape: everything compiles, the kernel moves the
  # minimum bytes, XLA no fewer, and the report has the summary and rows.
  rows = tpu_aot.sweep(gens=("v5e:2x2",), shape_list=((1024, 4096),),
                       dtypes=(BF16,), ops=("fwd", "bwd"), log=lambda s: None)
  for r in rows:
    assert r.ok and r.block == "128", r
    assert r.min_bytes <= r.kernel_bytes <= 1.001 * r.min_bytes, r
    assert r.xla_bytes >= r.min_bytes, r
  text = tpu_aot.markdown(rows)
  assert "Compiled: pallas_tpu 2/2, xla 2/2." in text
  assert "| v5e:2x2 | 819 | 2/2 | 2/2 |" in text
  assert "| v5e:2x2 | 1024x4096 | bfloat16 | bwd | yes | 128 |" in text


def _sharded_args(gen, kind, axis_type):
  devices = tpu_aot.topology(gen).devices
  assert len(devices) == 4
  mesh = jax.sharding.Mesh(np.array(devices), ("d",),
                           axis_types=(axis_type,))
  spec = P("d", None, None) if kind == "batch" else P(None, None, "d")
  x = jax.ShapeDtypeStruct((8, 256, 4096), BF16,
                           sharding=NamedSharding(mesh, spec))
  scale = jax.ShapeDtypeStruct((4096,), F32,
                               sharding=NamedSharding(mesh, P(spec[-1])))
  return mesh, spec, x, scale


def _loss(x, scale):
  return jnp.sum(rj.rms_norm(x, scale).astype(F32) ** 2)


def _forward_and_grad(x, scale):
  return rj.rms_norm(x, scale), jax.grad(_loss, argnums=(0, 1))(x, scale)


SHARDED_GENS = [pytest.param(g, id=g.split(":")[0])
                for g in ("v5e:2x2", "v6e:2x2")]


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen", SHARDED_GENS)
@pytest.mark.parametrize("kind", ["batch", "hidden"])
def test_aot_sharded_rms_norm_explicit_axes(gen, kind):
  # Explicit mesh axes: sharding.py runs the kernel per shard in shard_map.
  mesh, spec, x, scale = _sharded_args(gen, kind,
                                       jax.sharding.AxisType.Explicit)
  compiled = tpu_aot.compile_fn(_forward_and_grad, (x, scale), mesh)
  hlo = compiled.as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo, "x gathered"
  reduced = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-reduce"
                                    r"(?:-start)?\(", hlo)]
  local_rows = 8 * 256 // (4 if kind == "batch" else 1)
  if kind == "batch":
    # The forward and backward kernels on each device's rows; only dscale
    # (one float32 per lane) is summed over devices.
    assert _kernel_calls(hlo) == 2
    assert reduced == [4096], reduced
  else:
    # Split rows: one float32 per row all-reduced in the forward (sum of
    # squares) and in the backward (sum of g * xhat), never x itself.
    assert reduced and all(n == local_rows for n in reduced), reduced
  y_sharding = compiled.output_shardings[0]
  assert y_sharding.is_equivalent_to(NamedSharding(mesh, spec), 3)


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen", SHARDED_GENS)
@pytest.mark.parametrize("kind", ["batch", "hidden"])
def test_aot_sharded_rms_norm_auto_axes(gen, kind):
  # Auto mesh axes over several TPU devices: custom_partitioning cannot
  # compile for TPU (jax-ml/jax#38196), so sharding.py sends the TPU to XLA's
  # math there, which XLA partitions without gathering x.
  mesh, spec, x, scale = _sharded_args(gen, kind, jax.sharding.AxisType.Auto)
  compiled = tpu_aot.compile_fn(_forward_and_grad, (x, scale), mesh)
  hlo = compiled.as_text()
  assert "CustomSPMDPartitioning" not in hlo
  assert "all-gather" not in hlo and "all-to-all" not in hlo, "x gathered"
  assert _kernel_calls(hlo) == 0
  assert compiled.output_shardings[0].is_equivalent_to(
      NamedSharding(mesh, spec), 3)


@pytest.mark.tpu_aot
@needs_libtpu
def test_aot_one_device_program_keeps_the_kernel():
  # The fallback above is only for programs over several devices.
  devices = tpu_aot.topology("v5e:2x2").devices[:1]
  mesh = jax.sharding.Mesh(np.array(devices), ("d",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct((8, 256, 4096), BF16,
                           sharding=NamedSharding(mesh, P()))
  scale = jax.ShapeDtypeStruct((4096,), F32, sharding=NamedSharding(mesh, P()))
  hlo = tpu_aot.compile_fn(_forward_and_grad, (x, scale), mesh).as_text()
  assert _kernel_calls(hlo) == 2
