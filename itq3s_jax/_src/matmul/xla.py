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

import math

import jax
import jax.numpy as jnp
from jax import lax

from itq3s_jax._src import codec
from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import qtensor

# Decode-tile size (values) for a single activation row: there the dot streams each decoded
# tile once, so a tile that stays in a core's L2 beside the next one's decode pays; more rows
# reuse the tile and amortise per-tile work over larger ones (codec.DECODE_TILE, 2^18).
# Measured on the 2-core CPU (benchmarks/layer_profile.py, speed.py): 2^17 at M = 1 takes a
# 576 x 576 product 0.41 -> 0.24 ms, SmolLM2's decode layer 2.26 -> 2.01 ms, 4096^2 14.0 ->
# 10.2 ms; at M = 8 / 32 / 256 it was 5-9 % slower than 2^18, and 2^16 slower at M = 1 too.
# CPU only: elsewhere every M takes codec.tile_values()'s large tiles.
MATVEC_TILE = 1 << 17


def dequantize_dot(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  """float32 (..., N): dequantize the whole weight, then one float32 dot at full precision."""
  w = codec.dequantize(qt, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def _tile_rows(m: int, qt: qtensor.QuantizedTensor) -> int:
  """Weight rows per decode tile of act_rotate_dot for x of ``m`` rows."""
  matvec = m == 1 and jax.default_backend() == "cpu"
  return codec.tile_rows(qt.shape[0], blocks.coded_length(qtensor.segments(qt.format, qt.k)),
                         MATVEC_TILE if matvec else None)


def decode_tiles(qt: qtensor.QuantizedTensor, m: int = 1) -> tuple[jax.Array, ...]:
  """The codes of ``qt`` in the column-major tiles act_rotate_dot decodes for x of ``m`` rows.

  A decode loop that multiplies the same weights by one activation row per
  step computes these once and passes them back (``act_rotate_dot(x, qt,
  tiles=...)``): each call then skips transposing the codes, which took
  SmolLM2's decoding on the 2-core CPU from 11 to 16 tokens/s
  (``models.generate.Generator`` does this; benchmarks/generate.py). The same
  bytes as ``qt.data``, rearranged: as much memory again as the codes.

  Returns:
    per segment uint8 (tiles, nbytes, count, rows) (``codec.column_tiles``).
  """
  qtensor.validate(qt)
  return tuple(codec.column_tiles(qt.data, qt.format, qt.k, _tile_rows(m, qt)))


def act_rotate_dot(x: jax.Array, qt: qtensor.QuantizedTensor,
                   tiles: tuple[jax.Array, ...] | None = None) -> jax.Array:
  """float32 (..., N): rotated activations . coding-domain weights, decoded in row tiles.

  Args:
    x: float (..., K) activations.
    qt: 2-D quantized weight (N, K).
    tiles: None, or :func:`decode_tiles` of ``qt`` for x's number of rows (not
      checked against qt's bytes; shapes must match).

  Returns:
    float32 (..., N), equal to ``x @ dequantize(qt).T`` up to rounding.

  Raises:
    ValueError: ``tiles`` shaped for another weight or number of rows.
  """
  n_out, k = qt.shape
  lead = x.shape[:-1]
  segs = qtensor.segments(qt.format, k)
  if n_out == 0 or not segs or not math.prod(lead):
    return jnp.zeros((*lead, n_out), jnp.float32)
  x2 = x.reshape(math.prod(lead), k)
  sig = jnp.asarray(codec.signs(qt.format, qt.seed))
  xr = codec.rotate(x2, sig, qt.format)  # (M, Kp) float32
  xs = [_columns_order(xr, seg) for seg in segs]
  rows = _tile_rows(x2.shape[0], qt)
  if tiles is None:
    tiles = codec.column_tiles(qt.data, qt.format, k, rows)
  else:
    want = [(-(-n_out // rows), s.nbytes, s.count, rows) for s in segs]
    if [tuple(t.shape) for t in tiles] != want:
      raise ValueError(f"tiles have shapes {[tuple(t.shape) for t in tiles]}, expected {want} "
                       f"for this weight and {x2.shape[0]} activation rows: "
                       "decode_tiles(qt, m) with the same m.")

  def tile(bts):  # per segment uint8 (nbytes, count, rows) -> float32 (M, rows)
    y = jnp.zeros((x2.shape[0], rows), jnp.float32)
    for xp, seg, bt in zip(xs, segs, bts):
      z = codec.decode_tile(bt, seg, qt.format)  # (n, count, rows): a (K, N) operand
      y = y + jnp.dot(xp, z.reshape(seg.n * seg.count, rows),
                      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y

  y = codec.map_tiles(tile, list(tiles))  # (tiles, M, rows)
  y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], -1)[:, :n_out]
  return y.reshape(*lead, n_out)


def _columns_order(xr: jax.Array, seg) -> jax.Array:
  """(M, Kp) rotated activations -> (M, n * count): the segment's values in (i, c) order."""
  part = xr[:, seg.coded_start:seg.coded_stop].reshape(xr.shape[0], seg.count, seg.n)
  return jnp.swapaxes(part, 1, 2).reshape(xr.shape[0], seg.n * seg.count)
