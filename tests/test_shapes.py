"""The shape specs: validation, the derived selections, min_bytes."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rmsnorm_jax import shapes


def test_spec_names_are_unique_and_shapes_match_rows():
  names = [s.name for s in shapes.SPECS]
  assert len(names) == len(set(names))
  for s in shapes.SPECS:
    assert math.prod(s.shape[:-1]) == s.rows and s.shape[-1] == s.hidden
    if s.dtype is not None:
      assert s.name == f"{s.rows}x{s.hidden}:{s.dtype}"
      assert shapes.by_name(s.name) is s


def test_selections_are_the_tagged_specs_in_their_old_formats():
  assert shapes.BENCHMARK == tuple(
      ((s.rows, s.hidden), jnp.dtype(s.dtype)) for s in shapes.SPECS
      if "bench" in s.tags)
  # The issue 12 shapes: wide rows and 2048x8192 float16 are benchmarked.
  bench = {(r, h, np.dtype(d).name) for (r, h), d in shapes.BENCHMARK}
  assert {(4096, 16384, "bfloat16"), (2048, 32768, "bfloat16"),
          (1024, 65536, "bfloat16"), (2048, 8192, "float16"),
          (8192, 4096, "bfloat16"), (1024, 4096, "float32")} <= bench
  assert all(h >= 16384 for (_, h), _ in
             (s.case for s in shapes.select("bench", "wide")))
  assert (2, 3, 256) in shapes.CORRECTNESS
  assert shapes.WIDE == ((3, 65536),)
  assert not set(shapes.WIDE) & set(shapes.CORRECTNESS)
  assert all(len(s) == 2 for s in shapes.TPU_AOT)


def test_bad_specs_and_tags_raise_naming_the_problem():
  with pytest.raises(ValueError, match="leading"):
    shapes.Spec("x", 6, 8, None, frozenset(), leading=(2, 2))
  with pytest.raises(ValueError, match="unknown tags"):
    shapes.Spec("x", 1, 8, None, frozenset({"fast"}))
  with pytest.raises(ValueError, match="dtype"):
    shapes.Spec("x", 1, 8, "int8", frozenset())
  with pytest.raises(ValueError, match="unknown tags"):
    shapes.select("fast")
  with pytest.raises(KeyError, match="no shape spec"):
    shapes.by_name("nope")
  with pytest.raises(ValueError, match="no dtype"):
    _ = shapes.select("correctness")[0].case


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_min_bytes_counts_arrays_rstd_scale_and_its_gradient(dtype):
  rows, hidden = 10, 128
  s = np.dtype(jnp.dtype(dtype)).itemsize
  n = rows * hidden * s
  assert shapes.min_bytes("fwd", rows, hidden, dtype) == (
      2 * n + 4 * rows + hidden * s)
  assert shapes.min_bytes("bwd", rows, hidden, dtype) == (
      3 * n + 4 * rows + 2 * hidden * s)
  for alias, op in (("res_fwd", "fused_fwd"), ("res_bwd", "fused_bwd")):
    assert shapes.min_bytes(alias, rows, hidden, dtype) == shapes.min_bytes(
        op, rows, hidden, dtype)
  assert shapes.min_bytes("fused_bwd", rows, hidden, dtype) == (
      4 * n + 4 * rows + 2 * hidden * s)
  with pytest.raises(ValueError, match="op must be one of"):
    shapes.min_bytes("forward", rows, hidden, dtype)


def _nbytes(*arrays):
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)


def _feature_arrays(op, rows, hidden, dtype):
  """(arrays read, arrays written) of a feature op, from the public API's
  own output shapes (jax.eval_shape) and the rstd the forward saves (one
  float32 per normalized row, see rmsnorm_jax.api)."""
  import jax

  import rmsnorm_jax as rj

  def sds(shape, dt=dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
  head = op.startswith("head_")
  xs = sds(shapes.heads_shape(rows, hidden) if head else (rows, hidden))
  s = sds(xs.shape[1:] if head else (hidden,))
  b = sds((hidden,))
  rstd = sds(xs.shape[:-1], jnp.float32)
  if op.startswith("quant_"):
    qdt = jnp.float8_e4m3fn if op == "quant_fp8_fwd" else jnp.int8
    if op == "quant_fused_fwd":
      outs = jax.eval_shape(lambda x, r, s: rj.rms_norm_quantized(
          x, s, quant_dtype=qdt, residual=r), xs, xs, s)
      return (xs, xs, s), outs
    return (xs, s), jax.eval_shape(
        lambda x, s: rj.rms_norm_quantized(x, s, quant_dtype=qdt), xs, s)
  args = (xs, s, b) if op.startswith("bias_") else (xs, s)
  f = lambda *a: rj.rms_norm(*a)  # noqa: E731
  if op.endswith("_fwd"):
    return args, (jax.eval_shape(f, *args), rstd)
  # Backward: the saved input, scale and rstd and dy read; the gradients of
  # every argument written (bias's not needed to compute them).
  grads = jax.eval_shape(lambda dy, *a: jax.vjp(f, *a)[1](dy), xs, *args)
  return (xs, s, rstd, xs), grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("op", shapes.FEATURE_OPS)
def test_feature_min_bytes_are_the_arrays_each_op_reads_and_writes(op, dtype):
  rows, hidden = 6, 2 * shapes.HEAD_DIM
  reads, writes = _feature_arrays(op, rows, hidden, dtype)
  assert shapes.min_bytes(op, rows, hidden, dtype) == (
      _nbytes(*reads) + _nbytes(*writes))


def test_heads_shape_splits_hidden_into_heads_of_head_dim():
  assert shapes.heads_shape(8192, 4096) == (8192, 32, 128)
  assert shapes.heads_shape(16384, 2048) == (16384, 16, 128)
  for hidden in (100, 64, 200):
    with pytest.raises(ValueError, match="multiple of HEAD_DIM"):
      shapes.heads_shape(8, hidden)
  with pytest.raises(ValueError, match="hidden"):
    shapes.min_bytes("head_fwd", 8, 100, "float32")


def test_feature_specs_are_8mb_or_more_and_split_into_heads():
  picked = shapes.select("bench_features")
  assert picked and all(s.dtype for s in picked)
  for s in picked:
    assert s.rows * s.hidden * np.dtype(jnp.dtype(s.dtype)).itemsize >= 8e6, s
    assert s.hidden % shapes.HEAD_DIM == 0, s
  per_head = {shapes.heads_shape(s.rows, s.hidden) + (s.dtype,)
              for s in picked}
  # The QK-norm cases of the issue: 8192x32x128 and 16384x16x128 bfloat16.
  assert {(8192, 32, 128, "bfloat16"), (16384, 16, 128, "bfloat16")} <= (
      per_head)
  # The default benchmark set gains no shape from the feature tag.
  only_features = {s.case for s in picked if "bench" not in s.tags}
  assert only_features and not only_features & set(shapes.BENCHMARK)
