"""``uniform3`` / ``uniform3_rot``: the paper's round-to-nearest 3-bit baselines.

Block of n weights: an fp16 scale d (bytes 0-1, little-endian) then n 3-bit codes
c_i in 0..7, LSB-first (bitpack.pack_bits); value (c_i - 4) d. As in ggml's Q4_0,
d = -m/4 with m the signed value of the largest |x|, so the largest magnitude lands
exactly on level -4 and only the other sign can clip (by at most |d|). d is rounded
to fp16 *away from zero*, so |d| >= |m|/4 always. 256 weights take 98 bytes
(3.0625 bpw). ``uniform3_rot`` codes the randomized-FWHT coefficients instead.

Certified bound from the bytes: |x_i - x_hat_i| <= |d|/2 for codes 0..6 and <= |d|
for code 7 (the clipped side), so ||x - x_hat||_2 <= |d| sqrt(n_7 + (n - n_7)/4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry

_F16_MAX = float(np.finfo(np.float16).max)


def nbytes(n: int) -> int:
  return 2 + 3 * n // 8


def _scale(b: jax.Array) -> jax.Array:
  return bitpack.fp16_from_bytes(b[..., :2]).astype(jnp.float32)


def decode(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., nbytes(n)) -> float32 (..., n)."""
  return bitpack.rows(decode_columns(bitpack.columns(b), n))


def decode_columns(bt: jax.Array, n: int) -> jax.Array:
  """uint8 (nbytes(n), ...) -> float32 (n, ...): :func:`decode` with the byte axis leading.

  Column-major (bitpack): each code's two byte rows gathered, then one
  elementwise pass with row-constant shifts; the scale through the fp16 table.
  """
  f = kernel_codec.field_tables(2, n, 3, 1, nbytes(n))
  c = kernel_codec.bit_field(bitpack.take_rows(bt, f["lo"]), bitpack.take_rows(bt, f["hi"]),
                             bitpack.along_rows(f["shift"], bt.ndim), 3)
  return (c - 4).astype(jnp.float32) * bitpack.fp16_rows_to_f32(bt[0], bt[1])


def bound(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., nbytes(n)) -> float32 (...) certified L2 error bound."""
  c = bitpack.unpack_bits(b[..., 2:], 3, n)
  n7 = jnp.sum(c == 7, axis=-1).astype(jnp.float32)
  return jnp.abs(_scale(b)) * jnp.sqrt(n7 + (n - n7) / 4.0)


def _f16_away_from_zero(d: jax.Array) -> jax.Array:
  """float32 -> float16 with |result| >= |d| (clamped to the finite range)."""
  h = jnp.clip(d, -_F16_MAX, _F16_MAX).astype(jnp.float16)
  bits = jax.lax.bitcast_convert_type(h, jnp.uint16)
  short = (jnp.abs(h.astype(jnp.float32)) < jnp.abs(d)) & (jnp.abs(d) < _F16_MAX)
  # Sign-magnitude: adding one to the bit pattern steps away from zero.
  bumped = jnp.where(d < 0, bits | 0x8000, bits) + 1
  return jax.lax.bitcast_convert_type(jnp.where(short, bumped, bits), jnp.float16)


def encode(x: jax.Array, importance: jax.Array | None = None) -> jax.Array:
  """float32 (..., n) -> uint8 (..., nbytes(n)); ``importance`` is unused (RTN)."""
  del importance  # round-to-nearest has nothing to weigh
  i = jnp.argmax(jnp.abs(x), axis=-1)
  m = jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
  d16 = _f16_away_from_zero(m / -4.0)
  # One encoding of the zero block: +0 (m = +-0, or subnormal m flushed by XLA:CPU,
  # would give either sign of zero and two byte strings for the same values; T7).
  d16 = jnp.where(d16 == 0, jnp.float16(0), d16)
  d = d16.astype(jnp.float32)
  safe = jnp.where(d == 0, 1.0, d)
  c = jnp.where(d[..., None] == 0, 4, jnp.clip(jnp.round(x / safe[..., None]), -4, 3) + 4)
  return jnp.concatenate([bitpack.fp16_to_bytes(d16), bitpack.pack_bits(c.astype(jnp.int32), 3)],
                         axis=-1)


def levels(b: jax.Array, n: int):
  """Admissible values with the stored scale: x_hat_i = d q_i, -4 <= q_i <= 3.

  Returns (step float32, lo int32, hi int32), each (..., n) (registry.Format.levels).
  """
  d = jnp.broadcast_to(_scale(b)[..., None], (*b.shape[:-1], n))
  return d, jnp.full(d.shape, -4, jnp.int32), jnp.full(d.shape, 3, jnp.int32)


def repack(b: jax.Array, q: jax.Array, n: int) -> jax.Array:
  """Keeps the fp16 scale of ``b`` (..., nbytes(n)); codes int q (..., n) in -4..3."""
  return jnp.concatenate([b[..., :2], bitpack.pack_bits(q.astype(jnp.int32) + 4, 3)], axis=-1)


def kernel_decoder(n: int) -> kernel_codec.Codec:
  """The decoder above as per-column byte arithmetic (``core/kernel_codec.py``)."""
  f = kernel_codec.field_tables(2, n, 3, 1, nbytes(n))

  def decode(src: kernel_codec.Source) -> jax.Array:
    zero = jnp.zeros((1, 1), jnp.int32)
    bits = src.byte(zero) | (src.byte(zero + 1) << 8)  # little-endian fp16 scale
    d = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    c = kernel_codec.bit_field(src.byte(src.table("lo")), src.byte(src.table("hi")),
                               src.table("shift"), 3)
    return (c - 4).astype(jnp.float32) * d.astype(jnp.float32)

  return kernel_codec.Codec({k: v.astype(np.int32) for k, v in f.items()}, {}, decode)


_COMMON = dict(
    tail="pow2", block_nbytes=nbytes, encode=encode, decode=decode, bound=bound,
    max_abs=4.0 * _F16_MAX, levels=levels, repack=repack, kernel_codec=kernel_decoder)
UNIFORM3 = registry.register(registry.Format(
    name="uniform3", transform="none",
    description="round-to-nearest 3-bit, one fp16 absmax scale per block, no rotation "
    "(3.0625 bpw)", **_COMMON))
UNIFORM3_ROT = registry.register(registry.Format(
    name="uniform3_rot", transform="rht",
    description="uniform3 on randomized-FWHT coefficients (3.0625 bpw)", **_COMMON))
