"""CPU smoke test of the benchmark: record structure and derived ratios.

Timings on a shared CPU are noise, so only their presence is checked.
"""

import gzip
import json
import math

import jax
import jax.numpy as jnp
import pytest

from rmsnorm_jax import bench

KEYS = {"op", "impl", "rows", "hidden", "dtype", "bytes", "time_us", "gbps",
        "timing", "ratio_to_roofline", "speedup_vs_xla"}


def test_run_benchmark_records_and_ratios(tmp_path):
  records = bench.run_benchmark(
      [((8, 128), jnp.float32)], ops=["fwd", "bwd", "fused_bwd"],
      impls=["xla", "rmsnorm_jax"], reps=1, log=None)
  by = {(r["op"], r["impl"]): r for r in records}
  assert set(by) == {(op, impl) for op in ("fwd", "bwd", "fused_bwd")
                     for impl in ("roofline", "xla", "rmsnorm_jax")}
  for r in records:
    assert KEYS <= set(r), r
    assert r["time_us"] > 0 and r["timing"] in ("wallclock", "profiler"), r
    assert math.isclose(r["gbps"], r["bytes"] / (r["time_us"] * 1e3))
    roof = by[(r["op"], "roofline")]["time_us"]
    assert math.isclose(r["ratio_to_roofline"], r["time_us"] / roof)
    xla = by[(r["op"], "xla")]["time_us"]
    if r["impl"] != "roofline":
      assert math.isclose(r["speedup_vs_xla"], xla / r["time_us"])
  n = 8 * 128
  assert by[("fwd", "roofline")]["bytes"] == 2 * n * 4
  assert by[("bwd", "xla")]["bytes"] == 3 * n * 4 + 8 * 4 + 2 * 128 * 4
  assert by[("fused_bwd", "roofline")]["bytes"] == 4 * n * 4
  text = bench.table(records)
  assert "### fwd" in text and "### bwd" in text and "wallclock" in text


def test_trace_parsing_attributes_kernels_to_calls(tmp_path):
  # A synthetic trace in the layout jax.profiler writes on GPUs: a device
  # process with stream lines, kernel events carrying the XLA module.
  ev = [
      dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
      dict(ph="M", pid=2, name="process_name",
           args=dict(name="/device:GPU:0")),
      dict(ph="M", pid=2, tid=7, name="thread_name",
           args=dict(name="Stream #7(Compute)")),
      dict(ph="M", pid=2, tid=9, name="thread_name",
           args=dict(name="XLA Ops")),
  ]
  ts = 0.0
  for call in range(4):
    for k, dur in enumerate((3.0, 1.0 + call)):
      ev.append(dict(ph="X", pid=2, tid=7, ts=ts, dur=dur, name=f"k{k}",
                     args=dict(hlo_module="jit_rb00101_fwd_x")))
      ev.append(dict(ph="X", pid=2, tid=9, ts=ts, dur=dur, name="dup"))
      ts += 10
  ev.append(dict(ph="X", pid=2, tid=7, ts=ts, dur=50.0, name="other",
                 args=dict(hlo_module="jit_rb00102_fwd_y")))
  path = tmp_path / "host.trace.json.gz"
  with gzip.open(path, "wt") as fp:
    json.dump(dict(traceEvents=ev), fp)
  assert bench._trace_file(str(tmp_path)) == str(path)
  kernels, modules, info = bench.device_events(str(path))
  assert info["n_kernels"] == 9 and modules == []
  mine = bench._attribute(kernels, modules, "rb00101_")
  summary = bench._summarize(mine, 4)
  assert summary["time_us"] == 5.5 and summary["kernels"] == 2
  assert summary["breakdown"] == [("k0", 3.0), ("k1", 2.5)]
  assert bench._summarize(mine, 3)["timing"] == "profiler-mean"


def test_cli_rejects_unknown_op():
  with pytest.raises(SystemExit, match="--ops"):
    bench.main(["--small", "--ops", "nope"])


def test_trace_without_device_events_falls_back_to_host_timing():
  # On CPU the profiler trace holds no GPU kernels: each candidate must
  # still get a time (back-to-back host timing), not an error.
  records = bench.run_benchmark([((4, 128), jnp.float32)], ops=["fwd"],
                                impls=["xla"], reps=1, profiler=True,
                                log=None)
  assert {r["impl"] for r in records} == {"roofline", "xla"}
  for r in records:
    assert r["time_us"] > 0 and r["timing"] == "wallclock-batched", r
    assert r["jax"] == jax.__version__


def test_layer_ops_time_every_layer_forward_and_backward():
  layers = ["flax_linen", "rmsnorm_jax_linen", "flax_nnx", "rmsnorm_jax_nnx"]
  records = bench.run_benchmark([((8, 256), jnp.bfloat16)],
                                ops=["linen_fwd", "linen_bwd",
                                     "linen_fwd_default"],
                                impls=layers + ["xla"], reps=1, log=None)
  by = {(r["op"], r["impl"]): r for r in records}
  # xla is not a layer: the layer ops time only the layers and the roofline.
  assert set(by) == {(op, i) for op in ("linen_fwd", "linen_bwd",
                                        "linen_fwd_default")
                     for i in layers + ["roofline"]}
  for r in records:
    assert not r.get("error") and r["time_us"] > 0, r
  n = 8 * 256
  assert by[("linen_bwd", "roofline")]["bytes"] == 3 * n * 2
  assert by[("linen_bwd", "flax_nnx")]["bytes"] == 3 * n * 2 + 8 * 4 + 256 * 4
  # flax's defaults: bfloat16 x in, float32 y out, float32 scale.
  assert by[("linen_fwd_default", "rmsnorm_jax_nnx")]["bytes"] == (
      n * 6 + 8 * 4 + 256 * 4)
  flax_bwd = by[("linen_bwd", "flax_linen")]["time_us"]
  assert math.isclose(by[("linen_bwd", "rmsnorm_jax_nnx")]["speedup_vs_xla"],
                      flax_bwd / by[("linen_bwd", "rmsnorm_jax_nnx")]["time_us"])
  assert "### linen_bwd" in bench.table(records)


def test_flax_linen_runs_the_plain_ops_and_other_layers_do_not():
  records = bench.run_benchmark(
      [((8, 256), jnp.bfloat16)], ops=["fwd", "bwd", "fused_fwd"],
      impls=["xla", "flax_linen", "rmsnorm_jax_linen", "flax_nnx",
             "rmsnorm_jax_nnx"], reps=1, log=None)
  for op in ("fwd", "bwd", "fused_fwd"):
    impls = {r["impl"] for r in records if r["op"] == op}
    assert impls == {"roofline", "xla", "flax_linen"}, (op, impls)
