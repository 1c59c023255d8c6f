"""Backend selection happens when lowering, per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import dispatch
from rmsnorm_jax import kernels
from rmsnorm_jax import reference
from rmsnorm_jax.kernels.gpu import TRITON_CALL_TARGET

from gpu_test_util import needs_triton_target
from numerics_util import assert_close, random

# What each platform's kernel leaves in StableHLO.
KERNEL_MARKERS = {"tpu": "tpu_custom_call", "cuda": "triton"}


# Triton calls carry no serialization-compatibility guarantee; exporting them
# is the user's explicit choice.
UNSTABLE_OK = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]


def _exported_text(fn, platforms, *args):
  return jax.export.export(jax.jit(fn), platforms=platforms,
                           disabled_checks=UNSTABLE_OK)(*args).mlir_module()


def _route(backend, rows, hidden, dtype, **norm):
  call = base.Call("forward", rows, hidden, np.dtype(dtype), (hidden,), False,
                   base.Norm(eps=1e-6, out_dtype=np.dtype(dtype), **norm))
  return dispatch.route(backend, call), call


def _kernel_calls(fn, *args):
  """How many platform kernels the lowering for each kernel platform holds."""
  return sum(_exported_text(fn, [p], *args).count(KERNEL_MARKERS[p])
             for p in kernels.BY_PLATFORM if p in KERNEL_MARKERS)


@needs_triton_target
def test_export_once_for_three_platforms_carries_each_implementation():
  rng = np.random.default_rng(0)
  x = random(rng, (256, 1024), jnp.bfloat16)
  scale = random(rng, (1024,), jnp.float32)
  f = jax.jit(lambda x, s: rj.rms_norm(x, s))
  exp = jax.export.export(f, platforms=["cpu", "cuda", "tpu"],
                          disabled_checks=UNSTABLE_OK)(x, scale)
  assert exp.platforms == ("cpu", "cuda", "tpu")
  text = exp.mlir_module()
  for platform, marker in KERNEL_MARKERS.items():
    if platform in kernels.BY_PLATFORM:
      assert marker in text, f"no {platform} kernel in the exported module"
  # The exported artifact runs here (CPU branch: XLA) and is correct.
  y = exp.call(x, scale)
  assert_close(y, reference.rms_norm(x, scale)[0], 1e-2, "exported on cpu")


def test_cpu_lowering_keeps_only_the_cpu_branch():
  x = jnp.ones((64, 512), jnp.float32)
  hlo = jax.jit(lambda x: rj.rms_norm(x)).lower(x).as_text(dialect="hlo")
  assert "custom_call" not in hlo and "conditional" not in hlo


@pytest.mark.skipif(not kernels.BY_PLATFORM, reason="no kernel registered")
def test_auto_stages_kernels_and_force_backend_removes_them():
  x = jnp.ones((4096, 1024), jnp.bfloat16)
  assert _kernel_calls(lambda x: rj.rms_norm(x), x) >= 1
  with rj.force_backend("xla"):
    # A new function: jit caches traces, and the override is read at trace
    # time.
    assert _kernel_calls(lambda x: rj.rms_norm(x), x) == 0


def test_environment_variable_forces_auto(monkeypatch):
  x = jnp.ones((4096, 1024), jnp.bfloat16)
  monkeypatch.setenv(dispatch.ENV_VAR, "xla")
  route, _ = _route("auto", 4096, 1024, x.dtype)
  assert {type(i).__name__ for _, i in route.per_platform} == {"Xla"}
  assert _kernel_calls(lambda x: rj.rms_norm(x), x) == 0
  # An explicit argument still wins over the override.
  assert _route("xla", 1, 8, x.dtype)[0].requested == "xla"
  monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
  with pytest.raises(ValueError, match=r"RMSNORM_JAX_BACKEND.*got 'bogus'"):
    rj.rms_norm(x)


def test_force_backend_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"force_backend\(name\) must be one of"):
    with rj.force_backend("fast"):
      pass


def test_backend_names_list_every_kernel():
  names = rj.backend_names()
  assert names[:3] == ("auto", "xla", "pallas")
  for name in kernels.BY_NAME:
    assert name in names


@pytest.mark.parametrize("rows,hidden", [(1, 768), (1, 4096), (64, 4096),
                                         (8192, 4096), (32768, 128)])
def test_auto_follows_each_kernels_own_size_rule(rows, hidden):
  route, call = _route("auto", rows, hidden, jnp.bfloat16)
  plan = dict(route.per_platform)
  assert type(plan["cpu"]).__name__ == "Xla"
  for platform, classes in kernels.BY_PLATFORM.items():
    # The first kernel in order of preference that serves the call and does
    # not decline it; XLA when none is left.
    willing = [c for c in classes if c().cannot_serve(call) is None
               and c().auto_declines(call) is None]
    want = willing[0] if willing else base.Xla
    assert type(plan[platform]) is want, (platform, plan[platform])
    # The reason "auto" passed each kernel before it over is reported.
    for cls in classes[:classes.index(want) if willing else len(classes)]:
      reason = cls().cannot_serve(call) or cls().auto_declines(call)
      assert reason in route.describe(platform)
  # float64 never goes to a kernel, and each kernel says why.
  route64, _ = _route("auto", rows, hidden, jnp.float64)
  assert all(type(i).__name__ == "Xla" for _, i in route64.per_platform)
  for platform, classes in kernels.BY_PLATFORM.items():
    for cls in classes:
      assert f"{cls.name}: " in route64.describe(platform)
    assert "float64" in route64.describe(platform)


@needs_triton_target
def test_auto_takes_the_second_kernel_where_the_first_declines():
  # cuda: Mosaic GPU first, which declines the forward (Triton measured
  # faster) and takes the backward of 4096-wide rows (measured faster).
  fwd, _ = _route("auto", 8192, 4096, jnp.bfloat16)
  assert fwd.impl("cuda").name == "pallas_gpu"
  assert "mosaic_gpu: forward" in fwd.describe("cuda")
  bwd = dispatch.route("auto", base.Call(
      "backward", 8192, 4096, np.dtype(jnp.bfloat16), (4096,), False,
      base.Norm(eps=1e-6, out_dtype=np.dtype(jnp.bfloat16))))
  assert bwd.impl("cuda").name == "mosaic_gpu"
  # "pallas" ignores XLA's speed but keeps the kernels' order of preference.
  assert _route("pallas", 8192, 4096, jnp.bfloat16)[0].impl(
      "cuda").name == "pallas_gpu"
  # A feature Mosaic GPU does not serve goes to Triton, with the reason.
  llama, _ = _route("auto", 8192, 4096, jnp.bfloat16, cast_mode="llama")
  assert llama.impl("cuda").name == "pallas_gpu"
  assert "mosaic_gpu: " in llama.describe("cuda")


def test_triton_kernels_step_aside_where_jax_names_no_gpu(monkeypatch):
  # From jax 0.11 the Triton lowering raises where it can name no GPU model
  # (lowering for cuda on a host without one, or a GPU jax does not list).
  # The kernels then cannot serve: "auto" lowers XLA's math for cuda with
  # the reason, and naming them raises it when traced; interpret mode,
  # which compiles nothing for a GPU, still serves.
  from rmsnorm_jax.kernels import gpu  # pylint: disable=g-import-not-at-top

  def no_gpu():
    raise ValueError("Unsupported GPU device kind: cpu")

  monkeypatch.setattr(gpu, "_GET_GPU_INFO", no_gpu)
  reason = gpu.triton_target_reason()
  assert "Unsupported GPU device kind: cpu" in reason
  assert "lower on a machine with such a GPU" in reason
  fwd, call = _route("auto", 8192, 4096, jnp.bfloat16)
  assert fwd.impl("cuda").name == "xla"
  assert f"pallas_gpu: {reason}" in fwd.describe("cuda")
  assert _route("pallas", 8192, 4096, jnp.bfloat16)[0].impl(
      "cuda").name == "mosaic_gpu"
  with pytest.raises(ValueError, match="backend='pallas_gpu' cannot serve "
                     "this call: jax .* lowers Pallas Triton kernels only"):
    dispatch.route("pallas_gpu", call)
  assert gpu.PallasGpu(interpret=True).cannot_serve(call) is None
  monkeypatch.setattr(gpu, "_GET_GPU_INFO", lambda: None)
  assert gpu.triton_target_reason() is None
  assert _route("auto", 8192, 4096, jnp.bfloat16)[0].impl(
      "cuda").name == "pallas_gpu"


def test_implementation_instances_are_accepted_as_backend():
  impl = dispatch.base.Xla()
  x = jnp.ones((3, 16))
  assert_close(rj.rms_norm(x, backend=impl), rj.rms_norm(x), 0.0, "instance")


@needs_triton_target
def test_weight_dtype_is_judged_as_each_kernel_receives_it():
  # The Triton kernel folds weight_dtype (it reads the float32 scale); the
  # Mosaic GPU kernels get the scale cast to it (partition.Local), so
  # "auto" weighs them as it would a call with bfloat16 parameters.
  bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)

  def call(op, scale_dtype, weight_dtype, bias=True):
    norm = base.Norm(eps=1e-6, out_dtype=bf16, weight_dtype=weight_dtype)
    return base.Call(op, 8192, 4096, bf16, (4096,), bias, norm,
                     scale_dtype, scale_dtype if bias else None)

  folded = call("backward", f32, bf16)
  mosaic, triton = kernels.BY_NAME["mosaic_gpu"](), kernels.BY_NAME[
      "pallas_gpu"]()
  assert folded.seen_by(triton) is folded
  seen = folded.seen_by(mosaic)
  assert (seen.scale_dtype, seen.bias_dtype, seen.norm.weight_dtype) == (
      bf16, bf16, None)
  for op in ("forward", "backward", "residual_forward", "residual_backward"):
    for bias in (True, False):
      want = dispatch.route("auto", call(op, bf16, None, bias))
      got = dispatch.route("auto", call(op, f32, bf16, bias))
      assert got.describe("cuda") == want.describe("cuda"), (op, bias)
  # Without a bias a float32 scale routes apart (the Mosaic kernels were
  # not timed with it), so the loop above compares real choices.
  assert dispatch.route("auto", call("backward", f32, None, False)).describe(
      "cuda") != dispatch.route("auto", call("backward", f32, bf16, False)
                                ).describe("cuda")
