"""``x @ dequantize(qt).T`` in XLA, any backend, any format: two methods.

``dequantize_dot`` (method ``"xla"``, the reference): dequantize the whole
weight (codes -> inverse transform -> float32), then one float32 dot.

``act_rotate_dot`` (method ``"xla_act_rotate"``, the default off GPU): the
act_rotate kernel's algebra in plain XLA. The transform R of a block is
orthonormal, so x . w_hat = (R x) . (R w_hat) = (R x) . z_hat: the activations
are rotated once per block (O(M K log 256)) and the codes are decoded straight
to the coding domain, so no weight is inverse-transformed. The decode runs
column-major (``codec.decode_columns``: value i of block c of weight row r at
[i, c, r]), in tiles of weight rows that stay in cache, and each tile meets
the rotated activations permuted to the same (i, c) order in one dot whose
weight operand is already (K, N): no transpose of decoded values anywhere.
Tail blocks (128/64/32, or the zero-padded last 256-block) are segments like
any other. Equal to ``dequantize_dot`` up to float rounding (proofs T6; the
tolerance is derived in tests/matmul_test.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from itq3s_jax._src import codec
from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import qtensor

# Weights decoded per tile: 2^18 float32 values = 1 MiB, within a core's L2, so
# the dot reads the tile from cache rather than a tensor-sized buffer that
# every call would page in afresh (measured: benchmarks/speed.py).
TILE_WEIGHTS = 1 << 18


def dequantize_dot(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  """float32 (..., N): dequantize the whole weight, then one float32 dot at full precision."""
  w = codec.dequantize(qt, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def act_rotate_dot(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  """float32 (..., N): rotated activations . coding-domain weights, decoded in row tiles.

  Args:
    x: float (..., K) activations.
    qt: 2-D quantized weight (N, K).

  Returns:
    float32 (..., N), equal to ``x @ dequantize(qt).T`` up to rounding.
  """
  n_out, k = qt.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  sig = jnp.asarray(codec.signs(qt.format, qt.seed))
  xr = codec.rotate(x2, sig, qt.format)  # (M, Kp) float32
  segs = qtensor.segments(qt.format, k)
  xs = [_columns_order(xr, seg) for seg in segs]

  def tile(d):  # uint8 (T, row_nbytes) -> float32 (M, T)
    y = None
    for xp, (seg, z) in zip(xs, codec.decode_columns(d, None, qt.format, k)):
      part = jnp.dot(xp, z.reshape(seg.n * seg.count, d.shape[0]),
                     precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
      y = part if y is None else y + part
    return y if y is not None else jnp.zeros((x2.shape[0], d.shape[0]), jnp.float32)

  rows = tile_rows(n_out, blocks.coded_length(segs))
  if rows >= n_out:
    y = tile(qt.data)
  else:
    tiles = -(-n_out // rows)
    data = jnp.pad(qt.data, ((0, tiles * rows - n_out), (0, 0)))
    y = lax.map(tile, data.reshape(tiles, rows, data.shape[-1]))  # (tiles, M, rows)
    y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], tiles * rows)[:, :n_out]
  return y.reshape(*lead, n_out)


def tile_rows(n_out: int, kp: int) -> int:
  """Weight rows decoded per tile: about TILE_WEIGHTS values, a multiple of 8 (or all rows)."""
  rows = max(8, TILE_WEIGHTS // max(kp, 1) // 8 * 8)
  return n_out if rows * 2 > n_out else rows


def _columns_order(xr: jax.Array, seg) -> jax.Array:
  """(M, Kp) rotated activations -> (M, n * count): the segment's values in (i, c) order."""
  part = xr[:, seg.coded_start:seg.coded_stop].reshape(xr.shape[0], seg.count, seg.n)
  return jnp.swapaxes(part, 1, 2).reshape(xr.shape[0], seg.n * seg.count)

