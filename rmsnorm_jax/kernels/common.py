"""Helpers shared by the kernel modules: what they serve, pallas_call types
inside shard_map, the sums of their backward's partials.

Inside ``shard_map`` with checked types (``check_vma=True``, the default) every
value carries the set of manual mesh axes it varies over. A pallas_call must
state that set for its outputs, and interpret mode requires its inputs to
agree. Outside shard_map the set is empty and these helpers change nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import ops


def _varying(a) -> frozenset:
  return ops.varying_axes(jax.typeof(a))


def match_varying(inputs):
  """``inputs`` with each one cast to vary over the union of their axes.

  A scale replicated across a data axis meets rows that vary over it; the
  kernel treats both alike, and its outputs vary over the union. Casting is
  free at run time.
  """
  inputs = list(inputs)
  union = frozenset().union(*(_varying(a) for a in inputs))
  out = []
  for a in inputs:
    missing = tuple(sorted(union - _varying(a)))
    out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
  return out


def vary_like(out_shapes, inputs):
  """ShapeDtypeStructs (a pytree) typed to vary as ``inputs`` together do."""
  typed = match_varying(inputs)[0]  # traced only for its type; XLA drops it
  mat = getattr(jax.typeof(typed), "manual_axis_type", None)

  def one(s):
    if mat is None or not mat.varying:
      return jax.ShapeDtypeStruct(s.shape, s.dtype)
    return jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat)

  return jax.tree.map(one, out_shapes)


def leading_sums(partials, param_dtype=None):
  """Float32 sums over axis 0 of partials of one shape.

  The backwards write dscale's and dbias' per-program partials of a
  ``(hidden,)`` scale and bias side by side. One variadic XLA reduction
  sums them all in one op, where a ``jnp.sum`` each takes an op apiece
  (on an H200 a kernel launch of about 2 us each). On GPU, where the sums
  are cast to a 16-bit parameter's dtype next, each gets its own
  ``jnp.sum``: XLA's GPU backend fuses the cast into a reduction of one
  result but not into a variadic one, whose cast kernels made it slower
  (H200, 8192x4096 bf16 partials: 4.4 us against 3.7). The TPU compiler
  fuses both casts into the variadic reduction (one op for either
  parameter dtype, every generation; libtpu 0.0.42), so the TPU kernels
  pass no ``param_dtype``. Each sum's order is fixed by XLA's emitter for
  the shape: deterministic.

  Args:
    partials: float32 arrays of one shape ``(n, ...)``.
    param_dtype: the dtype the sums are cast to next (the scale's), where
      a cast keeps the sums apart (GPU); None for one reduction regardless.

  Returns:
    A tuple of float32 arrays of shape ``(...)``, one per partial.

  Raises:
    ValueError: if the partials' shapes differ.
  """
  shapes = {p.shape for p in partials}
  if len(shapes) != 1:
    raise ValueError(f"partials must share one shape; got {sorted(shapes)}.")
  if len(partials) == 1 or (param_dtype is not None and np.dtype(
      param_dtype) != np.dtype(np.float32)):
    return tuple(jnp.sum(p, axis=0) for p in partials)
  zero = jnp.zeros((), jnp.float32)
  return tuple(jax.lax.reduce(
      tuple(partials), (zero,) * len(partials),
      lambda a, b: tuple(u + v for u, v in zip(a, b)), (0,)))


def head_sums(partials, heads: int):
  """Float32 sums of row partials by head, in one reduction.

  A backward kernel with a per-head scale writes, per program, partials of
  a tile of the scale's rows: row ``i`` of a tile belongs to head ``i %
  heads``, and a tile's rows are a multiple of ``heads``. Flattened, row
  ``j`` of all partials then belongs to head ``j % heads``, so one
  reduction sums over the programs and a tile's copies of each head
  together (the TPU kernels had taken two, each writing its result).

  Args:
    partials: float32, shape ``(..., rows, hidden)`` with ``rows`` a
      multiple of ``heads``.
    heads: the head count, or 0 to sum every row (a ``(hidden,)`` result).

  Returns:
    float32 ``(heads, hidden)``, or ``(hidden,)`` for ``heads`` 0; the sum
    order is fixed by XLA's emitter for the shape: deterministic.

  Raises:
    ValueError: rows not a multiple of ``heads``.
  """
  if heads and partials.shape[-2] % heads:
    raise ValueError(f"partials must have a multiple of heads={heads} rows; "
                     f"got shape {partials.shape}.")
  hidden = partials.shape[-1]
  sums = jnp.sum(partials.reshape(-1, heads or 1, hidden), axis=0)
  return sums if heads else sums[0]


FEATURES = ("bias", "llama", "per_head", "quantized")


def f32_if_wide(a):
  """A float64 array (x64 mode) as float32, which the kernels compute in
  anyway; None and other arrays as they are."""
  if a is not None and np.dtype(a.dtype) == np.dtype(np.float64):
    return a.astype(jnp.float32)
  return a


def not_implemented(name: str, call, dtypes,
                    implemented=frozenset()) -> str | None:
  """Why kernel ``name`` cannot serve ``call`` (a base.Call), or None.

  ``implemented``: the names in ``FEATURES`` the kernel already serves; a
  call needing any other one is declined with its name.
  """
  unknown = set(implemented) - set(FEATURES)
  if unknown:
    raise ValueError(f"implemented must name features among {FEATURES}; got "
                     f"{sorted(unknown)}.")
  if np.dtype(call.dtype) not in dtypes:
    return (f"{name} supports {', '.join(np.dtype(d).name for d in dtypes)}, "
            f"not {np.dtype(call.dtype).name}")
  if call.norm.cast_mode != "float32" and "llama" not in implemented:
    return f"{name} implements cast_mode='float32' only"
  if np.dtype(call.product_dtype) == np.dtype(np.float64):
    # The kernels multiply in float32 at most; the llama order with a
    # float64 scale (x64 mode) asks for float64 products.
    return (f"{name} computes in float32; cast_mode='llama' with a float64 "
            "scale needs float64 products")
  if call.has_bias and "bias" not in implemented:
    return f"{name} does not add a bias"
  if len(call.scale_shape) == 2 and "per_head" not in implemented:
    return f"{name} does not take a per-head scale"
  if call.op == "quantized_forward" and "quantized" not in implemented:
    return f"{name} has no quantized forward"
  if not call.static_rows:
    return (f"{name} needs a static row count; got the symbolic dimension "
            f"{call.rows}")
  return None
