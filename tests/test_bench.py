"""CPU smoke test of the benchmark: record structure and derived ratios.

Timings on a shared CPU are noise, so only their presence is checked.
"""

import dataclasses
import gzip
import json
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import base
from rmsnorm_jax import bench
from rmsnorm_jax import reference
from rmsnorm_jax.bench import triton_ir
from rmsnorm_jax.kernels import gpu_tiling

from gpu_test_util import needs_triton_target

KEYS = {"op", "impl", "rows", "hidden", "dtype", "bytes", "time_us",
        "time_min", "time_max", "gbps", "timing", "ratio_to_roofline",
        "ratio_to_copy", "speedup_vs_xla", "noise", "backend"}


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
    assert r["time_min"] <= r["time_us"] <= r["time_max"], r
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
  # Off-GPU the kernel runs in Pallas interpret mode, and its column says so.
  assert "rmsnorm_jax [pallas_gpu (interpret)]" in text
  assert by[("fwd", "rmsnorm_jax")]["backend"] == "pallas_gpu (interpret)"


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
  assert bench.trace_file(str(tmp_path)) == str(path)
  kernels, modules, info = bench.device_events(str(path))
  assert info["n_kernels"] == 9 and modules == []
  mine = bench.attribute(kernels, modules, "rb00101_")
  summary = bench.summarize(mine, 4)
  # Calls take 3+1, 3+2, 3+3, 3+4 us.
  assert summary["time_us"] == 5.5 and summary["kernels"] == 2
  assert (summary["time_min"], summary["time_max"]) == (4.0, 7.0)
  assert summary["breakdown"] == [("k0", 3.0), ("k1", 2.5)]
  assert bench.summarize(mine, 3)["timing"] == "profiler-mean"


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
  ops = ["linen_fwd", "linen_bwd", "linen_fwd_default", "linen_bwd_mixed",
         "linen_bwd_default"]
  records = bench.run_benchmark([((8, 256), jnp.bfloat16)], ops=ops,
                                impls=layers + ["xla"], reps=1, log=None)
  by = {(r["op"], r["impl"]): r for r in records}
  # xla is not a layer: the layer ops time only the layers and the roofline.
  # (A cotangent in another dtype than the layer's y would fail the vjp: the
  # backward ops ran with dy in float32 for flax's defaults, in bfloat16
  # with dtype=bfloat16.)
  assert set(by) == {(op, i) for op in ops for i in layers + ["roofline"]}
  for r in records:
    assert not r.get("error") and r["time_us"] > 0, r
  n = 8 * 256
  assert by[("linen_bwd", "roofline")]["bytes"] == 3 * n * 2
  assert by[("linen_bwd", "flax_nnx")]["bytes"] == 3 * n * 2 + 8 * 4 + 256 * 4
  # flax's defaults: bfloat16 x in, float32 y out, float32 scale.
  assert by[("linen_fwd_default", "rmsnorm_jax_nnx")]["bytes"] == (
      n * 6 + 8 * 4 + 256 * 4)
  # Float32 parameters: a float32 scale read and dscale written; with
  # flax's defaults a float32 dy read too.
  assert by[("linen_bwd_mixed", "flax_linen")]["bytes"] == (
      3 * n * 2 + 8 * 4 + 256 * 8)
  assert by[("linen_bwd_default", "flax_linen")]["bytes"] == (
      n * 8 + 8 * 4 + 256 * 8)
  assert by[("linen_bwd_default", "roofline")]["bytes"] == n * 8
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


def _rec(impl, t, lo=None, hi=None, timing="profiler", op="fwd"):
  return dict(op=op, impl=impl, rows=64, hidden=256, dtype="float32",
              bytes=1000, time_us=t, time_min=lo, time_max=hi, timing=timing)


def test_ratios_against_roofline_copy_and_xla():
  records = bench.add_ratios([_rec("roofline", 10.0), _rec("copy", 8.0),
                              _rec("xla", 12.0), _rec("rmsnorm_jax", 9.0),
                              _rec("liger", 18.0)])
  by = {r["impl"]: r for r in records}
  assert math.isclose(by["rmsnorm_jax"]["ratio_to_copy"], 9.0 / 8.0)
  assert math.isclose(by["rmsnorm_jax"]["ratio_to_roofline"], 9.0 / 10.0)
  assert math.isclose(by["liger"]["speedup_vs_xla"], 12.0 / 18.0)
  assert by["copy"]["ratio_to_copy"] is None
  assert all(r["noise"] == [] for r in records)  # device timing
  text = bench.table(records)
  # References first, peers last; the cells carry the copy ratio.
  header = next(line for line in text.splitlines() if line.startswith("| shape"))
  assert header.split(" | ")[3:5] == ["roofline", "copy"]
  assert header.rstrip(" |").endswith("liger")
  assert "1.12x copy" in text and "0.90x roof" in text


def test_host_timing_ratios_are_noise_when_the_spread_overlaps_one():
  records = bench.add_ratios([
      _rec("roofline", 10.0, 5.0, 30.0, "wallclock"),
      _rec("xla", 11.0, 6.0, 25.0, "wallclock"),
      # 100x slower and spreads far apart: a supported ratio.
      _rec("rmsnorm_jax", 1000.0, 900.0, 1500.0, "wallclock")])
  by = {r["impl"]: r for r in records}
  assert by["xla"]["noise"] == ["ratio_to_roofline"]
  assert by["rmsnorm_jax"]["noise"] == []
  text = bench.table(records)
  # Off-accelerator the table prints times with their spread, no ratio.
  row = next(line for line in text.splitlines() if line.startswith("| 64x"))
  assert row.endswith("| 1000.0 (900.0..1500.0) |"), row
  assert "x roof" not in row and "speedup" not in row, row
  assert "no ratio is printed" in text


def test_missing_torch_is_a_note_not_an_error(tmp_path, monkeypatch):
  # A torch that cannot be imported (whatever this machine has installed):
  # the benchmark's own columns still come, and a note says why the peers
  # and the copy do not.
  (tmp_path / "torch.py").write_text(
      'raise ImportError("no torch in this test")\n')
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  notes = []
  records = bench.run_benchmark([((4, 128), jnp.float32)], ops=["fwd"],
                                impls=["xla"], reps=1, peers=["liger"],
                                copy=True, notes=notes, log=None)
  assert {r["impl"] for r in records} == {"roofline", "xla"}
  assert not any(r.get("error") for r in records)
  assert any("torch is not importable" in n and "no torch in this test" in n
             for n in notes), notes
  # Nor a copy through CuPy, even where CuPy sees a GPU: JAX ran on the CPU.
  assert any(n.startswith("copy: not measured") for n in notes), notes
  assert "- note: peers and copy: torch is not importable" in bench.table(
      records, notes)


def test_peer_trace_attribution_by_launch_correlation(tmp_path):
  # torch's Chrome trace: user annotations and launches on the host,
  # kernels on the device linked to their launch by a correlation id. The
  # last kernel starts after its range closed (device clock skew): its
  # launch decides.
  ev = [dict(ph="X", cat="user_annotation", name="liger|fwd", ts=0, dur=100),
        dict(ph="X", cat="user_annotation", name="copy|fwd", ts=200, dur=100)]
  for i, (launch, start, dur) in enumerate(
      [(10, 20, 4.0), (30, 40, 6.0), (210, 220, 2.0), (290, 301, 3.0)]):
    ev.append(dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel",
                   ts=launch, dur=1, args=dict(correlation=i)))
    ev.append(dict(ph="X", cat="kernel", name=f"k{i}", ts=start, dur=dur,
                   args=dict(correlation=i)))
  path = tmp_path / "trace.json"
  path.write_text(json.dumps(dict(traceEvents=ev)))
  from rmsnorm_jax.bench import peer_worker
  found = peer_worker._attribute(str(path), {"liger|fwd", "copy|fwd"})
  assert [k["name"] for k in found["liger|fwd"]] == ["k0", "k1"]
  assert [k["name"] for k in found["copy|fwd"]] == ["k2", "k3"]
  s = peer_worker._summarize(found["copy|fwd"], 2)
  assert (s["time_us"], s["time_min"], s["time_max"]) == (2.5, 2.0, 3.0)
  assert peer_worker._summarize(found["liger|fwd"], 1)["kernels"] == 2


def test_cli_help_names_every_default_and_no_internal_names(capsys):
  with pytest.raises(SystemExit):
    bench.main(["--help"])
  text = capsys.readouterr().out
  assert "`" not in text and "shapes.BENCHMARK" not in text
  options = [o for o in ("--small", "--cases", "--ops", "--impls", "--peers",
                         "--copy", "--reps", "--json", "--markdown",
                         "--plot")]
  # argparse wraps help texts; every option's own help names its default.
  flat = " ".join(text.split())
  for i, opt in enumerate(options):
    start = flat.index(f" {opt} ", flat.index("options:"))
    end = (flat.index(f" {options[i + 1]} ", start) if i + 1 < len(options)
           else len(flat))
    assert "default" in flat[start:end], opt


def test_cases_by_text_and_by_tag():
  from rmsnorm_jax import shapes
  cases = bench.parse_cases("8x256:bfloat16,tag:wide")
  assert cases[0] == ((8, 256), jnp.dtype(jnp.bfloat16))
  wide = {c[0][1] for c in cases[1:]}
  assert {16384, 32768, 65536} <= wide
  assert cases[1:] == [s.case for s in shapes.select("bench", "wide")]
  for bad in ("8x256", "8x256:int8x", "tag:nope", "0x4:float32"):
    with pytest.raises(ValueError, match="--cases"):
      bench.parse_cases(bad)
  with pytest.raises(SystemExit, match="--cases"):
    bench.main(["--cases", "8by256:float32"])


def test_peer_and_copy_columns_end_to_end_with_a_stand_in_torch(
    tmp_path, monkeypatch):
  # tests/fake_torch.py stands in for torch in the worker process: its
  # "device" events have fixed durations (rms_norm 3 us; backward 4 + 1 us;
  # copy 2 us), so the times that come back test the worker's profiler
  # parsing, attribution and protocol, and the merge into the records.
  import pathlib
  import shutil
  shutil.copy(pathlib.Path(__file__).with_name("fake_torch.py"),
              tmp_path / "torch.py")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  notes = []
  records = bench.run_benchmark(
      [((64, 256), jnp.float32)], ops=["fwd", "bwd", "fused_fwd",
                                       "linen_fwd"],
      impls=["xla"], reps=2, peers=["torch", "liger"], copy=True,
      notes=notes, log=None)
  by = {(r["op"], r["impl"]): r for r in records}
  assert by[("fwd", "torch")]["time_us"] == 3.0
  assert by[("fwd", "torch")]["timing"] == "torch-profiler"
  assert by[("bwd", "torch")]["time_us"] == 5.0
  assert by[("bwd", "torch")]["kernels"] == 2
  # torch has no fused add+norm and no layer: no such records.
  assert ("fused_fwd", "torch") not in by and ("linen_fwd", "torch") not in by
  # A copy for every op timed, of that op's minimum bytes.
  for op in ("fwd", "bwd", "fused_fwd", "linen_fwd"):
    copy = by[(op, "copy")]
    assert copy["time_us"] == 2.0, copy
    assert copy["bytes"] == bench.min_bytes(op, 64, 256, copy["dtype"])
  assert math.isclose(by[("fwd", "torch")]["ratio_to_copy"], 1.5)
  assert math.isclose(by[("bwd", "xla")]["ratio_to_copy"],
                      by[("bwd", "xla")]["time_us"] / 2.0)
  assert math.isclose(by[("fwd", "torch")]["speedup_vs_xla"],
                      by[("fwd", "xla")]["time_us"] / 3.0)
  # Device time (the peer) against host time (XLA on a CPU): not a ratio
  # the table may claim.
  assert "speedup_vs_xla" in by[("fwd", "torch")]["noise"]
  assert by[("fwd", "torch")]["noise"] == ["ratio_to_roofline",
                                           "speedup_vs_xla"]
  # The notes name what timed the peers, and the device.
  assert any("torch 0.0+stand-in on Stand-in: torch" in n for n in notes)
  # With no peer asked for, the note names the copy alone.
  worker = bench.PeerWorker([], log=None)
  try:
    assert worker.notes == ["copy timed through torch 0.0+stand-in on "
                            "Stand-in (no peer)"], worker.notes
  finally:
    worker.close()
  # liger is not importable next to the stand-in: a note, not an error.
  assert any("liger" in n for n in notes), notes
  assert not any(r.get("error") for r in records)
  text = bench.table(records, notes)
  assert "| roofline | copy | xla | torch |" in text
  assert by[("linen_fwd", "copy")]["dtype"] == "bfloat16"
  assert "1.50x copy" in text and "speedup noise" in text


# ------------------------------------------------------------ feature ops --

def _public_call(op, backend, d):
  """The public API call each feature op stands for, written out here
  independently of the benchmark's own table (bwd: the vjp with dy)."""
  import rmsnorm_jax as rj
  eps = bench.EPS
  if op == "quant_fwd":
    return rj.rms_norm_quantized(d["x"], d["s"], eps=eps, backend=backend)
  if op == "quant_fp8_fwd":
    return rj.rms_norm_quantized(d["x"], d["s"], eps=eps, backend=backend,
                                 quant_dtype=jnp.float8_e4m3fn)
  if op == "quant_fused_fwd":
    return rj.rms_norm_quantized(d["x"], d["s"], eps=eps, backend=backend,
                                 residual=d["r"])
  if op == "bias_fwd":
    return rj.rms_norm(d["x"], d["s"], d["b"], eps=eps, backend=backend)
  if op == "head_fwd":
    return rj.rms_norm(d["x"], d["s"], eps=eps, backend=backend)
  args = (d["x"], d["s"], d["b"]) if op == "bias_bwd" else (d["x"], d["s"])
  _, vjp = jax.vjp(lambda *a: rj.rms_norm(*a, eps=eps, backend=backend),
                   *args)
  return vjp(d["dy"])


def _reference(op, d):
  """Float64 NumPy results of a feature op (quantized ops: the
  dequantized y)."""
  import numpy as np

  f64 = {k: np.asarray(v, np.float64) for k, v in d.items()}
  x, s = f64["x"], f64["s"]
  h = x + f64["r"] if op == "quant_fused_fwd" else x
  y, rstd = reference.rms_norm(h, s, eps=bench.EPS)
  if op == "bias_fwd":
    return (y + f64["b"],)
  if op.endswith("_fwd"):
    return (y,) if op == "head_fwd" else (y, h)
  dy, r = f64["dy"], rstd[..., None]
  dx, _ = reference.rms_norm_grad(x, s, dy, eps=bench.EPS)
  # A per-head scale's gradient sums over tokens only, one row per head.
  dscale = np.sum(dy * x * r, axis=0)
  return (dx, dscale) + ((np.sum(dy, axis=0),) if op == "bias_bwd" else ())


@pytest.mark.parametrize("op", bench.FEATURE_OPS)
def test_feature_candidates_compute_the_public_call(op):
  import numpy as np

  from rmsnorm_jax.bench import cases
  rows, hidden = 4, 256
  cands = bench.build_candidates(op, ["xla", "rmsnorm_jax"], rows, hidden,
                                 jnp.float32, 1)
  assert [c.impl for c in cands] == ["xla", "rmsnorm_jax"], cands
  d = cands[0].inputs[0]
  if op.startswith("head_"):
    assert d["x"].shape == (rows, 2, 128) and d["s"].shape == (2, 128)
  for c in cands:
    backend = "xla" if c.impl == "xla" else cases.kernel_backend()[0]
    got = jax.tree.leaves(c.fn(*c.arg_sets[0]))
    want = jax.tree.leaves(jax.jit(
        lambda d, backend=backend: _public_call(op, backend, d))(d))
    assert len(got) == len(want), (c.impl, len(got), len(want))
    for g, w in zip(got, want):
      assert g.shape == w.shape and g.dtype == w.dtype, (c.impl, g, w)
      if op.endswith("_fwd"):
        # The same jitted program: the same bits.
        np.testing.assert_array_equal(np.asarray(g, np.float32),
                                      np.asarray(w, np.float32))
      else:
        # The vjp of a forward done beforehand against forward and
        # backward in one program: float32 sums compiled apart may round
        # differently in the last bits.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # What each candidate computes, against float64 NumPy: float32 inputs
    # and arithmetic (2e-5, as the numerics tests); a quantized y is off by
    # at most half a step of its row scale (int8: max|y| / 127 / 2 per
    # element, about 1/250 of the row in norm; e4m3: 3 mantissa bits,
    # 2**-4 relative), so its norm error stays under 2e-2 and 7e-2.
    ref = _reference(op, d)
    if op.startswith("quant_"):
      q, q_scale = (np.asarray(a, np.float64) for a in got[:2])
      assert q_scale.shape == (rows, 1)
      deq = q * q_scale
      numerics_tol = 7e-2 if op == "quant_fp8_fwd" else 2e-2
      assert reference.rel_error(deq, ref[0]) <= numerics_tol, (c.impl, op)
      if op == "quant_fused_fwd":
        assert reference.rel_error(got[2], ref[1]) <= 2e-5
      continue
    for g, w in zip(got, ref):
      assert reference.rel_error(g, w) <= 2e-5, (c.impl, op)


def test_feature_ops_records_bytes_and_head_shapes():
  import numpy as np
  notes = []
  records = bench.run_benchmark(
      [((8, 256), jnp.bfloat16)], ops=bench.FEATURE_OPS, impls=["xla"],
      reps=1, notes=notes, log=None)
  records += bench.run_benchmark(
      [((8, 100), jnp.bfloat16)], ops=["head_fwd", "head_bwd", "bias_fwd"],
      impls=["xla"], reps=1, notes=notes, log=None)
  by = {(r["op"], r["impl"], r["hidden"]): r for r in records}
  for op in bench.FEATURE_OPS:
    assert not by[(op, "xla", 256)].get("error"), by[(op, "xla", 256)]
    assert by[(op, "xla", 256)]["bytes"] == bench.min_bytes(
        op, 8, 256, "bfloat16")
    assert by[(op, "roofline", 256)]["bytes"] == bench.roofline_bytes(
        op, 8, 256, "bfloat16")
  # The roofline op moves the large arrays: x and q (one byte an element)
  # for the quantized forward, x, r, h and q with a residual.
  n = 8 * 256
  assert bench.roofline_bytes("quant_fwd", 8, 256, "bfloat16") == 3 * n
  assert bench.roofline_bytes("quant_fused_fwd", 8, 256, "bfloat16") == 7 * n
  # hidden=100 is no multiple of 128: the head ops skip it with a note, the
  # others run.
  assert ("head_fwd", "xla", 100) not in by and ("bias_fwd", "xla", 100) in by
  assert any("head_bwd 8x100: skipped" in n for n in notes), notes
  text = bench.table(records, notes)
  assert "### quant_fp8_fwd" in text and "| 8x2x128 | bfloat16 |" in text
  assert np.dtype(by[("quant_fwd", "xla", 256)]["dtype"]) == jnp.bfloat16


def test_cli_takes_the_feature_ops_and_keeps_the_default_set(tmp_path):
  from rmsnorm_jax.bench import cli
  args = cli.parse_args([])
  default = cli._list_arg(args.ops, bench.OPS, "--ops", cli.OP_GROUPS)
  assert default == list(bench.DEFAULT_OPS)
  assert not set(default) & set(bench.FEATURE_OPS)
  assert cli._list_arg("features,fwd", bench.OPS, "--ops",
                       cli.OP_GROUPS) == list(bench.FEATURE_OPS) + ["fwd"]
  path = tmp_path / "b.json"
  records = bench.main(["--small", "--ops", "bias_bwd,head_fwd",
                        "--impls", "xla", "--json", str(path)])
  assert {r["op"] for r in records} == {"bias_bwd", "head_fwd"}
  assert json.loads(path.read_text())["records"]
  with pytest.raises(SystemExit, match="features"):
    bench.main(["--small", "--ops", "quant"])


def test_resume_times_only_the_cases_a_cut_short_run_left(tmp_path):
  # A run stopped after its first case (as by a time limit) is continued:
  # that case's records are kept as they were, the next case is added, and
  # a layer op done on the bfloat16 case is not repeated on a float32 case
  # of the same shape (as in one uninterrupted run).
  path = tmp_path / "run.json"
  common = ["--ops", "fwd,linen_fwd", "--impls", "xla", "--reps", "1",
            "--json", str(path), "--resume"]
  first = bench.main(["--cases", "8x128:bfloat16"] + common)
  assert {r["case"] for r in first} == {"8x128:bfloat16"}
  again = bench.main(["--cases", "8x128:bfloat16,8x128:float32"] + common)
  saved = json.loads(path.read_text())
  assert saved["records"] == again
  assert [r for r in again if r["case"] == "8x128:bfloat16"] == first
  added = [r for r in again if r["case"] == "8x128:float32"]
  assert {r["op"] for r in added} == {"fwd"}  # linen_fwd: bf16's run
  assert {r["impl"] for r in added} == {"roofline", "xla"}
  assert len(saved["commands"]) == 2
  assert saved["command"] == saved["commands"][0]
  # Nothing left: the third call times nothing and changes nothing.
  assert bench.main(["--cases", "8x128:bfloat16,8x128:float32"]
                    + common) == again
  # Other settings, no --json, or a file from elsewhere: clear errors.
  with pytest.raises(SystemExit, match=r"impls=\['xla'\].*impls="):
    bench.main(["--cases", "8x128:float32", "--ops", "fwd,linen_fwd",
                "--impls", "xla,rmsnorm_jax", "--reps", "1", "--json",
                str(path), "--resume"])
  with pytest.raises(SystemExit, match="expected --json PATH"):
    bench.main(["--small", "--resume"])
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"records": []}))
  with pytest.raises(SystemExit, match="no run settings"):
    bench.main(["--small", "--json", str(other), "--resume"])
  with pytest.raises(ValueError, match="'case'"):
    bench.run_benchmark([((8, 128), jnp.float32)], ops=["fwd"],
                        impls=["xla"], reps=1, log=None,
                        previous=[{"op": "fwd"}])


def test_mosaic_gpu_impl_runs_only_where_mosaic_gpu_does():
  # rmsnorm_jax_mosaic names the Mosaic GPU kernels: on a Hopper GPU each
  # op's candidate runs them; elsewhere (no interpret mode) it is left out.
  from rmsnorm_jax.bench import cases
  from gpu_test_util import HOPPER_REASON
  hopper = HOPPER_REASON is None
  assert (cases.mosaic_backend() is not None) == hopper
  for op in ("fwd", "bwd", "fused_fwd", "fused_bwd", "bias_fwd", "quant_fwd"):
    cands = bench.build_candidates(op, ["rmsnorm_jax_mosaic"], 8, 256,
                                   jnp.bfloat16, 1)
    if not hopper:
      assert cands == [], (op, cands)
      continue
    assert [c.backend for c in cands] == ["mosaic_gpu"], (op, cands)
    jax.block_until_ready(cands[0].fn(*cands[0].arg_sets[0]))


def test_a_candidate_that_fails_to_build_keeps_its_impl_name():
  # The record of an impl that raised while its candidate was built names
  # that impl (the tables put its "err" in the impl's own column).
  @dataclasses.dataclass(frozen=True)
  class Declines(base.Xla):
    name: ClassVar[str] = "declines"

    def cannot_serve(self, call):
      return "this implementation serves no call"

  records = bench.run_benchmark([((8, 256), jnp.float32)], ops=("bwd",),
                                impls=("xla", ("declines", Declines())),
                                reps=1, log=None)
  by_impl = {r["impl"]: r for r in records}
  assert {"xla", "declines"} <= set(by_impl), records
  assert not by_impl["xla"].get("error")
  assert "serves no call" in by_impl["declines"]["error"]
  assert by_impl["declines"]["error"].startswith("ValueError: ")
  cands = bench.build_candidates("bwd", [("declines", Declines())], 8, 256,
                                 jnp.float32, 1)
  assert [type(c).__name__ for c in cands] == ["BuildError"]
  assert cands[0].impl == "declines"
  assert isinstance(cands[0].error, ValueError)


@needs_triton_target
def test_triton_kernels_of_a_call_lowered_without_a_gpu():
  # benchmarks/triton_registers.py compiles these kernels' IR with pip's
  # Triton: their names, launch settings and IR must be those of the call.
  rows, hidden = 2048, 8192
  x = jax.ShapeDtypeStruct((rows, hidden), jnp.float16)
  s = jax.ShapeDtypeStruct((hidden,), jnp.float16)

  def bias_backward(x, s, b, dy):
    _, vjp = jax.vjp(lambda x, s, b: rj.rms_norm(x, s, b,
                                                  backend="pallas_gpu"),
                     x, s, b)
    return vjp(dy)
  kernels = triton_ir.triton_kernels(bias_backward, x, s, s, x)
  assert [k.name for k in kernels] == ["rmsnorm_forward", "rmsnorm_backward"]
  bwd = kernels[1]
  want = gpu_tiling.resolve(
      gpu_tiling.Config(num_sms=gpu_tiling.num_sms()), "backward", rows,
      hidden, itemsize=2, device_kind=None, float16_bias=True)
  assert bwd.num_warps == want.num_warps == gpu_tiling.BWD_F16_BIAS_WARPS
  assert bwd.num_stages == want.num_stages
  assert bwd.grid[1:] == (1, 1) and bwd.grid[0] >= 1
  for k in kernels:
    assert k.ir.startswith(f"module @{k.name}"), k.ir[:80]
    assert f"tt.func public @{k.name}(" in k.ir
  # The backward writes dx and the float32 dscale and dbias partials.
  assert bwd.ir.count("tt.store") >= 3, bwd.ir
  assert triton_ir.triton_kernels(lambda x: x * 2, x) == []
