"""A stand-in for the parts of PyTorch the benchmark's peer worker uses.

tests/test_bench.py copies this file to ``<tmp>/torch.py`` and puts ``<tmp>``
on the worker's PYTHONPATH, so that the peer worker's protocol, profiler
parsing and attribution run end to end on a machine without torch or a GPU.
"Device" work is a fixed list of events per call, on a fake clock:
``rms_norm`` is one kernel of 3 us, a backward two kernels of 4 and 1 us, a
copy one memcpy of 2 us. The submodules (torch.nn, torch.nn.functional,
torch.profiler) are registered in ``sys.modules`` so this one file serves
their imports.
"""

import contextlib
import json
import sys
import types

__version__ = "0.0+stand-in"
float32, float16, bfloat16, uint8 = "float32", "float16", "bfloat16", "uint8"
STATE = {"clock": 0.0, "corr": 0, "events": [], "profiling": False}


def launch(name, dur, cat="kernel"):
  """A host launch and its device event, linked by a correlation id."""
  STATE["corr"] += 1
  STATE["clock"] += 1.0
  if STATE["profiling"]:
    STATE["events"].append(dict(ph="X", cat="cuda_runtime", name="launch",
                                ts=STATE["clock"], dur=0.5,
                                args=dict(correlation=STATE["corr"])))
    STATE["events"].append(dict(ph="X", cat=cat, name=name,
                                ts=STATE["clock"] + 0.5, dur=dur,
                                args=dict(correlation=STATE["corr"])))
  STATE["clock"] += dur


class device:  # noqa: N801 (torch's name)

  def __init__(self, name):
    self.type = name


class Generator:

  def __init__(self, device=None):
    self.device = device

  def manual_seed(self, seed):
    return self


class Tensor:

  def __init__(self, shape, dtype, dev=None):
    self.shape, self.dtype, self.device = tuple(shape), dtype, dev

  def detach(self):
    return Tensor(self.shape, self.dtype, self.device)

  def requires_grad_(self, flag=True):
    return self

  def to(self, dtype=None, **_):
    return Tensor(self.shape, dtype or self.dtype, self.device)

  def __mul__(self, other):
    return self

  __add__ = __mul__

  def random_(self):
    return self

  def copy_(self, src):
    launch("Memcpy DtoD (Device -> Device)", 2.0, cat="gpu_memcpy")
    return self


def randn(shape, generator=None, device=None, dtype=None):
  return Tensor(shape, dtype, device)


def empty(n, dtype=None, device=None):
  return Tensor((n,), dtype, device)


def _grad(outputs, inputs, grad_outputs=None, retain_graph=None):
  launch("rms_norm_bwd", 4.0)
  launch("reduce_dweight", 1.0)
  return tuple(inputs)


def _rms_norm(x, normalized_shape, weight=None, eps=None):
  launch("rms_norm_fwd", 3.0)
  return x


class _Event:

  def record(self):
    pass

  def synchronize(self):
    pass

  def elapsed_time(self, other):
    return 0.001


autograd = types.SimpleNamespace(grad=_grad)
cuda = types.SimpleNamespace(
    is_available=lambda: True, get_device_name=lambda index=0: "Stand-in",
    synchronize=lambda: None, empty_cache=lambda: None,
    Event=lambda enable_timing=False: _Event())


class _Profile:

  def __init__(self, activities=None):
    self.events = []

  def __enter__(self):
    STATE["events"], STATE["profiling"] = [], True
    return self

  def __exit__(self, *exc):
    STATE["profiling"] = False
    self.events = list(STATE["events"])
    return False

  def export_chrome_trace(self, path):
    with open(path, "w") as fp:
      json.dump(dict(traceEvents=self.events), fp)


@contextlib.contextmanager
def _record_function(name):
  start = STATE["clock"]
  yield
  STATE["clock"] += 1.0
  STATE["events"].append(dict(ph="X", cat="user_annotation", name=name,
                              ts=start, dur=STATE["clock"] - start))


nn = types.ModuleType("torch.nn")
nn.functional = types.ModuleType("torch.nn.functional")
nn.functional.rms_norm = _rms_norm
profiler = types.ModuleType("torch.profiler")
profiler.profile = _Profile
profiler.record_function = _record_function
profiler.ProfilerActivity = types.SimpleNamespace(CPU="cpu", CUDA="cuda")
sys.modules.update({"torch.nn": nn, "torch.nn.functional": nn.functional,
                    "torch.profiler": profiler})
