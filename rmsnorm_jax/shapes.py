"""Shapes kept as data, shared by the tests, the benchmark and the TPU AOT check.

Every shape is one :class:`Spec` in :data:`SPECS`: a name, the rows and hidden
size of the flattened input, a dtype (or None where the consumer runs several
dtypes) and tags saying who uses it:

* ``bench``: the benchmark set (``python -m rmsnorm_jax.bench``);
* ``smoke``: tiny shapes for a CPU run of the benchmark (``--small``);
* ``tpu_aot``: compiled for every TPU generation in bfloat16 and float32;
* ``correctness``: small shapes for the numerics tests (ragged row counts,
  hidden sizes that are not multiples of 128, extra leading dims);
* ``wide``: rows of 16384 columns or more (on TPU, ``correctness`` + ``wide``
  exceeds one VMEM block and takes the two-pass path);
* ``narrow``: rows of 128 columns or fewer;
* ``launch_bound``: under 1 MB per array, where launch latency dominates;
* ``bench_features``: the benchmark's shapes for the feature ops (bias,
  per-head scale, quantized output; ``--cases tag:bench_features``), every
  one 8 MB or more per array and a multiple of :data:`HEAD_DIM` wide;
* ``bench_widths``: model widths that are not powers of two (Qwen2's 3584
  and 5120, Gemma 2's 4608, Gemma 3's 5376, DeepSeek-V3's 7168;
  ``--cases tag:bench_widths``), where the kernels pad or change layout.

A per-head case keeps the two numbers of every case: ``rows`` tokens of
``hidden = heads * HEAD_DIM`` columns, normalized as ``(rows, heads,
HEAD_DIM)`` with a ``(heads, HEAD_DIM)`` scale (:func:`heads_shape`);
8192x4096 is the QK-norm case 8192x32x128.

The names used before the specs existed (:data:`BENCHMARK`, :data:`TPU_AOT`,
:data:`CORRECTNESS`, :data:`WIDE`) are selections from :data:`SPECS` in
their old formats. :func:`min_bytes` is the one count of an op's least
device-memory traffic, used by the benchmark and the TPU report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax.numpy as jnp
import numpy as np

TAGS = frozenset({"bench", "smoke", "tpu_aot", "correctness", "wide",
                  "narrow", "launch_bound", "bench_features",
                  "bench_widths"})
# The per-head ops' head size: attention heads of 128 (LLaMA, Qwen, Mistral).
HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Spec:
  """One named input shape.

  Attributes:
    name: unique name; for a spec with a dtype, ``ROWSxHIDDEN:DTYPE`` (the
      benchmark's ``--cases`` syntax), else the shape joined by ``x``.
    rows: number of rows after flattening the leading dims (>= 1).
    hidden: size of the normalized last dim (>= 1).
    dtype: NumPy dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``) or
      None when the consumer chooses the dtypes.
    tags: a frozenset of names from :data:`TAGS`.
    leading: the leading dims when x has more than two (their product is
      ``rows``); empty for a 2-D input.

  Raises:
    ValueError: a non-positive size, ``leading`` whose product is not
      ``rows``, an unknown dtype or tag.
  """

  name: str
  rows: int
  hidden: int
  dtype: str | None
  tags: frozenset
  leading: tuple[int, ...] = ()

  def __post_init__(self):
    if self.rows < 1 or self.hidden < 1:
      raise ValueError(f"Spec {self.name!r}: rows and hidden must be >= 1, "
                       f"got rows={self.rows}, hidden={self.hidden}")
    if self.leading and math.prod(self.leading) != self.rows:
      raise ValueError(f"Spec {self.name!r}: leading={self.leading} must "
                       f"multiply to rows={self.rows}")
    if self.dtype is not None and self.dtype not in (
        "bfloat16", "float16", "float32", "float64"):
      raise ValueError(f"Spec {self.name!r}: dtype must be a float dtype "
                       f"name or None, got {self.dtype!r}")
    unknown = set(self.tags) - TAGS
    if unknown:
      raise ValueError(f"Spec {self.name!r}: unknown tags {sorted(unknown)}; "
                       f"expected some of {sorted(TAGS)}")

  @property
  def shape(self) -> tuple[int, ...]:
    """The input's shape: ``leading + (hidden,)`` or ``(rows, hidden)``."""
    return (*self.leading, self.hidden) if self.leading else (
        self.rows, self.hidden)

  @property
  def case(self) -> tuple[tuple[int, int], np.dtype]:
    """``((rows, hidden), dtype)``, the benchmark's case format.

    Raises:
      ValueError: the spec has no dtype.
    """
    if self.dtype is None:
      raise ValueError(f"Spec {self.name!r} has no dtype; a benchmark case "
                       "needs one")
    return (self.rows, self.hidden), jnp.dtype(self.dtype)


def _spec(rows, hidden, dtype=None, tags=(), leading=()):
  shape = (*leading, hidden) if leading else (rows, hidden)
  name = "x".join(str(d) for d in shape)
  if dtype is not None:
    name += f":{dtype}"
  return Spec(name, rows, hidden, dtype, frozenset(tags), tuple(leading))


_BF16, _F16, _F32 = "bfloat16", "float16", "float32"

SPECS: tuple[Spec, ...] = (
    # The benchmark set, largest first so that a run cut short keeps the
    # shapes the targets are about: LLaMA/Qwen-sized rows, wide rows (issue
    # tables up to 65536 columns), QK-norm (128 columns), single-token
    # decode.
    _spec(8192, 4096, _BF16, ["bench", "bench_features"]),
    _spec(4096, 16384, _BF16, ["bench", "wide"]),
    _spec(2048, 32768, _BF16, ["bench", "wide"]),
    _spec(1024, 65536, _BF16, ["bench", "wide"]),
    _spec(32768, 128, _BF16, ["bench", "narrow"]),
    _spec(8192, 4096, _F16, ["bench"]),
    _spec(2048, 8192, _F16, ["bench", "bench_features"]),
    _spec(2048, 4096, _F16, ["bench"]),
    _spec(1024, 4096, _F32, ["bench"]),
    _spec(64, 4096, _F32, ["bench"]),
    _spec(64, 768, _F32, ["bench", "launch_bound"]),
    _spec(1, 4096, _F32, ["bench", "launch_bound"]),
    _spec(1, 768, _F32, ["bench", "launch_bound"]),
    # The feature ops' other shapes (with the two above): 16384x4096 and
    # 4096x8192 (128 and 64 MB a bfloat16 array); 16384x2048 is the per-head
    # case 16384x16x128.
    _spec(16384, 4096, _BF16, ["bench_features"]),
    _spec(4096, 8192, _BF16, ["bench_features"]),
    _spec(16384, 2048, _BF16, ["bench_features"]),
    # Model widths that are not powers of two, 8192 tokens (4096 at 7168
    # columns), in bfloat16, and one float16 case on 2048 tokens.
    _spec(8192, 3584, _BF16, ["bench_widths"]),
    _spec(8192, 4608, _BF16, ["bench_widths"]),
    _spec(8192, 5120, _BF16, ["bench_widths"]),
    _spec(8192, 5376, _BF16, ["bench_widths"]),
    _spec(4096, 7168, _BF16, ["bench_widths"]),
    _spec(2048, 5120, _F16, ["bench_widths"]),
    # CPU smoke run of the benchmark: one tiny case, seconds not minutes
    # (the layer ops run it in bfloat16, the others in float32).
    _spec(8, 256, _F32, ["smoke", "launch_bound"]),
    # Compiled for every TPU generation (bfloat16 and float32).
    _spec(1, 768, None, ["tpu_aot", "launch_bound"]),
    _spec(1, 4096, None, ["tpu_aot", "launch_bound"]),
    _spec(64, 768, None, ["tpu_aot", "launch_bound"]),
    _spec(64, 4096, None, ["tpu_aot"]),
    _spec(1024, 4096, None, ["tpu_aot"]),
    _spec(2048, 4096, None, ["tpu_aot"]),
    _spec(8192, 4096, None, ["tpu_aot"]),
    _spec(32768, 128, None, ["tpu_aot", "narrow"]),
    _spec(4096, 16384, None, ["tpu_aot", "wide"]),
    _spec(16, 65536, None, ["tpu_aot", "wide"]),
    # Correctness: ragged row counts, hidden sizes that are not multiples of
    # 128, tiny and wide rows, extra leading dims.
    _spec(1, 1, None, ["correctness", "launch_bound"]),
    _spec(3, 8, None, ["correctness", "launch_bound"]),
    _spec(7, 100, None, ["correctness", "launch_bound"]),
    _spec(17, 128, None, ["correctness", "narrow", "launch_bound"]),
    _spec(33, 129, None, ["correctness", "launch_bound"]),
    _spec(5, 2880, None, ["correctness", "launch_bound"]),
    _spec(6, 256, None, ["correctness", "launch_bound"], leading=(2, 3)),
    _spec(120, 64, None, ["correctness", "narrow", "launch_bound"],
          leading=(4, 5, 6)),
    _spec(9, 5184, None, ["correctness", "launch_bound"]),
    _spec(1000, 128, None, ["correctness", "narrow", "launch_bound"]),
    # Wide rows that exceed a single VMEM block on TPU (two-pass path).
    _spec(3, 65536, None, ["correctness", "wide", "launch_bound"]),
)


def select(*tags: str, exclude: Iterable[str] = ()) -> tuple[Spec, ...]:
  """The specs carrying every tag in ``tags`` and none in ``exclude``.

  Order is that of :data:`SPECS`.

  Raises:
    ValueError: a tag not in :data:`TAGS`.
  """
  exclude = tuple(exclude)
  unknown = set(tags + exclude) - TAGS
  if unknown:
    raise ValueError(f"select: unknown tags {sorted(unknown)}; expected "
                     f"some of {sorted(TAGS)}")
  return tuple(s for s in SPECS
               if set(tags) <= s.tags and not set(exclude) & s.tags)


def by_name(name: str) -> Spec:
  """The spec called ``name``.

  Raises:
    KeyError: no spec has that name (the message lists the known names).
  """
  for s in SPECS:
    if s.name == name:
      return s
  raise KeyError(f"no shape spec named {name!r}; known: "
                 f"{', '.join(s.name for s in SPECS)}")


# The selections in the formats their consumers have always read.
# ((rows, hidden), dtype): the benchmark set.
BENCHMARK = tuple(s.case for s in select("bench"))
# (rows, hidden): compiled for every TPU generation, bfloat16 and float32.
TPU_AOT = tuple((s.rows, s.hidden) for s in select("tpu_aot"))
# Deviceless TPU topologies, oldest first (v2 and v3: Colab's TPUs).
TPU_GENERATIONS = ("v2:2x2", "v3:2x2", "v4:2x2x1", "v5e:2x2", "v5p:2x2x1",
                   "v6e:2x2", "tpu7x:2x2x1")
# Input shapes for correctness (the wide one apart).
CORRECTNESS = tuple(s.shape for s in select("correctness", exclude=["wide"]))
# Wide rows that exceed a single VMEM block on TPU (two-pass path).
WIDE = tuple(s.shape for s in select("correctness", "wide"))

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# The ops whose traffic min_bytes counts; "res_fwd" and "res_bwd" are other
# names of the fused (residual) ops.
_OP_ALIASES = {"res_fwd": "fused_fwd", "res_bwd": "fused_bwd"}
# The feature ops: a bias, a per-head scale, the quantized output (int8, or
# float8_e4m3fn for "quant_fp8_fwd"; "quant_fused_fwd" adds a residual).
FEATURE_OPS = ("quant_fwd", "quant_fp8_fwd", "quant_fused_fwd", "bias_fwd",
               "bias_bwd", "head_fwd", "head_bwd")
MIN_BYTES_OPS = ("fwd", "bwd", "fused_fwd", "fused_bwd", "res_fwd", "res_bwd",
                 "linen_fwd", "linen_fwd_mixed", "linen_fwd_default",
                 "linen_bwd", "linen_bwd_mixed",
                 "linen_bwd_default") + FEATURE_OPS
# Bytes an element of the quantized output takes (int8 and float8 alike).
QUANT_ITEMSIZE = 1


def heads_shape(rows: int, hidden: int) -> tuple[int, int, int]:
  """x's shape in a per-head case: ``(rows, hidden // HEAD_DIM, HEAD_DIM)``.

  The scale is ``(hidden // HEAD_DIM, HEAD_DIM)``.

  Raises:
    ValueError: ``hidden`` is not a positive multiple of :data:`HEAD_DIM`.
  """
  if hidden < HEAD_DIM or hidden % HEAD_DIM:
    raise ValueError(f"a per-head case needs hidden to be a positive "
                     f"multiple of HEAD_DIM={HEAD_DIM} (heads x head_dim), "
                     f"got hidden={hidden}")
  return rows, hidden // HEAD_DIM, HEAD_DIM


def min_bytes(op: str, rows: int, hidden: int, dtype) -> int:
  """Fewest bytes ``op`` must move through device memory.

  N = rows * hidden elements of ``dtype`` (itemsize s); the scale, bias and
  their gradients are in ``dtype``, the per-row rstd saved by the forward
  is float32 (4 bytes a row; a row of each head in the head ops).

  * fwd: read x, write y (2N), write rstd, read scale.
  * bwd: read x and dy, write dx (3N), read rstd and scale, write dscale.
  * fused_fwd (res_fwd): read x and residual, write y and h (4N), rstd,
    scale.
  * fused_bwd (res_bwd): read h, dy, dh, write the gradient of h (4N; the
    gradients of x and residual are that same array), read rstd and scale,
    write dscale.
  * linen_fwd: bfloat16 x and y (``dtype`` ignored: the layer ops run in
    bfloat16), rstd, a bfloat16 scale.
  * linen_fwd_mixed: the same with a float32 scale.
  * linen_fwd_default: flax's defaults on bfloat16 x: float32 y and scale.
  * linen_bwd: bfloat16 x, dy, dx, rstd, a bfloat16 scale and dscale.
  * linen_bwd_mixed: the same with a float32 scale and dscale (float32
    parameters, ``dtype=bfloat16``: mixed-precision training).
  * linen_bwd_default: flax's defaults: a float32 dy, scale and dscale.
  * quant_fwd, quant_fp8_fwd: read x (N), write q (one byte an element)
    and its float32 scale per row, read scale; no rstd (forward only).
  * quant_fused_fwd: read x and residual, write h (3N), q and the per-row
    float32 scales, read scale.
  * bias_fwd: fwd and a read of bias.
  * bias_bwd: bwd and a write of dbias (bias itself is not needed).
  * head_fwd, head_bwd: fwd and bwd on ``(rows, heads, HEAD_DIM)`` with a
    ``(heads, HEAD_DIM)`` scale, ``heads = hidden // HEAD_DIM``: the
    scale is hidden elements as in fwd, rstd is ``rows * heads`` floats.

  Args:
    op: one of :data:`MIN_BYTES_OPS`.
    rows, hidden: the flattened input's size (ints >= 0); for the head
      ops, tokens and ``heads * HEAD_DIM``.
    dtype: the activations' dtype (anything ``np.dtype`` accepts).

  Returns:
    The byte count, an int.

  Raises:
    ValueError: unknown ``op``; a head op whose hidden is not a multiple of
      :data:`HEAD_DIM`.
  """
  if op not in MIN_BYTES_OPS:
    raise ValueError(f"min_bytes: op must be one of {MIN_BYTES_OPS}, got "
                     f"{op!r}")
  op = _OP_ALIASES.get(op, op)
  n, s = rows * hidden, np.dtype(dtype).itemsize
  stat, vec = rows * 4, hidden * s
  if op in ("head_fwd", "head_bwd"):
    _, heads, _ = heads_shape(rows, hidden)
    stat = rows * heads * 4
    op = op[len("head_"):]
  q = n * QUANT_ITEMSIZE
  return {
      "fwd": 2 * n * s + stat + vec,
      "bwd": 3 * n * s + stat + 2 * vec,
      "fused_fwd": 4 * n * s + stat + vec,
      "fused_bwd": 4 * n * s + stat + 2 * vec,
      "linen_fwd": n * 4 + stat + hidden * 2,
      "linen_fwd_mixed": n * 4 + stat + hidden * 4,
      "linen_fwd_default": n * 6 + stat + hidden * 4,
      "linen_bwd": 6 * n + stat + hidden * 4,
      "linen_bwd_mixed": 6 * n + stat + hidden * 8,
      "linen_bwd_default": 8 * n + stat + hidden * 8,
      "quant_fwd": n * s + q + stat + vec,
      "quant_fp8_fwd": n * s + q + stat + vec,
      "quant_fused_fwd": 3 * n * s + q + stat + vec,
      "bias_fwd": 2 * n * s + stat + 2 * vec,
      "bias_bwd": 3 * n * s + stat + 3 * vec,
  }[op]
