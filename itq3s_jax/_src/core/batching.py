"""Running a per-block encoder kernel over any leading shape, one compilation per size class."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def encode_blocks(kernel: Callable[[jax.Array, jax.Array], jax.Array], z: jax.Array,
                  importance: jax.Array | None, qk: int) -> jax.Array:
  """Codes ``z`` block by block with ``kernel``.

  Args:
    kernel: jitted (B, qk) float32 values, (B, qk) float32 weights -> uint8 (B, nbytes).
    z: float (..., n) with n a multiple of ``qk``.
    importance: per-value weights broadcastable to ``z``, or None (all ones).
    qk: the kernel's block length.

  Returns:
    uint8 (..., n / qk * nbytes): the blocks of each row in column order.

  The block count is zero-padded to a power of two (at least 8), so one compilation of
  ``kernel`` serves every tensor of a size class instead of one per shape.
  """
  z = jnp.asarray(z, jnp.float32)
  a = jnp.ones_like(z) if importance is None else jnp.asarray(importance, jnp.float32)
  a = jnp.broadcast_to(a, z.shape)
  lead, n = z.shape[:-1], z.shape[-1]
  z, a = z.reshape(-1, qk), a.reshape(-1, qk)
  rows = z.shape[0]
  pad = max(8, 1 << (rows - 1).bit_length()) - rows
  if pad:
    z, a = jnp.pad(z, ((0, pad), (0, 0))), jnp.pad(a, ((0, pad), (0, 0)))
  out = kernel(z, a)[:rows]
  return out.reshape(*lead, n // qk * out.shape[-1])
