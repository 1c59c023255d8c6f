# Ported from flax's own tests:
#   repository: https://github.com/google/flax
#   path:       tests/linen/linen_test.py (class NormalizationTest:
#               test_rms_norm_mask, test_rms_norm)
#   revision:   commit 3a49110824001614baf35c6ee8934479fcdb133a
#               ("update to v0.12.8", the flax 0.12.8 release; the file is
#               unchanged up to the newer commit 18f8f311)
#   license:    Apache License 2.0, Copyright 2024 The Flax Authors
# Changes: only the RMSNorm tests are kept; ``nn.RMSNorm`` is
# ``rmsnorm_jax.linen.RMSNorm``; inputs, assertions and tolerances are
# flax's. The settings flax runs its tests with (rank promotion "raise",
# its warning filters) come from flax_port_util; test_runs_under_flax_settings
# is added here to show they are in force.
"""flax.linen's RMSNorm tests, run against rmsnorm_jax.linen.RMSNorm."""


from absl.testing import absltest, parameterized
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import pytest

from rmsnorm_jax import linen as rj_linen

import flax_port_util
from flax_port_util import FLAX_WARNING_FILTERS
from flax_port_util import flax_rank_promotion  # noqa: F401 (autouse)

pytestmark = FLAX_WARNING_FILTERS

# As in flax's module: only reads --jax_* flags from the command line, so a
# plain pytest run leaves the configuration unchanged.
jax.config.parse_flags_with_absl()


class NormalizationTest(parameterized.TestCase):

  def test_rms_norm_mask(self):
    key = random.key(0)
    keys = random.split(key)
    x = random.normal(keys[0], (3, 4, 5))
    m = random.choice(keys[1], 2, x.shape).astype(bool)
    m = m.at[..., :1].set(True)  # guarantee at least 1 element
    x = jnp.where(m, x, jnp.nan)

    module = rj_linen.RMSNorm()
    y, w = module.init_with_output(key, x, mask=m)

    z = np.square(y).mean(-1, where=m)
    np.testing.assert_allclose(z, 1, atol=1e-4)

  @parameterized.parameters(
    {'reduction_axes': -1}, {'reduction_axes': 1}, {'reduction_axes': (1, 2)}
  )
  def test_rms_norm(self, reduction_axes):
    rng = random.key(0)
    key1, key2 = random.split(rng)
    e = 1e-5
    x = random.normal(key1, (2, 3, 4))
    model_cls = rj_linen.RMSNorm(
      use_scale=False, epsilon=e, reduction_axes=reduction_axes
    )
    y, _ = model_cls.init_with_output(key2, x)
    self.assertEqual(x.dtype, y.dtype)
    self.assertEqual(x.shape, y.shape)
    y_one_liner = x * jax.lax.rsqrt(
      jnp.mean(jax.lax.square(x), axis=reduction_axes, keepdims=True) + e
    )
    np.testing.assert_allclose(y_one_liner, y, atol=1e-4)


def test_runs_under_flax_settings():
  """The ported tests above see flax's settings, else they prove less."""
  flax_port_util.check_flax_settings()


if __name__ == '__main__':
  absltest.main()
