"""``act_rotate``'s block decoders: each format's 256-block as dot terms (kernel_codec.Terms).

A format declares them as ``Format.kernel_codec(256).terms`` (iq3_s / itq3_s
do, beside their codec). ``itq3_t`` and ``uniform3*`` predate the term form;
their term decoders live here until they move beside their codecs. Each is
tested bit for bit against ``Format.decode`` (tests/pallas_kernels_test.py).

``itq3_t`` (4 terms of 128 slots). Trits are stored 5 per byte, weight i is
trits (2i, 2i+1) and its 16-weight sub-block shares one step, so neither
weights nor sub-blocks align with bytes. Each sub-block is read as the 8
bytes that hold its 32 trits (a window; neighbouring windows overlap), each
byte looked up whole in a table that gives the byte's whole weights and its
split-weight halves as 4 slots (which slots a byte has depends on whether its
first trit is even), times the sub-block's step multiplier (float16 table:
8 steps x 256 bytes x 2 x 4 = 32 KB; float32: multiplied after the lookup,
exactly). The activations are expanded to match (a split weight's halves
take x and 3x) and zeroed for slots of a neighbouring sub-block. A term is 4
sub-blocks; the super-scale is the block scale.

``uniform3`` (2 terms of 128 codes, natural order). Each 8 codes are 3 bytes,
gathered into one word; a code is then a shift and a mask, and its float16 is
(1024 + code) - 1028 from the bits, with no int-to-float conversion.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry
from itq3s_jax._src.formats import itq3_t
from itq3s_jax._src.formats import uniform3

QK = 256
# ------------------------------------------------------------------ itq3_t
_T_FIRST = 1 + -(-3 * (QK // itq3_t.SUB) // 8)  # first trit byte (7)
_T_BYTES = -(-2 * QK // 5)  # trit bytes (103)
_WIN = 8  # bytes per sub-block window
ITQ3T_TERMS = 4  # dot terms per block (4 sub-blocks each): benchmarks/KERNELS.md


def _itq3t_slots():
  """columns, coef (16, 32): the weight and multiplier of each (byte, slot) of a window."""
  w = np.minimum(32 * np.arange(16) // 5, _T_BYTES - _WIN)
  j = w[:, None, None] + np.arange(_WIN)[None, :, None]  # (16, 8, 1)
  i = np.arange(4)[None, None, :]
  odd = j % 2 == 1
  # even byte: q(pos0,1), q(pos2,3), pos4 = t0 of the next weight; odd byte: pos0 =
  # t1 of the previous weight (x3), q(pos1,2), q(pos3,4). Slot 3 is unused.
  weight = np.where(odd, (5 * j - 1) // 2 + i, 5 * j // 2 + i)
  coef = np.where(odd & (i == 0), 3.0, 1.0)
  t = np.arange(16)[:, None, None]
  keep = (i < 3) & (weight // itq3_t.SUB == t) & (weight < QK)
  return (np.where(keep, weight, -1).reshape(16, 32).astype(np.int32),
          np.where(keep, coef, 0.0).reshape(16, 32).astype(np.float32))


def _itq3t_luts() -> dict[str, np.ndarray]:
  t = bitpack.trit(np.arange(256)[:, None], 3 ** np.arange(5))  # (256, 5), numpy in and out
  even = np.stack([t[:, 0] + 3 * t[:, 1], t[:, 2] + 3 * t[:, 3], t[:, 4], 0 * t[:, 0]], -1)
  odd = np.stack([t[:, 0], t[:, 1] + 3 * t[:, 2], t[:, 3] + 3 * t[:, 4], 0 * t[:, 0]], -1)
  slots = np.stack([even, odd], axis=1).reshape(-1)  # [v, parity, slot]
  # float16: the step multiplier folded in, [s, v, parity, slot] (32 KB), rounded once;
  # the residual (q * MULT has <= 14 significant bits, so it is exact in float16).
  exact = itq3_t.MULT[:, None].astype(np.float64) * slots[None, :]
  scaled = exact.astype(np.float16)
  return dict(slots16=scaled.reshape(-1), res16=(exact - scaled).astype(np.float16).reshape(-1),
              slots32=slots.astype(np.float32), mult32=itq3_t.MULT, super=itq3_t.SUPER)


def _itq3t_decode(src, t, dtype, table=None):
  t = np.asarray(t).reshape(-1)
  per = 16 // ITQ3T_TERMS
  n = t.size * per  # sub-blocks u0..u0+n-1
  u = lax.broadcasted_iota(jnp.int32, (1, n, 1), 1) + int(t[0]) * per
  w = jnp.minimum(32 * u // 5, _T_BYTES - _WIN)  # (1, n, 1) first byte of each window
  v = src.gather(_T_FIRST + w + lax.broadcasted_iota(jnp.int32, (1, 1, _WIN), 2))
  k = lax.broadcasted_iota(jnp.int32, (1, 1, _WIN, 1), 2)
  i = lax.broadcasted_iota(jnp.int32, (1, 1, 1, 4), 3)
  lo = 1 + (3 * u >> 3)  # the 3-bit step code straddles at most two bytes
  s = ((src.gather(lo) | (src.gather(lo + 1) << 8)) >> (3 * u & 7)) & 7  # (R, n, 1)
  idx = v[..., None] * 8 + ((w[..., None] + k) & 1) * 4 + i  # (R, n, 8, 4)
  r = v.shape[0]
  if dtype == jnp.float16:
    vals = src.lut(table or "slots16", idx + s[..., None] * 2048)
  else:
    vals = src.lut("slots32", idx) * src.lut("mult32", s)[..., None]
  return vals.reshape(r, t.size, per * 4 * _WIN).astype(dtype)


def _itq3t_residual(src, t):
  return _itq3t_decode(src, t, jnp.dtype(jnp.float16), table="res16")


def _itq3t_scale(src):
  return src.lut("super", src.load(0, 1))


@functools.lru_cache(maxsize=None)
def _itq3t_terms() -> kernel_codec.Terms:
  columns, coef = _itq3t_slots()
  return kernel_codec.Terms(terms=ITQ3T_TERMS, slots=512 // ITQ3T_TERMS,
                            columns=columns.reshape(ITQ3T_TERMS, -1),
                            coef=coef.reshape(ITQ3T_TERMS, -1),
                            luts=kernel_codec.pad_luts(_itq3t_luts()),
                            decode=_itq3t_decode, scale=_itq3t_scale,
                            residual=_itq3t_residual)


# ------------------------------------------------------------------ uniform3
UNIFORM3_TERMS = 2  # dot terms per block (16 groups of 8 codes each)


def _uniform3_decode(src, t, dtype):
  t = np.asarray(t).reshape(-1)
  per = 32 // UNIFORM3_TERMS  # groups of 8 codes (3 bytes) per term
  n = t.size * per
  g = lax.broadcasted_iota(jnp.int32, (1, n, 1), 1) + int(t[0]) * per
  word = (src.gather(2 + 3 * g) | (src.gather(3 + 3 * g) << 8)
          | (src.gather(4 + 3 * g) << 16))  # (R, n, 1)
  c = (word >> (lax.broadcasted_iota(jnp.int32, (1, 1, 8), 2) * 3)) & 7  # (R, n, 8)
  if dtype == jnp.float16:  # 1024 + c as float16 bits, minus 1028: exact
    v = lax.bitcast_convert_type((c | 0x6400).astype(jnp.uint16), jnp.float16) - 1028
  else:  # 2^23 + c as float32 bits, minus 2^23 + 4: exact
    v = lax.bitcast_convert_type(c | 0x4B000000, jnp.float32) - 8388612.0
  return v.reshape(v.shape[0], t.size, 8 * per).astype(dtype)


def _uniform3_scale(src):
  bits = src.load(0, 1) | (src.load(1, 1) << 8)
  return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _uniform3_terms() -> kernel_codec.Terms:
  return kernel_codec.Terms(
      terms=UNIFORM3_TERMS, slots=QK // UNIFORM3_TERMS,
      columns=np.arange(QK, dtype=np.int32).reshape(UNIFORM3_TERMS, -1),
      coef=np.ones((UNIFORM3_TERMS, QK // UNIFORM3_TERMS), np.float32), luts={},
      decode=_uniform3_decode, scale=_uniform3_scale)


_HERE = {itq3_t.FORMAT.name: _itq3t_terms, uniform3.UNIFORM3.name: _uniform3_terms,
         uniform3.UNIFORM3_ROT.name: _uniform3_terms}


def get(format: str) -> kernel_codec.Terms:
  """The term decoder of ``format``; NotImplementedError if it has none."""
  codec = kernel_codec.get(format, QK)  # NotImplementedError without a kernel decoder
  if codec.terms is not None:
    return codec.terms
  if format in _HERE:
    return _HERE[format]()
  raise NotImplementedError(
      f"format {format!r} has no term decoder for act_rotate; use method='xla'.")


def formats() -> tuple[str, ...]:
  """Formats with a term decoder."""
  return tuple(f for f in kernel_codec.formats()
               if f in _HERE or registry.get_format(f).kernel_codec(QK).terms is not None)
