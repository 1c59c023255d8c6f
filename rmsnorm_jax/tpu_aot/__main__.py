"""``python -m rmsnorm_jax.tpu_aot``: see :mod:`rmsnorm_jax.tpu_aot.cli`."""

import sys

from rmsnorm_jax.tpu_aot import cli

if __name__ == "__main__":
  sys.exit(cli.main())
