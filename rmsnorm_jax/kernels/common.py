"""Helpers shared by the kernel modules: pallas_call types inside shard_map.

Inside ``shard_map`` with checked types (``check_vma=True``, the default) every
value carries the set of manual mesh axes it varies over. A pallas_call must
state that set for its outputs, and interpret mode requires its inputs to
agree. Outside shard_map the set is empty and these helpers change nothing.
"""

from __future__ import annotations

import jax


def _varying(a) -> frozenset:
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())


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
