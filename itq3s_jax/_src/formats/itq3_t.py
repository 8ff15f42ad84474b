"""``itq3_t``: interleaved balanced-ternary planes with a certified error bound.

Block of n weights (n = 256, or a 128/64/32 tail block), coded in the
randomized-Hadamard domain z = H (sigma * w) / sqrt(n):

  byte 0                    e, the super-scale code: D = 2^((e - 176) / 4), e = 0 means D = 0
  next ceil(3 (n/16) / 8)   s_b, 3-bit step codes of the n/16 sub-blocks of 16 coefficients
  next ceil(2 n / 5)        the trit stream t0_0, t1_0, t0_1, t1_1, ... at 5 trits per byte

  Delta_b = fp32(D * MULT[s_b]),  q_i = 3 t1_i + t0_i in {-4..4},  z_hat_i = Delta_b q_i

256 weights take 1 + 6 + 103 = 110 bytes (3.4375 bpw, the size of IQ3_S / Q3_K).
The encoder never clips: every sub-block satisfies max|z| <= 4.5 Delta_b, so each
coefficient errs by at most Delta_b / 2 and, the transform being orthonormal,

  ||w - w_hat||_2 <= eps_q = sqrt(sum_b 16 (Delta_b / 2)^2) = 2 ||Delta||_2,

a number computed from the stored bytes alone (proofs/README.md, T3). Within
that constraint the encoder searches the super-scale (2 codes) and each
sub-block's step (the 2 smallest admissible codes) for the least squared error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry

SUB = 16  # coefficients per sub-block (one 3-bit step code each)
E_BIAS = 176  # D(e) = 2^((e - E_BIAS) / 4)
# Every constant below has an 11-bit significand (it is a float16 value), so
# D * MULT[s] has at most 22 significant bits and Delta * q (|q| <= 4) at most 24:
# both products are exact in float32. Decoded values therefore do not depend on
# whether the compiler contracts multiply-adds into FMAs (bit-identical across
# batch shapes, jit and vmap; proofs T8).
# 2^(k/4) for k = 0..3; D(e) = ldexp(_QUARTER[e % 4], e // 4 - 44) is exact.
_QUARTER = np.float16([1.0, 2.0**0.25, 2.0**0.5, 2.0**0.75]).astype(np.float32)
SUPER = np.concatenate(
    [[np.float32(0)],
     np.ldexp(_QUARTER[np.arange(1, 256) % 4], np.arange(1, 256) // 4 - 44)]
).astype(np.float32)
# Step multipliers: geometric from 0.45 to 1 (measured best of 0.35..0.55 on N(0,1)).
MULT = np.float16(0.45 ** ((7 - np.arange(8)) / 7.0)).astype(np.float32)
# Admissible step: Delta >= m * 2/9 (i.e. m <= 4.5 Delta). The 1e-6 relative margin
# exceeds the float32 rounding of the product, so the test is exact (FORMAT.md §2.4).
_TWO_NINTHS_UP = np.float32(2.0 / 9.0 * (1.0 + 2.0**-20))
MAX_ABS = float(4.5 * SUPER[255] * MULT[7])


def nbytes(n: int) -> int:
  return 1 + -(-3 * (n // SUB) // 8) + -(-2 * n // 5)


def _split(b: jax.Array, n: int):
  ns = n // SUB
  sb = -(-3 * ns // 8)
  return b[..., 0], b[..., 1:1 + sb], b[..., 1 + sb:], ns


def steps(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., nbytes(n)) -> float32 (..., n/16) sub-block steps Delta_b."""
  e, sbytes, _, ns = _split(b, n)
  s = bitpack.unpack_bits(sbytes, 3, ns)
  d = jnp.asarray(SUPER)[e.astype(jnp.int32)]
  return d[..., None] * jnp.asarray(MULT)[s]


def decode(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., nbytes(n)) -> float32 (..., n) rotated-domain values z_hat."""
  return bitpack.rows(decode_columns(bitpack.columns(b), n))


def decode_columns(bt: jax.Array, n: int) -> jax.Array:
  """uint8 (nbytes(n), ...) -> float32 (n, ...): :func:`decode` with the byte axis leading.

  The same products as :func:`steps` and the kernel decoder (fp32(D * MULT[s])
  times the digit), bit for bit. Column-major (bitpack): the byte rows each
  coefficient reads are gathered first (whole-row copies), so the arithmetic is
  one elementwise pass with row constants (measured 2.5x faster in the matmul
  than unpacking the trit stream by reshapes, whose index arithmetic XLA keeps
  per element).
  """
  ns = n // SUB
  rest = bt.shape[1:]
  t = _column_tables(n)
  ax = lambda v: bitpack.along_rows(v, bt.ndim)  # noqa: E731
  s = kernel_codec.bit_field(bitpack.take_rows(bt, t["s_lo"]), bitpack.take_rows(bt, t["s_hi"]),
                             ax(t["s_shift"]), 3)  # (ns, ...)
  delta = jnp.asarray(SUPER)[bt[0].astype(jnp.int32)] * jnp.asarray(MULT)[s]
  t0 = bitpack.trit(bitpack.take_rows(bt, t["t0_col"]), ax(t["t0_pow"]))
  t1 = bitpack.trit(bitpack.take_rows(bt, t["t1_col"]), ax(t["t1_pow"]))
  q = (3 * t1 + t0).astype(jnp.float32).reshape(ns, SUB, *rest)
  return (q * delta[:, None]).reshape(n, *rest)


@functools.lru_cache(maxsize=None)
def _column_tables(n: int) -> dict[str, np.ndarray]:
  """Per sub-block step-field and per coefficient trit positions of a block of n."""
  ns = n // SUB
  f = kernel_codec.field_tables(1, ns, 3, 1, nbytes(n))
  tbyte = 1 + -(-3 * ns // 8)
  j = 2 * np.arange(n)  # trit index of t0_i; t1_i follows
  return dict(s_lo=f["lo"], s_hi=f["hi"], s_shift=f["shift"],
              t0_col=tbyte + j // 5, t0_pow=3 ** (j % 5),
              t1_col=tbyte + (j + 1) // 5, t1_pow=3 ** ((j + 1) % 5))


def bound(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., nbytes(n)) -> float32 (...): eps_q = 2 ||Delta||_2 (exact arithmetic)."""
  delta = steps(b, n)
  return 2.0 * jnp.sqrt(jnp.sum(delta * delta, axis=-1))


def _sse(zs, delta, imp):
  q = jnp.clip(jnp.round(zs / delta[..., None]), -4, 4)
  err = zs - q * delta[..., None]
  err2 = err * err if imp is None else imp * err * err
  return jnp.sum(err2, axis=-1), q


def encode(z: jax.Array, importance: jax.Array | None = None) -> jax.Array:
  """float32 (..., n) rotated coefficients -> uint8 (..., nbytes(n))."""
  n = z.shape[-1]
  ns = n // SUB
  zs = z.reshape(*z.shape[:-1], ns, SUB)
  imp = None if importance is None else importance.reshape(zs.shape)
  need = jnp.max(jnp.abs(zs), axis=-1) * _TWO_NINTHS_UP  # (..., ns): least admissible step
  top = jnp.max(need, axis=-1)  # (...,)
  sup = jnp.asarray(SUPER)
  mult = jnp.asarray(MULT)
  # Smallest e >= 1 with SUPER[e] >= top; the log2 guess is corrected by one exact test.
  guess = jnp.ceil(E_BIAS + 4.0 * jnp.log2(jnp.maximum(top, 1e-38))).astype(jnp.int32)
  e0 = jnp.clip(guess, 1, 255)
  e0 = jnp.where((sup[e0] < top) & (e0 < 255), e0 + 1, e0)
  e0 = jnp.where((sup[jnp.maximum(e0 - 1, 1)] >= top) & (e0 > 1), e0 - 1, e0)

  def best_steps(e):
    """Per sub-block, the better of the two smallest admissible step codes."""
    table = sup[e][..., None] * mult  # (..., 8) steps available in this block
    smin = jnp.minimum(jnp.sum(table[..., None, :] < need[..., None], axis=-1), 7)
    cands = []
    for s in (smin, jnp.minimum(smin + 1, 7)):
      cost, q = _sse(zs, jnp.take_along_axis(table, s, axis=-1), imp)
      cands.append((cost, s, q))
    (c0, s0, q0), (c1, s1, q1) = cands
    better = c1 < c0
    return (jnp.sum(jnp.where(better, c1, c0), -1), jnp.where(better, s1, s0),
            jnp.where(better[..., None], q1, q0))

  e1 = jnp.minimum(e0 + 1, 255)
  (tot0, s0, q0), (tot1, s1, q1) = best_steps(e0), best_steps(e1)
  use1 = tot1 < tot0  # the super-scale is per block: compare whole-block costs
  e = jnp.where(use1, e1, e0)
  s = jnp.where(use1[..., None], s1, s0)
  q = jnp.where(use1[..., None, None], q1, q0).astype(jnp.int32)
  zero = top <= 0
  e = jnp.where(zero, 0, e)
  s = jnp.where(zero[..., None], 0, s)
  q = jnp.where(zero[..., None, None], 0, q).reshape(z.shape)
  return jnp.concatenate(
      [e.astype(jnp.uint8)[..., None], bitpack.pack_bits(s, 3), _pack_digits(q)], axis=-1)


def levels(b: jax.Array, n: int):
  """Admissible values with the stored steps: z_hat_i = Delta_i q_i, -4 <= q_i <= 4.

  Returns (step float32, lo int32, hi int32), each (..., n) (registry.Format.levels).
  """
  delta = jnp.repeat(steps(b, n), SUB, axis=-1)
  lo = jnp.full(delta.shape, -4, jnp.int32)
  return delta, lo, -lo


def repack(b: jax.Array, q: jax.Array, n: int) -> jax.Array:
  """Keeps the scale bytes of ``b`` (..., nbytes(n)); codes int q (..., n) in -4..4."""
  _, _, tbytes, _ = _split(b, n)
  return jnp.concatenate([b[..., :b.shape[-1] - tbytes.shape[-1]], _pack_digits(q)], axis=-1)


def _pack_digits(q: jax.Array) -> jax.Array:
  """int (..., n) digits in -4..4 -> the interleaved trit stream bytes (..., ceil(2n/5)).

  ``bitpack.pack_trits`` of the stream t0_0, t1_0, t0_1, ... (q = 3 t1 + t0),
  computed per 5 coefficients = 2 bytes without divisions or a reduction over
  digits: with w = q + 4 = 3 u1 + u0 (u = t + 1), u1 = (11 w) >> 5 for w <= 8,
  v = 3 u0 + u1 is a coefficient's two digits in stream order, and
    even byte = 27 v_0 + 3 v_1 + u0_2,  odd byte = 81 u1_2 + 9 v_3 + v_4,
  each then coded ceil(256 q / 243) = q + floor(270 (13 q + 242) / 2^16)
  (exact for 0 <= q <= 242; tests/quantize_test.py checks every digit group).
  """
  n = q.shape[-1]
  lead = q.shape[:-1]
  pairs = -(-n // 5)
  w = jnp.pad(q.astype(jnp.int32) + 4, [(0, 0)] * len(lead) + [(0, 5 * pairs - n)],
              constant_values=4).reshape(*lead, pairs, 5)  # padding digits are trits 0
  u1 = (w * 11) >> 5
  u0 = w - 3 * u1
  v = 3 * w - 8 * u1
  even = v[..., 0] * 27 + v[..., 1] * 3 + u0[..., 2]
  odd = u1[..., 2] * 81 + v[..., 3] * 9 + v[..., 4]
  code = jnp.stack([even, odd], axis=-1).reshape(*lead, 2 * pairs)[..., :-(-2 * n // 5)]
  return (code + (((code * 13 + 242) * 270) >> 16)).astype(jnp.uint8)


def kernel_decoder(n: int) -> kernel_codec.Codec:
  """The decoder above as per-column byte arithmetic (``core/kernel_codec.py``)."""
  nb = nbytes(n)
  tbyte = 1 + -(-3 * (n // SUB) // 8)  # first trit byte
  j = 2 * np.arange(n)  # trit index of t0_i; t1_i follows
  f = kernel_codec.field_tables(1, n, 3, SUB, nb)
  tables = dict(s_lo=f["lo"], s_hi=f["hi"], s_shift=f["shift"],
                t0_col=tbyte + j // 5, t0_pow=3 ** (j % 5),
                t1_col=tbyte + (j + 1) // 5, t1_pow=3 ** ((j + 1) % 5))

  def decode(src: kernel_codec.Source) -> jax.Array:
    e = src.byte(jnp.zeros((1, 1), jnp.int32))
    s = kernel_codec.bit_field(src.byte(src.table("s_lo")), src.byte(src.table("s_hi")),
                               src.table("s_shift"), 3)
    delta = src.lut("super", e) * src.lut("mult", s)  # as steps(): fp32(D * MULT[s])
    t0 = bitpack.trit(src.byte(src.table("t0_col")), src.table("t0_pow"))
    t1 = bitpack.trit(src.byte(src.table("t1_col")), src.table("t1_pow"))
    return (3 * t1 + t0).astype(jnp.float32) * delta

  return kernel_codec.Codec({k: v.astype(np.int32) for k, v in tables.items()},
                            dict(super=SUPER, mult=MULT), decode)


FORMAT = registry.register(registry.Format(
    name="itq3_t",
    transform="rht",
    tail="pow2",
    block_nbytes=nbytes,
    encode=encode,
    decode=decode,
    bound=bound,
    max_abs=MAX_ABS,
    levels=levels,
    repack=repack,
    kernel_codec=kernel_decoder,
    description="randomized FWHT + two interleaved balanced-ternary planes, 16-wide "
    "sub-block steps, certified bound (3.4375 bpw at n=256)",
))
