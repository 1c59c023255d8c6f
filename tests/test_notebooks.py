"""The notebooks in notebooks/: committed clean, and runnable top to bottom.

Executing them takes a few minutes, so a plain ``pytest`` run (the README's
test command, CI's main test step) only checks that they are present and
committed without outputs, and what their install cell installs where (with
pip stubbed out); ``test_notebook_runs`` executes them when
``RMSNORM_JAX_NOTEBOOKS=1`` is set, which ``.ci/notebooks.sh`` does. That
script is the one place CI runs them, so they never run twice.

Running them needs the notebooks extra (``pip install -e ".[notebooks]"``:
nbclient, nbformat, ipykernel, matplotlib, optax). The kernel runs this
interpreter (sys.executable), with the working directory set to notebooks/,
as Jupyter would. A failing cell fails the test with the cell's traceback.
Executed copies are written to ``$RMSNORM_JAX_NOTEBOOK_OUT`` when that is set
(for inspection), never over the committed notebooks.
"""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

RUN_VAR = "RMSNORM_JAX_NOTEBOOKS"
NOTEBOOK_DIR = pathlib.Path(__file__).absolute().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Per cell; the whole set runs in about 3 minutes on 2 CPU cores.
CELL_TIMEOUT_S = 300
KERNEL_NAME = "rmsnorm-jax-test"
# tests/conftest.py gives this process 8 host devices for the sharding tests;
# the notebooks should see the machine as a user's Jupyter would.
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def _install_cell(path):
  nb = json.loads(path.read_text())
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"
           and "REPO_URL = " in "".join(c["source"])]
  assert len(cells) == 1, f"{path.name}: {len(cells)} install cells"
  return "".join(cells[0]["source"])


def test_install_cells_agree_with_the_package_url():
  # The repository URL lives in setup.cfg's metadata; each notebook repeats
  # it because a notebook opened on Colab has nothing else to read it from.
  cfg = configparser.ConfigParser()
  cfg.read(NOTEBOOK_DIR.parent / "setup.cfg")
  url = cfg["metadata"]["url"]
  cells = {p.name: _install_cell(p) for p in NOTEBOOKS}
  for name, cell in cells.items():
    assert f'REPO_URL = "{url}"' in cell, (name, url)
  assert len(set(cells.values())) == 1, "the install cells differ"


def _run_install_cell(cell, cwd, tmp_path):
  """Runs the install cell where rmsnorm_jax is not importable, with pip
  replaced by a stub that records its arguments; returns them (or None)."""
  stub = tmp_path / "stub"
  (stub / "pip").mkdir(parents=True)
  record = tmp_path / "pip_args.json"
  (stub / "pip" / "__init__.py").write_text("")
  (stub / "pip" / "__main__.py").write_text(
      "import json, sys\n"
      f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
  script = tmp_path / "cell.py"
  script.write_text(cell)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["PYTHONPATH"] = str(stub)
  # -S: no site-packages, so the installed rmsnorm_jax is not found, as on a
  # fresh Colab runtime.
  proc = subprocess.run([sys.executable, "-S", str(script)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return json.loads(record.read_text()) if record.exists() else None


def test_install_cell_installs_nothing_inside_a_checkout(tmp_path):
  cell = _install_cell(NOTEBOOKS[0])
  assert _run_install_cell(cell, NOTEBOOK_DIR, tmp_path) is None


def test_install_cell_prefers_an_uploaded_package(tmp_path):
  cell = _install_cell(NOTEBOOKS[0])
  work = tmp_path / "colab"
  work.mkdir()
  old = work / "rmsnorm_jax-0.0.9.tar.gz"
  new = work / "rmsnorm_jax-0.1.0-py3-none-any.whl"
  old.write_bytes(b"")
  new.write_bytes(b"")
  os.utime(old, (1_000_000, 1_000_000))
  args = _run_install_cell(cell, work, tmp_path)
  assert args[:2] == ["install", "-q"]
  assert f"rmsnorm_jax[notebooks] @ {new.resolve().as_uri()}" in args


def test_install_cell_falls_back_to_the_repository(tmp_path):
  cell = _install_cell(NOTEBOOKS[0])
  work = tmp_path / "colab"
  work.mkdir()
  url = re.search(r'REPO_URL = "([^"]+)"', cell).group(1)
  args = _run_install_cell(cell, work, tmp_path)
  if any(pathlib.Path("/content").glob("rmsnorm_jax-*")):
    pytest.skip("/content holds an rmsnorm_jax package, which the cell prefers")
  assert f"rmsnorm_jax[notebooks] @ git+{url}" in args


def test_notebooks_found():
  names = {p.name for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "benchmark.ipynb", "tiling.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
  # Outputs of a run here (CPU numbers, or a stale error) would be shown on
  # GitHub and Colab as if they were the notebook's results.
  nb = json.loads(path.read_text())
  dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, (
      f"{path.name}: code cells {dirty} have outputs; clear them "
      f"(jupyter nbconvert --clear-output --inplace {path.name})")


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  """A kernelspec for this interpreter, found first through JUPYTER_PATH.

  A "python3" kernelspec installed elsewhere on the machine could point at
  another Python without jax; this one cannot.
  """
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "rmsnorm_jax tests",
      "language": "python",
  }))
  keys = ("JUPYTER_PATH", "MPLBACKEND", "XLA_FLAGS")
  old = {k: os.environ.get(k) for k in keys}
  os.environ["JUPYTER_PATH"] = os.pathsep.join(
      [str(root)] + ([old["JUPYTER_PATH"]] if old["JUPYTER_PATH"] else []))
  # Plots render inline as PNG outputs; nothing needs a display.
  os.environ.pop("MPLBACKEND", None)
  flags = _DEVICE_COUNT_FLAG.sub("", old["XLA_FLAGS"] or "").strip()
  if flags:
    os.environ["XLA_FLAGS"] = flags
  else:
    os.environ.pop("XLA_FLAGS", None)
  yield KERNEL_NAME
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.mark.skipif(
    os.environ.get(RUN_VAR) != "1",
    reason=f"executes the notebooks only with {RUN_VAR}=1 (.ci/notebooks.sh "
           "sets it)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_name):
  extra = "needs the notebooks extra: pip install -e '.[notebooks]'"
  nbclient = pytest.importorskip("nbclient", reason=extra)
  nbformat = pytest.importorskip("nbformat", reason=extra)
  for module in ("ipykernel", "matplotlib", "optax"):
    pytest.importorskip(module, reason=extra)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  t0 = time.perf_counter()
  try:
    client.execute()
  finally:
    out = os.environ.get("RMSNORM_JAX_NOTEBOOK_OUT")
    if out:
      pathlib.Path(out).mkdir(parents=True, exist_ok=True)
      nbformat.write(nb, pathlib.Path(out) / path.name)
  print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
