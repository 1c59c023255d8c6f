"""Tiling sweep for the PallasGpu kernels (device time from the profiler).

    python benchmarks/gpu_sweep.py [--round 1..5] --json sweep.json

Times each op on a few shapes under several explicit ``PallasGpu`` configs
next to the default heuristic, XLA and the roofline, and prints the configs
ranked per (op, shape). The winners feed the constants in
``rmsnorm_jax/kernels/gpu_tiling.py`` (see docs/gpu_perf_notes.md). The
(op, shape) pairs run in order of how much they decide the targets, and the
JSON is rewritten after each, so a run cut short keeps what it measured.

The explicit configs are taken around the heuristic itself (no tuning file);
"default" is what ``PallasGpu()`` runs on this device, its tuning file
included (``python -m rmsnorm_jax.tune`` writes those; docs/tuning.md), and
where that differs from the heuristic, "heuristic" is timed too.
"""

import argparse
import json

import jax.numpy as jnp

from rmsnorm_jax import bench
from rmsnorm_jax.kernels import gpu_kernels
from rmsnorm_jax.kernels import gpu_tiling
from rmsnorm_jax.kernels.gpu import PallasGpu

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
# (op, shape, dtype) in order of importance.
CASES = [
    ("bwd", (8192, 4096), BF16),
    ("fwd", (8192, 4096), BF16),
    ("fused_bwd", (8192, 4096), BF16),
    ("fwd", (4096, 16384), BF16),
    ("bwd", (4096, 16384), BF16),
    ("bwd", (32768, 128), BF16),
    ("fwd", (32768, 128), BF16),
    ("fwd", (1024, 4096), F32),
    ("bwd", (1024, 4096), F32),
    ("fused_fwd", (8192, 4096), BF16),
    ("bwd", (2048, 8192), F16),
    ("fused_bwd", (32768, 128), BF16),
]

# Second round: explicit configs where the first round left a target missed
# (narrow-row backward, 16384-wide backward, mid-size backward, float32
# forward at 1024 rows).
FOCUSED = [
    ("bwd", (32768, 128), BF16, [dict(programs_per_sm=4),
                                 dict(programs_per_sm=8),
                                 dict(programs_per_sm=4, num_warps=4),
                                 dict(programs_per_sm=4, block_rows=16)]),
    ("fused_bwd", (32768, 128), BF16, [dict(programs_per_sm=4),
                                       dict(programs_per_sm=8),
                                       dict(programs_per_sm=4, num_warps=4)]),
    ("bwd", (4096, 16384), BF16, [dict(num_stages=2), dict(num_stages=3)]),
    ("bwd", (2048, 4096), F16, [dict(block_rows=1, num_warps=8,
                                     programs_per_sm=2),
                                dict(block_rows=1, num_warps=8,
                                     programs_per_sm=3),
                                dict(block_rows=1, programs_per_sm=2),
                                dict(num_stages=2)]),
    ("bwd", (1024, 4096), F32, [dict(num_warps=8, programs_per_sm=2),
                                dict(num_warps=8, programs_per_sm=3),
                                dict(num_stages=2)]),
    ("bwd", (8192, 4096), BF16, [dict(block_rows=1, num_warps=8,
                                      programs_per_sm=2),
                                 dict(num_stages=2)]),
    ("fwd", (1024, 4096), F32, [dict(block_rows=1, num_warps=4),
                                dict(block_rows=1, num_warps=8),
                                dict(block_rows=2, num_warps=8)]),
    ("fused_bwd", (4096, 16384), BF16, [dict(num_stages=2)]),
]

# Third round: the changed defaults against what they replaced (the wide
# backward's second read; the narrow backward's smaller tiles).
OLD_NARROW = dict(block_rows=32, num_warps=8, programs_per_sm=2)
CHECK = [
    ("bwd", (4096, 16384), BF16, [dict(reload=False)]),
    ("fused_bwd", (4096, 16384), BF16, [dict(reload=False)]),
    ("bwd", (32768, 128), BF16, [OLD_NARROW]),
    ("fused_bwd", (32768, 128), BF16, [OLD_NARROW]),
]
# Fourth round: the wide-row backward with the second read (reload) on, in
# the combinations measured only before reload existed (prefetch of the next
# row, two programs per SM, wider programs).
WIDE = [
    ("bwd", (4096, 16384), BF16, [dict(prefetch=True),
                                  dict(prefetch=True, num_warps=32),
                                  dict(num_warps=32),
                                  dict(programs_per_sm=2),
                                  dict(programs_per_sm=2, num_warps=8),
                                  dict(programs_per_sm=2, prefetch=True),
                                  dict(cache_scale=True, prefetch=True)]),
    ("fused_bwd", (4096, 16384), BF16, [dict(prefetch=True),
                                        dict(prefetch=True, num_warps=32),
                                        dict(programs_per_sm=2)]),
    ("bwd", (2048, 16384), F16, [dict(prefetch=True),
                                 dict(prefetch=True, num_warps=32)]),
]
# Fifth round: 32 warps on 16384-wide backward rows (round 4's winner,
# 171.6 us against 195.2 for the 16-warp default), with and without the
# second read and the cached scale, on the three wide backward cases.
WIDE32 = [
    (op, shape, dt, [dict(num_warps=32), dict(num_warps=32, reload=False),
                     dict(num_warps=32, cache_scale=True),
                     dict(num_warps=32, num_stages=2)])
    for op, shape, dt in [("bwd", (4096, 16384), BF16),
                          ("fused_bwd", (4096, 16384), BF16),
                          ("bwd", (2048, 16384), F16),
                          ("fused_bwd", (2048, 16384), F32)]]
# Sixth round: rows wider than 16384 columns. The chunked tiling against
# one-row chunk blocks (fewer rows in flight, so the rows the second loop
# re-reads stay in L2) and against whole rows held in registers (one read:
# 32 values per thread at 32768 columns, 64 at 65536).
WIDER = [
    ("fwd", (2048, 32768), BF16, [dict(block_rows=1),
                                  dict(block_rows=1, num_stages=3),
                                  dict(block_cols=32768),
                                  dict(block_cols=32768, programs_per_sm=1),
                                  dict(block_cols=32768, programs_per_sm=1,
                                       prefetch=True),
                                  dict(block_cols=32768, persistent=False)]),
    ("bwd", (2048, 32768), BF16, [dict(block_cols=32768),
                                  dict(block_cols=32768, cache_scale=True)]),
    ("fwd", (1024, 65536), BF16, [dict(block_rows=1),
                                  dict(block_cols=65536, programs_per_sm=1),
                                  dict(block_cols=65536, persistent=False)]),
    ("bwd", (1024, 65536), BF16, [dict(block_cols=65536)]),
    ("fused_fwd", (2048, 32768), BF16, [dict(block_cols=32768,
                                             programs_per_sm=1)]),
    ("fused_bwd", (2048, 32768), BF16, [dict(block_cols=32768)]),
]
# Seventh round: 65536-wide rows, where whole rows spill, walked in chunks
# of one row with fewer, wider programs (so fewer rows are in flight and the
# second loop finds them in L2); and the 32768-wide quantized forward, now
# on whole rows, against the chunked tiling it had.
WIDEST = [
    ("fwd", (1024, 65536), BF16, [dict(block_rows=1),
                                  dict(block_rows=1, block_cols=16384),
                                  dict(block_rows=1, block_cols=32768),
                                  dict(block_rows=2, block_cols=8192)]),
    ("fused_fwd", (1024, 65536), BF16, [dict(block_rows=1, block_cols=16384),
                                        dict(block_rows=1,
                                             block_cols=32768)]),
    ("quant_fwd", (2048, 32768), BF16, [dict(block_rows=8, block_cols=1024)]),
]
# Eighth round: the whole-row backward of 32768-wide rows in 16384-wide
# pieces (the default now) against XLA; 65536-wide whole rows in pieces.
PIECES = [
    ("bwd", (2048, 32768), BF16, []),
    ("fused_bwd", (2048, 32768), BF16, []),
    ("bwd", (1024, 65536), BF16, [dict(block_cols=65536)]),
]
# Ninth round: where Liger-Kernel's Triton forward leads (docs/bench_h200.md),
# its launch (one program per row, no persistent grid, its warps: 8 below
# 8192 columns, 16 below 32768, 32 from there) against the default.
def _one_row(warps, **kw):
  one = dict(block_rows=1, persistent=False, num_warps=warps, **kw)
  return [one, dict(one, cache_scale=False)]


LIGER = [
    ("fused_fwd", (8192, 4096), BF16, _one_row(8)),
    ("fused_fwd", (4096, 16384), BF16, _one_row(16) + [
        dict(block_rows=1, persistent=False, num_warps=32)]),
    ("fused_fwd", (2048, 32768), BF16, _one_row(32, block_cols=32768)),
    ("fused_fwd", (2048, 8192), F16, _one_row(16)),
    ("fused_fwd", (2048, 4096), F16, _one_row(8)),
    ("fwd", (8192, 4096), F16, _one_row(8)),
    ("fwd", (2048, 32768), BF16, _one_row(32, block_cols=32768)),
]
ROUNDS = {2: FOCUSED, 3: CHECK, 4: WIDE, 5: WIDE32, 6: WIDER, 7: WIDEST,
          8: PIECES, 9: LIGER}


def _label(cfg):
  short = dict(block_rows="br", block_cols="bc", num_warps="w",
               programs_per_sm="p", prefetch="pf", cache_scale="cs",
               num_stages="st", persistent="ps", reload="rl")
  return "_".join(f"{short[k]}{int(v)}" for k, v in cfg.items()) or "default"


def configs(op, rows, hidden, dtype):
  """The default heuristic plus explicit tiling picks around it."""
  kind = {"fwd": "forward", "fused_fwd": "residual_forward",
          "bwd": "backward", "fused_bwd": "residual_backward"}[op]
  isz = jnp.dtype(dtype).itemsize
  heuristic = gpu_tiling.resolve(gpu_tiling.Config(), kind, rows, hidden,
                                 itemsize=isz, device_kind=None)
  d = gpu_kernels.Geometry(heuristic, rows, hidden)
  br, w = d.block_rows, d.config.num_warps
  grid = []
  if br > 1:
    grid.append(dict(block_rows=br // 2))
  grid.append(dict(block_rows=br * 2))
  if w > 4:
    grid.append(dict(num_warps=w // 2))
  if w < 32:
    grid.append(dict(num_warps=w * 2))
  if kind in ("forward", "residual_forward"):
    if d.steps > 1:
      grid += [dict(persistent=False), dict(prefetch=False)]
    else:
      grid += [dict(persistent=True, programs_per_sm=2)]
  else:
    grid += [dict(prefetch=not d.prefetch),
             dict(programs_per_sm=2 if d.grid <= gpu_tiling.num_sms()
                  else 1)]
    if not d.config.cache_scale:
      grid.append(dict(cache_scale=True))
  out = [("default", PallasGpu())]
  if gpu_tiling.resolve(gpu_tiling.Config(), kind, rows, hidden,
                        itemsize=isz) != heuristic:
    out.append(("heuristic", PallasGpu(config=heuristic)))
  # Resolved in full here: left to PallasGpu, the knobs not named would come
  # from the device's tuning file rather than the heuristic.
  return out + [(_label(c), PallasGpu(config=gpu_tiling.resolve(
      gpu_tiling.Config(**c), kind, rows, hidden, itemsize=isz,
      device_kind=None))) for c in grid]


def _impl(cfg):
  return PallasGpu(config=gpu_tiling.Config(**cfg))


def check(op, rows, hidden, dtype, impl, seed=0):
  """Relative errors of ``impl`` against float64 NumPy (plain ops only).

  Returns ``{"y": err}`` for "fwd", ``{"dx": err, "dscale": err}`` for
  "bwd", ``{}`` otherwise; the kernels' float32 arithmetic on bf16 data
  lands near bf16's rounding (~4e-3) on y and dx.
  """
  if op not in ("fwd", "bwd"):
    return {}
  import jax
  import numpy as np
  import rmsnorm_jax as rj
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (rows, hidden), jnp.float32).astype(dtype)
  s = (1.0 + 0.5 * jax.random.normal(k2, (hidden,))).astype(dtype)
  dy = jax.random.normal(k3, (rows, hidden), jnp.float32).astype(dtype)
  xn, sn, dyn = (np.asarray(a, np.float64) for a in (x, s, dy))
  rstd = 1.0 / np.sqrt(np.mean(xn * xn, axis=1, keepdims=True) + 1e-6)
  xhat = xn * rstd

  def rel(a, ref):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

  fwd = jax.jit(lambda x, s: rj.rms_norm(x, s, eps=1e-6, backend=impl))
  if op == "fwd":
    return {"y": rel(fwd(x, s), xhat * sn)}
  _, vjp = jax.vjp(fwd, x, s)
  dx, ds = jax.jit(lambda v, d: v(d))(vjp, dy)
  g = dyn * sn
  dx_ref = rstd * (g - xhat * np.mean(g * xhat, axis=1, keepdims=True))
  return {"dx": rel(dx, dx_ref), "dscale": rel(ds, np.sum(dyn * xhat, 0))}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--json")
  p.add_argument("--limit", type=int, default=len(CASES),
                 help="run only the first N (op, shape) cases")
  p.add_argument("--round", type=int, default=1, choices=tuple(range(1, 10)),
                 help="1: configs around the default (CASES); 2: FOCUSED; "
                      "3: CHECK; 4: WIDE; 5: WIDE32; 6: WIDER; 7: WIDEST; 8: PIECES; 9: LIGER")
  p.add_argument("--check", action="store_true",
                 help="first compare each config's fwd/bwd with a float64 "
                      "reference (fresh random inputs)")
  p.add_argument("--run-once", action="store_true",
                 help="only run each config's kernels twice (for Nsight "
                      "Compute: the second launch is the one to read)")
  args = p.parse_args()
  if args.round > 1:
    cases = [(op, shape, dt, [("default", PallasGpu())] + [
        (_label(c), _impl(c)) for c in cfgs])
             for op, shape, dt, cfgs in ROUNDS[args.round]]
  else:
    cases = [(op, shape, dt, configs(op, *shape, dt))
             for op, shape, dt in CASES]
  records = []
  for op, (rows, hidden), dtype, cfgs in cases[:args.limit]:
    if args.check or args.run_once:
      for label, impl in cfgs:
        errs = check(op, rows, hidden, dtype, impl)
        if args.check:
          print(f"check {op} ({rows},{hidden}) {label}: " + ", ".join(
              f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
      if args.run_once:
        continue
    impls = ["xla"] + cfgs
    recs = bench.run_benchmark([((rows, hidden), dtype)], ops=[op],
                               impls=impls, reps=args.reps, log=None)
    records.extend(recs)
    ranked = sorted((r for r in recs if r.get("time_us")),
                    key=lambda r: r["time_us"])
    print(f"{op} ({rows},{hidden}) {jnp.dtype(dtype).name}: " + ", ".join(
        f"{r['impl']}={r['time_us']:.1f}({r['ratio_to_roofline']:.2f}x)"
        if r.get("ratio_to_roofline") else f"{r['impl']}={r['time_us']:.1f}"
        for r in ranked), flush=True)
    for r in recs:
      if r["impl"] == "default" and r.get("breakdown"):
        print("   default kernels:", r["breakdown"], flush=True)
      if r.get("error"):
        print("   error:", r["impl"], r["error"][:300], flush=True)
    if args.json:
      with open(args.json, "w") as fp:
        json.dump(records, fp, indent=1)


if __name__ == "__main__":
  main()
