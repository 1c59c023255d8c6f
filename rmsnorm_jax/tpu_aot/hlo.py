"""HBM bytes moved by a compiled TPU program, from its optimized HLO text.

For every instruction of the entry computation, the sizes of its operands
and results that live in HBM (memory space 0), padded to their tiled
layouts: what each top-level op moves if it reads each operand and writes
each result once. A Mosaic kernel is one such instruction, which is what its
block specs do. XLA's ``cost_analysis()`` is not used: it reports no total
for Mosaic custom calls and counts VMEM traffic of XLA fusions.
"""

from __future__ import annotations

import re

import numpy as np

# Instructions that move no data themselves.
_SKIP_OPS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant",
             "after-all", "partition-id", "replica-id", "opt-barrier",
             "add-dependency"}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_TILE = re.compile(r"T\(([0-9,]+)\)")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2,
          "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8}


def _itemsize(dtype: str) -> int:
  # Every float8 flavour (f8e4m3fn, f8e5m2, ...) is one byte.
  return 1 if dtype.startswith("f8") else _BYTES.get(dtype, 4)


def array_bytes(dtype: str, dims: str, layout: str | None
                ) -> tuple[int, bool]:
  """(bytes padded to the layout's first tile, whether it lives in HBM).

  Args:
    dtype: HLO element type, e.g. ``"bf16"`` (unknown types count 4 bytes).
    dims: comma-separated dims, e.g. ``"16,128"``.
    layout: ``"{1,0:T(8,128)(2,1)S(1)}"`` or None.
  """
  shape = [int(d) for d in dims.split(",") if d]
  in_hbm = True
  if layout:
    minor_to_major, _, rest = layout[1:-1].partition(":")
    order = [int(d) for d in minor_to_major.split(",") if d]
    space = _MEMORY_SPACE.search(rest)
    in_hbm = space is None or space.group(1) == "0"
    tile = _TILE.search(rest)
    if tile and order:
      # The tile's last entry applies to the most minor dim, and so on.
      for k, tk in enumerate(reversed([int(v) for v in
                                       tile.group(1).split(",")])):
        if k < len(order):
          shape[order[k]] = -(-shape[order[k]] // tk) * tk
  return int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype), in_hbm


def _hbm_shape_bytes(text: str) -> int:
  total = 0
  for m in _ARRAY.finditer(text):
    size, in_hbm = array_bytes(*m.groups())
    if in_hbm:
      total += size
  return total


def hbm_bytes(hlo_text: str) -> int:
  """HBM bytes moved by the entry computation of optimized HLO text.

  Args:
    hlo_text: ``compiled.as_text()`` of a TPU executable.

  Raises:
    ValueError: the text has no ENTRY computation.
  """
  lines = hlo_text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith("ENTRY")),
               None)
  if start is None:
    raise ValueError("hlo_text must be HLO module text with an ENTRY "
                     f"computation; got {hlo_text[:80]!r}")
  shapes_by_name: dict[str, str] = {}
  total = 0
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if not m:
      continue
    name, rhs = m.groups()
    # rhs: "<shape> <opcode>(<operands>), attrs"
    op_m = re.search(r"\s([a-z][\w\-]*)\(", rhs)
    if not op_m:
      continue
    shape_text = rhs[:op_m.start()]
    opcode = op_m.group(1)
    shapes_by_name[name] = shape_text
    # An async op's "-done" only hands over what its "-start" moved.
    if opcode in _SKIP_OPS or opcode.endswith("-done"):
      continue
    depth, i = 1, op_m.end()
    while depth and i < len(rhs):
      depth += {"(": 1, ")": -1}.get(rhs[i], 0)
      i += 1
    operands = re.findall(r"%([\w.\-]+)", rhs[op_m.end():i])
    if opcode.endswith("-start"):
      total += _async_bytes(shape_text,
                            [shapes_by_name.get(o, "") for o in operands])
      continue
    total += _hbm_shape_bytes(shape_text) + sum(
        _hbm_shape_bytes(shapes_by_name.get(o, "")) for o in operands)
  return total


def _async_bytes(shape_text: str, sources: list[str]) -> int:
  """Bytes an async copy or slice start moves.

  Its result tuple holds the operand (aliased), the destination and a
  context scalar: it reads the destination's size from the operand's memory
  space and writes it to the destination's.
  """
  src = " ".join(sources)
  dest = [m for m in _ARRAY.finditer(shape_text)
          if m.group(0) not in src and m.group(2)]
  moved = max((array_bytes(*m.groups())[0] for m in dest), default=0)
  reads = moved if any(_hbm_shape_bytes(t) for t in sources) else 0
  writes = moved if any(array_bytes(*m.groups())[1] for m in dest) else 0
  return reads + writes
