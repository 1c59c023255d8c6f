"""Implementations every numerics test runs against, as ``(id, factory)``.

Kernel modules add their interpret-mode configuration here so that the same
tests cover them on CPU; on a GPU the ``gpu`` marker runs them compiled.
"""

from rmsnorm_jax import base
from rmsnorm_jax.kernels.gpu import PallasGpu
from rmsnorm_jax.kernels.tpu import PallasTpu

IMPLEMENTATIONS = [
    ("xla", base.Xla),
    ("pallas_gpu_interpret", lambda: PallasGpu(interpret=True)),
    ("pallas_tpu_interpret", lambda: PallasTpu(interpret=True)),
]
