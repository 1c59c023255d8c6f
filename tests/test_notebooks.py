"""The notebooks in notebooks/: committed clean, and runnable top to bottom.

Executing them takes a few minutes, so a plain ``pytest`` run (the README's
test command, CI's main test step) only checks that they are present and
committed without outputs; ``test_notebook_runs`` executes them when
``RMSNORM_JAX_NOTEBOOKS=1`` is set, which ``.ci/notebooks.sh`` does. That
script is the one place CI runs them, so they never run twice.

Running them needs the notebooks extra (``pip install -e ".[notebooks]"``:
nbclient, nbformat, ipykernel, matplotlib, optax). The kernel runs this
interpreter (sys.executable), with the working directory set to notebooks/,
as Jupyter would. A failing cell fails the test with the cell's traceback.
Executed copies are written to ``$RMSNORM_JAX_NOTEBOOK_OUT`` when that is set
(for inspection), never over the committed notebooks.
"""

import json
import os
import pathlib
import re
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
