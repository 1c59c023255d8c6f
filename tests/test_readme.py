"""Every Python snippet of README.md runs as written, and its links resolve.

The snippets run as a user would paste them, in fresh interpreters with the
test process's 8-host-device XLA flag removed (tests/conftest.py adds it):
the ones that set ``XLA_FLAGS`` themselves each run alone, the others in one
script in README order, since later snippets use names the earlier ones
define (``x``, ``scale``).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).absolute().parent.parent
README = ROOT / "README.md"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")
# Per interpreter: importing jax and flax and compiling a few small programs
# takes ~10 s on a 2-core CPU.
TIMEOUT_S = 300


def _blocks(lang):
  return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(),
                    flags=re.S | re.M)


def _scripts():
  """(id, source) pairs: the shared script, then each self-contained one."""
  blocks = _blocks("python")
  alone = [b for b in blocks if "XLA_FLAGS" in b]
  shared = "\n".join(b for b in blocks if "XLA_FLAGS" not in b)
  return [("shared", shared)] + [(f"own_flags_{i}", b)
                                 for i, b in enumerate(alone)]


def _clean_env():
  env = dict(os.environ)
  flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  # The package from this checkout, as after `pip install -e .`.
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def test_readme_has_snippets_for_every_use():
  code = "\n".join(_blocks("python"))
  for use in ("rj.rms_norm(", "rj.rms_norm_residual(", "rnn.RMSNorm(",
              "rnn.RMSNormResidual(", "rnnx.RMSNorm(",
              "rnnx.RMSNormResidual(", "jax.make_mesh("):
    assert use in code, use


@pytest.mark.parametrize("name,source", _scripts(), ids=[n for n, _ in
                                                         _scripts()])
def test_readme_snippet_runs(name, source, tmp_path):
  del name
  script = tmp_path / "snippet.py"
  script.write_text(source)
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                        env=_clean_env(), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, (
      f"README snippet failed:\n{source}\n--- stderr ---\n{proc.stderr[-4000:]}")


def test_readme_commands():
  bash = "\n".join(_blocks("bash"))
  assert "python -m rmsnorm_jax" in bash
  assert "python -m pytest -n 2 -rs" in bash


def test_readme_links_resolve():
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
  local = [l for l in links if "://" not in l]
  assert local
  missing = [l for l in local if not (ROOT / l).exists()]
  assert not missing, missing
