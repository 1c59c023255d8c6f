"""Runs test modules under pytest from a Bazel py_test.

Bazel runs a py_test's main file as a plain script, which would bypass
pytest: no fixtures, no parametrization, and no markers, so tests marked
``gpu`` or ``tpu_aot`` would not be skipped where the hardware or libtpu is
missing. Every py_test in tests/BUILD.bazel therefore has this file as its
main and passes the test module(s) to run as arguments.

The working directory of a Bazel test is the root of this workspace in the
runfiles tree, where setup.cfg (the pytest configuration, with the marker
definitions) is present as data, so pytest finds the same rootdir and
configuration as a plain ``pytest`` run in a checkout.

Sharding: a target with ``shard_count = N`` runs as N processes, each told
its ``TEST_SHARD_INDEX`` of ``TEST_TOTAL_SHARDS``; each keeps every N-th
test of the collected tests ordered by a hash (CRC-32) of their ids, and
deselects the rest. The hash order, rather than collection order, because
parametrized families often alternate (e.g. a GPU-only case that skips after
each CPU case), and a plain stride would give some shards only the skips.
"""

import os
import pathlib
import sys
import zlib

import pytest


class ShardPlugin:
  """Keeps this shard's share of the collected tests."""

  def __init__(self, index, total):
    self.index, self.total = index, total

  def pytest_collection_modifyitems(self, config, items):
    shuffled = sorted(items, key=lambda t: (zlib.crc32(t.nodeid.encode()),
                                            t.nodeid))
    mine = {t.nodeid for t in shuffled[self.index::self.total]}
    keep = [t for t in items if t.nodeid in mine]
    drop = [t for t in items if t.nodeid not in mine]
    if drop:
      config.hook.pytest_deselected(items=drop)
    items[:] = keep

  def pytest_report_header(self, config):
    del config
    return f"bazel shard {self.index + 1} of {self.total}"


class InterpreterPlugin:
  """Names the interpreter in the header: Bazel runs the python3 on PATH."""

  def pytest_report_header(self, config):
    del config
    return f"python: {sys.executable} (prefix {sys.prefix})"


def main(argv):
  args = [
      "-p", "no:cacheprovider",  # The runfiles tree is not ours to write.
      "-o", "console_output_style=classic",
      "-rs",  # Print why each test was skipped.
  ]
  # Bazel's XML_OUTPUT_FILE lets the test report list each test case.
  xml = os.environ.get("XML_OUTPUT_FILE")
  if xml:
    args += ["--junitxml", xml]
  plugins = [InterpreterPlugin()]
  total = int(os.environ.get("TEST_TOTAL_SHARDS", "1"))
  if total > 1:
    # Tells Bazel that this runner understands sharding.
    status = os.environ.get("TEST_SHARD_STATUS_FILE")
    if status:
      pathlib.Path(status).touch()
    plugins.append(ShardPlugin(int(os.environ["TEST_SHARD_INDEX"]), total))
  code = pytest.main(args + argv[1:], plugins=plugins)
  if total > 1 and code == pytest.ExitCode.NO_TESTS_COLLECTED:
    return 0  # More shards than tests: this one has nothing to run.
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv))
