# Ported from flax's own tests:
#   repository: https://github.com/google/flax
#   paths:      tests/nnx/nn/normalization_test.py (class TestLinenConsistency:
#               test_nnx_linen_rmsnorm_equivalence);
#               tests/nnx/nn/linear_test.py (classes TestLayersSameGraph and
#               TestLayersParamsMetadata: their nnx.RMSNorm rows)
#   revision:   commit 3a49110824001614baf35c6ee8934479fcdb133a
#               ("update to v0.12.8", the flax 0.12.8 release; both files are
#               unchanged up to the newer commit 18f8f311)
#   license:    Apache License 2.0, Copyright 2024 The Flax Authors
# Changes: only the RMSNorm tests (and rows) are kept; ``nnx.RMSNorm`` is
# ``rmsnorm_jax.nnx.RMSNorm`` and ``linen.RMSNorm`` is
# ``rmsnorm_jax.linen.RMSNorm``. The equivalence test gains one parameter,
# ``layers``, naming whose layer each side uses: ours on both sides (the
# test as flax wrote it, pointed at our layers) and each of ours against
# flax's other one, so the layers are checked against flax's too. Inputs,
# assertions and tolerances are flax's. The settings flax runs its tests with
# (rank promotion "raise", its warning filters) come from flax_port_util;
# test_runs_under_flax_settings is added here to show they are in force.
"""flax.nnx's RMSNorm tests, run against rmsnorm_jax.nnx.RMSNorm."""

import typing as tp

import jax
import jax.numpy as jnp
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from flax import linen
from flax import nnx
from flax.typing import Dtype

from rmsnorm_jax import linen as rj_linen
from rmsnorm_jax import nnx as rj_nnx

import flax_port_util
from flax_port_util import FLAX_WARNING_FILTERS
from flax_port_util import flax_rank_promotion  # noqa: F401 (autouse)

pytestmark = FLAX_WARNING_FILTERS

# (nnx side, linen side) of the equivalence test.
_LAYERS = {
    'ours_ours': (rj_nnx.RMSNorm, rj_linen.RMSNorm),
    'ours_flax': (rj_nnx.RMSNorm, linen.RMSNorm),
    'flax_ours': (nnx.RMSNorm, rj_linen.RMSNorm),
}


class TestLinenConsistency(parameterized.TestCase):

  @parameterized.product(
    dtype=[jnp.float32, jnp.float16],
    param_dtype=[jnp.float32, jnp.float16],
    use_fast_variance=[True, False],
    mask=[None, np.array([True, False, True, False, True])],
    layers=list(_LAYERS),
  )
  def test_nnx_linen_rmsnorm_equivalence(
    self,
    dtype: tp.Optional[Dtype],
    param_dtype: Dtype,
    use_fast_variance: bool,
    mask: tp.Optional[np.ndarray],
    layers: str,
  ):
    nnx_rmsnorm, linen_rmsnorm = _LAYERS[layers]

    class NNXModel(nnx.Module):
      def __init__(self, dtype, param_dtype, use_fast_variance, rngs):
        self.norm_layer = nnx_rmsnorm(
          5,
          dtype=dtype,
          param_dtype=param_dtype,
          use_fast_variance=use_fast_variance,
          promote_dtype=lambda x, **kwargs: x,  # ensure same behavior as Linen
          rngs=rngs,
        )
        self.linear = nnx.Linear(
          5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

      def __call__(self, x, *, mask=None):
        x = self.norm_layer(x, mask=mask)
        x = self.linear(x)
        return x

    class LinenModel(linen.Module):
      dtype: tp.Optional[Dtype] = None
      param_dtype: Dtype = jnp.float32
      use_fast_variance: bool = True

      def setup(self):
        self.norm_layer = linen_rmsnorm(
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          use_fast_variance=self.use_fast_variance,
        )
        self.linear = linen.Dense(
          4, dtype=self.dtype, param_dtype=self.param_dtype
        )

      def __call__(self, x, *, mask=None):
        x = self.norm_layer(x, mask=mask)
        x = self.linear(x)
        return x

    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))

    linen_model = LinenModel(
      dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance
    )
    variables = linen_model.init(jax.random.key(1), x)
    if layers == 'ours_ours':
      linen_out = linen_model.apply(variables, x, mask=mask)
    else:
      # Cross pairs (not in flax's test): flax's layer run eagerly, op by
      # op, can differ from its own compiled result in the last float32
      # bit; ours always runs compiled. Compiled against compiled.
      linen_out = jax.jit(
        lambda v, x: linen_model.apply(v, x, mask=mask))(variables, x)

    nnx_model = NNXModel(
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=use_fast_variance,
      rngs=rngs,
    )
    nnx_model.linear.kernel.set_value(variables['params']['linear']['kernel'])
    nnx_model.linear.bias.set_value(variables['params']['linear']['bias'])

    if layers == 'ours_ours':
      nnx_out = nnx_model(x, mask=mask)
    else:
      nnx_out = nnx.jit(lambda m, x: m(x, mask=mask))(nnx_model, x)
    assert isinstance(linen_out, jax.Array)
    np.testing.assert_array_equal(linen_out, nnx_out)


class TestLayersSameGraph(parameterized.TestCase):

  @parameterized.product(
      module_args_kwargs_initargs=[
          (rj_nnx.RMSNorm, (3,), ("scale_init",)),
      ],
  )
  def test(self, module_args_kwargs_initargs):
    module_cls, args, init_argnames = module_args_kwargs_initargs
    kwargs = {"rngs": nnx.Rngs(0)}
    init_zeros = nnx.initializers.zeros
    init_ones = nnx.initializers.ones
    init1_kwargs = {k: init_zeros for k in init_argnames}
    init2_kwargs = {k: init_ones for k in init_argnames}
    mod1 = module_cls(*args, **init1_kwargs, **kwargs)
    mod2 = module_cls(*args, **init2_kwargs, **kwargs)
    g1, g2 = nnx.graphdef(mod1), nnx.graphdef(mod2)
    assert g1 == g2


class TestLayersParamsMetadata(parameterized.TestCase):

  @parameterized.product(
      module_args_kwargs_initargs=[
          (rj_nnx.RMSNorm, (3,), (("scale", 1, ()), )),
      ],
  )
  def test(self, module_args_kwargs_initargs):
    module_cls, args, metadata_argnames = module_args_kwargs_initargs
    kwargs = {"rngs": nnx.Rngs(0)}
    out_sharding = ("din", "dout")
    metadata_kwargs = {
      f"{key}_metadata": {"out_sharding": out_sharding[:le]}
      for key, le, _ in metadata_argnames
    }

    mesh = jax.make_mesh(
      (1, 1),
      out_sharding,
      axis_types=(jax.sharding.AxisType.Auto,) * len(out_sharding),
    )
    with jax.set_mesh(mesh):
      module = module_cls(*args, **metadata_kwargs, **kwargs)

    for key, le, attrs in metadata_argnames:
      attrs = attrs if attrs else ((None, key), )
      for attr_name, param_name in attrs:
        attr = getattr(module, attr_name) if attr_name is not None else module
        param = getattr(attr, param_name)
        self.assertIsNotNone(param.out_sharding)
        self.assertEqual(param.out_sharding, out_sharding[:le])


def test_runs_under_flax_settings():
  """The ported tests above see flax's settings, else they prove less."""
  flax_port_util.check_flax_settings()


if __name__ == '__main__':
  absltest.main()
