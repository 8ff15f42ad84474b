"""``iq4_nl``: GGML IQ4_NL (type 20), llama.cpp's fallback for rows IQ3_S cannot block.

A block of 32 values is 18 bytes, little-endian (4.5 bpw):

  0   d        fp16 scale (any sign)
  2   qs[16]   4-bit indices: value j in the low nibble of qs[j], value j + 16
               in the high nibble of qs[j]

  y[j] = fp32(d) * KVALUES[idx_j]     (float32, one rounding; gguf and ggml alike)

with the 16 non-uniform levels ``KVALUES`` taken from the ``gguf`` package
(-127 ... 113, denser near zero). The format codes the weights themselves
(transform "none"); a row of K weights is K/32 blocks in column order, which is
exactly a GGML IQ4_NL row. Blocks of 64/128/256 (the "pow2" plan's segments) are
runs of 32-blocks, so any K that is a multiple of 32 codes without padding.

Encoder (vectorised, deterministic, jit-compiled). It minimises
sum_j a_j (x_j - y_j)^2 (a = importance, default 1) per block:
  1. candidate scales d = m / r for r in ``_RATIOS`` (m: the signed value of the
     largest |x|; r near -127 puts m on the lowest level, r near 113 on the
     highest, so both polarities of the asymmetric table are tried); at each,
     every value takes its nearest level and d is refit by weighted least
     squares; the candidate of least error wins;
  2. d is rounded to fp16, the values re-take their nearest level at the
     decoder's float32 scale, d is refit and rounded once more, and the better
     of the two (judged at the stored scales) is kept.
Nearest level = index of x / d among the midpoints of ``KVALUES``: exact for
either sign of d. An all-zero block gets d = 0 (decodes to zeros).

GPTQ hooks (gptq.py): ``levels`` gives step = fp32(d) per value, ``snap`` the
nearest level of x / step (``group`` 1), ``repack`` keeps d and writes the
levels' indices. IQ4_NL has no worst-case bound (``bound`` None).
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import batching
from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import registry

QK = 32
NBYTES = 18
GGML_TYPE = int(gguf.GGMLQuantizationType.IQ4_NL)
KVALUES = np.asarray(gguf.quants.IQ4_NL.kvalues, np.float32)  # (16,), ascending
_MID = (KVALUES[1:] + KVALUES[:-1]) / 2  # (15,) decision thresholds (exact in float32)
_STEP = KVALUES[1:] - KVALUES[:-1]
_FP16_MAX = 65504.0
MAX_ABS = _FP16_MAX * float(-KVALUES[0])
# Step 1's candidate ratios: m maps to level r. Around -127 as llama.cpp scans
# (its 15 ratios -134..-120), and around +113 for the other polarity.
_RATIOS = tuple(float(r) for r in np.concatenate([np.arange(-136.0, -117.0, 1.5),
                                                  np.arange(106.0, 122.0, 2.0)]))
# Index of each integer level value + 128 (for repack: level -> index).
_INDEX_OF = np.zeros(256, np.int32)
_INDEX_OF[(KVALUES + 128).astype(np.int32)] = np.arange(16)


def block_nbytes(n: int) -> int:
  if n % QK or n <= 0:
    raise ValueError(f"IQ4_NL codes runs of 32-value blocks, got {n=}.")
  return NBYTES * (n // QK)


def _nearest(t: jax.Array):
  """float32 t (any shape) -> (index int32, level float32) of the nearest KVALUES entry.

  A sum of threshold tests, not a gather: one elementwise pass that XLA vectorises.
  Ties (t exactly on a midpoint) take the lower level.
  """
  idx = jnp.zeros(t.shape, jnp.int32)
  lvl = jnp.full(t.shape, KVALUES[0], jnp.float32)
  for mid, step in zip(_MID.tolist(), _STEP.tolist()):
    above = t > mid
    idx = idx + above.astype(jnp.int32)
    lvl = lvl + jnp.where(above, jnp.float32(step), jnp.float32(0))
  return idx, lvl


def _rounded(t: jax.Array, one: jax.Array) -> jax.Array:
  """``t`` (32, N) or (N,), times ``one`` (N,) = 1.0 at run time.

  The candidate errors below are compared to the last bit (a constant block is exact at
  both polarities), so every rounding must be the same whatever the compiler does. XLA:CPU
  contracts a*b + c into one FMA at its default optimization level (not at level 0, nor on
  a CPU without FMA), and that changed the chosen scales. Multiplying a rounded product by
  a 1.0 the compiler cannot see makes any contraction exact: fma(p, 1, c) = p + c rounded
  once, the unfused result. (``lax.optimization_barrier`` did not stop it on jax 0.10.)
  """
  return t * one


def _sum0(t: jax.Array, one: jax.Array) -> jax.Array:
  """Sum over axis 0 of (32, N) as a fixed pairwise tree of elementwise adds -> (N,).

  ``jnp.sum`` lets XLA pick the summation order, and it picks differently under jit and
  vmap; elementwise adds are never reassociated, so this order, and the bytes, do not
  depend on batching. The terms are rounded first (:func:`_rounded`).
  """
  t = _rounded(t, one)
  while t.shape[0] > 1:
    h = t.shape[0] // 2
    t = t[:h] + t[h:]
  return t[0]


def _fit(x, a, q, one):
  """Weighted least-squares scale of levels q and its error: x, a, q (32, N) -> (N,), (N,)."""
  sqx = _sum0(a * q * x, one)
  sqq = _sum0(a * q * q, one)
  d = sqx / jnp.maximum(sqq, 1e-30)
  return d, _sum0(a * x * x, one) - _rounded(d * sqx, one)


def _at(x, a, d, one):
  """Codes and error at a fixed (float32) scale d (N,): ((32, N) idx, (N,) error)."""
  safe = jnp.where(d == 0, 1.0, d)
  idx, q = _nearest(x / safe)
  y = _rounded(jnp.where(d == 0, 0.0, d * q), one)
  return idx, _sum0(a * (x - y) ** 2, one)


def _f16(d):
  return jnp.clip(d, -_FP16_MAX, _FP16_MAX).astype(jnp.float16)


@jax.jit
def _encode(z: jax.Array, a: jax.Array) -> jax.Array:
  """float32 (N, 32) values and weights -> uint8 (N, 18)."""
  x, a = z.T, a.T  # (32, N): every step works on long contiguous N-vectors
  pick = jnp.argmax(jnp.abs(x), axis=0)
  m = jnp.take_along_axis(x, pick[None], axis=0)[0]
  safe_m = jnp.where(m == 0, 1.0, m)
  one = 1.0 + 0.0 * m  # 1.0 (m is finite) that XLA does not fold: see _rounded

  def trial(best, r):
    best_err, best_d = best
    _, q = _nearest(x * (r / safe_m))
    d, err = _fit(x, a, q, one)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, d, best_d)), None

  init = (jnp.full(m.shape, jnp.inf), safe_m / KVALUES[0])
  (_, d), _ = jax.lax.scan(trial, init, jnp.asarray(_RATIOS, jnp.float32))
  d1 = _f16(d)
  idx1, err1 = _at(x, a, d1.astype(jnp.float32), one)
  q1 = jnp.asarray(KVALUES)[idx1]
  d2 = _f16(_fit(x, a, q1, one)[0])
  idx2, err2 = _at(x, a, d2.astype(jnp.float32), one)
  second = err2 < err1
  d16 = jnp.where(second, d2, d1)
  idx = jnp.where(second[None], idx2, idx1)
  zero = (m == 0) | (d16 == 0)
  d16 = jnp.where(zero, jnp.float16(0), d16)
  idx = jnp.where(zero[None], 8, idx)  # any index decodes to 0 with d = 0
  return _pack(d16, idx.T)


def _pack(d16: jax.Array, idx: jax.Array) -> jax.Array:
  """fp16 d (...,) and int32 indices (..., 32) -> uint8 (..., 18)."""
  qs = (idx[..., :16] | (idx[..., 16:] << 4)).astype(jnp.uint8)
  return jnp.concatenate([bitpack.fp16_to_bytes(d16), qs], axis=-1)


def _blocks(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., block_nbytes(n)) -> (..., n/32, 18), checking the byte count."""
  if b.shape[-1] != block_nbytes(n):
    raise ValueError(f"IQ4_NL data of {n} values must have {block_nbytes(n)} bytes, got "
                     f"trailing axis {b.shape[-1]}.")
  return jnp.asarray(b, jnp.uint8).reshape(*b.shape[:-1], n // QK, NBYTES)


def _scale(b: jax.Array) -> jax.Array:
  """uint8 (..., 18) -> float32 (...,) fp32(d)."""
  return bitpack.fp16_from_bytes(b[..., :2]).astype(jnp.float32)


def _indices(b: jax.Array) -> jax.Array:
  """uint8 (..., 18) -> int32 (..., 32)."""
  qs = b[..., 2:].astype(jnp.int32)
  return jnp.concatenate([qs & 15, qs >> 4], axis=-1)


def decode(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., 18 n/32) -> float32 (..., n) (bit-exact vs gguf and ggml)."""
  blk = _blocks(b, n)
  y = _scale(blk)[..., None] * jnp.asarray(KVALUES)[_indices(blk)]
  return y.reshape(*b.shape[:-1], n)


def encode(z: jax.Array, importance: jax.Array | None = None) -> jax.Array:
  """float32 (..., n) values [+ weights (..., n)] -> uint8 (..., 18 n/32)."""
  block_nbytes(z.shape[-1])
  return batching.encode_blocks(_encode, z, importance, QK)


def levels(b: jax.Array, n: int):
  """Per value the step fp32(d) and the level range: (float32, int32, int32), each (..., n).

  Values are step * q for q in ``KVALUES`` (``snap`` picks one); lo/hi are
  the table's ends.
  """
  blk = _blocks(b, n)
  step = jnp.repeat(_scale(blk), QK, axis=-1).reshape(*b.shape[:-1], n)
  lo = jnp.full(step.shape, int(KVALUES[0]), jnp.int32)
  return step, lo, jnp.full(step.shape, int(KVALUES[-1]), jnp.int32)


def snap(x: jax.Array, step: jax.Array) -> jax.Array:
  """float32 x, step (..., 1) (step != 0, either sign) -> int32 level of KVALUES nearest x."""
  _, q = _nearest(x / step)
  return q.astype(jnp.int32)


def repack(b: jax.Array, q: jax.Array, n: int) -> jax.Array:
  """Keeps each block's d; writes the indices of int levels q (..., n) (0: a zero block)."""
  blk = _blocks(b, n)
  d16 = bitpack.fp16_from_bytes(blk[..., :2])
  idx = jnp.asarray(_INDEX_OF)[jnp.clip(q, -128, 127) + 128].reshape(*blk.shape[:-1], QK)
  idx = jnp.where((q == 0).reshape(idx.shape), 8, idx)
  return _pack(d16, idx).reshape(b.shape)


IQ4_NL = registry.register(registry.Format(
    name="iq4_nl", transform="none", tail="pow2", block_nbytes=block_nbytes, encode=encode,
    decode=decode, bound=None, max_abs=MAX_ABS, gguf_type=GGML_TYPE, levels=levels,
    repack=repack, group=1, snap=snap,
    description="llama.cpp IQ4_NL: 16 non-uniform levels per 32-block, 4.5 bpw (GGML type 20)"))
