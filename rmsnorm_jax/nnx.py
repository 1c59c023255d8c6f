"""flax.nnx layers: ``RMSNorm`` (drop-in) and ``RMSNormResidual`` (fused).

``RMSNorm`` subclasses ``flax.nnx.RMSNorm``: same constructor, attributes,
``scale`` Param and dtype promotion (``promote_dtype`` casts x and scale to a
common dtype first, as flax does), so code and checkpoints written for flax's
layer work unchanged.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from rmsnorm_jax import api
from rmsnorm_jax import base
from rmsnorm_jax import layer_math


class RMSNorm(nnx.RMSNorm):
  """Drop-in for ``flax.nnx.RMSNorm``.

  The keyword-only arguments beyond flax's:

  Args:
    scale_offset: added to scale before use (Gemma: 1.0 with zeros init).
    cast_mode: ``"float32"`` or ``"llama"``, as in ``rmsnorm_jax.rms_norm``.
    use_bias: add a ``bias`` Param of shape ``(num_features,)`` after
      scaling (init ``bias_init``, zeros).
    backend: as in ``rmsnorm_jax.rms_norm``.

  Call: ``layer(x, mask=None)``, x of shape ``(..., num_features)``; returns
  x's shape in the promoted dtype (``dtype`` if given).
  """

  def __init__(self, num_features: int, *, scale_offset: float = 0.0,
               cast_mode: str = "float32", use_bias: bool = False,
               bias_init=nnx.initializers.zeros, backend: str = "auto",
               **kwargs):
    super().__init__(num_features, **kwargs)
    self.scale_offset = scale_offset
    self.cast_mode = cast_mode
    self.use_bias = use_bias
    self.bias = (nnx.Param(bias_init(kwargs["rngs"].params(), (num_features,),
                                     self.param_dtype))
                 if use_bias else nnx.data(None))
    self.backend = backend

  @base.with_own_promotion_rules
  def __call__(self, x, mask=None):
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    if not layer_math.fused_path_serves(
        x, self.reduction_axes, self.feature_axes, self.axis_index_groups, mask):
      x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
      return layer_math.general_rms_norm(
          x, scale, epsilon=self.epsilon, dtype=self.dtype,
          reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          mask=mask, scale_offset=self.scale_offset, bias=bias,
          cast_mode=self.cast_mode)
    # flax promotes x and scale to a common dtype first; only the dtypes are
    # taken here, so that exact widenings are not materialized (see
    # layer_math.cast_unless_exact_widening) and the parameters' rounding to
    # a narrower dtype happens as the kernel loads them (weight_dtype), not
    # in a launch of its own.
    want = jax.eval_shape(
        lambda a: self.promote_dtype(a, dtype=self.dtype), (x, scale, bias))
    out_dtype = self.dtype or jnp.result_type(
        *[w.dtype for w in want if w is not None])
    llama = self.cast_mode == "llama"
    x = layer_math.cast_unless_exact_widening(x, want[0], llama)
    scale, bias, weight_dtype = layer_math.weights_as_promoted(
        (scale, bias), want[1:], llama)
    return api.rms_norm(
        x, scale, bias, eps=self.epsilon, scale_offset=self.scale_offset,
        cast_mode=self.cast_mode, out_dtype=out_dtype,
        weight_dtype=weight_dtype, backend=self.backend,
        axis_name=self.axis_name)


class RMSNormResidual(nnx.Module):
  """Fused ``h = x + residual; normed = RMSNorm(h)`` over the last axis.

  Args:
    num_features: hidden size; ``scale`` is a Param of shape (num_features,).
    epsilon: as flax's RMSNorm.
    dtype: as flax's RMSNorm.
    param_dtype: as flax's RMSNorm.
    use_scale: as flax's RMSNorm.
    scale_init: as flax's RMSNorm.
    scale_offset: as ``RMSNorm`` here.
    cast_mode: as ``RMSNorm`` here.
    use_bias: as ``RMSNorm`` here.
    bias_init: as ``RMSNorm`` here.
    backend: as ``RMSNorm`` here.
    rngs: as flax's RMSNorm.

  Call: ``layer(x, residual)`` -> ``(normed, h)``; h in residual's dtype,
  normed in ``dtype`` or residual's dtype promoted with param_dtype.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype=None, param_dtype=jnp.float32, use_scale: bool = True,
               scale_init=nnx.initializers.ones, scale_offset: float = 0.0,
               cast_mode: str = "float32", use_bias: bool = False,
               bias_init=nnx.initializers.zeros, backend: str = "auto",
               rngs: nnx.Rngs):
    self.scale = (nnx.Param(scale_init(rngs.params(), (num_features,),
                                       param_dtype))
                  if use_scale else nnx.data(None))
    self.bias = (nnx.Param(bias_init(rngs.params(), (num_features,),
                                     param_dtype))
                 if use_bias else nnx.data(None))
    self.cast_mode = cast_mode
    self.use_bias = use_bias
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.scale_offset = scale_offset
    self.backend = backend

  @base.with_own_promotion_rules
  def __call__(self, x, residual):
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    return api.rms_norm_residual(
        x, residual, scale, bias, eps=self.epsilon,
        scale_offset=self.scale_offset, cast_mode=self.cast_mode,
        out_dtype=layer_math.output_dtype(residual, scale, self.dtype, bias),
        backend=self.backend)
