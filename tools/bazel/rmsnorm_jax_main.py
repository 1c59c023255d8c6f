"""Bazel entry point equivalent to ``python -m rmsnorm_jax``.

Running rmsnorm_jax/__main__.py directly as a script would put the package
directory itself first on sys.path (so its modules could shadow others) and
give it no parent package; runpy runs it exactly as ``python -m`` does.
"""

import runpy

if __name__ == "__main__":
  runpy.run_module("rmsnorm_jax", run_name="__main__", alter_sys=True)
