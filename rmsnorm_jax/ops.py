"""The ops every implementation provides: operands, results and their kinds.

One vocabulary for the whole package (api, dispatch, partition, kernels,
benchmark, TPU AOT tool): ``forward``, ``backward``, ``residual_forward``,
``residual_backward``, ``quantized_forward``. Each operand and result has a
kind that says how its shape follows x's ``(..., hidden)`` and how it is
sharded when x is:

- ``x``: ``(..., hidden)``, like x;
- ``row``: ``(...)``, one value per row (rstd);
- ``row1``: ``(..., 1)`` (the quantization scale);
- ``scale``: ``(hidden,)``, or ``(heads, hidden)`` for a per-head scale;
- ``feat``: ``(hidden,)`` (bias and its gradient);
- ``scalar``: ``()`` (a static quantization scale).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# op -> (operands, results), each a tuple of (name, kind). Optional operands
# are passed as None; an optional result exists when the operand it derives
# from (OPTIONAL_RESULTS) does.
SIGNATURES = {
    "forward": (
        (("x", "x"), ("scale", "scale"), ("bias", "feat")),
        (("y", "x"), ("rstd", "row"))),
    "backward": (
        (("x", "x"), ("scale", "scale"), ("bias", "feat"), ("rstd", "row"),
         ("dy", "x")),
        (("dx", "x"), ("dscale", "scale"), ("dbias", "feat"))),
    "residual_forward": (
        (("x", "x"), ("residual", "x"), ("scale", "scale"), ("bias", "feat")),
        (("y", "x"), ("h", "x"), ("rstd", "row"))),
    "residual_backward": (
        (("h", "x"), ("scale", "scale"), ("bias", "feat"), ("rstd", "row"),
         ("dy", "x"), ("dh", "x")),
        (("dh_total", "x"), ("dscale", "scale"), ("dbias", "feat"))),
    "quantized_forward": (
        (("x", "x"), ("residual", "x"), ("scale", "scale"), ("bias", "feat"),
         ("quant_scale", "scalar")),
        (("q", "x"), ("q_scale", "row1"), ("h", "x"))),
}
OPTIONAL_OPERANDS = ("scale", "bias", "residual", "quant_scale")
OPTIONAL_RESULTS = {"dscale": "scale", "dbias": "bias", "h": "residual"}
ROW_KINDS = ("x", "row", "row1")
FEATURE_KINDS = ("scale", "feat", "scalar")


def _names(op, present):
  operands = SIGNATURES[op][0]
  return {name for (name, _), p in zip(operands, present) if p}


def operand_kinds(op: str, present) -> tuple[str, ...]:
  """Kinds of the operands that are present, in order."""
  return tuple(k for (_, k), p in zip(SIGNATURES[op][0], present) if p)


def result_names(op: str, present) -> tuple[str, ...]:
  """Names of the results that exist for these operands, in order."""
  have = _names(op, present)
  out = []
  for name, _ in SIGNATURES[op][1]:
    dep = OPTIONAL_RESULTS.get(name)
    # residual_forward's h always exists; quantized_forward's only with a
    # residual.
    if dep is None or dep in have or (name == "h" and op != "quantized_forward"):
      out.append(name)
  return tuple(out)


def result_kinds(op: str, present) -> tuple[str, ...]:
  kinds = dict(SIGNATURES[op][1])
  return tuple(kinds[n] for n in result_names(op, present))


def has_feature_results(op: str, present) -> bool:
  """Whether the op returns per-feature sums (dscale, dbias)."""
  return any(k in FEATURE_KINDS for k in result_kinds(op, present))


def unflatten_results(op: str, present, outs):
  """The op's full result tuple, None where a result does not exist."""
  got = dict(zip(result_names(op, present), outs))
  return tuple(got.get(name) for name, _ in SIGNATURES[op][1])


def _stat_dtype(dtype):
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def result_dtypes(op: str, norm, operands: dict) -> dict:
  """Result name -> dtype, given the present operands by name (avals)."""
  x = operands.get("x", operands.get("h"))
  scale = operands.get("scale")
  pdt = norm.product_dtype(x.dtype, None if scale is None else scale.dtype)
  acc = _stat_dtype(pdt)
  if op == "forward":
    return {"y": norm.out_dtype, "rstd": _stat_dtype(x.dtype)}
  if op == "backward":
    return {"dx": x.dtype, "dscale": acc, "dbias": acc}
  if op == "residual_forward":
    h = operands["residual"].dtype
    return {"y": norm.out_dtype, "h": h, "rstd": _stat_dtype(h)}
  if op == "residual_backward":
    return {"dh_total": x.dtype, "dscale": acc, "dbias": acc}
  if op == "quantized_forward":
    res = operands.get("residual")
    return {"q": norm.quant_dtype, "q_scale": np.dtype(np.float32),
            "h": None if res is None else res.dtype}
  raise ValueError(f"unknown op {op!r}")


def result_avals(op: str, norm, present, avals):
  """Abstract results of ``op`` from the present operands' avals.

  Shapes follow the kinds (a result of kind ``scale`` has the scale
  operand's shape, ``row`` is x's without its last dim); each result varies
  over the mesh axes its operands vary over inside shard_map. Batch dims of
  a per-element vmap lead every operand, so the shapes carry them.
  """
  names = [n for (n, _), p in zip(SIGNATURES[op][0], present) if p]
  by_name = dict(zip(names, avals))
  x = by_name.get("x", by_name.get("h"))
  shapes = {"x": x.shape, "row": x.shape[:-1], "row1": x.shape[:-1] + (1,),
            "scale": getattr(by_name.get("scale"), "shape", None),
            "feat": getattr(by_name.get("bias"), "shape", None)}
  dtypes = result_dtypes(op, norm, by_name)
  src = max(avals, key=lambda a: len(varying_axes(a)))
  kinds = dict(SIGNATURES[op][1])
  return [src.update(shape=shapes[kinds[n]], dtype=dtypes[n], weak_type=False)
          for n in result_names(op, present)]


def varying_axes(aval) -> frozenset:
  """Manual mesh axes an aval varies over inside shard_map (else empty)."""
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())
