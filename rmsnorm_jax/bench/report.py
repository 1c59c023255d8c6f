"""Report: ratios between records, the markdown table, the bandwidth plot."""

from __future__ import annotations

import jax

from rmsnorm_jax import shapes
from rmsnorm_jax.bench.cases import HEAD_OPS, IMPLS, LINEN_OPS, OPS
from rmsnorm_jax.bench.peers import PEERS

RATIOS = ("ratio_to_roofline", "ratio_to_copy", "speedup_vs_xla")
REFERENCE_IMPLS = ("roofline", "copy")


def _key(r):
  return (r["op"], r["rows"], r["hidden"], r["dtype"])


def host_timed(r: dict) -> bool:
  """Whether a record's time is host wall clock (noisy off-accelerator)."""
  return str(r.get("timing") or "").startswith("wallclock")


def _noise(num: dict, den: dict) -> bool:
  """Whether num/den is unsupported: the two times come from different
  clocks (device and host), or both from the host and the interval
  [num_min/den_max, num_max/den_min] holds 1 (or a spread is unknown)."""
  if host_timed(num) != host_timed(den):
    return True
  if not host_timed(num):
    return False
  try:
    lo = num["time_min"] / den["time_max"]
    hi = num["time_max"] / den["time_min"]
  except (KeyError, TypeError, ZeroDivisionError):
    return True
  return lo <= 1.0 <= hi


def add_ratios(records: list[dict]) -> list[dict]:
  """Adds the ratios to each record, in place; returns ``records``.

  * ratio_to_roofline: time / the roofline op's time;
  * ratio_to_copy: time / the device copy of the op's minimum bytes;
  * speedup_vs_xla: XLA's time / time (``flax.linen.RMSNorm``'s for the
    linen ops);
  * noise: the names of those ratios the timing does not support: a host
    time against a device time, or two host times whose spreads overlap
    1; empty when both are device times.

  A ratio is None where a time or its reference is missing.
  """
  refs = {name: {} for name in ("roofline", "copy", "xla")}
  for r in records:
    if r.get("time_us") and r["impl"] in refs:
      refs[r["impl"]][_key(r)] = r
  for r in records:
    if r["op"] in LINEN_OPS and r["impl"] == "flax_linen" and r.get(
        "time_us"):
      refs["xla"][_key(r)] = r  # the linen ops: flax's layer is the reference
  for r in records:
    t = r.get("time_us")
    r["noise"] = []
    for field, name, inverse in (("ratio_to_roofline", "roofline", False),
                                 ("ratio_to_copy", "copy", False),
                                 ("speedup_vs_xla", "xla", True)):
      ref = refs[name].get(_key(r))
      if not t or ref is None or (name == "copy" and r["impl"] == "copy"):
        r[field] = None
        continue
      num, den = (ref, r) if inverse else (r, ref)
      r[field] = num["time_us"] / den["time_us"]
      if ref is not r and _noise(num, den):
        r["noise"].append(field)
  return records


def column_label(impl: str, recs: list[dict]) -> str:
  """The table header of ``impl``: this library's kernel names its
  backend (``rmsnorm_jax [pallas_gpu (interpret)]`` off-GPU)."""
  if impl == "rmsnorm_jax":
    backend = next((r.get("backend") for r in recs
                    if r["impl"] == impl and r.get("backend")), None)
    if backend:
      return f"{impl} [{backend}]"
  return impl


def shape_label(op: str, rows: int, hidden: int) -> str:
  """A case's shape as the op sees it: ``8192x32x128`` for a head op on
  8192x4096 (x of ``shapes.heads_shape``), else ``ROWSxHIDDEN``."""
  if op in HEAD_OPS and hidden % shapes.HEAD_DIM == 0:
    return "x".join(str(d) for d in shapes.heads_shape(rows, hidden))
  return f"{rows}x{hidden}"


def _cell(r, impl, ref_name):
  if r is None:
    return ""
  if not r.get("time_us"):
    return "err"
  text = f"{r['time_us']:.1f}"
  if host_timed(r) and r.get("time_min") is not None:
    text += f" ({r['time_min']:.1f}..{r['time_max']:.1f})"
  if impl in REFERENCE_IMPLS or host_timed(r):
    # Host wall clock off-accelerator: a few samples with dispatch jitter
    # do not support a ratio in print (the records keep them, with noise).
    return text
  extra = []
  for field, short in (("ratio_to_roofline", "roof"),
                       ("ratio_to_copy", "copy"),
                       ("speedup_vs_xla", "speedup")):
    v = r.get(field)
    if v is None or (field == "speedup_vs_xla" and impl == ref_name):
      continue
    noise = field in r.get("noise", [])
    if field == "speedup_vs_xla":
      extra.append(f"speedup {'noise' if noise else f'{v:.2f}'}")
    else:
      extra.append(f"{short} noise" if noise else f"{v:.2f}x {short}")
  return text + (f" ({', '.join(extra)})" if extra else "")


def table(records: list[dict], notes: list[str] | None = None) -> str:
  """A markdown table per op.

  Cells: us per call, then in brackets the time over the roofline op's,
  over the device copy's, and the speedup against XLA (against
  ``flax.linen.RMSNorm`` for the linen ops); a device-timed ratio the
  spreads do not support reads "noise". Host-timed cells show the
  min..max over calls and no ratio.
  ``notes`` (e.g. a missing peer) are listed under the tables.
  """
  lines = []
  for op in OPS:
    recs = [r for r in records if r["op"] == op]
    if not recs:
      continue
    present = list(dict.fromkeys(r["impl"] for r in recs))
    # References first, then this benchmark's impls, then the peers.
    order = ([i for i in REFERENCE_IMPLS if i in present]
             + [i for i in present if i not in REFERENCE_IMPLS + PEERS]
             + [i for i in PEERS if i in present])
    ref_name = "flax_linen" if op in LINEN_OPS else "xla"
    host = any(host_timed(r) for r in recs)
    ratios = ["x roofline time"] + (
        ["x copy time"] if "copy" in present else []) + [
            f"speedup vs {ref_name}"]
    if host:
      lines.append(f"\n### {op} (us per call, min..max over calls; host "
                   "wall clock: no ratios)\n")
    else:
      lines.append(f"\n### {op} (us per call; {', '.join(ratios)})\n")
    lines.append("| shape | dtype | MB | "
                 + " | ".join(column_label(i, recs) for i in order) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(order))
    for case in dict.fromkeys((r["rows"], r["hidden"], r["dtype"])
                              for r in recs):
      row = {r["impl"]: r for r in recs
             if (r["rows"], r["hidden"], r["dtype"]) == case}
      mb = next((r["bytes"] for i, r in row.items()
                 if r.get("bytes") and i != "roofline"), 0) / 1e6
      cells = [_cell(row.get(i), i, ref_name) for i in order]
      lines.append(f"| {shape_label(op, case[0], case[1])} | {case[2]} | "
                   f"{mb:.2f} | "
                   + " | ".join(cells) + " |")
  timing = sorted({r["timing"] for r in records if r.get("timing")})
  device = sorted({r["device"] for r in records if r.get("device")})
  versions = sorted({r["jax"] for r in records if r.get("jax")}) or [
      jax.__version__]
  lines.append(f"\ntiming: {', '.join(timing)}; device: {', '.join(device)}; "
               f"jax {', '.join(versions)}")
  if any(host_timed(r) for r in records):
    lines.append("host wall clock (no device timer): times include "
                 "dispatch overhead and vary between runs, so no ratio is "
                 "printed (the JSON records keep them, listing under "
                 "'noise' those whose spread overlaps 1). Use a GPU for "
                 "performance claims.")
  for n in notes or []:
    lines.append(f"- note: {n}")
  for r in records:
    if r.get("error"):
      lines.append(f"- {r['op']} {r['impl']} ({r['rows']},{r['hidden']}) "
                   f"{r['dtype']}: {r['error'][:160]}")
  return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
  """Writes a PNG: achieved bandwidth (GB/s) against bytes moved, one panel
  per op, one line per implementation (references dashed).

  Raises:
    ImportError: matplotlib is not installed (``pip install .[bench]``).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ops = [op for op in OPS if any(r["op"] == op for r in records)]
  if not ops:
    return
  cols = min(3, len(ops))
  rows = -(-len(ops) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows),
                           squeeze=False)
  # One color per implementation across panels.
  names = list(dict.fromkeys(("copy",) + IMPLS + PEERS + tuple(
      r["impl"] for r in records)))
  colors = {impl: f"C{i % 10}" for i, impl in enumerate(names)}
  for ax, op in zip(axes.flat, ops):
    recs = [r for r in records if r["op"] == op and r.get("gbps")]
    for impl in dict.fromkeys(r["impl"] for r in recs):
      pts = sorted((r["bytes"], r["gbps"]) for r in recs if r["impl"] == impl)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              markersize=3, label=column_label(impl, recs),
              color=colors.get(impl),
              linestyle="--" if impl in REFERENCE_IMPLS else "-")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved")
    ax.set_ylabel("GB/s")
    ax.set_title(op)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(ops):]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
