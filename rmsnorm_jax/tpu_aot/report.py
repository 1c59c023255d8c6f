"""The sweep's rows as markdown: a summary per generation, then every row.

:func:`write` keeps the hand-written part of the report file (everything
above :data:`MARKER`) and replaces what follows it.
"""

from __future__ import annotations

import importlib.metadata
import os

import jax


MARKER = ("<!-- Everything below is written by python -m rmsnorm_jax.tpu_aot;"
          " edit the text above this line. -->")


def _us(nbytes, bw):
  return "-" if nbytes is None else f"{nbytes / bw * 1e6:.2f}"


def _ratio(nbytes, minimum):
  return "-" if nbytes is None else f"{nbytes / minimum:.2f}"


def _what(r) -> str:
  return f"{r.shape[0]}x{r.shape[1]} {r.dtype} {r.op}"


def _count(flags) -> str:
  flags = list(flags)
  return f"{sum(flags)}/{len(flags)}"


def _roofline_sum(rows, attr):
  """Sum of bytes / bandwidth (us) over rows, or None if any is missing."""
  vals = [getattr(r, attr) for r in rows]
  if not rows or any(v is None for v in vals):
    return None
  return sum(v / r.bandwidth for v, r in zip(vals, rows)) * 1e6


def _kernel_state(r) -> str:
  if r.compiled:
    return "yes"
  if r.declined:
    return f"declined: {r.declined}"
  return f"NO: {r.error}"


def summary(rows) -> list[str]:
  """Markdown lines: one summary row per generation.

  Args:
    rows: :class:`~rmsnorm_jax.tpu_aot.compile.Row` list.
  """
  ops = list(dict.fromkeys(r.op for r in rows))
  out = [
      "| generation | device GB/s | pallas_tpu compiled | xla compiled | "
      "declined by the kernel | VMEM MiB | max kernel bytes / min | "
      "same, rows >= 64 | two-pass programs | "
      + " | ".join(f"{op} roofline us, kernel / xla" for op in ops) + " |",
      "|---" * (9 + len(ops)) + "|",
  ]
  for gen in dict.fromkeys(r.gen for r in rows):
    g = [r for r in rows if r.gen == gen]
    served = [r for r in g if not r.declined]
    measured = [r for r in g if r.kernel_bytes is not None]
    worst = max(measured, key=lambda r: r.kernel_bytes / r.min_bytes,
                default=None)
    big = [r.kernel_bytes / r.min_bytes for r in measured if r.shape[0] >= 64]
    xla_tried = [r for r in g if r.xla_compiled is not None]
    cells = [
        gen, f"{g[0].bandwidth / 1e9:.0f}",
        _count(r.compiled for r in served),
        _count(bool(r.xla_compiled) for r in xla_tried) if xla_tried
        else "not run",
        str(len(g) - len(served)),
        f"{g[0].vmem_bytes / 2**20:.0f}",
        "-" if worst is None else
        f"{worst.kernel_bytes / worst.min_bytes:.2f} ({_what(worst)})",
        f"{max(big):.3f}" if big else "-",
        ", ".join(_what(r) for r in g if "2-pass" in r.block) or "none",
    ]
    for op in ops:
      o = [r for r in g if r.op == op]
      k = _roofline_sum(o, "kernel_bytes")
      x = _roofline_sum(o, "xla_bytes")
      cell = "-" if k is None else f"{k:.0f}"
      if k is not None and x is not None:
        cell += f" / {x:.0f} ({x / k:.2f}x)"
      cells.append(cell)
    out.append("| " + " | ".join(cells) + " |")
  return out


def _versions() -> str:
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = "not installed"
  return f"jax {jax.__version__}, libtpu {libtpu}"


def markdown(rows) -> str:
  """The generated part of the report (summary, failures, every row)."""
  served = [r for r in rows if not r.declined]
  xla_tried = [r for r in rows if r.xla_compiled is not None]
  failed = [r for r in rows if not r.ok]
  out = [
      "## Results",
      "",
      f"Compiled by the TPU compiler ({_versions()}) on a CPU host, for "
      "each generation's deviceless topology; no TPU ran anything. Times "
      "below are byte counts divided by bandwidth, not measurements.",
      "",
      f"Compiled: pallas_tpu {_count(r.compiled for r in served)}"
      + (f" ({len(rows) - len(served)} declined by the kernel)"
         if len(served) < len(rows) else "")
      + (f", xla {_count(bool(r.xla_compiled) for r in xla_tried)}"
         if xla_tried else ", xla not compiled") + ".",
      "",
      "### Summary per generation",
      "",
  ] + summary(rows) + [""]
  if failed:
    out += ["### Failures", ""] + [
        f"* {r.gen} {_what(r)}: {r.error}" for r in failed] + [""]
  out += [
      "### Every program",
      "",
      "| generation | shape | dtype | op | compiled | block | "
      "kernel bytes | x min | kernel roofline us | xla bytes | x min | "
      "xla roofline us | min roofline us |",
      "|---" * 13 + "|",
  ]
  for r in rows:
    out.append(
        f"| {r.gen} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.op} | "
        f"{_kernel_state(r)} | {r.block} | "
        f"{r.kernel_bytes if r.kernel_bytes is not None else '-'} | "
        f"{_ratio(r.kernel_bytes, r.min_bytes)} | "
        f"{_us(r.kernel_bytes, r.bandwidth)} | "
        f"{r.xla_bytes if r.xla_bytes is not None else '-'} | "
        f"{_ratio(r.xla_bytes, r.min_bytes)} | "
        f"{_us(r.xla_bytes, r.bandwidth)} | {_us(r.min_bytes, r.bandwidth)} |")
  out.append("")
  return "\n".join(out)


def write(path: str, rows) -> None:
  """Writes the report to ``path``, keeping the text above :data:`MARKER`.

  A file without the marker (or no file) gets a one-line title instead.
  """
  head = "# TPU deviceless AOT compilation\n\n"
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if MARKER in text:
      head = text[:text.index(MARKER)]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(head + MARKER + "\n\n" + markdown(rows))
