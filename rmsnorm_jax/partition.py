"""What a platform's lowering runs: the implementation on row views, per shard.

``dispatch.py`` calls ``lowering_body`` for each platform when a program is
lowered, which is when its device count is known:

- one device (or inside ``shard_map``, where operands are already local):
  the implementation on the operands flattened to rows;
- several devices with Auto mesh axes: the same, wrapped in
  ``custom_partitioning``, whose rule reads the operands' shardings when the
  program is partitioned, so each device runs the implementation on its
  shard and XLA never gathers x for an opaque kernel. Leading dims sharded:
  the local rows, with dscale/dbias summed over those mesh axes; the hidden
  dim sharded: XLA's math with the per-row sums all-reduced (a split row
  needs its statistics before any output is written).

On TPU, ``custom_partitioning`` has no lowering in programs over several
devices (jax-ml/jax#38196), so there a kernel's multi-device Auto-axes
program runs XLA's math, which XLA partitions itself; Explicit axes are
handled at trace time by ``sharding.py`` (``shard_map``) and keep the kernel.
"""

from __future__ import annotations

import dataclasses
import string

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rmsnorm_jax import base
from rmsnorm_jax import ops


@dataclasses.dataclass(frozen=True)
class Local:
  """``impl``'s method for ``op`` on N-D operands, through 2-D row views.

  Attributes:
    impl: the implementation.
    op: the op (``ops.SIGNATURES``).
    norm: its static arguments.
    present: which optional operands are there.
    nvmap: leading batch dims every operand carries (vmap per element).
  """

  impl: base.Implementation
  op: str
  norm: base.Norm
  present: tuple
  nvmap: int = 0

  @base.with_own_promotion_rules
  def __call__(self, *arrays):
    fn = self._rows_call
    for _ in range(self.nvmap):
      fn = jax.vmap(fn)
    return tuple(fn(*arrays))

  def _rows_call(self, *arrays):
    kinds = ops.operand_kinds(self.op, self.present)
    x = arrays[0]
    lead, hidden = x.shape[:-1], x.shape[-1]
    flat = [a.reshape(-1, hidden) if k == "x" else
            a.reshape(-1) if k == "row" else
            a.reshape(-1, 1) if k == "row1" else a
            for a, k in zip(arrays, kinds)]
    it = iter(flat)
    operands = [next(it) if p else None for p in self.present]
    norm = self.norm
    if norm.weight_dtype is not None and not self.impl.folds_weight_cast:
      names = [n for n, _ in ops.SIGNATURES[self.op][0]]
      operands = [o.astype(norm.weight_dtype)
                  if o is not None and n in ("scale", "bias") else o
                  for o, n in zip(operands, names)]
      norm = dataclasses.replace(norm, weight_dtype=None)
    outs = getattr(self.impl, self.op)(*operands, norm=norm)
    names = ops.result_names(self.op, self.present)
    avals = ops.result_avals(self.op, self.norm, self.present,
                             [jax.typeof(a) for a in arrays])
    full = dict(zip([n for n, _ in ops.SIGNATURES[self.op][1]], outs))
    kinds_out = dict(ops.SIGNATURES[self.op][1])
    results = []
    for name, aval in zip(names, avals):
      o = full[name]
      k = kinds_out[name]
      if k == "x":
        o = o.reshape(*lead, hidden)
      elif k == "row":
        o = o.reshape(lead)
      elif k == "row1":
        o = o.reshape(*lead, 1)
      results.append(o.astype(aval.dtype))
    return tuple(results)


def _num_devices(ctx) -> int | None:
  """Devices the program spans; None inside shard_map (operands are local)."""
  ac = ctx.module_context.axis_context
  if hasattr(ac, "num_devices"):  # jit: ShardingContext
    return ac.num_devices
  if hasattr(ac, "mesh"):  # shard_map: SPMDAxisContext
    return None
  return 1


def lowering_body(ctx, platform, impl, op, norm, present, nvmap, *,
                  partitioned):
  """The function lowered for ``platform``: Local, or Local per shard."""
  local = Local(impl, op, norm, present, nvmap)
  n = _num_devices(ctx)
  x_aval = ctx.avals_in[0]
  if (n is None or n <= 1 or nvmap or not partitioned or x_aval.ndim < 2
      or type(impl) is base.Xla):
    # XLA partitions its own ops; a vmapped kernel (per-element batch
    # axis) is left to XLA's partitioner as well.
    return local
  if platform == "tpu":
    return Local(base.Xla(), op, norm, present, nvmap)
  kinds = ops.operand_kinds(op, present)
  per_head = "scale" in kinds and ctx.avals_in[kinds.index("scale")].ndim == 2
  return _partitioned(local, x_aval.ndim, per_head)


def specs_by_kind(spec, ndim: int, per_head: bool):
  """PartitionSpecs per operand kind given x's spec, plus the mesh axes.

  Returns ``(by_kind, sum_axes, hidden_axes)``: ``sum_axes`` are the mesh
  axes per-feature sums (dscale, dbias) are partial over.
  """
  spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  lead, hid = spec[:-1], spec[-1]
  by_kind = {"x": P(*lead, hid), "row": P(*lead), "row1": P(*lead, None),
             "scale": P(lead[-1], hid) if per_head else P(hid),
             "feat": P(hid), "scalar": P()}
  row_axes = tuple(a for e in lead for a in axes_of(e))
  head_axes = axes_of(lead[-1]) if per_head else ()
  return by_kind, row_axes, head_axes, axes_of(hid)


def axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def sum_partials(outs, result_kinds, row_axes, head_axes):
  """Per-feature results (dscale, dbias) summed over the row-sharding axes.

  A per-head dscale is not summed over the axes that split the heads: each
  device holds its own heads' rows of it.
  """
  summed = []
  for o, k in zip(outs, result_kinds):
    axes = tuple(a for a in row_axes if k == "feat" or a not in head_axes)
    if k in ("scale", "feat") and axes:
      o = jax.lax.psum(o, axes)
    summed.append(o)
  return tuple(summed)


def _per_shard(local: Local, row_axes, head_axes, hidden_axes):
  """One device's share: its rows (and hidden slice) of the op."""
  if hidden_axes:
    local = dataclasses.replace(local, impl=base.Xla(tuple(hidden_axes)))
  result_kinds = ops.result_kinds(local.op, local.present)
  return lambda *arrays: sum_partials(local(*arrays), result_kinds, row_axes,
                                      head_axes)


def _partitioned(local: Local, ndim: int, per_head: bool):
  kinds = ops.operand_kinds(local.op, local.present)
  result_kinds = ops.result_kinds(local.op, local.present)

  @custom_partitioning
  def fn(*arrays):
    return local(*arrays)

  def specs(mesh, x_sharding):
    spec = x_sharding.spec if isinstance(x_sharding, NamedSharding) else ()
    by_kind, row_axes, head_axes, hidden_axes = specs_by_kind(
        spec, ndim, per_head)
    return ({k: NamedSharding(mesh, v) for k, v in by_kind.items()},
            row_axes, head_axes, hidden_axes)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    by_kind = specs(mesh, arg_shapes[0].sharding)[0]
    return tuple(by_kind[k] for k in result_kinds)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    by_kind, row_axes, head_axes, hidden_axes = specs(
        mesh, arg_shapes[0].sharding)
    return (mesh, _per_shard(local, row_axes, head_axes, hidden_axes),
            tuple(by_kind[k] for k in result_kinds),
            tuple(by_kind[k] for k in kinds))

  letters = [c for c in string.ascii_lowercase if c not in "hoz"][:ndim - 1]
  factor = {"x": " ".join(letters + ["h"]), "row": " ".join(letters),
            "row1": " ".join(letters + ["o"]),
            "scale": (letters[-1] + " h") if per_head else "h",
            "feat": "h", "scalar": ""}
  rule = (", ".join(factor[k] for k in kinds) + " -> "
          + ", ".join(factor[k] for k in result_kinds))
  fn.def_partition(partition, infer_sharding_from_operands=infer,
                   sharding_rule=rule)
  return fn

