"""The main job (python -m rmsnorm_jax): what it checks, says and claims."""

import contextlib
import io
import re

import jax
import numpy as np
import pytest

import rmsnorm_jax as rj
from rmsnorm_jax import __main__ as main_job


def _rows(out, op, shape, dtype):
  """Lines of the printed tables that belong to one case."""
  return [l for l in out.splitlines()
          if l.startswith(op + " ") and " " + "x".join(map(str, shape)) + " "
          in l and f" {np.dtype(dtype).name} " in l]


@pytest.fixture(scope="module")
def job_output():
  """The printed output of one run of the main job (it takes seconds)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = main_job.main(["--repeats", "2"])
  assert status == 0, out.getvalue()
  return out.getvalue()


def test_main_job_checks_every_case_and_names_what_ran(job_output):
  out = job_output
  assert f"all {len(main_job.CASES)} results within tolerance" in out
  platform = main_job.lowering_platform()
  for op, shape, dtype in main_job.CASES:
    correctness, timing = _rows(out, op, shape, dtype)
    assert " yes " in correctness
    assert correctness.endswith(main_job.explain(op, platform, shape, dtype))
    # Three min / median / max cells: auto, xla, flax.
    cells = re.findall(r"([\d.]+) / ([\d.]+) / ([\d.]+)", timing)
    assert len(cells) == 3, timing
    for cell in cells:
      lo, med, hi = map(float, cell)
      assert 0 < lo <= med <= hi


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the no-ratio rule is the CPU's")
def test_main_job_claims_no_speed_ratio_on_cpu(job_output):
  out = job_output
  assert "No speed ratio on cpu" in out
  assert "rmsnorm_jax.bench" in out
  assert not re.search(r"\d\.\d\dx\b", out), out
  assert "vs xla" not in out and "vs flax" not in out


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="on CPU the library has no kernel to choose")
def test_explain_on_cpu_says_xla_and_why():
  for op, shape, dtype in main_job.CASES:
    text = main_job.explain(op, "cpu", shape, dtype)
    assert re.fullmatch(r"xla \(.+\)", text), text


def test_ratio_only_where_the_ranges_are_disjoint():
  rng = np.random.default_rng()
  fast = list(rng.uniform(1.0, 1.2, 7))
  slow = list(rng.uniform(2.0, 2.4, 7))
  cell = lambda a, b: main_job.ratio_cell(main_job.spread(a),
                                          main_job.spread(b))
  assert cell(fast, slow) == f"{np.median(slow) / np.median(fast):.2f}x"
  assert cell(slow, fast) == f"{np.median(fast) / np.median(slow):.2f}x"
  # One sample of either reaching into the other's range is enough (a
  # sample at the other's median lies inside it whatever the draw; a fixed
  # 2.1 fell below all seven slow samples in about one run in eight).
  assert cell(fast + [float(np.median(slow))], slow) == "overlap"
  assert cell(fast, slow + [float(np.median(fast))]) == "overlap"


def test_device_times_reads_the_benchmarks_profiler_records(monkeypatch):
  # The benchmark's real candidates, with the profiler timing replaced by
  # made-up records (a CPU has no device events): each entry of IMPLS must
  # get the record of its own candidate, in seconds.
  from rmsnorm_jax import bench
  made_up = {}

  def fake_time_candidates(cands, *, reps, profiler):
    assert profiler and reps == 3
    out = {}
    for c in cands:
      lo, med, hi = sorted(np.random.default_rng().uniform(1, 100, 3))
      made_up[c.impl] = (lo * 1e-6, med * 1e-6, hi * 1e-6)
      out[c.fn.__name__] = dict(time_us=med, time_min=lo, time_max=hi,
                                timing="profiler")
    return out

  monkeypatch.setattr(bench, "time_candidates", fake_time_candidates)
  for op in ("rms_norm", "rms_norm_residual"):
    got = main_job.device_times(op, (64, 256), jax.numpy.bfloat16, 3)
    assert set(got) == set(main_job.IMPLS)
    for impl, label in main_job.BENCH_IMPLS.items():
      assert got[impl] == made_up[label]


def test_no_device_time_falls_back_to_the_host_clock(monkeypatch):
  def no_trace(*args):
    raise RuntimeError("no device events in the profiler trace")

  monkeypatch.setattr(main_job, "device_times", no_trace)
  row = main_job.run_case("rms_norm", (8, 256), jax.numpy.float32,
                          platform="cpu", repeats=2, batch=1,
                          device_clock=True, rng=np.random.default_rng())
  assert row["ok"] and row["clock"] == "host"
  assert "no device events" in row["note"]
  for lo, med, hi in row["times"].values():
    assert 0 < lo <= med <= hi


def test_spread_is_min_median_max():
  samples = list(np.random.default_rng().uniform(0, 1, 9))
  assert main_job.spread(samples) == (min(samples), float(np.median(samples)),
                                      max(samples))


def test_time_calls_gives_one_sample_per_repeat():
  x = np.random.default_rng().normal(size=(4, 128)).astype(np.float32)
  fns = {"a": lambda v: rj.rms_norm(v), "b": lambda v: rj.rms_norm(v) * 2}
  samples = main_job.time_calls(fns, (x,), repeats=3, batch=2)
  assert set(samples) == {"a", "b"}
  assert all(len(s) == 3 and min(s) > 0 for s in samples.values())


def test_help_is_complete(capsys):
  with pytest.raises(SystemExit) as exc:
    main_job.main(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  assert "``" not in out
  assert "python -m rmsnorm_jax" in out
  options = out.split("options:", 1)[1]
  for option in ("--repeats", "--batch", "--host-clock"):
    block = options.split(option, 1)[1].split("\n  -", 1)[0]
    assert "default" in block, (option, block)


@pytest.mark.parametrize("flag", ["--repeats", "--batch"])
def test_main_job_rejects_counts_below_one(capsys, flag):
  with pytest.raises(SystemExit):
    main_job.main([flag, "0"])
  assert f"{flag} must be >= 1; got 0" in capsys.readouterr().err
