"""Smoke check of an installed rmsnorm_jax (run by .ci/wheel.sh).

Fails unless the package imports from the clean venv's site-packages (not a
checkout), carries py.typed and its license, reports one version through
both ``__version__`` and the installed metadata, and computes RMSNorm within
float32 rounding of the float64 NumPy reference.
"""

import importlib.metadata
import os
import pathlib
import sys

import numpy as np

import rmsnorm_jax as rj
from rmsnorm_jax import reference

site = pathlib.Path(os.environ["RMSNORM_JAX_EXPECT_SITE"]).resolve()
pkg = pathlib.Path(rj.__file__).resolve().parent
if pkg.parent != site:
  sys.exit(f"rmsnorm_jax imported from {pkg}, expected under {site}")
if not (pkg / "py.typed").is_file():
  sys.exit(f"{pkg} has no py.typed")
dist = importlib.metadata.distribution("rmsnorm_jax")
if dist.version != rj.__version__:
  sys.exit(f"metadata version {dist.version} != __version__ {rj.__version__}")
if dist.metadata["License-Expression"] != "Apache-2.0":
  sys.exit(f"License-Expression is {dist.metadata['License-Expression']!r}")
if not any(str(f).endswith("LICENSE") for f in dist.files or ()):
  sys.exit("the installed distribution carries no LICENSE file")

rng = np.random.default_rng()
x = rng.normal(0.3, 1.5, (6, 384)).astype(np.float32)
scale = rng.normal(1.0, 0.2, (384,)).astype(np.float32)
want, _ = reference.rms_norm(x, scale)
err = reference.rel_error(rj.rms_norm(x, scale), want)
# float32 arithmetic over 384 elements: a few units of float32 rounding.
if not err < 1e-5:
  sys.exit(f"rms_norm relative error {err:.2e} vs the float64 reference")
print(f"rmsnorm_jax {rj.__version__} from {pkg}: rel err {err:.1e}")
