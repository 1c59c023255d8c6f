"""``PallasGpu``: the Pallas (Triton) implementation for NVIDIA GPUs.

One kernel per op, each one pass over its inputs (scale and bias are read
by every program, from L2):

* forward: reads x, writes y and the float32 rstd;
* backward: reads x, dy, rstd, writes dx and per-program float32 partial
  sums of dscale (and dbias), which a small XLA reduction finishes;
* fused residual forward: reads x and residual, writes y, h and rstd;
* fused residual backward: reads h, dy, dh, rstd, writes the gradient of h
  and the partials;
* quantized forward: reads x (and residual), writes q, its per-row float32
  scale (and h).

Kernel bodies are in ``gpu_kernels.py``, launch heuristics in
``gpu_tiling.py``; the measurements behind the constants are in
docs/gpu_perf_notes.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp
import numpy as np

from rmsnorm_jax import base
from rmsnorm_jax.kernels import common
from rmsnorm_jax.kernels import gpu_kernels
from rmsnorm_jax.kernels import gpu_tiling

SUPPORTED_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                    np.dtype(jnp.float16))

# backend="auto" and the crossover with XLA, measured on an H100
# (docs/gpu_perf_notes.md, device time per call). At small shapes both are
# launch-bound; the kernel's single launch beat or tied XLA's one or two
# fusions in the forward at every shape up to 8192 columns tried (1x128 ..
# 512x4096: 1.2-3.8 us against 1.2-4.3), and in the backward from 4 rows up
# (kernel + dscale reduction against XLA's two to four fusions; at one row
# of 4096 bf16 it lost 3.0 to 2.7 while the forward won 1.4 to 2.3, so the
# kernel is kept there too). Few rows of 16384 columns lose overall: each
# row is one program on one SM (1, 2 and 4 rows of 16384 bf16: forward
# 2.3-2.4 us against 2.7, 1.8, 1.8; backward 6.4, 6.2, 6.3 against 4.1,
# 5.5, 5.9), so "auto" keeps XLA below AUTO_WIDE_MIN_ROWS rows of 16384
# padded columns or more. The kernel wins again at 4096 such rows; 8 to
# 4096 rows of that width, and wider rows (walked in chunks), were not
# measured: the boundary sits just above the rows where XLA was seen ahead.
# Later (H200, jax 0.11.2, bf16, us, XLA against the kernel), the plain
# forward: 8x16384 1.73 against 2.30, 16x16384 1.8 against 2.3, 32x16384
# 1.9 against 2.4, 48x16384 2.29 against 2.40, 64x16384 3.33 against 2.50;
# wider rows favour the kernel sooner: 16x32768 3.87 against 3.42, 48x32768
# 6.34 against 4.30, 16x65536 5.02 against 3.71. So the plain forward keeps
# XLA below AUTO_WIDE_MIN_ROWS_FORWARD rows: (least padded width, least rows
# of the kernel), the first that applies; the bound at 32768 columns and
# more is the 8 rows of 16384 carried over (fewer than 16 rows not timed
# there). The fused forward of 8x16384 stays with the kernel (4.22 against
# 2.91).
AUTO_WIDE_COLS = 16384
AUTO_WIDE_MIN_ROWS = 8
AUTO_WIDE_MIN_ROWS_FORWARD = ((2 * AUTO_WIDE_COLS, 9), (AUTO_WIDE_COLS, 49))
# Element offsets past 2**31 would need 64-bit pointer arithmetic in every
# tile; such inputs (8 GiB of float32) stay on XLA under "auto".
AUTO_MAX_ELEMENTS = 2**31 - 1
# Rows wider than the resident tiling (walked in chunks): on an H200 XLA's
# backward and fused ops were faster than the chunked kernels, the plain
# forward was not (bfloat16, us, XLA against the kernel): backward
# 1024x65536 185.4 against 226.1; fused forward 193.2 against 190.0 (level);
# forward 121 against 90.8 (docs/gpu_perf_notes.md). 16-bit rows of up to
# 32768 columns are resident, and there the kernels are ahead or level
# (2048x32768: fused forward 146.6 against 195.0, fused backward 221.3
# against 233.0, backward 180.3 against 182.5).
AUTO_CHUNKED_XLA_OPS = ("backward", "residual_backward", "residual_forward")
# Per-head (QK-norm) forward: XLA's fusion measured 4-7% faster than the
# kernel on an H200 at every size measured, 34 to 134 MB of x (bf16 and
# f16, 16 to 64 heads of 128: XLA 0.94-1.02x the device-copy time, the
# kernel 1.01-1.09x; docs/bench_h200_features.md), so "auto" keeps XLA from
# the smallest of those sizes up. Smaller inputs were not measured and keep
# the kernel; the per-head backward is the kernel's (1.10-1.23x copy against
# XLA's 1.95-2.31x).
AUTO_PER_HEAD_FWD_MIN_BYTES = 32 * 2**20
# 16-bit rows of this many padded columns or more with a float32 output
# (flax's default layer: float32 parameters, bfloat16 x, dtype=None, so a
# float32 y and dy): XLA's fusions (x read twice) measured faster than the
# kernel's one pass under every launch tried; H200, bfloat16 x, float32
# scale, us, XLA against the kernel: 2048x32768 141.0 against 178.8 (best
# launch, 16 warps with the scale kept in registers, 159.9), 1024x65536
# 139.5 against 172.4; fused forward 225.6 against 240.4 and 224.5 against
# 278.3; backward 2048x32768 239.0 against 357.2, fused backward 284.3
# against 471.3. At 16384 columns the kernel is ahead or level (4096x16384:
# forward 106.7 against 136.6, fused 219.7 against 280.5, backward 183.1
# against 232.8, fused backward 278.8 against 277.5), so "auto" sends the
# four ops to XLA from this width.
AUTO_F32_OUT_XLA_MIN_COLS = 32768
# The features beyond the plain norm the kernels serve (kernels/common.py
# FEATURES); cannot_serve declines a call needing any other.
IMPLEMENTED = frozenset(("bias", "llama", "per_head", "quantized"))
# Interpret mode on CPU: a few "SMs" so that tests exercise the persistent
# backward loop (several row blocks per program) on small shapes.
INTERPRET_NUM_SMS = 4


# The XLA custom call each Pallas Triton kernel lowers to (jaxlib 0.10.2 and
# 0.11.2), carrying the kernel's Triton IR, which XLA compiles for the
# device. ``jax.export`` serializes a program with these kernels only when
# this target is named in ``disabled_checks``
# (``jax.export.DisabledSafetyCheck.custom_call``): it has no compatibility
# guarantee.
TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"


def _gpu_info_lookup():
  """jax's own answer to "which GPU does Triton lowering compile for"
  (``get_gpu_info``, public from jax 0.11), or None where jax has none
  (0.10: the lowering embeds Triton IR, compiled later for the device)."""
  get = getattr(pltriton, "get_gpu_info", None)
  if get is None:
    try:
      # pylint: disable-next=import-outside-toplevel
      from jax._src.pallas.triton import gpu_info
    except ImportError:
      return None
    get = getattr(gpu_info, "get_gpu_info", None)
  return get


_GET_GPU_INFO = _gpu_info_lookup()


def triton_target_reason() -> str | None:
  """Why jax's Pallas Triton lowering has no GPU to compile for here, or
  None where it has one.

  From jax 0.11 the lowering targets the default device's GPU, or the
  abstract GPU device of the abstract mesh in context, and raises where
  neither is a GPU model it knows: lowering for ``cuda`` on a host without
  a GPU (``jax.export`` for several platforms, say), or on a GPU missing
  from jax's list. An abstract mesh does not help through this library's
  public functions: jax 0.11 refuses one around primitives that need the
  devices when lowered, as this library's does (for its multi-device
  path). ``PallasGpu.cannot_serve`` gives this reason, so that
  ``backend="auto"`` lowers XLA's math (or a Mosaic GPU kernel) there and an
  explicit ``backend="pallas_gpu"`` raises it when traced.
  """
  if _GET_GPU_INFO is None:
    return None
  try:
    _GET_GPU_INFO()
  except (ValueError, RuntimeError) as e:
    return (f"jax {jax.__version__} lowers Pallas Triton kernels only for "
            f"a GPU model it knows, and has none here ({e}); lower on a "
            "machine with such a GPU")
  return None


def _f32_weight(a, norm):
  # A float64 scale or bias (x64 mode) as float32, holding its cast to a
  # 16-bit weight_dtype where one is set: XLA's conversion from float64
  # (base.from_float64), which the kernel's own rounding from float32 then
  # leaves as it is.
  if a is not None and np.dtype(a.dtype) == np.dtype(np.float64):
    return base.from_float64(a, norm.weight_rounding)
  return a


@dataclasses.dataclass(frozen=True)
class PallasGpu(base.Implementation):
  """Pallas kernels lowered through Triton, for CUDA GPUs.

  Inputs: x (and residual) of dtype float32, bfloat16 or float16, 2-D
  ``(rows, hidden)`` with any rows and hidden (rows past 16384 columns are
  processed in chunks); scale ``None``, ``(hidden,)`` or per-head
  ``(heads, hidden)`` and bias ``None`` or ``(hidden,)``, in any float
  dtype; both cast modes; quantized outputs int8, float8_e4m3fn and
  float8_e5m2. ``cannot_serve`` names what it does not take (float64, a
  symbolic row count), so "auto" uses XLA there.

  Attributes:
    config: launch knobs (``gpu_tiling.Config``); its None fields (all, by
      default) are chosen per call by ``gpu_tiling.resolve``.
    interpret: run with the Pallas interpreter; then every platform
      (including CPU) may lower it, which is how CI tests the kernels.
    poison_outputs: testing aid; outputs start as NaN so that an element the
      kernel never writes shows up (costs an extra fill per output).
  """

  name: ClassVar[str] = "pallas_gpu"
  platforms: ClassVar[tuple[str, ...]] = ("cuda",)
  folds_weight_cast: ClassVar[bool] = True

  config: gpu_tiling.Config = gpu_tiling.Config()
  interpret: bool = False
  poison_outputs: bool = False

  def __post_init__(self):
    if not isinstance(self.config, gpu_tiling.Config):
      raise TypeError("PallasGpu(config=...) takes a gpu_tiling.Config; got "
                      f"{type(self.config).__name__}.")

  def lowering_platforms(self) -> tuple[str, ...]:
    if self.interpret:
      return base.PLATFORMS
    return self.platforms

  def cannot_serve(self, call: base.Call) -> str | None:
    """Why the kernels cannot compute ``call`` (None when they can): what
    they do not implement, or, compiled, that jax cannot name a GPU to
    lower them for (``triton_target_reason``)."""
    reason = common.not_implemented(self.name, call, SUPPORTED_DTYPES,
                                    IMPLEMENTED)
    if reason is None and not self.interpret:
      reason = triton_target_reason()
    return reason

  def auto_declines(self, call: base.Call) -> str | None:
    """Where XLA measured faster than the kernel (see the constants)."""
    rows, hidden = int(call.rows), int(call.hidden)
    if rows * hidden > AUTO_MAX_ELEMENTS:
      return (f"{rows}x{hidden} elements need 64-bit offsets, which the "
              "kernel does not use")
    padded = gpu_tiling.next_pow2(hidden)
    wide, least = AUTO_WIDE_COLS, AUTO_WIDE_MIN_ROWS
    if call.op == "forward":
      wide, least = next(((c, n) for c, n in AUTO_WIDE_MIN_ROWS_FORWARD
                          if padded >= c), (wide, least))
    if padded >= wide and rows < least:
      return (f"XLA measured faster for fewer than {least} rows of "
              f"{wide} or more columns")
    itemsize = np.dtype(call.dtype).itemsize
    if (call.op == "forward" and len(call.scale_shape) == 2
        and rows * hidden * itemsize >= AUTO_PER_HEAD_FWD_MIN_BYTES):
      return ("XLA measured faster for the per-head forward of "
              f"{AUTO_PER_HEAD_FWD_MIN_BYTES >> 20} MiB or more")
    resident_cols = gpu_tiling.heuristic_resident_cols(itemsize)
    if call.op in AUTO_CHUNKED_XLA_OPS and padded > resident_cols:
      return (f"XLA measured faster for {call.op} on rows wider than "
              f"{resident_cols} columns (chunked tiling)")
    if (call.op != "quantized_forward" and itemsize == 2
        and np.dtype(call.norm.out_dtype).itemsize == 4
        and padded >= AUTO_F32_OUT_XLA_MIN_COLS):
      return (f"XLA measured faster for {call.op} of 16-bit rows of "
              f"{AUTO_F32_OUT_XLA_MIN_COLS} or more columns with a float32 "
              "output")
    if (call.op == "forward" and itemsize == 2 and padded > resident_cols
        and call.scale_dtype is not None
        and np.dtype(call.scale_dtype).itemsize == 4):
      # XLA ahead here too: 1024x65536 bfloat16, bfloat16 y, 121.7 against
      # 126.7 us (H200).
      return ("XLA measured faster for the forward of 16-bit rows wider "
              f"than {resident_cols} columns with a float32 scale")
    return None

  # ------------------------------------------------------------- plumbing --

  def resolved_config(self, op: str, rows: int, hidden: int, dtype,
                      heads: int = 1, bias: bool = False
                      ) -> gpu_tiling.Config:
    """The full configuration ``op`` runs with on ``(rows, hidden)``.

    ``heads``: scale rows of a per-head scale (1 otherwise); ``bias``: the
    call has a bias.
    """
    config = self.config
    if config.num_sms is None:
      config = dataclasses.replace(
          config, num_sms=INTERPRET_NUM_SMS if self.interpret
          else gpu_tiling.num_sms())
    float16 = np.dtype(dtype) == np.dtype(jnp.float16)
    # Interpret mode runs on the host: a GPU's tuning file says nothing
    # about it, and tests stay reproducible across machines.
    return gpu_tiling.resolve(config, op, rows, hidden,
                              itemsize=np.dtype(dtype).itemsize, heads=heads,
                              device_kind=None if self.interpret
                              else gpu_tiling.AUTO,
                              bias=bool(bias),
                              float16_bias=bool(bias) and float16)

  def _kw(self, op, x, scale, dtype=None, bias=None):
    rows, hidden = x.shape
    heads = 1 if scale is None or scale.ndim == 1 else scale.shape[0]
    return dict(config=self.resolved_config(op, rows, hidden,
                                            dtype or x.dtype, heads,
                                            bias is not None),
                interpret=self.interpret, poison=self.poison_outputs)

  @staticmethod
  def _kernel_out_dtype(out_dtype):
    # float64 outputs are computed in float32 and widened afterwards.
    dt = np.dtype(out_dtype)
    return np.dtype(jnp.float32) if dt == np.dtype(np.float64) else dt

  # ------------------------------------------------------------ interface --

  def forward(self, x, scale, bias, *, norm):
    """x (rows, hidden) -> (y in norm.out_dtype, rstd float32 (rows,))."""
    y, rstd = gpu_kernels.forward(
        x, None, _f32_weight(scale, norm), _f32_weight(bias, norm), norm=norm,
        out_dtype=self._kernel_out_dtype(norm.out_dtype),
        **self._kw("forward", x, scale, bias=bias))
    return y.astype(norm.out_dtype), rstd

  def backward(self, x, scale, bias, rstd, dy, *, norm):
    """-> (dx in x.dtype, dscale float32 scale-shaped or None, dbias)."""
    return gpu_kernels.backward(
        x, _f32_weight(scale, norm), bias, rstd, common.f32_if_wide(dy), None,
        norm=norm, **self._kw("backward", x, scale, bias=bias))

  def residual_forward(self, x, residual, scale, bias, *, norm):
    """-> (y in out_dtype, h = x + residual in residual.dtype, rstd)."""
    wider = max(x.dtype.itemsize, residual.dtype.itemsize)
    y, h, rstd = gpu_kernels.forward(
        x, residual, _f32_weight(scale, norm), _f32_weight(bias, norm),
        norm=norm, out_dtype=self._kernel_out_dtype(norm.out_dtype),
        **self._kw("residual_forward", x, scale, np.dtype(f"f{wider}")))
    return y.astype(norm.out_dtype), h, rstd

  def residual_backward(self, h, scale, bias, rstd, dy, dh, *, norm):
    """-> (gradient of h in h.dtype, dscale float32 or None, dbias)."""
    return gpu_kernels.backward(
        h, _f32_weight(scale, norm), bias, rstd, common.f32_if_wide(dy),
        common.f32_if_wide(dh), norm=norm,
        **self._kw("residual_backward", h, scale, bias=bias))

  def quantized_forward(self, x, residual, scale, bias, quant_scale, *,
                        norm):
    """-> (q in norm.quant_dtype, q_scale float32 (rows, 1), h or None).

    One pass: reads x (and residual), writes q, q_scale (and h).
    """
    wider = x.dtype.itemsize if residual is None else max(
        x.dtype.itemsize, residual.dtype.itemsize)
    # With a residual the launch is tuned apart (gpu_tiling.OPS).
    op = ("quantized_forward" if residual is None
          else gpu_tiling.QUANTIZED_RESIDUAL_OP)
    outs = gpu_kernels.forward(
        x, residual, _f32_weight(scale, norm), _f32_weight(bias, norm),
        norm=norm, out_dtype=None, quant_scale=quant_scale,
        **self._kw(op, x, scale, np.dtype(f"f{wider}")))
    if residual is None:
      return outs[0], outs[1], None
    return outs
