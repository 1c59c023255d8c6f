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
