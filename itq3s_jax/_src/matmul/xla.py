"""The XLA implementation of ``x @ dequantize(qt).T``: any backend, any format (the reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from itq3s_jax._src import codec
from itq3s_jax._src.core import qtensor


def dequantize_dot(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  """float32 (..., N): dequantize the whole weight, then one float32 dot at full precision."""
  w = codec.dequantize(qt, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
