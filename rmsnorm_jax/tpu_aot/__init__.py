"""Deviceless ahead-of-time compilation of the TPU kernels for every generation.

``python -m rmsnorm_jax.tpu_aot`` needs libtpu (``pip install
"jax[tpu]==<jax version>"``) but no TPU. For each TPU generation it
compiles every op, on a list of shapes and dtypes, and the features (bias,
per-head scale, llama cast order, quantized output) on a few, as the
``pallas_tpu`` kernel and as the XLA program, with the real TPU compiler;
it reports whether they compiled (or why the kernel declines a call), the
kernel's block, and the HBM bytes of each compiled program against the
op's minimum.
docs/tpu_aot.md holds the method, what CI runs, and the latest report.

Modules: ``specs`` (what is compiled), ``hlo`` (HBM bytes from compiled
HLO), ``compile`` (topologies, meshes, the sweep), ``report`` (markdown),
``cli`` (the command line).
"""

import os

# libtpu reads these when it initializes, which happens at the first
# topology or compile, after this import. Without them it probes for a TPU
# host and logs errors; deviceless compilation needs neither. libtpu also
# takes a machine-wide lock file so that two processes cannot drive one TPU;
# with no TPU to share, several compiling processes (pytest-xdist workers,
# the sweep's jobs) may load it at once.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from rmsnorm_jax.tpu_aot.compile import Row  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import compile_fn  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import compile_one  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import libtpu_available  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import single_device_mesh  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import sweep  # noqa: E402
from rmsnorm_jax.tpu_aot.compile import topology  # noqa: E402
from rmsnorm_jax.tpu_aot.hlo import hbm_bytes  # noqa: E402
from rmsnorm_jax.tpu_aot.report import markdown  # noqa: E402
from rmsnorm_jax.tpu_aot.report import summary  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import CORES_PER_CHIP  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import DTYPES  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import GENERATIONS  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import HBM_BYTES_PER_S  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import OPS  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import Variant  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import device_bandwidth  # noqa: E402
from rmsnorm_jax.tpu_aot.specs import min_bytes  # noqa: E402

__all__ = [
    "CORES_PER_CHIP", "DTYPES", "GENERATIONS", "HBM_BYTES_PER_S", "OPS",
    "Row", "Variant", "compile_fn", "compile_one", "device_bandwidth", "hbm_bytes",
    "libtpu_available", "markdown", "min_bytes", "single_device_mesh",
    "summary", "sweep", "topology",
]
