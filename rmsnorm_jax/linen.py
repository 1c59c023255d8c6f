"""flax.linen layers: ``RMSNorm`` (drop-in) and ``RMSNormResidual`` (fused).

``RMSNorm`` subclasses ``flax.linen.RMSNorm``: the same fields, defaults,
parameter name and shape, and result dtype, so models and checkpoints written
for flax's layer work unchanged. When the configuration is a plain last-axis
norm it runs ``rms_norm`` (the kernel on TPU/GPU, one custom_vjp); otherwise
it computes flax's formula with XLA.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from rmsnorm_jax import api
from rmsnorm_jax import base
from rmsnorm_jax import layer_math


class RMSNorm(nn.RMSNorm):
  """Drop-in for ``flax.linen.RMSNorm``.

  The fields after flax's are all defaulted.

  Attributes:
    scale_offset: added to scale before use; 1.0 gives Gemma's ``(1 + scale)``
      form (then use ``scale_init=nn.initializers.zeros``).
    cast_mode: ``"float32"`` (flax's order) or ``"llama"`` (Hugging Face's
      LlamaRMSNorm order), as in ``rmsnorm_jax.rms_norm``.
    use_bias: add a ``bias`` parameter of shape ``(hidden,)`` (init
      ``bias_init``, zeros) after scaling.
    bias_init: initializer of ``bias``.
    backend: as in ``rmsnorm_jax.rms_norm``.

  Call: ``layer.apply(params, x, mask=None)`` with x of shape ``(..., hidden)``
  (any floating dtype); returns x's shape in ``dtype`` or, when dtype is None,
  x's dtype promoted with param_dtype (flax's rule).
  """

  scale_offset: float = 0.0
  cast_mode: str = "float32"
  use_bias: bool = False
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  backend: str = "auto"

  @nn.compact
  @base.with_own_promotion_rules
  def __call__(self, x, *, mask=None):
    feat = layer_math.feature_shape(x.shape, self.feature_axes)
    scale = (self.param("scale", self.scale_init, feat, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feat, self.param_dtype)
            if self.use_bias else None)
    if not layer_math.fused_path_serves(
        x, self.reduction_axes, self.feature_axes, self.axis_index_groups, mask,
        self.force_float32_reductions):
      return layer_math.general_rms_norm(
          x, scale, epsilon=self.epsilon, dtype=self.dtype,
          reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          mask=mask, force_float32_reductions=self.force_float32_reductions,
          scale_offset=self.scale_offset, bias=bias, cast_mode=self.cast_mode)
    return api.rms_norm(
        x, scale, bias, eps=self.epsilon, scale_offset=self.scale_offset,
        cast_mode=self.cast_mode,
        out_dtype=layer_math.output_dtype(x, scale, self.dtype, bias),
        backend=self.backend, axis_name=self.axis_name)


class RMSNormResidual(nn.Module):
  """Fused ``h = x + residual; normed = RMSNorm(h)`` over the last axis.

  Same fields as ``RMSNorm`` for the last-axis case; the parameters are
  ``scale`` (and with ``use_bias``, ``bias``) of shape ``(hidden,)``. ``__call__(x, residual)`` returns
  ``(normed, h)``: h in residual's dtype, normed in ``dtype`` or residual's
  dtype promoted with param_dtype.
  """

  epsilon: float = 1e-6
  dtype: object = None
  param_dtype: object = jnp.float32
  use_scale: bool = True
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  scale_offset: float = 0.0
  cast_mode: str = "float32"
  use_bias: bool = False
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  backend: str = "auto"

  @nn.compact
  @base.with_own_promotion_rules
  def __call__(self, x, residual):
    feat = (x.shape[-1],)
    scale = (self.param("scale", self.scale_init, feat, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feat, self.param_dtype)
            if self.use_bias else None)
    return api.rms_norm_residual(
        x, residual, scale, bias, eps=self.epsilon,
        scale_offset=self.scale_offset, cast_mode=self.cast_mode,
        out_dtype=layer_math.output_dtype(residual, scale, self.dtype, bias),
        backend=self.backend)
