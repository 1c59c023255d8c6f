"""The implementation interface and the pure-XLA implementation.

Every implementation works on 2-D views: ``x`` of shape ``(rows, hidden)`` and
``scale`` of shape ``(hidden,)`` or ``None``. The public API in ``api.py``
validates arguments, flattens leading dims and wires the ``custom_vjp``; an
implementation only supplies the four primitives below. The XLA implementation
is both the numerical reference for the kernels and the fallback on every
platform.

The math (float32 throughout, ``w = scale + scale_offset``)::

    rstd = 1 / sqrt(mean(x**2) + eps)                        # per row
    y    = x * rstd * w
    dx   = rstd * (dy*w) - x * rstd**3 * mean(dy*w*x)        # per row
    dw   = sum_rows(dy * x * rstd)

For the fused residual variant ``h = x + residual`` (rounded to residual's
dtype, since that is what the caller receives and what the norm sees), and the
gradient flowing into ``h`` is ``dx_norm + dh_out``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp


def upcast(a):
  """float32 for half and single precision, float64 stays float64."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def effective_scale(scale, scale_offset: float, hidden: int, dtype):
  """The multiplier ``scale + scale_offset`` in dtype (ones if scale is None)."""
  if scale is None:
    return jnp.ones((hidden,), dtype)
  w = scale.astype(dtype)
  return w + jnp.asarray(scale_offset, dtype) if scale_offset else w


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way of computing RMSNorm; subclasses are frozen (hashable) configs.

  Attributes of the class:
    name: the ``backend=`` string that selects it.
    platforms: lowering platforms it can run on (``"cpu"``, ``"cuda"``,
      ``"rocm"``, ``"tpu"``); dispatch never sends it anywhere else.
  """

  name: ClassVar[str] = "abstract"
  platforms: ClassVar[tuple[str, ...]] = ()

  def lowering_platforms(self) -> tuple[str, ...]:
    """Platforms this instance may be lowered for (interpret mode: any)."""
    return self.platforms

  def preferred_for(self, rows: int, hidden: int, dtype) -> bool:
    """Whether ``backend="auto"`` should pick this over XLA for the shape."""
    del rows, hidden, dtype
    return True

  def forward(self, x, scale, *, eps: float, scale_offset: float, out_dtype):
    """Returns ``(y[rows, hidden] in out_dtype, rstd[rows] float32)``."""
    raise NotImplementedError

  def backward(self, x, scale, rstd, dy, *, scale_offset: float):
    """Returns ``(dx in x.dtype, dscale float32 (hidden,) or None)``."""
    raise NotImplementedError

  def residual_forward(self, x, residual, scale, *, eps: float,
                       scale_offset: float, out_dtype):
    """Returns ``(y in out_dtype, h in residual.dtype, rstd float32)``.

    The default composes an XLA add with ``forward``; kernels override it to
    read ``x`` and ``residual`` once.
    """
    h = (upcast(x) + upcast(residual)).astype(residual.dtype)
    y, rstd = self.forward(h, scale, eps=eps, scale_offset=scale_offset,
                           out_dtype=out_dtype)
    return y, h, rstd

  def residual_backward(self, h, scale, rstd, dy, dh, *, scale_offset: float):
    """Returns ``(gradient of h in h.dtype, dscale float32 or None)``.

    ``dh`` is the cotangent of the updated residual output.
    """
    dx, dscale = self.backward(h, scale, rstd, dy, scale_offset=scale_offset)
    return (upcast(dx) + upcast(dh)).astype(h.dtype), dscale


@dataclasses.dataclass(frozen=True)
class Xla(Implementation):
  """Plain jax.numpy; XLA fuses the forward into one kernel on every platform."""

  name: ClassVar[str] = "xla"
  platforms: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "rocm", "tpu")

  def forward(self, x, scale, *, eps, scale_offset, out_dtype):
    xf = upcast(x)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + jnp.asarray(eps, xf.dtype))
    w = effective_scale(scale, scale_offset, x.shape[-1], xf.dtype)
    y = xf * rstd[:, None] * w
    return y.astype(out_dtype), rstd

  def backward(self, x, scale, rstd, dy, *, scale_offset):
    dx, dscale = xla_backward_f32(x, scale, rstd, dy, scale_offset=scale_offset)
    return dx.astype(x.dtype), dscale

  def residual_backward(self, h, scale, rstd, dy, dh, *, scale_offset):
    dx, dscale = xla_backward_f32(h, scale, rstd, dy, scale_offset=scale_offset)
    return (dx + upcast(dh)).astype(h.dtype), dscale


def xla_backward_f32(x, scale, rstd, dy, *, scale_offset):
  """The explicit backward; dx stays float32 so callers round once."""
  xf, dyf = upcast(x), upcast(dy)
  r = rstd[:, None]
  w = effective_scale(scale, scale_offset, x.shape[-1], xf.dtype)
  g = dyf * w
  xhat = xf * r
  # mean(g * xhat) couples the row: it is the projection the norm removes.
  c = jnp.mean(g * xhat, axis=-1, keepdims=True)
  dx = r * (g - xhat * c)
  dscale = None if scale is None else jnp.sum(dyf * xhat, axis=0)
  return dx, dscale
