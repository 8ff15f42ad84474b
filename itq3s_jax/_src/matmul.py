"""``matmul(x, qt)``: x @ dequantize(qt).T with one dispatch entry point.

Methods: ``"xla"`` (dequantize, then ``jnp.dot``; the CPU default and the
reference). Pallas methods are added by ``pallas_kernels`` (see issue 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from itq3s_jax._src import qtensor
from itq3s_jax._src import quantize as quantize_lib


def _xla(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  w = quantize_lib.dequantize(qt, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), w.T, preferred_element_type=jnp.float32)


_METHODS = {"xla": _xla}


def matmul(x: ArrayLike, qt: qtensor.QuantizedTensor, *, method: str = "auto") -> jax.Array:
  """Computes ``x @ dequantize(qt).T`` in float32.

  Args:
    x: activations (..., K).
    qt: a 2-D quantized weight of shape (N, K).
    method: ``"auto"`` or one of the registered methods (``"xla"``, ...).

  Returns:
    float32 (..., N).
  """
  x = jnp.asarray(x)
  if len(qt.shape) != 2:
    raise ValueError(f"matmul needs a 2-D weight (N, K), got shape {qt.shape}.")
  if x.shape[-1] != qt.shape[-1]:
    raise ValueError(f"x has K={x.shape[-1]} but the weight has K={qt.shape[-1]}.")
  if method == "auto":
    method = "xla"
  if method not in _METHODS:
    raise ValueError(f"unknown matmul method {method!r}; known: {sorted(_METHODS)} or 'auto'.")
  return _METHODS[method](x, qt)
