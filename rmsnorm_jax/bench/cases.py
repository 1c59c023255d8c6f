"""What the benchmark times: ops, implementations, inputs, jitted candidates."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import shapes
from rmsnorm_jax.kernels.gpu import PallasGpu
# The one count of an op's least traffic, shared with the TPU report.
from rmsnorm_jax.shapes import FEATURE_OPS, heads_shape, min_bytes

# The default set (a run without --ops): the plain norm, the fused residual
# forms and the layers.
DEFAULT_OPS = ("fwd", "bwd", "fused_fwd", "fused_bwd", "linen_fwd",
               "linen_fwd_mixed", "linen_fwd_default", "linen_bwd",
               "linen_bwd_mixed", "linen_bwd_default")
# Every op; the feature ops (bias, per-head scale, quantized output) are
# timed when asked for, on shapes of their own (tag "bench_features").
OPS = DEFAULT_OPS + FEATURE_OPS
# The quantized ops' output dtype: int8 (every backend), float8_e4m3fn (the
# GPU's fp8 matrix input).
QUANT_OPS = {"quant_fwd": jnp.int8, "quant_fp8_fwd": jnp.float8_e4m3fn,
             "quant_fused_fwd": jnp.int8}
# x of shape shapes.heads_shape(rows, hidden), scale (heads, HEAD_DIM).
HEAD_OPS = ("head_fwd", "head_bwd")
# The implementations with the feature ops: flax's layer has no bias, and
# neither it nor JAX's Pallas example has a per-head scale or a quantized
# output.
FEATURE_IMPLS = ("xla", "rmsnorm_jax", "rmsnorm_jax_auto",
                 "rmsnorm_jax_mosaic")
LINEN_BWD_OPS = ("linen_bwd", "linen_bwd_mixed", "linen_bwd_default")
LINEN_OPS = ("linen_fwd", "linen_fwd_mixed", "linen_fwd_default"
             ) + LINEN_BWD_OPS
# Layer ops: (param dtype, layer dtype); the input is bfloat16 throughout.
LAYER_DTYPES = {"linen_fwd": (jnp.bfloat16, jnp.bfloat16),
                "linen_fwd_mixed": (jnp.float32, jnp.bfloat16),
                "linen_fwd_default": (jnp.float32, None),
                "linen_bwd": (jnp.bfloat16, jnp.bfloat16),
                "linen_bwd_mixed": (jnp.float32, jnp.bfloat16),
                "linen_bwd_default": (jnp.float32, None)}
IMPLS = ("roofline", "xla", "flax_linen", "jax_pallas_example",
         "rmsnorm_jax", "rmsnorm_jax_auto", "rmsnorm_jax_mosaic",
         "rmsnorm_jax_linen", "flax_nnx", "rmsnorm_jax_nnx")
# The layer implementations: (module holding RMSNorm, which flax API).
LAYERS = {"flax_linen": ("flax.linen", "linen"),
          "rmsnorm_jax_linen": ("rmsnorm_jax.linen", "linen"),
          "flax_nnx": ("flax.nnx", "nnx"),
          "rmsnorm_jax_nnx": ("rmsnorm_jax.nnx", "nnx")}
SMALL = tuple(s.case for s in shapes.select("smoke"))
EPS = 1e-6
# Input sets rotated per call: enough that their bytes exceed L2 (50 MB on
# H100, 60 MB on H200) about three times over, at least 2 and at most 16.
ROTATE_BYTES = 150 * 2**20
MAX_SETS = 16


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() == "gpu"


def roofline_bytes(op: str, rows: int, hidden: int, dtype) -> int:
  """Bytes the elementwise roofline op moves (the op's bytes less vectors).

  Raises:
    KeyError: ``op`` not in :data:`OPS`.
  """
  n, s = rows * hidden, np.dtype(dtype).itemsize
  q = n * shapes.QUANT_ITEMSIZE
  return {"fwd": 2 * n * s, "bwd": 3 * n * s, "fused_fwd": 4 * n * s,
          "fused_bwd": 4 * n * s, "linen_fwd": 4 * n,
          "linen_fwd_mixed": 4 * n, "linen_fwd_default": 6 * n,
          "linen_bwd": 6 * n, "linen_bwd_mixed": 6 * n,
          "linen_bwd_default": 8 * n, "quant_fwd": n * s + q,
          "quant_fp8_fwd": n * s + q, "quant_fused_fwd": 3 * n * s + q,
          "bias_fwd": 2 * n * s, "bias_bwd": 3 * n * s,
          "head_fwd": 2 * n * s, "head_bwd": 3 * n * s}[op]


def n_sets(op: str, rows: int, hidden: int, dtype) -> int:
  """Input sets to rotate over so that together they exceed L2."""
  per_set = max(1, min_bytes(op, rows, hidden, dtype))
  return int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / per_set))))


def op_dtype(op: str, dtype):
  """The activations' dtype of ``op`` on a case of ``dtype``: the layer
  ops always run in bfloat16."""
  return jnp.dtype(jnp.bfloat16 if op in LINEN_OPS else dtype)


# ------------------------------------------------------------ candidates --

@dataclasses.dataclass
class Candidate:
  """One (op, impl) on one shape: a jitted fn and its rotated argument sets.

  ``backend`` names what runs (e.g. ``"pallas_gpu (interpret)"``);
  ``inputs`` holds the random arrays of each set by name (x, s and as the
  op needs r, b, dy, dh), from which its arguments were made.
  """

  op: str
  impl: str
  fn: Callable
  arg_sets: list
  backend: str
  inputs: list = dataclasses.field(default_factory=list)


def _flax_norm(x, scale):
  import flax.linen as nn
  layer = nn.RMSNorm(epsilon=EPS, dtype=x.dtype, param_dtype=scale.dtype)
  return layer.apply({"params": {"scale": scale}}, x)


def _pallas_example(x, scale):
  from jax.experimental.pallas.ops.gpu import rms_norm as example
  # It normalizes (batch, seq, hidden) and always adds a bias.
  y = example.rms_norm(x[None], scale, jnp.zeros_like(scale), eps=EPS)
  return y[0]


def kernel_backend():
  """(Implementation, label) of this library's GPU kernel: compiled on a
  GPU, in Pallas interpret mode elsewhere (and labelled so)."""
  if on_gpu():
    return PallasGpu(), "pallas_gpu"
  return PallasGpu(interpret=True), "pallas_gpu (interpret)"


def mosaic_backend():
  """The Mosaic GPU kernels (``MosaicGpu``) where they run, a Hopper GPU;
  None elsewhere (they have no interpret mode)."""
  from rmsnorm_jax.kernels import mosaic_gpu
  cc = mosaic_gpu.visible_compute_capability() if on_gpu() else None
  return mosaic_gpu.MosaicGpu() if cc and cc.startswith("9") else None


def _norm_fn(impl: str):
  """(x, scale) -> y for each impl; None where the impl does not apply."""
  kernel, kname = kernel_backend()
  table = {
      "xla": (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend="xla"), "xla"),
      "rmsnorm_jax": (lambda x, s: rj.rms_norm(x, s, eps=EPS,
                                               backend=kernel), kname),
      "rmsnorm_jax_auto": (lambda x, s: rj.rms_norm(x, s, eps=EPS), "auto"),
      "flax_linen": (_flax_norm, "flax"),
  }
  if on_gpu():
    table["jax_pallas_example"] = (_pallas_example, "pallas_example")
  if impl == "rmsnorm_jax_mosaic" and (mosaic := mosaic_backend()):
    table[impl] = (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend=mosaic),
                   mosaic.name)
  return table.get(impl)


def _custom(impl):
  """An ``(label, Implementation)`` pair passed as impl, else None."""
  return impl if isinstance(impl, tuple) else None


def _residual_fn(impl):
  kernel, kname = kernel_backend()
  if (custom := _custom(impl)) is not None:
    return (lambda x, r, s: rj.rms_norm_residual(
        x, r, s, eps=EPS, backend=custom[1]), custom[1].name)
  table = {
      "xla": (lambda x, r, s: rj.rms_norm_residual(x, r, s, eps=EPS,
                                                   backend="xla"), "xla"),
      "rmsnorm_jax": (lambda x, r, s: rj.rms_norm_residual(
          x, r, s, eps=EPS, backend=kernel), kname),
      "rmsnorm_jax_auto": (lambda x, r, s: rj.rms_norm_residual(
          x, r, s, eps=EPS), "auto"),
      # flax has no fused variant: the add, then its layer.
      "flax_linen": (lambda x, r, s: (_flax_norm((x + r).astype(r.dtype), s),
                                      (x + r).astype(r.dtype)), "flax"),
  }
  if impl == "rmsnorm_jax_mosaic" and (mosaic := mosaic_backend()):
    table[impl] = (lambda x, r, s: rj.rms_norm_residual(
        x, r, s, eps=EPS, backend=mosaic), mosaic.name)
  return table.get(impl)


def _plain_fn(impl):
  if (custom := _custom(impl)) is not None:
    return (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend=custom[1]),
            custom[1].name)
  return _norm_fn(impl)


def _with_h(h):
  return h * 2, h


def _with_q(h):
  return (h * 2).astype(jnp.int8), h


# Elementwise XLA ops reading and writing exactly the roofline bytes, and the
# input names they take.
_ROOFLINE = {
    "fwd": (lambda x, s: x * 2, ("x", "s")),
    "bwd": (lambda x, s, dy: x + dy, ("x", "s", "dy")),
    # h and a value computed from it: XLA emits one loop fusion with both
    # outputs (two independent outputs became two kernels each reading x
    # and r, and a stacked output a slow concatenate fusion).
    "fused_fwd": (lambda x, r, s: _with_h(x + r), ("x", "r", "s")),
    "fused_bwd": (lambda h, dy, dh: h + dy + dh, ("x", "dy", "dh")),
    "linen_fwd": (lambda x, s: x * 2, ("x", "s")),
    "linen_fwd_mixed": (lambda x, s: x * 2, ("x", "s")),
    "linen_fwd_default": (lambda x, s: x.astype(jnp.float32) * 2, ("x", "s")),
    "linen_bwd": (lambda x, s, dy: x + dy, ("x", "s", "dy")),
    "linen_bwd_mixed": (lambda x, s, dy: x + dy, ("x", "s", "dy")),
    # A float32 dy in, a bfloat16 dx out.
    "linen_bwd_default": (lambda x, s, dy: (x.astype(jnp.float32) + dy)
                          .astype(x.dtype), ("x", "s", "dy")),
    "quant_fwd": (lambda x, s: (x * 2).astype(jnp.int8), ("x", "s")),
    "quant_fp8_fwd": (lambda x, s: (x * 2).astype(jnp.float8_e4m3fn),
                      ("x", "s")),
    "quant_fused_fwd": (lambda x, r, s: _with_q(x + r), ("x", "r", "s")),
    "bias_fwd": (lambda x, s: x * 2, ("x", "s")),
    "bias_bwd": (lambda x, s, dy: x + dy, ("x", "s", "dy")),
    "head_fwd": (lambda x, s: x * 2, ("x", "s")),
    "head_bwd": (lambda x, s, dy: x + dy, ("x", "s", "dy")),
}


def _named_jit(fn, name):
  # A unique function name becomes the XLA module name ("jit_<name>"), which
  # is how device events are attributed to candidates in the trace.
  def wrapped(*a):
    return fn(*a)
  wrapped.__name__ = wrapped.__qualname__ = name
  return jax.jit(wrapped)


def _vjp_runner(f, primals, cot):
  """Backward only: the vjp closure (holding f's own saved residuals) and
  the cotangent are arguments, so the timed call is the backward pass."""
  _, vjp_fn = jax.vjp(jax.jit(f), *primals)
  jax.block_until_ready(vjp_fn)
  return vjp_fn, cot


def _call_vjp(vjp_fn, cot):
  return vjp_fn(cot)


def _call_vjp_residual(vjp_fn, cot):
  # The gradients of x and residual are the same array (h = x + residual);
  # returning both from one jit forces XLA to copy it into a second buffer,
  # which a training step (consuming both inside one program) would not do.
  # So the residual's and the scale's gradients are returned.
  _, d_res, d_scale = vjp_fn(cot)
  return d_res, d_scale


def make_inputs(key, op, rows, hidden, dtype) -> dict:
  """Random inputs of ``op`` (never zeros): x, s and as the op needs r, b,
  dy, dh, drawn on the device (host-side generation of the large sets took
  longer than timing them). The head ops' x and dy are
  ``shapes.heads_shape(rows, hidden)``, their s ``(heads, HEAD_DIM)``.

  Raises:
    ValueError: a head op whose hidden is not a multiple of HEAD_DIM.
  """
  keys = iter(jax.random.split(key, 6))

  def rand(shape, dt, mean=0.0, scale=1.0):
    v = jax.random.normal(next(keys), shape, jnp.float32) * scale + mean
    return v.astype(dt)
  if op in FEATURE_OPS:
    shape = heads_shape(rows, hidden) if op in HEAD_OPS else (rows, hidden)
    d = dict(x=rand(shape, dtype, 0.3),
             s=rand(shape[1:] if op in HEAD_OPS else (hidden,), dtype, 1.0,
                    0.5))
    if op.startswith("bias_"):
      d["b"] = rand((hidden,), dtype, 0.0, 0.5)
    if op == "quant_fused_fwd":
      d["r"] = rand(shape, dtype, 0.5)
    if op.endswith("_bwd"):
      d["dy"] = rand(shape, dtype)
    return d
  x = rand((rows, hidden), dtype, 0.3)
  if op in LINEN_OPS:
    sdt = LAYER_DTYPES[op][0]
    d = dict(x=x, s=rand((hidden,), sdt, 1.0, 0.5))
    if op in LINEN_BWD_OPS:
      # dy has the layer's output dtype: its dtype field, or else x's
      # promoted with the params' (float32 under flax's defaults).
      ydt = LAYER_DTYPES[op][1] or jnp.promote_types(dtype, sdt)
      d["dy"] = rand((rows, hidden), ydt)
    return d
  s = rand((hidden,), dtype, 1.0, 0.5)
  if op == "fwd":
    return dict(x=x, s=s)
  if op == "bwd":
    return dict(x=x, s=s, dy=rand((rows, hidden), dtype))
  r = rand((rows, hidden), dtype, 0.5)
  if op == "fused_fwd":
    return dict(x=x, r=r, s=s)
  return dict(x=x, r=r, s=s, dy=rand((rows, hidden), dtype),
              dh=rand((rows, hidden), dtype))


class BuildError(Exception):
  """A candidate that failed to build: ``impl`` names it, ``error`` is what
  it raised."""

  def __init__(self, impl: str, error: Exception):
    super().__init__(f"{type(error).__name__}: {error}")
    self.impl, self.error = impl, error


def build_candidates(op, impls, rows, hidden, dtype, n_sets, seed=0,
                     uid=0) -> list:
  """Jitted callables with ``n_sets`` fresh argument sets each.

  Args:
    op: one of :data:`OPS`.
    impls: names from :data:`IMPLS` or ``(label, Implementation)`` pairs.
    rows, hidden, dtype: the case (``dtype`` is the op's, see
      :func:`op_dtype`).
    n_sets: argument sets per candidate, rotated over by the timing.
    seed, uid: the random inputs' key, and a number that makes the jitted
      functions' names unique within a profiler trace.

  Returns:
    A :class:`Candidate` per impl that applies to ``op`` (impls that do
    not apply are left out); an impl that failed to build is a
    :class:`BuildError` naming it, in its place.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), uid)
  inputs = [make_inputs(jax.random.fold_in(base_key, i), op, rows, hidden,
                        dtype) for i in range(n_sets)]
  out = []
  for i, impl in enumerate(impls):
    label = impl[0] if isinstance(impl, tuple) else impl
    name = f"rb{uid:03d}{i:02d}_{re.sub(r'[^A-Za-z0-9]', '_', op + '_' + label)}"
    try:
      cand = _candidate(op, impl, label, inputs, name)
      if cand is not None:
        cand.inputs = inputs
    except Exception as e:  # pylint: disable=broad-except
      cand = BuildError(label, e)
    if cand is not None:
      out.append(cand)
  return out


def _layer_fn(impl, param_dtype, dtype):
  """``f(x, scale) -> y`` through a layer with params in ``param_dtype``
  and its ``dtype`` field (bfloat16, or None: x promoted with the params)."""
  if impl not in LAYERS:
    return None
  module, api = LAYERS[impl]
  cls = importlib.import_module(module).RMSNorm
  if api == "linen":
    layer = cls(epsilon=EPS, dtype=dtype, param_dtype=param_dtype)
    return lambda x, s: layer.apply({"params": {"scale": s}}, x)
  from flax import nnx

  def f(x, s):
    layer = cls(x.shape[-1], epsilon=EPS, dtype=dtype,
                param_dtype=param_dtype, rngs=nnx.Rngs(0))
    layer.scale[...] = s
    return layer(x)
  return f


def _feature_backend(impl):
  """(backend argument of the public call, label) of ``impl`` for the
  feature ops; None where the impl has none of them."""
  if (custom := _custom(impl)) is not None:
    return custom[1], custom[1].name
  if impl not in FEATURE_IMPLS:
    return None
  if impl == "rmsnorm_jax_mosaic":
    mosaic = mosaic_backend()
    return None if mosaic is None else (mosaic, mosaic.name)
  kernel, kname = kernel_backend()
  return {"xla": ("xla", "xla"), "rmsnorm_jax": (kernel, kname),
          "rmsnorm_jax_auto": ("auto", "auto")}[impl]


def feature_call(op, backend):
  """``(f, names)``: the public call a feature op times, as a function of
  the inputs called ``names`` (see :func:`make_inputs`); a backward op is
  the vjp of ``f`` with cotangent dy.

  Raises:
    KeyError: ``op`` is not a feature op.
  """
  if op in QUANT_OPS:
    qdt = QUANT_OPS[op]
    if op == "quant_fused_fwd":
      return (lambda x, r, s: rj.rms_norm_quantized(
          x, s, eps=EPS, quant_dtype=qdt, residual=r, backend=backend),
              ("x", "r", "s"))
    return (lambda x, s: rj.rms_norm_quantized(
        x, s, eps=EPS, quant_dtype=qdt, backend=backend), ("x", "s"))
  if op in ("bias_fwd", "bias_bwd"):
    return (lambda x, s, b: rj.rms_norm(x, s, b, eps=EPS, backend=backend),
            ("x", "s", "b"))
  if op in HEAD_OPS:
    return (lambda x, s: rj.rms_norm(x, s, eps=EPS, backend=backend),
            ("x", "s"))
  raise KeyError(f"feature_call: {op!r} is not one of {FEATURE_OPS}")


def _candidate(op, impl, label, inputs, name):
  if impl == "roofline":
    f, keys = _ROOFLINE[op]
    return Candidate(op, label, _named_jit(f, name),
                     [tuple(d[k] for k in keys) for d in inputs], "xla")
  if op in FEATURE_OPS:
    entry = _feature_backend(impl)
    if entry is None:
      return None
    backend, backend_label = entry
    f, keys = feature_call(op, backend)
    if op.endswith("_fwd"):
      return Candidate(op, label, _named_jit(f, name),
                       [tuple(d[k] for k in keys) for d in inputs],
                       backend_label)
    sets = [_vjp_runner(f, tuple(d[k] for k in keys), d["dy"])
            for d in inputs]
    return Candidate(op, label, _named_jit(_call_vjp, name), sets,
                     backend_label)
  if op in LINEN_OPS:
    param_dtype, layer_dtype = LAYER_DTYPES[op]
    f = _layer_fn(impl, param_dtype, layer_dtype)
    if f is None:
      return None
    backend = "flax" if impl.startswith("flax") else "auto"
    if op in LINEN_BWD_OPS:
      sets = [_vjp_runner(f, (d["x"], d["s"]), d["dy"]) for d in inputs]
      return Candidate(op, label, _named_jit(_call_vjp, name), sets, backend)
    return Candidate(op, label, _named_jit(f, name),
                     [(d["x"], d["s"]) for d in inputs], backend)
  if op in ("fwd", "bwd"):
    entry = _plain_fn(impl)
    if entry is None:
      return None
    f, backend = entry
    if op == "fwd":
      return Candidate(op, label, _named_jit(f, name),
                       [(d["x"], d["s"]) for d in inputs], backend)
    sets = [_vjp_runner(f, (d["x"], d["s"]), d["dy"]) for d in inputs]
    return Candidate(op, label, _named_jit(_call_vjp, name), sets, backend)
  entry = _residual_fn(impl)
  if entry is None:
    return None
  f, backend = entry
  if op == "fused_fwd":
    return Candidate(op, label, _named_jit(f, name),
                     [(d["x"], d["r"], d["s"]) for d in inputs], backend)
  sets = [_vjp_runner(f, (d["x"], d["r"], d["s"]), (d["dy"], d["dh"]))
          for d in inputs]
  return Candidate(op, label, _named_jit(_call_vjp_residual, name), sets,
                   backend)


def parse_cases(text: str) -> list:
  """``--cases`` text to ``[((rows, hidden), dtype), ...]``.

  Items are comma-separated: ``ROWSxHIDDEN:DTYPE`` (e.g.
  ``8192x4096:bfloat16``) or ``tag:NAME`` for every spec of
  :mod:`rmsnorm_jax.shapes` with that tag (e.g. ``tag:wide``).

  Raises:
    ValueError: an item in neither form, naming it.
  """
  cases = []
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    if item.startswith("tag:"):
      tag = item[len("tag:"):]
      try:
        picked = [s.case for s in shapes.select(tag) if s.dtype]
      except ValueError as e:
        raise ValueError(f"--cases: {e}") from e
      if not picked:
        raise ValueError(f"--cases: no shape with a dtype has tag {tag!r}")
      cases.extend(picked)
      continue
    try:
      dims, dtype = item.split(":")
      rows, hidden = (int(v) for v in dims.lower().split("x"))
      dt = jnp.dtype(dtype)
      if rows < 1 or hidden < 1:
        raise ValueError("sizes must be >= 1")
    except (ValueError, TypeError) as e:
      raise ValueError(f"--cases: expected ROWSxHIDDEN:DTYPE (e.g. "
                       f"8192x4096:bfloat16) or tag:NAME, got {item!r}"
                       ) from e
    cases.append(((rows, hidden), dt))
  return cases
