"""Implementations every numerics test runs against, as ``(id, factory)``.

Kernel modules add their interpret-mode configuration here so that the same
tests cover them on CPU; on a GPU the ``gpu`` marker runs them compiled.
"""

from rmsnorm_jax import base

IMPLEMENTATIONS = [
    ("xla", base.Xla),
]
