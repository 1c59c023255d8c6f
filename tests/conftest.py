"""Test-wide setup: eight host CPU devices, so sharding tests have a mesh.

XLA reads the flag when the CPU backend starts, i.e. at the first use of a
device, which happens after this module is imported.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG
                             ).strip()
