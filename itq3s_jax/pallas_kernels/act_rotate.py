"""``act_rotate``: rotate x once per 256 columns, then dequant-matmul in the coding domain.

Each 256-block of a weight row is stored as z = H (sigma * w) / 16, H/16
orthonormal, so w . x = z . (H (sigma * x) / 16): the activations are rotated
once (``itq3s_jax.rotate_activations``, M*K*8 add/sub in XLA, negligible at
small M) and the kernel only decodes, never transforms a weight tile. It
decodes each block as its format's dot terms (``pallas_kernels/terms.py``:
whole byte fields and lookup tables, in the slot order cheapest to read),
against activations expanded to that order in XLA. Equal to dequantize-first
up to rounding. y = x @ dequantize(qt)^T. The kernel body is shared with
``weight_ifwht`` (``driver.py``).
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from itq3s_jax._src.core import qtensor
from itq3s_jax._src.matmul import xla
from itq3s_jax.pallas_kernels import driver

Config = driver.Config
heuristic = driver.heuristic
reference = xla.dequantize_dot
supports = driver.supports


def act_rotate(x: ArrayLike, qt: qtensor.QuantizedTensor, *, config: Config | None = None,
               interpret: bool | None = None, out_init: jax.Array | None = None) -> jax.Array:
  """Fused x @ dequantize(qt)^T computed as rotate(x) @ decode_rotated(qt)^T.

  Args:
    x: float activations (..., K). The rotated activations are scaled per
      row by a power of two and dotted in float16 on tensor cores with the
      decoded terms (exact, or rounded once to float16). bf16/f16: one float16
      plane; float32: two (hi and a residual), and the residual of inexact
      terms, for float32 accuracy (``driver.py``).
    qt: weight (N, K) in a format with a term decoder (``pallas_kernels/terms.py``).
    config: tiling; None: :func:`heuristic`.
    interpret: None: chosen by the platform lowered for (interpreter on CPU,
      Triton on CUDA/ROCm); True/False force it.
    out_init: testing hook, see ``driver.fused``.

  Returns:
    float32 (..., N).

  Raises:
    NotImplementedError: format without a kernel decoder, K < 256, a default
      backend other than CPU/GPU.
  """
  return driver.run(x, qt, rotate=True, config=config, interpret=interpret, out_init=out_init)
