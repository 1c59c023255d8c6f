"""The implementation interface and the pure-XLA implementation.

Every implementation works on 2-D row views: ``x`` of shape ``(rows, hidden)``
and the per-feature operands ``scale`` and ``bias``. ``api.py`` validates
arguments, flattens leading dims and wires the ``custom_vjp``; an
implementation supplies the methods of ``Implementation``. The XLA
implementation is both the numerical reference for the kernels and the
fallback on every platform.

The math (``w = scale + scale_offset``; statistics in float32)::

    rstd  = 1 / sqrt(mean(x**2) + eps)                        # per row
    y     = x * rstd * w + bias                               # cast_mode "float32"
    y     = round_x(x * rstd) * w + bias   (in result_type(scale, x))  # "llama"
    dx    = rstd * g - x * rstd**3 * mean(g * x),  g = dy * w  # per row
    dw    = sum_rows(dy * x_hat),   dbias = sum_rows(dy)

``round_x`` rounds to x's dtype (Hugging Face's LlamaRMSNorm order). The
per-head form takes ``scale`` of shape ``(heads, hidden)``: the rows are
``(..., heads)`` flattened, and row ``r`` uses ``scale[r % heads]``.

For the fused residual variant ``h = x + residual`` (added in float32,
rounded to residual's dtype, since that is what the caller receives and what
the norm sees), and the gradient flowing into ``h`` is ``dx_norm + dh_out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
CAST_MODES = ("float32", "llama")
F32 = np.dtype(np.float32)

# Largest finite magnitude of each quantized dtype (int8 saturates at 127 so
# that the range is symmetric, as dynamic scaling by max|y| / 127 assumes).
QUANT_MAX = {
    np.dtype(jnp.int8): 127.0,
    np.dtype(jnp.float8_e4m3fn): 448.0,
    np.dtype(jnp.float8_e5m2): 57344.0,
}


@contextlib.contextmanager
def own_promotion_rules():
  """The library's code traces under JAX's default promotion rules.

  ``jax_numpy_rank_promotion="raise"`` and ``jax_numpy_dtype_promotion=
  "strict"`` are a user's guard on their own code; the library's internal
  arithmetic (float32 statistics beside 16-bit data, per-row values beside
  rows) is deliberate, so every place where it is traced (the public
  functions, the custom_vjp rules, the lowering of each implementation)
  runs inside this context.
  """
  with jax.numpy_rank_promotion("allow"), \
      jax.numpy_dtype_promotion("standard"):
    yield


def with_own_promotion_rules(fn):
  """Decorator form of ``own_promotion_rules``."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with own_promotion_rules():
      return fn(*args, **kwargs)
  return wrapped


@dataclasses.dataclass(frozen=True)
class Norm:
  """The static (compile-time) arguments of one norm call.

  Attributes:
    eps: added to the mean square.
    scale_offset: added to scale (Gemma's ``1 + scale`` with 1.0).
    cast_mode: ``"float32"`` or ``"llama"`` (see the module docstring).
    out_dtype: dtype of the normalized output.
    quant_dtype: ``None``, or the dtype of ``quantized_forward``'s ``q``.
    weight_dtype: ``None``, or the dtype scale and bias are rounded to
      before use: the outputs are those of ``scale.astype(weight_dtype)``
      and ``bias.astype(weight_dtype)`` (values and product dtype), while
      the arrays are read as stored; dscale and dbias stay the float32
      sums. Implementations with ``folds_weight_cast`` round as they load
      the vectors; the others get the cast arrays.
  """

  eps: float
  scale_offset: float = 0.0
  cast_mode: str = "float32"
  out_dtype: np.dtype = F32
  quant_dtype: np.dtype | None = None
  weight_dtype: np.dtype | None = None

  @property
  def weight_rounding(self) -> np.dtype | None:
    """``weight_dtype`` where it rounds float32 values (a 16-bit dtype):
    what kernels holding scale and bias in float32 must round them to."""
    wdt = self.weight_dtype
    return None if wdt is None or np.dtype(wdt).itemsize >= 4 else wdt

  @with_own_promotion_rules  # the same answer under any caller's settings
  def product_dtype(self, x_dtype, scale_dtype) -> np.dtype:
    """The dtype ``x_hat * w + bias`` is computed in (``scale_dtype``: the
    stored scale's, replaced by ``weight_dtype`` where that is set)."""
    if scale_dtype is not None and self.weight_dtype is not None:
      scale_dtype = self.weight_dtype
    if self.cast_mode == "llama":
      return np.dtype(jnp.result_type(x_dtype, scale_dtype or x_dtype))
    return np.dtype(jnp.promote_types(x_dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Call:
  """What an implementation needs to know to say whether it can serve a call.

  Attributes:
    op: ``"forward"``, ``"backward"``, ``"residual_forward"``,
      ``"residual_backward"`` or ``"quantized_forward"``.
    rows: row count (an int, or a symbolic dimension in shape-polymorphic
      export).
    hidden: normalized width.
    dtype: x's dtype (for residual ops, the residual stream's).
    scale_shape: ``()`` without scale, ``(hidden,)``, or ``(heads, hidden)``.
    has_bias: whether a bias is added.
    norm: the static arguments.
    scale_dtype: the scale's dtype (None without scale, or when it does not
      matter); with ``cast_mode="llama"`` it sets the product dtype.
    bias_dtype: the bias' dtype (None without bias, or not said).
    has_residual: for ``"quantized_forward"``, whether a residual is added
      (None: not said, so an implementation judges both).
    x_dtype: for ops that add x to a residual, x's own dtype where it
      differs from the residual stream's (``dtype``); None otherwise.
  """

  op: str
  rows: object
  hidden: int
  dtype: np.dtype
  scale_shape: tuple = ()
  has_bias: bool = False
  norm: Norm = Norm(eps=1e-6)
  scale_dtype: np.dtype | None = None
  bias_dtype: np.dtype | None = None
  has_residual: bool | None = None
  x_dtype: np.dtype | None = None

  @property
  def product_dtype(self) -> np.dtype:
    """The dtype ``x_hat * w + bias`` is computed in (see ``Norm``)."""
    return self.norm.product_dtype(self.dtype, self.scale_dtype)

  @property
  def static_rows(self) -> bool:
    return isinstance(self.rows, (int, np.integer))

  def seen_by(self, impl: "Implementation") -> "Call":
    """The call as ``impl`` receives it: an implementation that does not
    fold ``norm.weight_dtype`` gets scale and bias cast to it
    (``partition.Local``), so it judges them in that dtype."""
    wdt = self.norm.weight_dtype
    if wdt is None or impl.folds_weight_cast:
      return self
    return dataclasses.replace(
        self, scale_dtype=wdt if self.scale_dtype is not None else None,
        bias_dtype=wdt if self.bias_dtype is not None else None,
        norm=dataclasses.replace(self.norm, weight_dtype=None))


def upcast(a):
  """float32 for half and single precision, float64 stays float64."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def scale_rows(scale, rows: int):
  """The per-feature multiplier broadcast to ``(rows or 1, hidden)``.

  ``(hidden,)`` becomes ``(1, hidden)``; a per-head ``(heads, hidden)`` is
  tiled so that row ``r`` gets ``scale[r % heads]`` (rows is a multiple of
  heads).
  """
  if scale.ndim == 1:
    return scale[None, :]
  heads, hidden = scale.shape
  return jnp.broadcast_to(scale[None], (rows // heads, heads, hidden)
                          ).reshape(rows, hidden)


def fold_rows(a, scale_shape):
  """Sums a ``(rows, hidden)`` array into ``scale_shape`` (float32)."""
  if len(scale_shape) == 1:
    return jnp.sum(a, axis=0)
  heads, hidden = scale_shape
  return jnp.sum(a.reshape(-1, heads, hidden), axis=0)


def from_float64(a, dtype=None):
  """float64 ``a`` (x64 mode) as float32 holding ``a.astype(dtype)``
  (``dtype`` None: float32 itself, a weight_dtype that rounds nothing more).

  The cast is XLA's own conversion, so that a ``weight_dtype`` gives what
  the caller's cast gives however XLA rounds it: jaxlib 0.10.2's CPU
  backend converts float64 to a 16-bit dtype through float32 (two
  roundings); jaxlib 0.11.2's, as run on an H200 host, converted to
  float16 differently from that (in one rounding, by the values). The
  optimization barrier keeps the narrowing from being dropped as excess
  precision when the result is widened again.
  """
  return jax.lax.optimization_barrier(a.astype(dtype or F32)).astype(F32)


def rounded(a, dtype):
  """``a`` rounded to ``dtype``'s precision, kept in a's (wider) dtype.

  The same values as ``a.astype(dtype).astype(a.dtype)``, but XLA keeps a
  ``reduce_precision`` where it may drop such a conversion pair as excess
  precision (it does under jit on CPU and GPU), and the roundings are what
  the reference formulas define.
  """
  dt = np.dtype(dtype)
  if dt.itemsize >= np.dtype(a.dtype).itemsize:
    return a
  info = jnp.finfo(dt)
  r = jax.lax.reduce_precision(a, exponent_bits=info.nexp,
                               mantissa_bits=info.nmant)
  if info.nexp >= jnp.finfo(a.dtype).nexp:
    return r  # Subnormals of dt are subnormals of a's dtype too.
  # reduce_precision flushes dt's subnormals to zero; a conversion rounds
  # them to the subnormal grid (multiples of 2**(minexp - nmant)), exactly
  # what scaling by a power of two and rounding half to even gives.
  step = float(2.0 ** (int(info.minexp) - int(info.nmant)))
  sub = jnp.round(a * jnp.asarray(1.0 / step, a.dtype)) * jnp.asarray(
      step, a.dtype)
  return jnp.where(jnp.abs(a) < jnp.asarray(float(info.smallest_normal),
                                            a.dtype), sub, r)


def weights(scale, scale_offset: float, dtype):
  """``scale + scale_offset`` in dtype; None without scale."""
  if scale is None:
    return None
  w = scale.astype(dtype)
  return w + jnp.asarray(scale_offset, dtype) if scale_offset else w


class Implementation:
  """One way of computing RMSNorm; subclasses are frozen (hashable) configs.

  Attributes of the class:
    name: the ``backend=`` string that selects it.
    platforms: lowering platforms it can run on (``"cpu"``, ``"cuda"``,
      ``"rocm"``, ``"tpu"``); dispatch never sends it anywhere else.
  """

  name: ClassVar[str] = "abstract"
  platforms: ClassVar[tuple[str, ...]] = ()
  # Whether the methods apply ``norm.weight_dtype`` themselves; if not,
  # ``partition.Local`` casts scale and bias before calling them.
  folds_weight_cast: ClassVar[bool] = False

  def lowering_platforms(self) -> tuple[str, ...]:
    """Platforms this instance may be lowered for (interpret mode: any)."""
    return self.platforms

  def cannot_serve(self, call: Call) -> str | None:
    """Why this implementation cannot compute ``call``; None when it can."""
    del call
    return None

  def auto_declines(self, call: Call) -> str | None:
    """Why ``backend="auto"`` should prefer XLA for ``call``; None if not."""
    del call
    return None

  def forward(self, x, scale, bias, *, norm: Norm):
    """Returns ``(y[rows, hidden] in norm.out_dtype, rstd[rows] float32)``."""
    raise NotImplementedError

  def backward(self, x, scale, bias, rstd, dy, *, norm: Norm):
    """Returns ``(dx in x.dtype, dscale, dbias)``.

    dscale is float32 of scale's shape (None without scale), dbias float32
    ``(hidden,)`` (None without bias); bias is passed only for its presence.
    """
    raise NotImplementedError

  def residual_forward(self, x, residual, scale, bias, *, norm: Norm):
    """Returns ``(y in norm.out_dtype, h in residual.dtype, rstd float32)``.

    The default composes an XLA add with ``forward``; kernels override it to
    read ``x`` and ``residual`` once.
    """
    h = (upcast(x) + upcast(residual)).astype(residual.dtype)
    y, rstd = self.forward(h, scale, bias, norm=norm)
    return y, h, rstd

  def residual_backward(self, h, scale, bias, rstd, dy, dh, *, norm: Norm):
    """Returns ``(gradient of h in h.dtype, dscale, dbias)``.

    ``dh`` is the cotangent of the updated residual output.
    """
    dx, dscale, dbias = self.backward(h, scale, bias, rstd, dy, norm=norm)
    return (upcast(dx) + upcast(dh)).astype(h.dtype), dscale, dbias

  def quantized_forward(self, x, residual, scale, bias, quant_scale, *,
                        norm: Norm):
    """Returns ``(q, q_scale[rows, 1] float32, h or None)``.

    ``q`` in ``norm.quant_dtype``; ``quant_scale`` None (dynamic, per row) or
    a float32 scalar (static). The default quantizes ``forward``'s float32
    output with XLA.
    """
    f32_norm = dataclasses.replace(norm, out_dtype=F32)
    if residual is None:
      h = None
      y, _ = self.forward(x, scale, bias, norm=f32_norm)
    else:
      y, h, _ = self.residual_forward(x, residual, scale, bias, norm=f32_norm)
    q, q_scale = quantize(y, norm.quant_dtype, quant_scale,
                          getattr(self, "axis_names", ()))
    return q, q_scale, h


def quantize(y, quant_dtype, quant_scale=None, axis_names=()):
  """``(q, q_scale)`` from float32 ``y`` of shape ``(rows, hidden)``.

  Dynamic (quant_scale None): ``q_scale = max|y_row| * (1 / qmax)`` per row,
  1 for an all-zero row. Static: ``q_scale`` is the given float32 scalar.
  ``q`` is ``y * (1 / q_scale)`` rounded half to even and saturated for
  int8, or cast with saturation for float8. Each reciprocal is a float32
  value (of the constant, and once per row): the division written as the
  product XLA itself compiles it to, so every backend rounds alike; it is
  within one float32 ulp of the true quotient. ``axis_names``: mesh axes the row is split over
  (its max is all-reduced over them).
  """
  dt = np.dtype(quant_dtype)
  qmax = jnp.float32(QUANT_MAX[dt])
  if quant_scale is None:
    amax = jnp.max(jnp.abs(y), axis=-1, keepdims=True)
    if axis_names:
      amax = jax.lax.pmax(amax, axis_names)
    q_scale = jnp.where(amax > 0, amax * inverse_qmax(dt), jnp.float32(1.0))
  else:
    q_scale = jnp.broadcast_to(
        jnp.asarray(quant_scale, jnp.float32).reshape(1, 1), (y.shape[0], 1))
  v = jnp.clip(y * (jnp.float32(1.0) / q_scale), -qmax, qmax)
  if dt == np.dtype(jnp.int8):
    v = jnp.round(v)  # half to even
  return v.astype(dt), q_scale


def inverse_qmax(quant_dtype) -> np.float32:
  """``1 / qmax`` rounded to float32: the dynamic scale's multiplier."""
  return np.float32(1.0) / np.float32(QUANT_MAX[np.dtype(quant_dtype)])


@dataclasses.dataclass(frozen=True)
class Xla(Implementation):
  """Plain jax.numpy; XLA fuses the forward into one kernel on every platform.

  Attributes:
    axis_names: mesh axes over which the hidden dim is split (inside
      ``shard_map``, or one device's share of a partitioned program): the
      per-row sums are all-reduced over them. Empty for whole rows.
  """

  name: ClassVar[str] = "xla"
  platforms: ClassVar[tuple[str, ...]] = PLATFORMS
  folds_weight_cast: ClassVar[bool] = True
  axis_names: tuple[str, ...] = ()

  def _row_sum(self, a):
    s = jnp.sum(a, axis=-1, keepdims=True)
    return jax.lax.psum(s, self.axis_names) if self.axis_names else s

  def _row_mean(self, a):
    n = a.shape[-1]
    if self.axis_names:
      n = n * jax.lax.psum(1, self.axis_names)
    return self._row_sum(a) / jnp.asarray(n, a.dtype)

  def forward(self, x, scale, bias, *, norm):
    return self._forward(upcast(x), x.dtype, scale, bias, norm)

  def residual_forward(self, x, residual, scale, bias, *, norm):
    hf = rounded(upcast(x) + upcast(residual), residual.dtype)
    y, rstd = self._forward(hf, residual.dtype, scale, bias, norm)
    return y, hf.astype(residual.dtype), rstd

  def _forward(self, xf, x_dtype, scale, bias, norm):
    """The norm of ``xf`` (x's values, upcast) with x_dtype's roundings."""
    rstd = jax.lax.rsqrt(self._row_mean(xf * xf)
                         + jnp.asarray(norm.eps, xf.dtype))
    y = xf * rstd
    pdt = norm.product_dtype(x_dtype, None if scale is None else scale.dtype)
    if norm.cast_mode == "llama":
      y = rounded(y, x_dtype)
    y = rounded(y, pdt)
    w = self._weights(scale, norm, pdt, xf.dtype)
    if w is not None:
      y = rounded(y * scale_rows(w, xf.shape[0]), pdt)
    if bias is not None:
      b = self._weight_values(bias, norm)
      y = rounded(y + rounded(b, pdt)[None, :], pdt)
    return y.astype(norm.out_dtype), rstd[:, 0]

  @staticmethod
  def _weight_values(a, norm):
    """A scale or bias with the values of ``a.astype(norm.weight_dtype)``,
    in the dtype that cast upcasts to: from float64, XLA's own conversion
    (``from_float64``); from float32, ``rounded`` (a pair of conversions
    could be dropped by XLA as excess precision)."""
    if norm.weight_dtype is None:
      return upcast(a)
    if np.dtype(a.dtype) == np.dtype(np.float64) and norm.weight_rounding:
      return from_float64(a, norm.weight_rounding)
    wide = jnp.promote_types(norm.weight_dtype, F32)
    return rounded(a.astype(wide), norm.weight_dtype)

  @staticmethod
  def _weights(scale, norm, pdt, cdt):
    """``scale + offset`` computed in pdt, held in cdt (None without scale)."""
    if scale is None:
      return None
    w = rounded(Xla._weight_values(scale, norm).astype(cdt), pdt)
    if norm.scale_offset:
      w = rounded(w + jnp.asarray(norm.scale_offset, cdt), pdt)
    return w

  def backward(self, x, scale, bias, rstd, dy, *, norm):
    dx, dscale, dbias = self.backward_f32(x, scale, bias, rstd, dy, norm=norm)
    return dx.astype(x.dtype), dscale, dbias

  def backward_f32(self, x, scale, bias, rstd, dy, *, norm):
    """``backward`` with dx left in float32 so callers round once."""
    xf = upcast(x)
    r = rstd.astype(xf.dtype)[:, None]
    xhat = xf * r
    pdt = norm.product_dtype(x.dtype, None if scale is None else scale.dtype)
    dyp = rounded(dy.astype(xf.dtype), pdt)
    llama = norm.cast_mode == "llama"
    xhat_used = rounded(xhat, x.dtype) if llama else xhat
    w = self._weights(scale, norm, pdt, xf.dtype)
    g = dyp if w is None else rounded(dyp * scale_rows(w, x.shape[0]), pdt)
    if llama:
      # The cotangent passes back through x_hat's rounding to x's dtype.
      g = rounded(g, x.dtype)
    # mean(g * xhat) couples the row: it is the projection the norm removes.
    c = self._row_mean(g * xhat)
    dx = r * (g - xhat * c)
    dscale = None
    if scale is not None:
      dscale = fold_rows(dyp * rounded(xhat_used, pdt), scale.shape)
    dbias = None if bias is None else jnp.sum(dyp, axis=0)
    return dx, dscale, dbias

  def residual_backward(self, h, scale, bias, rstd, dy, dh, *, norm):
    dx, dscale, dbias = self.backward_f32(h, scale, bias, rstd, dy, norm=norm)
    return (dx + upcast(dh)).astype(h.dtype), dscale, dbias
