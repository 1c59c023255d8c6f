"""Pallas kernels, one module per backend.

``BY_NAME`` maps each explicit ``backend=`` name to its Implementation class.
``BY_PLATFORM`` gives, per lowering platform, the kernels that
``backend="auto"`` and ``"pallas"`` consider, in order of preference: the
first that serves the call and does not decline it (``auto_declines``: where
another implementation measured faster) runs it.
"""

BY_NAME: dict = {}
BY_PLATFORM: dict = {}

from rmsnorm_jax.kernels.gpu import PallasGpu  # noqa: E402
from rmsnorm_jax.kernels.mosaic_gpu import MosaicGpu  # noqa: E402

BY_NAME["pallas_gpu"] = PallasGpu
BY_NAME["mosaic_gpu"] = MosaicGpu
# Mosaic GPU first: it declines (auto_declines) every call where the Triton
# kernels measured as fast or faster on an H200 (docs/mosaic_gpu.md), and
# every GPU that is not Hopper.
BY_PLATFORM["cuda"] = (MosaicGpu, PallasGpu)

from rmsnorm_jax.kernels.tpu import PallasTpu  # noqa: E402

BY_NAME["pallas_tpu"] = PallasTpu
BY_PLATFORM["tpu"] = (PallasTpu,)
