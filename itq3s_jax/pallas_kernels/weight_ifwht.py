"""``weight_ifwht``: decode, inverse-FWHT each 256-wide weight tile in-kernel, dot.

The paper's fused kernel done right: sub-block steps are applied to the codes
*before* the transform (the transform mixes sub-blocks), in float32, with no
shared-memory traffic between threads of a tile. y = x @ dequantize(qt)^T.
Cost: 8 add/sub per weight for the butterfly (kernel_codec.hadamard) on top
of the decode, and the decode must be in natural column order (the
butterfly mixes columns); ``act_rotate`` avoids both. The kernel body is
shared with ``act_rotate`` (``driver.py``).
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


def weight_ifwht(x: ArrayLike, qt: qtensor.QuantizedTensor, *, config: Config | None = None,
                 interpret: bool | None = None, out_init: jax.Array | None = None) -> jax.Array:
  """Fused x @ dequantize(qt)^T with the inverse transform applied to weight tiles.

  Args:
    x: float activations (..., K); bf16/f16 run a bf16/f16 tensor-core dot
      (tiles rounded to that dtype), float32 a 3xTF32 dot when compiled, exact
      in interpret mode.
    qt: weight (N, K) in a format with a kernel decoder (``Format.kernel_codec``).
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
  return driver.run(x, qt, rotate=False, config=config, interpret=interpret, out_init=out_init)
