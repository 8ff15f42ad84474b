"""Byte packing shared by the codecs: base-3 trits (5 per byte), n-bit fields, fp16 scales.

Trit bytes use the TQ1_0 code of llama.cpp (docs/FORMAT.md): five trits
t_0..t_4 in {-1, 0, 1}, u_k = t_k + 1, q = sum_k u_k 3^(4-k) (t_0 most
significant) and byte = ceil(q * 256 / 243). Trit k of a byte b decodes as
((b * 3^k mod 256) * 3 >> 8) - 1, which needs no division and vectorises.
Bit fields are LSB-first: field i of width w occupies bits [w*i, w*i + w) of
the little-endian bit string of the bytes. fp16 scales are stored little-endian.

Column-major blocks. The codecs decode a block with its byte axis *leading*
(``columns``: (nbytes, ...) in, (n, ...) out), so that every per-coefficient
constant (which byte, which digit, which shift) is one row's constant and the
work of a row runs over all blocks contiguously: XLA:CPU vectorises that form,
and not the row-major one, whose index arithmetic sits on the minor axis.
A row-major caller wraps it as ``rows(decode_columns(columns(b)))``; where a
caller already holds column-major bytes the two transposes cancel in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_POW3 = (81, 27, 9, 3, 1)  # weight of trit k in q, first trit most significant


def pack_trits(t: jax.Array) -> jax.Array:
  """int (..., m) trits in {-1,0,1} -> uint8 (..., ceil(m/5)); padded with 0 trits."""
  m = t.shape[-1]
  nbytes = -(-m // 5)
  u = (t.astype(jnp.int32) + 1)
  u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, 5 * nbytes - m)], constant_values=1)
  u = u.reshape(*u.shape[:-1], nbytes, 5)
  q = jnp.sum(u * jnp.asarray(_POW3, jnp.int32), axis=-1)
  return ((q * 256 + 242) // 243).astype(jnp.uint8)


def trit(v: jax.Array, pow3: jax.Array) -> jax.Array:
  """Trit k of int32 TQ1_0 bytes ``v``, given pow3 = 3^k (broadcasts): int32 in {-1, 0, 1}.

  Integer ops only, so the Pallas kernels' decoders call it too.
  """
  return (((v * pow3) & 0xFF) * 3 >> 8) - 1


def unpack_trits(b: jax.Array, m: int) -> jax.Array:
  """uint8 (..., nbytes) -> int32 (..., m) trits in {-1, 0, 1}."""
  v = b.astype(jnp.int32)[..., None]
  t = trit(v, jnp.asarray([1, 3, 9, 27, 81], jnp.int32))
  return t.reshape(*b.shape[:-1], b.shape[-1] * 5)[..., :m]


def columns(b: jax.Array) -> jax.Array:
  """(..., m) -> (m, ...): the block axis first (column-major blocks)."""
  return jnp.moveaxis(b, -1, 0)


def rows(z: jax.Array) -> jax.Array:
  """(m, ...) -> (..., m): the inverse of :func:`columns`."""
  return jnp.moveaxis(z, 0, -1)


def take_rows(bt: jax.Array, idx) -> jax.Array:
  """int32 rows ``idx`` (a static sequence) of column-major bytes (m, ...) -> (len(idx), ...).

  A gather of whole rows (a contiguous run is a slice); XLA writes the result
  as its own small array, which keeps the consumer a plain elementwise pass.
  """
  idx = np.asarray(idx, np.int64)
  if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
    part = bt[int(idx[0]):int(idx[0]) + idx.size]
  else:
    part = jnp.take(bt, jnp.asarray(idx, jnp.int32), axis=0)
  return part.astype(jnp.int32)


def along_rows(v, ndim: int) -> jax.Array:
  """A static per-row constant (m,) shaped (m, 1, ...) to broadcast over an ndim-array."""
  return jnp.asarray(np.asarray(v, np.int32)).reshape((-1,) + (1,) * (ndim - 1))


def fp16_rows_to_f32(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """float32 value of the little-endian fp16 whose bytes are ``lo``, ``hi`` (int arrays).

  Through a 65536-entry table: XLA writes the gathered scales as their own
  array, where the bitcast-and-convert form is fused into every consumer and
  redone per decoded value (measured 4x slower decode on CPU). Every fp16 is
  exactly a float32, so this is the conversion itself, bit for bit.
  """
  code = lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 8)
  return jnp.asarray(_fp16_table())[code]


@functools.lru_cache(maxsize=None)
def _fp16_table() -> np.ndarray:
  return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def pack_bits(v: jax.Array, width: int) -> jax.Array:
  """int (..., m) fields of ``width`` bits -> uint8 (..., ceil(m*width/8)), LSB first."""
  m = v.shape[-1]
  nbits = m * width
  nbytes = -(-nbits // 8)
  bits = (v.astype(jnp.int32)[..., None] >> jnp.arange(width, dtype=jnp.int32)) & 1
  bits = bits.reshape(*v.shape[:-1], nbits)
  bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, 8 * nbytes - nbits)])
  bits = bits.reshape(*v.shape[:-1], nbytes, 8)
  return jnp.sum(bits << jnp.arange(8, dtype=jnp.int32), axis=-1).astype(jnp.uint8)


def unpack_bits(b: jax.Array, width: int, m: int) -> jax.Array:
  """uint8 (..., nbytes) -> int32 (..., m) fields of ``width`` bits, LSB first."""
  bits = (b.astype(jnp.int32)[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1
  bits = bits.reshape(*b.shape[:-1], b.shape[-1] * 8)[..., : m * width]
  bits = bits.reshape(*b.shape[:-1], m, width)
  return jnp.sum(bits << jnp.arange(width, dtype=jnp.int32), axis=-1)


def fp16_from_bytes(b: jax.Array) -> jax.Array:
  """uint8 (..., 2) little-endian -> float16 (...)."""
  bits = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
  return jax.lax.bitcast_convert_type(bits, jnp.float16)


def fp16_to_bytes(h: jax.Array) -> jax.Array:
  """float16 (...) -> uint8 (..., 2) little-endian."""
  bits = jax.lax.bitcast_convert_type(h.astype(jnp.float16), jnp.uint16)
  return jnp.stack([bits & 0xFF, bits >> 8], axis=-1).astype(jnp.uint8)
