"""Deviceless TPU compilation (marker ``tpu_aot``, needs libtpu).

The real TPU compiler, Mosaic included, compiles the kernels for each TPU
generation from a deviceless topology (odd shapes here; the full shape sweep
is ``python -m rmsnorm_jax.tpu_aot``), and the sharded public API for a
4-chip mesh. Skipped where libtpu is not installed (.ci/tpu_aot.sh installs
it).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsnorm_jax as rj
from rmsnorm_jax import base
# Imported before any TPU compilation: it sets libtpu's environment defaults.
from rmsnorm_jax import tpu_aot
from rmsnorm_jax.kernels.tpu import PallasTpu
from rmsnorm_jax.tpu_aot import cli
from rmsnorm_jax.tpu_aot import hlo
from rmsnorm_jax.tpu_aot import report
from rmsnorm_jax.tpu_aot import specs

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
    norm = base.Norm(eps=EPS, scale_offset=offset, out_dtype=x.dtype)
    res_norm = base.Norm(eps=EPS, scale_offset=offset, out_dtype=res.dtype)
    out = impl.forward(x, s, None, norm=norm)
    out += impl.backward(x, s, None, rstd, dy, norm=norm)
    out += impl.residual_forward(x, res, s, None, norm=res_norm)
    out += impl.residual_backward(res, s, None, rstd, dh, dh, norm=res_norm)
    return out
  return f


def _kernel_calls(hlo_text):
  return hlo_text.count('custom_call_target="tpu_custom_call"')


# (rows, hidden), x dtype, residual dtype, scale, config: ragged rows with
# odd hidden, a model width that is not a power of two (Gemma 3's 5376, 21
# lane tiles of 256), tiny rows, float16 with a float32 residual, no scale,
# a user block_rows, and the forced two-pass path (ragged lane chunks).
AOT_CASES = [
    pytest.param((1000, 2880), BF16, BF16, True, {}, id="1000x2880_bf16"),
    pytest.param((4096, 5376), BF16, BF16, True, {}, id="4096x5376_bf16"),
    pytest.param((1, 1), F16, F16, True, {}, id="1x1_f16"),
    pytest.param((3, 8), F32, F32, False, {}, id="3x8_f32_no_scale"),
    pytest.param((33, 129), F16, F32, True, dict(block_rows=16),
                 id="33x129_f16+f32_block16"),
    pytest.param((37, 100), F32, BF16, True, {}, id="37x100_f32+bf16"),
    pytest.param((40, 1000), BF16, BF16, True,
                 dict(hidden_block=256, block_rows=16), id="2pass_40x1000"),
]
GENS = [pytest.param(g, id=g.split(":")[0]) for g in tpu_aot.GENERATIONS]


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


# The quantized forward on wide rows, where the TPU compiler keeps copies
# of a row group beside the blocks (tk.QUANTIZED_GROUP_COPIES): these failed
# to compile on v5e, v5p, v6e and tpu7x (scoped VMEM exceeded by up to 12
# MiB) before the footprint counted them. v2-v4 decline rows this wide.
QUANT_WIDE_GENS = [pytest.param(g, id=g.split(":")[0]) for g in
                   ("v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1")]


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen", QUANT_WIDE_GENS)
@pytest.mark.parametrize("dtype,hidden", [(F32, 65536), (F16, 65536),
                                          (BF16, 32768)],
                         ids=["f32_65536", "f16_65536", "bf16_32768"])
def test_aot_compiles_the_quantized_forward_of_wide_rows(gen, dtype, hidden):
  mesh = tpu_aot.single_device_mesh(gen)
  sh = NamedSharding(mesh, P())
  rows = 2048
  x = jax.ShapeDtypeStruct((rows, hidden), dtype, sharding=sh)
  s = jax.ShapeDtypeStruct((hidden,), dtype, sharding=sh)
  impl = PallasTpu()

  def f(x, res, s):
    out = []
    for qdt, with_res, static in ((jnp.int8, False, False),
                                  (jnp.int8, True, False),
                                  (jnp.int8, False, True),
                                  (jnp.float8_e4m3fn, False, False)):
      norm = base.Norm(eps=EPS, quant_dtype=np.dtype(qdt))
      qs = jnp.float32(0.05) if static else None
      out += impl.quantized_forward(x, res if with_res else None, s, None,
                                    qs, norm=norm)
    return out

  compiled = tpu_aot.compile_fn(f, (x, x, s), mesh)
  # A kernel a variant; rows that take two passes (v5p: float32 with a
  # residual) run two, and XLA quantizes their y (cannot_serve declines
  # them, so "auto" runs XLA there).
  assert _kernel_calls(compiled.as_text()) >= 4


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen,two_pass_ops", [("v2:2x2", 3), ("v3:2x2", 3),
                                              ("v4:2x2x1", 3),
                                              ("v5e:2x2", 0)])
def test_aot_block_choice_follows_target_vmem(gen, two_pass_ops):
  # 64K-wide float32 rows: on v2, v3 and v4 (16 MiB VMEM per core) the
  # backward and both fused kernels take two passes; v5e (128 MiB) runs all
  # four in one. The chip is read from the mesh being compiled for, not from
  # the host.
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
                       dtypes=(BF16,), ops=("forward", "backward"),
                       features=False, log=lambda s: None)
  for r in rows:
    assert r.ok and r.block == "128", r
    assert r.min_bytes <= r.kernel_bytes <= 1.001 * r.min_bytes, r
    assert r.xla_bytes >= r.min_bytes, r
  text = tpu_aot.markdown(rows)
  assert "Compiled: pallas_tpu 2/2, xla 2/2." in text
  assert "| v5e:2x2 | 819 | 2/2 | 2/2 |" in text
  assert "| v5e:2x2 | 1024x4096 | bfloat16 | backward | yes | 128 |" in text


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


def _public_calls(x, res, scale, weight_dtype=None):
  """Every public entry point's default call, gradients included."""
  f32 = lambda a: a.astype(F32)
  kw = dict(weight_dtype=weight_dtype)
  grad = jax.grad(lambda x, s: f32(rj.rms_norm(x, s, **kw)).sum(),
                  argnums=(0, 1))
  fused_grad = jax.grad(
      lambda x, r, s: sum(f32(o).sum()
                          for o in rj.rms_norm_residual(x, r, s, **kw)),
      argnums=(0, 1, 2))
  return (rj.rms_norm(x, scale, **kw), grad(x, scale),
          fused_grad(x, res, scale),
          rj.rms_norm_quantized(x, scale, residual=res, **kw))


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("gen", GENS)
@pytest.mark.parametrize("x_dtype,scale_dtype,weight_dtype", [
    (BF16, BF16, None), (F16, F32, F16)], ids=["bf16", "f16+f32"])
def test_aot_compiles_the_public_calls_with_x64_and_strict_promotion(
    gen, x_dtype, scale_dtype, weight_dtype):
  # Users' settings: with jax_enable_x64 on, a literal block index in an
  # index map, or Python loop bounds, became int64 beside Mosaic's int32
  # grid indices, and no TPU kernel compiled ("func.return (i32, i64)");
  # float16's bit conversion selected between two Python ints, an int64
  # vector that stopped libtpu (a failed check in its layout code). 512
  # rows: the kernels loop over row groups. The float32 scale is rounded
  # to float16 as loaded (weight_dtype: that bit conversion, in XLA).
  mesh = tpu_aot.single_device_mesh(gen)
  sh = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((512, 4096), x_dtype, sharding=sh)
  scale = jax.ShapeDtypeStruct((4096,), scale_dtype, sharding=sh)
  with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"), \
      jax.numpy_rank_promotion("raise"):
    compiled = tpu_aot.compile_fn(
        functools.partial(_public_calls, weight_dtype=weight_dtype),
        (x, x, scale), mesh)
  # The forward (the gradient's is the same call), the backward, the fused
  # forward and backward, the quantized forward.
  assert _kernel_calls(compiled.as_text()) == 5


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


# ------------------------------------------- the tool itself (no libtpu) --

def _row(gen, op, compiled=True, declined="", error=""):
  return tpu_aot.Row(
      gen=gen, shape=(64, 768), dtype="bfloat16", op=op, compiled=compiled,
      declined=declined, block="64" if compiled else "-",
      kernel_bytes=200_000 if compiled else None, xla_compiled=True,
      xla_bytes=300_000, min_bytes=199_000, bandwidth=819e9,
      vmem_bytes=128 << 20, seconds=0.5, error=error)


def test_report_write_keeps_the_text_above_the_marker(tmp_path):
  path = tmp_path / "report.md"
  prose = "# Title\n\nHand-written method and CI notes.\n\n"
  path.write_text(prose + report.MARKER + "\n\nstale results\n")
  rows = [_row("v5e:2x2", "forward"),
          _row("v5e:2x2", "backward", compiled=False, error="VMEM exceeded"),
          _row("v5e:2x2", "residual_forward", compiled=False,
               declined="no bias")]
  report.write(str(path), rows)
  text = path.read_text()
  assert text.startswith(prose + report.MARKER)
  assert "stale results" not in text
  # The declined kernel is neither compiled nor failed; the failure is
  # listed with its error.
  assert "Compiled: pallas_tpu 1/2 (1 declined by the kernel), xla 3/3." in text
  assert "| v5e:2x2 | 819 | 1/2 | 3/3 | 1 | 128 |" in text
  assert "* v5e:2x2 64x768 bfloat16 backward: VMEM exceeded" in text
  assert "| backward | NO: VMEM exceeded | - |" in text
  assert "| residual_forward | declined: no bias | - |" in text
  assert [r.ok for r in rows] == [True, False, True]


def test_report_write_without_marker_starts_a_new_file(tmp_path):
  path = tmp_path / "sub" / "report.md"
  report.write(str(path), [_row("v2:2x2", "forward")])
  text = path.read_text()
  assert text.index(report.MARKER) < text.index("| v2:2x2 | 64x768 |")


def test_cli_help_gives_every_option_a_help_text_and_default():
  p = cli.parser()
  text = p.format_help()
  assert "`" not in text
  for action in p._actions:
    if action.dest == "help":
      continue
    assert action.help, action.dest
    assert "default" in action.help.lower(), action.dest
  for gen in tpu_aot.GENERATIONS:
    assert gen in text


@pytest.mark.parametrize("argv,where", [
    (["--ops", "forward,fwdx"], "--ops"),
    (["--gens", "v9:2x2"], "--gens"),
    (["--shapes", "1024"], "--shapes"),
    (["--dtypes", "floaty"], "--dtypes"),
    (["--jobs", "0"], "--jobs"),
])
def test_cli_rejects_bad_arguments_naming_the_option(argv, where, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv + ["--out", ""])
  assert e.value.code == 2
  assert where in capsys.readouterr().err


@pytest.mark.tpu_aot
@needs_libtpu
def test_sweep_in_two_processes_matches_one():
  kw = dict(gens=("v2:2x2", "v3:2x2"), shape_list=((64, 768),),
            dtypes=(BF16,), ops=("forward", "residual_backward"),
            features=False, xla=False,
            log=lambda s: None)
  key = lambda r: (r.gen, r.shape, r.dtype, r.op, r.compiled, r.block,
                   r.kernel_bytes, r.bandwidth)
  one = tpu_aot.sweep(jobs=1, **kw)
  two = tpu_aot.sweep(jobs=2, **kw)
  assert len(one) == 4 and all(r.compiled for r in one), one
  assert [key(r) for r in two] == [key(r) for r in one]


def test_hbm_bytes_counts_float8_as_one_byte_and_needs_an_entry():
  # A float8 result of (16, 128) in its (8, 128) tile: 2048 one-byte
  # elements written, a bf16 (16, 128) operand read: 4096 bytes.
  text = """HloModule m

ENTRY %main (p0: bf16[16,128]) -> f8e4m3fn[16,128] {
  %p0 = bf16[16,128]{1,0:T(16,128)(2,1)} parameter(0)
  ROOT %q = f8e4m3fn[16,128]{1,0:T(8,128)(4,1)} convert(%p0)
}
"""
  assert hlo.hbm_bytes(text) == 16 * 128 * 1 + 16 * 128 * 2
  with pytest.raises(ValueError, match="ENTRY"):
    hlo.hbm_bytes("HloModule m\n")


def test_quick_plan_keeps_every_program_on_every_generation():
  full = specs.plan(specs.GENERATIONS)
  quick = specs.plan(specs.GENERATIONS, quick=True)
  assert set(quick) < set(full)
  names = {v.name for v in specs.CORE + specs.FEATURES}
  for gen in specs.GENERATIONS:
    assert {p[3].name for p in quick if p[0] == gen} == names, gen
  short = {p[1] for p in quick if p[0] == "v2:2x2" and p[3] in specs.CORE}
  assert short == set(specs.QUICK_SHORT_SHAPES)
  # Per-head programs only where the rows are whole heads.
  assert all(p[1][0] % p[3].heads == 0 for p in full if p[3].heads)
