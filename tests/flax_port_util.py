# The warning filters below are taken from flax's pytest configuration:
#   repository: https://github.com/google/flax
#   path:       pyproject.toml ([tool.pytest.ini_options] filterwarnings)
#   revision:   commit 3a49110824001614baf35c6ee8934479fcdb133a
#               ("update to v0.12.8", the flax 0.12.8 release)
#   license:    Apache License 2.0, Copyright The Flax Authors
# The rank-promotion setting is the one flax's tests/run_all_tests.sh exports
# (JAX_NUMPY_RANK_PROMOTION=raise) for its whole pytest run.
"""How flax runs its own tests, applied to the modules ported from them.

flax runs its suite with ``JAX_NUMPY_RANK_PROMOTION=raise`` and with every
warning turned into an error except a fixed list. The ported modules
(``test_flax_port_linen.py``, ``test_flax_port_nnx.py``) apply both through
``pytestmark = FLAX_WARNING_FILTERS`` and the autouse fixture
``flax_rank_promotion``, imported into each module, so the settings hold for
those modules only and the rest of the suite runs as configured.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest

# Same entries, same order as flax's ini list: "error" first, so that each
# later "ignore" takes precedence over it, as in an ini filterwarnings list.
# One mark holding them all keeps that order (pytest applies a mark's
# arguments in order, each newer filter in front).
_FLAX_FILTERWARNINGS = (
    "error",
    "ignore:No GPU/TPU found, falling back to CPU.*:UserWarning",
    "ignore:`flax.traverse_util.Traversal` will be deprecated.*"
    ":DeprecationWarning",
    "ignore:Flax Checkpointing will soon be deprecated in favor of Orbax.*"
    ":DeprecationWarning",
    "ignore:.*The inputs_kv arg will be deprecated soon. Use inputs_k and "
    "inputs_v instead.*:DeprecationWarning",
    "ignore:.*the function signature of MultiHeadDotProductAttention's "
    "`__call__` method has changed.*:DeprecationWarning",
    "ignore:.*ml_dtypes.float8_e4m3b11 is deprecated.*:DeprecationWarning",
    "ignore:The --rsyncdir command line argument and rsyncdirs config "
    "variable are deprecated.:DeprecationWarning",
    "ignore:.*jax.random.KeyArray is deprecated.*:DeprecationWarning",
    "ignore:.*jax.core.Shape is deprecated.*:DeprecationWarning",
    "ignore:.*pkg_resources is deprecated as an API.*:DeprecationWarning",
    "ignore:.*Deprecated call to.*pkg_resources.declare_namespace.*"
    ":DeprecationWarning",
    "ignore:.*jax.xla_computation is deprecated.*:DeprecationWarning",
    "ignore:.*Couldn't find sharding info under RestoreArgs.*:UserWarning",
    "ignore:.*invalid value encountered in cast.*:RuntimeWarning",
    "ignore:.*divide by zero encountered in.*:RuntimeWarning",
    "ignore:.*numpy.core is deprecated.*:DeprecationWarning",
    "ignore:.*shape requires ndarray or scalar arguments.*:DeprecationWarning",
    "ignore:.*Sharding info not provided when restoring.*:UserWarning",
    "ignore:.*pkg_resources is deprecated as an API.*:UserWarning",
    "ignore:.*[Data|Static]' is deprecated, please replace.*"
    ":DeprecationWarning",
    "ignore:.*Implicit conversion of an array to a dtype is deprecated; "
    "rather than dtype=arr use dtype=arr.dtype.*:DeprecationWarning",
    "ignore:.*Setting `jax_pmap_shmap_merge` is deprecated in JAX.*"
    ":DeprecationWarning",
)

FLAX_WARNING_FILTERS = [pytest.mark.filterwarnings(*_FLAX_FILTERWARNINGS)]


@pytest.fixture(autouse=True)
def flax_rank_promotion():
  """Each test of an importing module runs with rank promotion "raise".

  The context manager, unlike ``jax.config.update``, restores the previous
  value afterwards, so tests of other modules in the same worker process are
  not affected.
  """
  with jax.numpy_rank_promotion("raise"):
    yield


def check_flax_settings():
  """A ported module's tests see flax's settings, else they prove less."""
  assert jax.config.jax_numpy_rank_promotion == "raise"
  with pytest.raises(ValueError, match="jax_numpy_rank_promotion=.raise."):
    jnp.ones((2, 3)) + jnp.ones((3,))
  with pytest.raises(UserWarning):
    warnings.warn("any warning not in flax's ignore list", UserWarning)
