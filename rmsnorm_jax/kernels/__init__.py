"""Pallas kernels, one module per backend.

``BY_NAME`` maps each explicit ``backend=`` name to its Implementation class;
``BY_PLATFORM`` names the kernel that ``backend="pallas"`` (and ``"auto"``,
where the kernel serves the call and does not decline it) uses on a
lowering platform.
"""

BY_NAME: dict = {}
BY_PLATFORM: dict = {}

from rmsnorm_jax.kernels.gpu import PallasGpu  # noqa: E402

BY_NAME["pallas_gpu"] = PallasGpu
BY_PLATFORM["cuda"] = PallasGpu

from rmsnorm_jax.kernels.tpu import PallasTpu  # noqa: E402

BY_NAME["pallas_tpu"] = PallasTpu
BY_PLATFORM["tpu"] = PallasTpu
# The Mosaic GPU (Hopper) kernels in mosaic_gpu.py are not registered: their
# compiled numerics failed on an H200 (docs/mosaic_gpu.md).
