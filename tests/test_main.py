"""The main job runs, checks its results and prints its table."""

from rmsnorm_jax import __main__ as main_job


def test_main_job_prints_table_and_passes(capsys):
  assert main_job.main(["--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "all results within tolerance" in out
  for op, shape, dtype in main_job.CASES:
    row = [l for l in out.splitlines()
           if l.startswith(op + " ") and "x".join(map(str, shape)) in l
           and f" {dtype.__name__} " in l]
    assert len(row) == 1, (op, shape, dtype, out)
    assert " yes " in row[0]


def test_main_job_rejects_bad_repeats(capsys):
  import pytest
  with pytest.raises(SystemExit):
    main_job.main(["--repeats", "0"])
  assert "--repeats must be >= 1; got 0" in capsys.readouterr().err
