"""Per-device tuning files: lookup in gpu_tiling.resolve, the file format,
and the tuning command's refusal without a GPU (CPU only, nothing timed)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from rmsnorm_jax import tune
from rmsnorm_jax.kernels import gpu_tiling

KIND = "Test GPU X1"
SLUG = "test_gpu_x1"
HEURISTIC = gpu_tiling.Config(num_sms=132)


def _heuristic(op, rows, hidden, itemsize=2):
  return gpu_tiling.resolve(HEURISTIC, op, rows, hidden, itemsize=itemsize,
                            device_kind=None)


def _entry(op, rows, hidden, chosen, itemsize=2, decision="tuned",
           exact=False):
  cols = gpu_tiling.next_pow2(hidden)
  return dict(op=op, itemsize=itemsize, cols=cols,
              **(dict(hidden=hidden) if exact else {}),
              rows=rows, dtype="bfloat16", decision=decision, chosen=chosen,
              candidates=[dict(label="heuristic", config=tune.knobs_of(
                  _heuristic(op, rows, hidden, itemsize)), us=10.0)], run=1)


def _table(*entries, kind=KIND):
  return dict(schema=gpu_tiling.SCHEMA, device_kind=kind,
              runs=[dict(run=1, date="2026-01-01 00:00 UTC", device_kind=kind,
                         command="python -m rmsnorm_jax.tune")],
              entries=list(entries))


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
  """A tuning folder searched before the package's; caches cleared."""
  monkeypatch.setenv(gpu_tiling.TUNING_DIR_ENV, str(tmp_path))
  gpu_tiling.clear_cache()
  yield tmp_path
  gpu_tiling.clear_cache()


def _write(folder, data, slug=SLUG):
  path = folder / f"{slug}.json"
  path.write_text(tune.dumps(data))
  return path


def test_device_slug():
  assert gpu_tiling.device_slug("NVIDIA H200") == "nvidia_h200"
  assert gpu_tiling.device_slug("NVIDIA H100 80GB HBM3") == (
      "nvidia_h100_80gb_hbm3")
  with pytest.raises(ValueError, match="device kind"):
    gpu_tiling.device_slug(" - ")


def test_file_knobs_are_used(tuning_dir):
  # Knobs that the heuristic would not choose, so that their source shows.
  h = _heuristic("backward", 8192, 4096)
  chosen = dict(tune.knobs_of(h), num_warps=h.num_warps // 2,
                programs_per_sm=h.programs_per_sm + 1,
                prefetch=not h.prefetch)
  _write(tuning_dir, _table(_entry("backward", 8192, 4096, chosen)))
  got = gpu_tiling.resolve(HEURISTIC, "backward", 8192, 4096,
                           device_kind=KIND)
  assert tune.knobs_of(got) == chosen
  # Nearest rows: an entry measured at 8192 rows serves 16384 rows too; an
  # unseen width, another op or itemsize keeps the heuristic.
  assert tune.knobs_of(gpu_tiling.resolve(
      HEURISTIC, "backward", 16384, 3000, device_kind=KIND)) == chosen
  for op, hidden, isz in [("backward", 8192, 2), ("forward", 4096, 2),
                          ("backward", 4096, 4)]:
    assert gpu_tiling.resolve(HEURISTIC, op, 8192, hidden, itemsize=isz,
                              device_kind=KIND) == _heuristic(
                                  op, 8192, hidden, isz)


def test_exact_width_entry_serves_that_width_only(tuning_dir):
  # 4608 columns run 8192-wide tiles: an entry measured at 4608 serves
  # 4608 alone; other widths of the class keep the class's entry, or the
  # heuristic without one.
  h = _heuristic("forward", 8192, 4608)
  padded = dict(tune.knobs_of(h), num_warps=4, programs_per_sm=4,
                persistent=True)
  wide = dict(tune.knobs_of(h), num_warps=32)
  _write(tuning_dir, _table(_entry("forward", 8192, 4608, padded,
                                   exact=True)))
  resolve = lambda hidden, rows=8192: tune.knobs_of(gpu_tiling.resolve(
      HEURISTIC, "forward", rows, hidden, device_kind=KIND))
  assert resolve(4608) == padded
  # Rows within a factor of two of the entry's (EXACT_WIDTH_ROWS_LOG2).
  assert resolve(4608, rows=4096) == resolve(4608, rows=16384) == padded
  assert resolve(4608, rows=2048) == tune.knobs_of(
      _heuristic("forward", 2048, 4608))
  assert resolve(5120) == tune.knobs_of(_heuristic("forward", 8192, 5120))
  assert resolve(8192) == tune.knobs_of(_heuristic("forward", 8192, 8192))
  gpu_tiling.clear_cache()
  _write(tuning_dir, _table(
      _entry("forward", 8192, 4608, padded, exact=True),
      _entry("forward", 8192, 8192, wide)))
  assert resolve(4608) == padded and resolve(4608, rows=1024) == wide
  assert resolve(5120) == wide and resolve(8192) == wide


@pytest.mark.parametrize("hidden", [8192, 3000, 0])
def test_exact_width_must_pad_to_its_class(tuning_dir, hidden):
  entry = _entry("forward", 8192, 4608, tune.knobs_of(
      _heuristic("forward", 8192, 4608)), exact=True)
  path = _write(tuning_dir, _table(dict(entry, hidden=hidden)))
  with pytest.raises(gpu_tiling.TuningFileError) as err:
    gpu_tiling.resolve(HEURISTIC, "forward", 8192, 4608, device_kind=KIND)
  assert str(path) in str(err.value) and err.match(r"entries\[0\]\.hidden")


def test_quantized_residual_forward_has_its_own_key(tuning_dir):
  # The quantized forward with and without a residual take their own
  # entries: each one's knobs apply to its op alone.
  op_res = gpu_tiling.QUANTIZED_RESIDUAL_OP
  h = _heuristic("quantized_forward", 8192, 4096)
  plain = dict(tune.knobs_of(h), block_rows=1, num_warps=8,
               programs_per_sm=4, persistent=True)
  fused = dict(tune.knobs_of(h), block_rows=1, num_warps=16,
               programs_per_sm=2, persistent=True)
  _write(tuning_dir, _table(_entry("quantized_forward", 8192, 4096, plain),
                            _entry(op_res, 8192, 4096, fused)))
  for op, want in (("quantized_forward", plain), (op_res, fused)):
    got = gpu_tiling.resolve(HEURISTIC, op, 8192, 4096, device_kind=KIND)
    assert tune.knobs_of(got) == want, op
  # Its tuning inputs carry the residual: x, residual, scale.
  sets = tune._inputs(op_res, 16, 128, jnp.bfloat16, 1, 0)
  assert [a.shape for a in sets[0]] == [(16, 128), (16, 128), (128,)]


def test_tuned_row_block_still_shrinks_for_the_grid(tuning_dir):
  # A tuned 8-row block of 16 warps at 8192 rows: at 132 rows the blocks
  # would leave SMs idle, so block and warps shrink together.
  h = _heuristic("forward", 8192, 1024)
  chosen = dict(tune.knobs_of(h), block_rows=8, num_warps=16)
  _write(tuning_dir, _table(_entry("forward", 8192, 1024, chosen)))
  big = gpu_tiling.resolve(HEURISTIC, "forward", 8192, 1024,
                           device_kind=KIND)
  small = gpu_tiling.resolve(HEURISTIC, "forward", 132, 1024,
                             device_kind=KIND)
  assert (big.block_rows, big.num_warps) == (8, 16)
  assert (small.block_rows, small.num_warps) == (1, 2)


def test_kept_heuristic_and_unknown_device(tuning_dir):
  h = _heuristic("forward", 8192, 4096)
  other = dict(tune.knobs_of(h), num_warps=h.num_warps * 2)
  _write(tuning_dir, _table(_entry("forward", 8192, 4096, other,
                                   decision="heuristic")))
  assert gpu_tiling.resolve(HEURISTIC, "forward", 8192, 4096,
                            device_kind=KIND) == h
  assert gpu_tiling.tuning_file("Never Seen GPU") is None
  assert gpu_tiling.resolve(HEURISTIC, "forward", 8192, 4096,
                            device_kind="Never Seen GPU") == h
  # On this CPU-only machine "auto" finds no GPU: the heuristic.
  assert jax.default_backend() != "gpu"
  assert gpu_tiling.gpu_kind() is None
  assert gpu_tiling.resolve(HEURISTIC, "forward", 8192, 4096) == h


def test_abstract_gpu_device_names_the_file_and_sm_count(tuning_dir):
  # Lowering for a GPU the host does not have (jax.sharding.use_abstract_mesh
  # with an AbstractDevice, as jax's own Triton lowering reads it): that
  # model's tuning file and its num_cores as the SM count.
  h = _heuristic("backward", 8192, 4096)
  chosen = dict(tune.knobs_of(h), num_warps=h.num_warps // 2)
  _write(tuning_dir, _table(_entry("backward", 8192, 4096, chosen)))
  device = jax.sharding.AbstractDevice(device_kind=KIND, num_cores=100,
                                       platform="cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("gpu",), abstract_device=device)):
    assert gpu_tiling.gpu_kind() == KIND
    assert gpu_tiling.num_sms() == 100
    got = gpu_tiling.resolve(gpu_tiling.Config(), "backward", 8192, 4096)
  assert (got.num_warps, got.num_sms) == (h.num_warps // 2, 100)
  # An abstract device of another platform names no GPU.
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                    platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("tpu",), abstract_device=tpu)):
    assert gpu_tiling.abstract_gpu() is None
    assert gpu_tiling.gpu_kind() == (None if jax.default_backend() != "gpu"
                                     else jax.devices()[0].device_kind)


def test_user_config_wins_knob_by_knob(tuning_dir):
  h = _heuristic("backward", 8192, 4096)
  chosen = dict(tune.knobs_of(h), num_warps=h.num_warps // 2,
                programs_per_sm=h.programs_per_sm + 1)
  _write(tuning_dir, _table(_entry("backward", 8192, 4096, chosen)))
  user = gpu_tiling.Config(num_sms=132, num_warps=h.num_warps * 2)
  got = gpu_tiling.resolve(user, "backward", 8192, 4096, device_kind=KIND)
  assert got.num_warps == h.num_warps * 2
  assert got.programs_per_sm == h.programs_per_sm + 1
  # A user block_cols forcing the chunked tiling: the file (whole-row
  # tiles) does not apply.
  chunked = gpu_tiling.Config(num_sms=132, block_cols=1024)
  assert gpu_tiling.resolve(chunked, "backward", 8192, 4096,
                            device_kind=KIND) == gpu_tiling.resolve(
                                chunked, "backward", 8192, 4096,
                                device_kind=None)


@pytest.mark.parametrize("change,key", [
    (lambda d: d["entries"][0]["chosen"].update(num_warps="8"),
     r"entries\[0\]\.chosen\.num_warps"),
    (lambda d: d["entries"][0]["chosen"].update(block_rows=3),
     r"entries\[0\]\.chosen\.block_rows"),
    (lambda d: d["entries"][0]["chosen"].update(warps=8),
     r"entries\[0\]\.chosen\.warps"),
    (lambda d: d["entries"][0].update(op="fwd"), r"entries\[0\]\.op"),
    (lambda d: d["entries"][0].update(cols=65536), r"entries\[0\]\.cols"),
    (lambda d: d["entries"][0].pop("decision"), r"entries\[0\]\.decision"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), r"entries\[1\]"),
    (lambda d: d.update(schema=2), "schema"),
    (lambda d: d.update(device_kind="Other GPU"), "device_kind"),
])
def test_malformed_file_names_file_and_key(tuning_dir, change, key):
  data = _table(_entry("forward", 8192, 4096,
                       tune.knobs_of(_heuristic("forward", 8192, 4096))))
  change(data)
  path = _write(tuning_dir, data)
  with pytest.raises(gpu_tiling.TuningFileError) as err:
    gpu_tiling.resolve(HEURISTIC, "forward", 8192, 4096, device_kind=KIND)
  assert str(path) in str(err.value)
  assert err.match(key)


def test_unreadable_json_names_file(tuning_dir):
  path = tuning_dir / f"{SLUG}.json"
  path.write_text('{"schema": 1,')
  with pytest.raises(gpu_tiling.TuningFileError, match="not readable"):
    gpu_tiling.resolve(HEURISTIC, "forward", 8, 128, device_kind=KIND)


def test_file_round_trips_and_merges(tmp_path):
  h = _heuristic("forward", 8192, 4096)
  first = _table(_entry("forward", 8192, 4096, tune.knobs_of(h)),
                 _entry("backward", 8192, 4096, tune.knobs_of(
                     _heuristic("backward", 8192, 4096))))
  text = tune.dumps(first)
  assert json.loads(text) == first
  # One line per candidate: a re-tune diffs line by line.
  assert text.count('"label"') == text.count("\n      {")
  path = str(tmp_path / "t.json")
  tune.write(path, first)
  with open(path) as fp:
    assert json.load(fp) == first
  # A second run replaces the entry it re-measured and keeps the other.
  newer = dict(_entry("forward", 8192, 4096, dict(tune.knobs_of(h),
                                                  num_warps=4)), run=2)
  second = dict(_table(newer), runs=[dict(first["runs"][0], run=2)])
  merged = tune.merge(first, second)
  assert [(e["op"], e["run"]) for e in merged["entries"]] == [
      ("forward", 2), ("backward", 1)]
  assert [r["run"] for r in merged["runs"]] == [1, 2]
  # An entry of an exact width is its own key beside its class's.
  exact = dict(_entry("forward", 8192, 4608, tune.knobs_of(h), exact=True),
               run=2)
  both = tune.merge(merged, dict(second, entries=[exact]))
  assert [(e["op"], e.get("hidden")) for e in both["entries"]] == [
      ("forward", None), ("forward", 4608), ("backward", None)]
  tune.write(path, both)
  with pytest.raises(ValueError, match="device_kind"):
    tune.merge(first, _table(newer, kind="Other GPU"))
  with pytest.raises(gpu_tiling.TuningFileError):
    tune.write(path, dict(first, schema=0))


def test_candidates_around_the_heuristic():
  for op in gpu_tiling.OPS:
    cands = tune.candidates(op, 8192, 4096, 2, 132)
    labels, configs = zip(*cands)
    assert labels[0] == "heuristic"
    assert configs[0] == _heuristic(op, 8192, 4096)
    assert len(set(configs)) == len(configs) <= 7
    assert all(c.resolved and c.block_cols == 4096 for c in configs)
  with pytest.raises(ValueError, match="hidden must be at most"):
    tune.candidates("forward", 8, 32768, 2, 132)
  # A padded width (4608 in 8192-wide tiles) also tries fewer warps with
  # more programs an SM, and two rows of half the warps, first.
  labels = [lab for lab, _ in tune.candidates("forward", 8192, 4608, 2, 132)]
  assert labels[1:3] == ["w4_p4_ps1", "br2_w8_ps1"] and len(labels) == 7
  assert "w4_p4_ps1" not in dict(tune.candidates("forward", 8192, 8192, 2,
                                                 132))
  # Forward ops of rows up to 4096 columns try one warp a row (no shared
  # memory), with the scale re-read each row; wider rows and the backward
  # (whose two accumulators spill) do not.
  one_warp = dict(block_rows=1, num_warps=1, persistent=False,
                  cache_scale=False)
  for op, hidden, tried in [("residual_forward", 4096, True),
                            ("quantized_forward", 2048, True),
                            ("forward", 8192, False),
                            ("backward", 4096, False)]:
    cands = tune.candidates(op, 8192, hidden, 2, 132)
    hit = [c for _, c in cands
           if all(getattr(c, k) == v for k, v in one_warp.items())]
    assert bool(hit) == tried, (op, hidden)
    if tried:
      assert cands[1] == ("br1_w1_ps0_cs0", hit[0])
  # Forward ops whose heuristic runs a persistent grid (16384 columns) try
  # one program a row with the scale re-read, first; the backward does not.
  for op in gpu_tiling.OPS:
    h = _heuristic(op, 4096, 16384)
    cands = tune.candidates(op, 4096, 16384, 2, 132)
    tried = cands[1][0] == "ps0_pf0_cs0"
    assert h.persistent and tried == (not op.endswith("backward")), op
    if tried:
      assert cands[1][1] == dataclasses.replace(
          h, persistent=False, prefetch=False, cache_scale=False)
  assert "ps0_pf0_cs0" not in dict(tune.candidates("residual_forward", 8192,
                                                   4096, 2, 132))
  # Backward ops that hold the scale in registers try it re-read each row
  # (fewer registers: no spill at 5376 columns, where the heuristic
  # spills), after a padded width's two; the forward ops do not.
  for op in gpu_tiling.OPS:
    for hidden, at in [(4096, 1), (5376, 3)]:
      h = _heuristic(op, 8192, hidden)
      cands = tune.candidates(op, 8192, hidden, 2, 132)
      if op.endswith("backward"):
        assert h.cache_scale, (op, hidden)
        assert cands[at] == ("cs0", dataclasses.replace(h, cache_scale=False))
      else:
        assert "cs0" not in dict(cands), (op, hidden)


def test_candidates_include_the_current_launch(tuning_dir):
  # A re-tune weighs its choice against the launch the call runs with now:
  # here 4608 columns take the 8192 class's entry, which differs from the
  # heuristic.
  h = _heuristic("forward", 8192, 8192)
  chosen = dict(tune.knobs_of(h), num_warps=32, persistent=True)
  _write(tuning_dir, _table(_entry("forward", 8192, 8192, chosen)))
  cands = tune.candidates("forward", 8192, 4608, 2, 132, device_kind=KIND)
  assert [lab for lab, _ in cands[:2]] == ["heuristic", "current"]
  assert tune.knobs_of(cands[1][1]) == chosen and len(cands) == 7
  assert cands[2][0] == "w4_p4_ps1"
  # Where the file changes nothing (or there is none), no such candidate.
  for kind in (KIND, None):
    labels = [lab for lab, _ in tune.candidates("backward", 8192, 4608, 2,
                                                132, device_kind=kind)]
    assert "current" not in labels


def test_decide_needs_more_than_noise():
  # 2% under the better heuristic time and beyond the two timings' spread.
  assert tune.decide([100.0, 101.0], [(2, 97.0), (3, 99.0)]) == 2
  assert tune.decide([100.0, 101.0], [(2, 98.5)]) is None
  assert tune.decide([100.0, 104.0], [(2, 97.0)]) is None
  assert tune.decide([None, None], [(2, 50.0)]) is None


def test_decide_keeps_the_incumbent_within_noise():
  # Re-measuring an entry whose earlier choice (index 2) is not the
  # heuristic: it stays unless a launch, the heuristic included, beats it
  # by the margin. The same timings without an incumbent keep the heuristic.
  assert tune.decide([35.0, 35.3], [(2, 34.6), (3, 35.5)], incumbent=2) == 2
  assert tune.decide([35.0, 35.3], [(2, 34.6), (3, 35.5)]) is None
  assert tune.decide([33.0, 33.2], [(2, 34.6)], incumbent=2) is None
  assert tune.decide([35.0, 35.3], [(2, 34.6), (3, 33.0)], incumbent=2) == 3
  assert tune.decide([35.0, 35.3], [(2, 34.6), (3, 33.95)],
                     incumbent=2) == 2


def test_has_entry(tuning_dir):
  knobs = tune.knobs_of(_heuristic("forward", 8192, 4096))
  _write(tuning_dir, _table(_entry("forward", 8192, 4096, knobs),
                            _entry("forward", 8192, 3584, knobs, exact=True)))
  assert gpu_tiling.has_entry(KIND, "forward", 8192, 4096, 2)
  assert gpu_tiling.has_entry(KIND, "forward", 8192, 4096, 2, hidden=4096)
  assert gpu_tiling.has_entry(KIND, "forward", 8192, 4096, 2, hidden=3584)
  assert not gpu_tiling.has_entry(KIND, "forward", 8192, 4096, 2,
                                  hidden=3840)
  assert not gpu_tiling.has_entry(KIND, "forward", 4096, 4096, 2)
  assert not gpu_tiling.has_entry(KIND, "backward", 8192, 4096, 2)
  assert not gpu_tiling.has_entry(KIND, "forward", 8192, 4096, 4)
  assert not gpu_tiling.has_entry(None, "forward", 8192, 4096, 2)


def test_cli_refuses_without_gpu(tmp_path, capsys):
  out = tmp_path / "x.json"
  assert tune.main(["--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "no GPU" in err and "Nothing was written" in err
  assert not out.exists()


def test_cli_help_and_bad_arguments(capsys):
  with pytest.raises(SystemExit) as done:
    tune.main(["--help"])
  assert done.value.code == 0
  text = capsys.readouterr().out
  assert "--budget-s" in text and "minute per run" in text
  with pytest.raises(SystemExit):
    tune.main(["--ops", "fwd"])
  assert "--ops: expected names from forward" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tune.main(["--cases", "8x32768:bfloat16"])
  assert "hidden must be at most" in capsys.readouterr().err


def test_shipped_files_pass_the_schema():
  names = [n for n in os.listdir(gpu_tiling.TUNING_DIR)
           if n.endswith(".json")]
  for name in names:
    path = os.path.join(gpu_tiling.TUNING_DIR, name)
    with open(path) as fp:
      data = json.load(fp)
    assert gpu_tiling.validate_table(data, path)
    assert gpu_tiling.device_slug(data["device_kind"]) + ".json" == name


def test_shipped_entries_serve_the_calls_they_were_measured_on():
  # No shipped entry is shadowed by another of its class: the call each
  # was measured on (its op, rows and width) gets its knobs, e.g. the few
  # wide rows of a class whose other entry was measured on 4096 rows.
  for name in os.listdir(gpu_tiling.TUNING_DIR):
    if not name.endswith(".json"):
      continue
    with open(os.path.join(gpu_tiling.TUNING_DIR, name)) as fp:
      data = json.load(fp)
    for e in data["entries"]:
      want = e["chosen"] if e["decision"] == "tuned" else {}
      got = gpu_tiling.tuned_knobs(data["device_kind"], e["op"], e["rows"],
                                   e["cols"], e["itemsize"],
                                   e.get("hidden", e["cols"]))
      assert got == want, (name, e["op"], e["rows"], e.get("hidden"),
                           e["cols"])
