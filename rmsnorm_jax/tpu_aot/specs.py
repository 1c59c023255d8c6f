"""What the sweep compiles: generations, shapes, dtypes, ops and programs.

Everything here is data or builds abstract programs; nothing loads libtpu.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax import shapes

# Deviceless topologies, oldest first (v2 and v3 are the TPUs Colab offers).
GENERATIONS = shapes.TPU_GENERATIONS

# HBM bandwidth per chip, bytes/s: the Cloud TPU documentation's page of
# each generation. That page gives no figure for v2; its entry is twice the
# per-TensorCore figure libtpu reports (pltpu.get_tpu_info(), 358 GB/s).
HBM_BYTES_PER_S = {
    "v2": 716e9,
    "v3": 900e9,
    "v4": 1200e9,
    "v5e": 819e9,
    "v5p": 2765e9,
    "v6e": 1640e9,
    "tpu7x": 7370e9,
}
# TensorCores per chip; a device that is one of them gets its share of HBM.
CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5e": 1, "v5p": 2, "v6e": 1,
                  "tpu7x": 2}

# The implementation interface's op names (rmsnorm_jax.ops).
OPS = ("forward", "backward", "residual_forward", "residual_backward",
       "quantized_forward")
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
SHAPES = shapes.TPU_AOT
EPS = 1e-6
# The shared byte count's names for these ops.
_SHARED_OP_NAMES = {"forward": "fwd", "backward": "bwd",
                    "residual_forward": "res_fwd",
                    "residual_backward": "res_bwd"}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One program of the sweep: an op and the features its call uses.

  Attributes:
    op: one of :data:`OPS`.
    bias: a ``(hidden,)`` bias is added (and its gradient computed).
    heads: rows of a per-head ``(heads, hidden)`` scale; 0 for a
      ``(hidden,)`` scale.
    cast_mode: ``"float32"`` or ``"llama"`` (see :mod:`rmsnorm_jax.base`).
    quant_dtype: the quantized output's dtype name (quantized_forward only).
    residual: quantized_forward also adds a residual (and returns h).
    static_quant: quantized_forward with a given float32 scale instead of
      the per-row dynamic one.
  """

  op: str
  bias: bool = False
  heads: int = 0
  cast_mode: str = "float32"
  quant_dtype: str | None = None
  residual: bool = False
  static_quant: bool = False

  @property
  def name(self) -> str:
    """``op`` followed by its features, e.g. ``"forward +bias"``."""
    parts = [self.op]
    if self.quant_dtype:
      parts.append(self.quant_dtype)
    if self.residual:
      parts.append("+residual")
    if self.static_quant:
      parts.append("static")
    if self.bias:
      parts.append("+bias")
    if self.heads:
      parts.append(f"{self.heads}-head scale")
    if self.cast_mode != "float32":
      parts.append(self.cast_mode)
    return " ".join(parts)


# Compiled for every shape in SHAPES and every dtype in DTYPES.
CORE = tuple(Variant(op) for op in OPS[:4])
# The features, compiled on FEATURE_SHAPES in bfloat16. The per-head scale
# has 8 rows (a multiple-of-8 row count is then whole heads).
FEATURES = (
    Variant("forward", bias=True),
    Variant("backward", bias=True),
    Variant("residual_forward", bias=True),
    Variant("residual_backward", bias=True),
    Variant("forward", heads=8),
    Variant("backward", heads=8),
    Variant("forward", cast_mode="llama"),
    Variant("backward", cast_mode="llama"),
    Variant("quantized_forward", quant_dtype="int8"),
    Variant("quantized_forward", quant_dtype="int8", residual=True),
    Variant("quantized_forward", quant_dtype="int8", static_quant=True),
    Variant("quantized_forward", quant_dtype="float8_e4m3fn"),
    Variant("quantized_forward", quant_dtype="float8_e5m2"),
)
FEATURE_SHAPES = ((1024, 4096), (32768, 128), (16, 65536))
FEATURE_DTYPES = (np.dtype(jnp.bfloat16),)

# The quick selection (CI's): every program on every generation, on fewer
# shapes. The features keep the QK-norm rows (their wide-row programs, the
# slowest to compile, are in the full sweep only); v2 and v3 have v4's VMEM,
# so v4's full list already covers their block choices, and they keep one
# shape of each kind (one row, LLaMA rows, QK-norm rows, two-pass rows).
QUICK_FEATURE_SHAPES = ((32768, 128),)
QUICK_SHORT_FAMILIES = ("v2", "v3")
QUICK_SHORT_SHAPES = ((1, 768), (1024, 4096), (32768, 128), (16, 65536))


def family(gen: str) -> str:
  """``"v5e"`` for ``"v5e:2x2"``.

  Raises:
    ValueError: gen's family has no bandwidth entry (names the known ones).
  """
  fam = gen.split(":")[0]
  if fam not in HBM_BYTES_PER_S:
    raise ValueError(
        f"generation {gen!r}: unknown TPU family {fam!r}; expected one of "
        f"{', '.join(HBM_BYTES_PER_S)} (as in {GENERATIONS[0]!r})")
  return fam


def device_bandwidth(gen: str, device) -> float:
  """HBM bytes/s available to ``device`` of topology ``gen``: its share.

  ``device.num_cores`` is 2 for a megacore device (v4, v5p), 1 for one
  TensorCore; a device holding one of a chip's two TensorCores gets half of
  the chip's bandwidth.
  """
  fam = family(gen)
  share = getattr(device, "num_cores", 1) / CORES_PER_CHIP[fam]
  return HBM_BYTES_PER_S[fam] * min(1.0, share)


def min_bytes(op, rows: int, hidden: int, dtype) -> int:
  """The least HBM traffic of a program, in bytes.

  The four core ops count as :func:`rmsnorm_jax.shapes.min_bytes` does
  (N = rows * hidden * itemsize: forward 2N, backward 3N, the residual ops
  4N, plus rstd, the scale, dscale). A :class:`Variant` adds what its
  features must move: a per-head scale (heads rows instead of one, and its
  gradient), a bias (read; its float32 gradient written backward).
  quantized_forward reads x, writes q (1 byte an element) and one float32
  scale per row; with a residual it also reads the residual and writes h.

  Args:
    op: one of :data:`OPS`, a :class:`Variant`, or a name the shared count
      takes (``"fwd"``).
    rows, hidden: the 2-D problem.
    dtype: x's dtype (and the scale's, bias's, residual's).

  Raises:
    ValueError: an op neither names.
  """
  v = op if isinstance(op, Variant) else Variant(op)
  size = np.dtype(dtype).itemsize
  vec = hidden * size
  backward = v.op in ("backward", "residual_backward")
  extra = 0
  if v.bias:
    extra += vec + (4 * hidden if backward else 0)
  if v.heads:
    extra += (v.heads - 1) * vec * (2 if backward else 1)
  if v.op == "quantized_forward":
    n = rows * hidden
    total = n * size + n + 4 * rows + vec + extra
    return total + (2 * n * size if v.residual else 0)
  return extra + shapes.min_bytes(_SHARED_OP_NAMES.get(v.op, v.op), rows,
                                  hidden, dtype)


def norm(v: Variant, dtype) -> base.Norm:
  """The static arguments of ``v``'s call (output in x's dtype)."""
  return base.Norm(
      eps=EPS, scale_offset=0.0, cast_mode=v.cast_mode,
      out_dtype=np.dtype(dtype),
      quant_dtype=np.dtype(v.quant_dtype) if v.quant_dtype else None)


def program(impl, v: Variant, dtype):
  """``v``'s op of ``impl`` as a function of :func:`arguments`'s operands
  (bias and residual only where ``v`` has them)."""
  n = norm(v, dtype)
  if v.op == "forward":
    return lambda x, s, *b: impl.forward(x, s, *(b or (None,)), norm=n)
  if v.op == "backward":
    return lambda x, s, r, dy, *b: impl.backward(x, s, *(b or (None,)), r,
                                                 dy, norm=n)
  if v.op == "residual_forward":
    return lambda x, res, s, *b: impl.residual_forward(
        x, res, s, *(b or (None,)), norm=n)
  if v.op == "residual_backward":
    return lambda h, s, r, dy, dh, *b: impl.residual_backward(
        h, s, *(b or (None,)), r, dy, dh, norm=n)
  if v.op == "quantized_forward":
    def quantized(x, s, *rest):
      rest = list(rest)
      res = rest.pop(0) if v.residual else None
      qs = rest.pop(0) if v.static_quant else None
      b = rest.pop(0) if v.bias else None
      return impl.quantized_forward(x, res, s, b, qs, norm=n)
    return quantized
  raise ValueError(f"op must be one of {', '.join(OPS)}; got {v.op!r}")


def arguments(v: Variant, rows: int, hidden: int, dtype, sharding):
  """ShapeDtypeStructs for :func:`program`: arrays, scale and bias in
  ``dtype``, rstd and a static quantization scale float32."""
  a = jax.ShapeDtypeStruct((rows, hidden), dtype, sharding=sharding)
  s = jax.ShapeDtypeStruct((v.heads, hidden) if v.heads else (hidden,),
                           dtype, sharding=sharding)
  r = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
  b = (jax.ShapeDtypeStruct((hidden,), dtype, sharding=sharding),
       ) if v.bias else ()
  if v.op == "quantized_forward":
    res = (a,) if v.residual else ()
    qs = (jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding),
          ) if v.static_quant else ()
    return (a, s) + res + qs + b
  return {"forward": (a, s), "backward": (a, s, r, a),
          "residual_forward": (a, a, s),
          "residual_backward": (a, s, r, a, a)}[v.op] + b


def call(v: Variant, rows: int, hidden: int, dtype) -> base.Call:
  """The :class:`base.Call` an implementation is asked to serve."""
  return base.Call(op=v.op, rows=rows, hidden=hidden, dtype=np.dtype(dtype),
                   scale_shape=(v.heads, hidden) if v.heads else (hidden,),
                   has_bias=v.bias, norm=norm(v, dtype))


def streamed_dtypes(v: Variant, dtype) -> list:
  """The kernel's streamed operands' dtypes, inputs then outputs."""
  if v.op == "quantized_forward":
    return [dtype] * (3 if v.residual else 1) + [np.dtype(v.quant_dtype)]
  return [dtype] * {"forward": 2, "backward": 3, "residual_forward": 4,
                    "residual_backward": 4}[v.op]


def plan(gens, shape_list=None, dtypes=None, ops=OPS, features=True,
         quick=False):
  """The sweep's programs, ``(gen, (rows, hidden), dtype, Variant)``.

  Args:
    gens: topology names.
    shape_list: ``(rows, hidden)`` pairs for every program; None: the core
      ops on :data:`SHAPES`, the features on :data:`FEATURE_SHAPES`.
    dtypes: x's dtypes for every program; None: :data:`DTYPES` for the core
      ops, :data:`FEATURE_DTYPES` for the features.
    ops: only the variants of these ops.
    features: include :data:`FEATURES` (else the core ops only).
    quick: where ``shape_list`` is None, the shorter lists: the features on
      :data:`QUICK_FEATURE_SHAPES`, and the core ops of
      :data:`QUICK_SHORT_FAMILIES` on :data:`QUICK_SHORT_SHAPES`.

  Returns:
    A list in the order gens x (core, features) x shapes x dtypes x
    variants. Per-head variants skip shapes whose rows are not whole heads.
  """
  out = []
  for gen in gens:
    core_shapes, feature_shapes = SHAPES, FEATURE_SHAPES
    if quick:
      feature_shapes = QUICK_FEATURE_SHAPES
      if family(gen) in QUICK_SHORT_FAMILIES:
        core_shapes = QUICK_SHORT_SHAPES
    groups = [(CORE, core_shapes, DTYPES)]
    if features:
      groups.append((FEATURES, feature_shapes, FEATURE_DTYPES))
    for vs, shs, dts in groups:
      for shape in (shs if shape_list is None else shape_list):
        for dt in (dts if dtypes is None else dtypes):
          for v in vs:
            if v.op not in ops or (v.heads and shape[0] % v.heads):
              continue
            out.append((gen, tuple(shape), np.dtype(dt), v))
  return out
