"""Entry point: python -m rmsnorm_jax.bench (see --help)."""

from rmsnorm_jax.bench.cli import main

if __name__ == "__main__":
  main()
