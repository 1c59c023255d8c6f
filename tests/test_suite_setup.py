"""The suite's own device rule (tests/conftest.py): tests not marked gpu run
on the CPU backend on every machine."""

import jax
import pytest

import conftest
from gpu_test_util import GPU_HINT, has_cuda


@pytest.mark.parametrize("markexpr, selects", [
    ("", False),
    ("gpu", True),
    ("not gpu", False),
    ("tpu_aot", False),
    ("gpu or tpu_aot", True),
    ("gpu and not tpu_aot", True),
    ("(gpu)", True),
])
def test_which_runs_keep_the_gpu(markexpr, selects):
  assert conftest.selects_gpu_tests(markexpr) is selects


@pytest.mark.skipif(not conftest.GPU_HIDDEN,
                    reason="this run hid no GPU (none installed, -m gpu, or "
                    "JAX_PLATFORMS set by the caller)")
def test_hidden_gpu_leaves_the_cpu_backend():
  assert jax.default_backend() == "cpu"
  assert jax.device_count() == 8
  with pytest.raises(RuntimeError):
    jax.devices("gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="no CUDA GPU visible to this run"
                    + GPU_HINT)
def test_gpu_runs_keep_the_gpu():
  # Reached only where a GPU is visible: the rule must not hide it from the
  # runs that select the gpu tests.
  assert jax.default_backend() == "gpu"
  assert not conftest.GPU_HIDDEN
