"""``iq3_s`` (GGML IQ3_S, type 21) and ``itq3_s`` (published ITQ3_S, type 41).

Block of 256 values, 110 bytes (docs/FORMAT.md), little-endian:

  0    d          fp16 super-scale
  2    qs[64]     low 8 bits of the 9-bit grid index of each 4-group
  66   qh[8]      bit k of qh[ib]: 9th index bit of group k of sub-block ib
  74   signs[32]  bit e%8 of signs[e/8] set: value e is negative
  106  scales[4]  4-bit s of sub-block ib: low nibble of scales[ib/2] if ib even

  y[e] = (fp32(d) * (1 + 2 s_ib)) * grid[idx_g][e % 4] * (-1)^sign_e

in float32 with exactly that rounding order, which is gguf's and llama.cpp's
(bit-exact; tests/iq3s_test.py). ``itq3_s`` stores IQ3_S codes of the block's
natural-order Hadamard transform z = H w / 16 (the driver's "hadamard"
transform, fwht.py) and decodes through the same butterfly and x 1/16.

Encoder (vectorised and deterministic, jit-compiled). It minimises
sum_i a_i (z_i - y_i)^2 (a = importance, default 1) in three searches:
  1. per 32-value sub-block, a continuous scale: for each ratio r in
     ``_RATIOS`` assign codes at S = max|z| / r, refit S by weighted least
     squares, keep the best; then reassign and refit once more;
  2. per block, d in fp16 from the largest sub-block scale over ``_DIVISORS``
     and per sub-block the two multipliers 1 + 2s bracketing its scale, judged
     in closed form with step 1's codes; codes are then reassigned at the
     chosen (exactly rounded) effective scales;
  3. codes at every tried scale: each 4-group rounds to a lattice point, then
     scores its ``NCAND`` nearest grid points exactly (iq3s_grid); an on-grid
     lattice point is optimal for any positive weights and is kept.
Final codes are chosen with the decoder's float32 scale d * (1 + 2s), so the
bytes decode to what the encoder chose, in gguf and llama.cpp alike.

Zero sub-blocks. IQ3_S cannot code a zero inside a block
with d > 0 (magnitudes are odd, multipliers >= 1); the nearest it can do is
+-d, so an all-zero sub-block is written at its own position with s = 0 and
grid entry 0 (1, 1, 1, 1): each value decodes to +d, and the d search counts
that cost. Nothing is shifted (llama.cpp's encoder shifts later sub-blocks'
codes one slot on such a block and decodes them as garbage). An all-zero block
gets d = 0 and decodes to exact zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import batching
from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry
from itq3s_jax._src.formats import iq3s_grid

QK = 256
NBYTES = 110
_FP16_MAX = 65504.0
# Largest |value| a block can hold: fp16 max d, multiplier 31, magnitude 15.
MAX_ABS = _FP16_MAX * 31 * 15
# Sub-block scale search: S = max|z| / r (r = what the largest value maps to,
# in odd-level units; llama.cpp scans 13.2..16.8).
# Three ratios + one refit reach 0.0174 on N(0,1) (six: 0.0170 at twice the cost).
_RATIOS = (12.0, 13.5, 15.0)
# Block super-scale search: d = fp16(max_b S_b / c).
_DIVISORS = (31.0, 30.0, 29.0)


def block_nbytes(n: int) -> int:
  if n != QK:
    raise ValueError(f"IQ3_S blocks hold 256 values, got {n=}.")
  return NBYTES


def _split(b: jax.Array):
  return b[..., 0:2], b[..., 2:66], b[..., 66:74], b[..., 74:106], b[..., 106:110]


def _bits(x: jax.Array, nbits: int) -> jax.Array:
  """uint8 (..., m) -> uint8 (..., m, nbits): bit j of each byte (LSB first)."""
  return (x[..., None] >> jnp.arange(nbits, dtype=jnp.uint8)) & 1


@jax.jit
def _decode(b: jax.Array) -> jax.Array:
  return bitpack.rows(decode_columns(bitpack.columns(b), QK))


def decode_columns(bt: jax.Array, n: int) -> jax.Array:
  """uint8 (110, ...) -> float32 (256, ...): :func:`decode` with the byte axis leading.

  Column-major (bitpack): for each value the byte rows it reads (scale nibble,
  qs, qh, sign) are gathered as whole rows, then one elementwise pass with row
  constants; its grid entry comes from one table of the four magnitudes packed
  in an int32 (``_grid_words``), d through the fp16 table. The float32
  products are the decoder's, in its order: (d * (1 + 2 s)) * grid, signed.
  """
  block_nbytes(n)
  t = _column_tables()
  ax = lambda v: bitpack.along_rows(v, bt.ndim)  # noqa: E731
  rows = lambda name: bitpack.take_rows(bt, t[name])  # noqa: E731
  s = (rows("scale") >> ax(t["scale_shift"])) & 15
  db = bitpack.fp16_rows_to_f32(bt[0], bt[1]) * (1 + 2 * s).astype(jnp.float32)
  idx = rows("qs") | (((rows("qh") >> ax(t["qh_shift"])) & 1) << 8)
  g = (jnp.asarray(_grid_words())[idx] >> ax(t["coord_shift"])) & 255
  y = db * g.astype(jnp.float32)
  neg = (rows("sign") >> ax(t["sign_shift"])) & 1
  return jnp.where(neg == 1, -y, y)


@functools.lru_cache(maxsize=None)
def _column_tables() -> dict[str, np.ndarray]:
  """Per value e of a block: the byte and bit of each field it reads (docstring layout)."""
  e = np.arange(QK)
  sub, grp = e // 32, e // 4
  return dict(scale=106 + sub // 2, scale_shift=4 * (sub % 2), qs=2 + grp,
              qh=66 + sub, qh_shift=grp % 8, coord_shift=8 * (e % 4),
              sign=74 + e // 8, sign_shift=e % 8)


@functools.lru_cache(maxsize=None)
def _grid_words() -> np.ndarray:
  """int32 (512,): the four magnitudes of grid entry i as bytes 0..3 of one word."""
  g = iq3s_grid.grid().astype(np.int64)
  return (g << (8 * np.arange(4))).sum(-1).astype(np.int32)


def decode(b: jax.Array, n: int) -> jax.Array:
  """uint8 (..., 110) -> float32 (..., 256) coding-domain values (bit-exact)."""
  block_nbytes(n)
  if b.shape[-1] != NBYTES:
    raise ValueError(f"IQ3_S block data must have {NBYTES} bytes per block, got "
                     f"trailing axis {b.shape[-1]}.")
  return _decode(jnp.asarray(b, jnp.uint8))


# Encoder layout: values as (4 coordinate, 8 group, 8 sub-block, N block) so that
# every step is an elementwise op over long contiguous N-vectors and sums over
# groups/coordinates add whole slabs (XLA's CPU backend vectorises those well,
# small trailing reductions and row gathers poorly).


def _levels(code: jax.Array, j: int) -> jax.Array:
  """Odd magnitude 2L+1 of coordinate j of lattice codes (any int shape), float32."""
  return (2 * ((code >> (3 * j)) & 7) + 1).astype(jnp.float32)


def _assign(xa: jax.Array, a: jax.Array, scale: jax.Array):
  """Best grid point of every 4-group at a fixed scale per sub-block.

  Args:
    xa, a: magnitudes and weights, each 4 float32 (8, 8, N) arrays (one per
      coordinate; kept apart so XLA does not fuse through a concatenation).
    scale: float32 (8, N) effective sub-block scales (> 0).

  Returns:
    (lattice code int32 (8, 8, N) of the chosen grid points, their magnitudes
    as 4 float32 (8, 8, N) arrays).
  """
  lvl = [jnp.clip(jnp.round((x / scale - 1.0) * 0.5), 0, 7).astype(jnp.int32) for x in xa]
  code = lvl[0] | (lvl[1] << 3) | (lvl[2] << 6) | (lvl[3] << 9)
  words = jnp.asarray(iq3s_grid.candidates())[:, code]  # (NCAND / 2, 8, 8, N)

  def score(k, best):
    # A loop, not a Python unroll: XLA keeps each candidate's scoring one small
    # vectorised kernel instead of fusing (and duplicating) all of them into
    # every consumer of the result, which runs 5-10x slower on CPU.
    best_cost, best_code = best
    cand = (words[k // 2] >> (12 * (k % 2))) & 4095
    cost = 0.0
    for j in range(4):
      diff = xa[j] - scale * _levels(cand, j)
      cost = cost + a[j] * diff * diff
    better = cost < best_cost  # strict: ties keep the nearer-listed candidate
    return jnp.where(better, cost, best_cost), jnp.where(better, cand, best_code)

  init = (jnp.full(code.shape, jnp.inf), code)
  _, best_code = jax.lax.fori_loop(0, iq3s_grid.NCAND, score, init)
  best_code = best_code.astype(jnp.int32)
  return best_code, [_levels(best_code, j) for j in range(4)]


def _coord_sum(terms) -> jax.Array:
  """Sum over the 4 coordinates (a list) and the 8 groups: (8, N)."""
  return jnp.sum(terms[0] + terms[1] + terms[2] + terms[3], axis=0)


def _fit(xa, a, g):
  """Weighted least-squares scale (8, N) of codes g and the error at that scale."""
  sxg = _coord_sum([a[j] * xa[j] * g[j] for j in range(4)])
  sgg = _coord_sum([a[j] * g[j] * g[j] for j in range(4)])
  sxx = _coord_sum([a[j] * xa[j] * xa[j] for j in range(4)])
  scale = sxg / jnp.maximum(sgg, 1e-30)
  return scale, sxx - scale * sxg


def _sse(xa, a, g, scale):
  return _coord_sum([a[j] * (xa[j] - scale * g[j]) ** 2 for j in range(4)])


def _subblock_scales(xa, a):
  """Step 1: (8, N) continuous least-squares scale of each sub-block (0 if
  empty) and the sums (sxx, sxg, sgg) of its grid codes at that scale."""
  m = jnp.max(jnp.maximum(jnp.maximum(xa[0], xa[1]), jnp.maximum(xa[2], xa[3])), axis=0)
  safe = jnp.where(m > 0, m, 1.0)

  def try_scale(carry, trial):
    best_err, best_scale = carry
    _, g = _assign(xa, a, trial)
    scale, err = _fit(xa, a, g)
    better = (err < best_err) & (scale > 0)
    return (jnp.where(better, err, best_err), jnp.where(better, scale, best_scale)), None

  # lax.scan, not a Python loop: XLA fuses nothing across loop iterations, so
  # the trials stay separate vectorised kernels instead of one duplicated fusion.
  carry = (jnp.full(m.shape, jnp.inf), safe / 15.0)
  trials = safe / jnp.asarray(_RATIOS, jnp.float32)[:, None, None]
  (_, scale), _ = jax.lax.scan(try_scale, carry, trials)
  _, g = _assign(xa, a, scale)  # codes at the refit scale, refit once more
  new, _ = _fit(xa, a, g)
  scale = jnp.where(new > 0, new, scale)
  sums = (_coord_sum([a[j] * xa[j] * xa[j] for j in range(4)]),
          _coord_sum([a[j] * xa[j] * g[j] for j in range(4)]),
          _coord_sum([a[j] * g[j] * g[j] for j in range(4)]))
  return jnp.where(m > 0, scale, 0.0), sums


def _superscale_search(xa, a, sub, sums):
  """Step 2: per block the fp16 d and per sub-block s of least error, judged
  in closed form with step 1's codes (sxx - 2 S sxg + S^2 sgg), then the codes
  at the chosen scales.

  Returns (d16 float16 (N,), s int32 (8, N), lattice codes int32 (8, 8, N)).
  """
  sxx, sxg, sgg = sums
  top = jnp.max(sub, axis=0)  # (N,)
  best = None
  for c in _DIVISORS:
    d16 = jnp.minimum(top / c, _FP16_MAX).astype(jnp.float16)
    dsafe = jnp.where(d16 > 0, d16.astype(jnp.float32), 1.0)
    s0 = jnp.clip(jnp.floor((sub / dsafe - 1.0) * 0.5), 0, 15).astype(jnp.int32)
    s1 = jnp.minimum(s0 + 1, 15)
    errs = []
    for si in (s0, s1):
      sc = dsafe * (1 + 2 * si).astype(jnp.float32)
      errs.append(sxx - 2.0 * sc * sxg + sc * sc * sgg)
    s = jnp.where(errs[1] < errs[0], s1, s0)
    cand = (jnp.sum(jnp.minimum(errs[0], errs[1]), axis=0), d16, s)
    if best is None:
      best = cand
    else:
      better = cand[0] < best[0]
      best = tuple(jnp.where(better, new, old) for new, old in zip(cand, best))
  _, d16, s = best
  dsafe = jnp.where(d16 > 0, d16.astype(jnp.float32), 1.0)
  code, _ = _assign(xa, a, dsafe * (1 + 2 * s).astype(jnp.float32))
  return d16, s, code


def _pack(d16, s, idx, neg):
  """Bytes of N blocks: d16 float16 (N,), s int32 (N, 8), idx int32 (N, 8, 8),
  neg bool (N, 256) -> uint8 (N, 110)."""
  n = d16.shape[0]
  d_b = bitpack.fp16_to_bytes(d16)
  qs = (idx & 255).astype(jnp.uint8).reshape(n, 64)
  weights8 = 1 << jnp.arange(8, dtype=jnp.int32)
  qh = jnp.sum(((idx >> 8) & 1) * weights8, axis=-1).astype(jnp.uint8)
  signs = jnp.sum(neg.reshape(n, 32, 8).astype(jnp.int32) * weights8,
                  axis=-1).astype(jnp.uint8)
  s2 = s.reshape(n, 4, 2)
  scales = (s2[..., 0] | (s2[..., 1] << 4)).astype(jnp.uint8)
  return jnp.concatenate([d_b, qs, qh, signs, scales], axis=-1)


@jax.jit
def _encode(z: jax.Array, a: jax.Array) -> jax.Array:
  """float32 (N, 256) values and weights -> uint8 (N, 110)."""
  # (N, sub, group, coord) -> (coord, group, sub, N)
  xa = list(jnp.abs(z).reshape(-1, 8, 8, 4).transpose(3, 2, 1, 0))
  a = list(a.reshape(-1, 8, 8, 4).transpose(3, 2, 1, 0))
  d16, s, code = _superscale_search(xa, a, *_subblock_scales(xa, a))
  idx = jnp.asarray(iq3s_grid.index_of_code())[code]  # (group, sub, N)
  zero = d16.astype(jnp.float32) <= 0  # all-zero block (or d below fp16 range)
  d16 = jnp.where(zero, jnp.float16(0), d16)
  s = jnp.where(zero, 0, s).T  # (N, 8)
  idx = jnp.where(zero, 0, idx).transpose(2, 1, 0)  # (N, sub, group)
  return _pack(d16, s, idx, z < 0)


def encode(z: jax.Array, importance: jax.Array | None = None) -> jax.Array:
  """float32 (..., 256) coding-domain values [+ weights (..., 256)] -> uint8 (..., 110)."""
  block_nbytes(z.shape[-1])
  return batching.encode_blocks(_encode, z, importance, QK)


# Hessian-aware rounding hooks (gptq.py): the block's d and sub-block scales stay,
# each 4-group is re-chosen on the grid.


def _scale_bits(b: jax.Array):
  """uint8 (..., 110) -> (fp16 d (...,), 4-bit s int32 (..., 8))."""
  d_b, _, _, _, scales = _split(b)
  s = jnp.stack([scales & 15, scales >> 4], axis=-1).reshape(*b.shape[:-1], 8)
  return bitpack.fp16_from_bytes(d_b), s.astype(jnp.int32)


def levels(b: jax.Array, n: int):
  """Per value the decoder's step fp32(d) (1 + 2 s) and the code range -15..15.

  Values are step * q for odd q whose 4-groups of |q| lie on the grid (``snap``).
  Returns (step float32, lo int32, hi int32), each (..., 256).
  """
  block_nbytes(n)
  d16, s = _scale_bits(b)
  step = d16.astype(jnp.float32)[..., None] * (1 + 2 * s).astype(jnp.float32)
  step = jnp.repeat(step, 32, axis=-1)
  lo = jnp.full(step.shape, -15, jnp.int32)
  return step, lo, -lo


def snap(x: jax.Array, step: jax.Array) -> jax.Array:
  """Nearest grid point with free signs: float32 (..., 4) values, steps -> odd int32 codes.

  The candidates are the encoder's (``_assign``), scored with the same float32
  arithmetic, so at the encoder's own values this returns its codes.
  """
  xa = [jnp.abs(x[..., j]) for j in range(4)]
  _, mags = _assign(xa, [jnp.ones_like(v) for v in xa], step[..., 0])
  q = jnp.stack(mags, axis=-1).astype(jnp.int32)
  return jnp.where(x < 0, -q, q)


def repack(b: jax.Array, q: jax.Array, n: int) -> jax.Array:
  """Keeps d and the sub-block scales of ``b`` (..., 110); codes from odd int q (..., 256).

  q = 0 (the code of an all-zero block, whose d is 0) is written as +1.
  """
  block_nbytes(n)
  lead = b.shape[:-1]
  d16, s = _scale_bits(b.reshape(-1, NBYTES))
  mag = jnp.maximum(jnp.abs(q.reshape(-1, 8, 8, 4)), 1)
  lvl = (mag - 1) // 2
  code = lvl[..., 0] | (lvl[..., 1] << 3) | (lvl[..., 2] << 6) | (lvl[..., 3] << 9)
  idx = jnp.asarray(iq3s_grid.index_of_code())[code]
  return _pack(d16, s, idx, q.reshape(-1, QK) < 0).reshape(*lead, NBYTES)


# Kernel decoder (core/kernel_codec.py): the block as KERNEL_TERMS dot terms of whole
# 32-value sub-blocks, in natural order, with the fp16 d factored out as the block scale.
# float16 values are exact: +-(1 + 2 s) * grid <= 31 * 15 needs 9 bits. The grid is a
# lookup table read in whole entries: uint32 pairs of float16 magnitudes, so the
# signs of two values go in with one multiply and one xor (bit 15 and bit 31).


def _grid_luts() -> dict[str, np.ndarray]:
  g = iq3s_grid.grid()  # (512, 4) odd magnitudes
  h = g.astype(np.float16).view(np.uint16).astype(np.uint32).reshape(512, 2, 2)
  return dict(grid16=(h[..., 0] | (h[..., 1] << 16)).reshape(-1),
              grid32=g.reshape(-1).astype(np.float32))


KERNEL_TERMS = 2  # dot terms per block (4 sub-blocks each): benchmarks/KERNELS.md


def _kernel_sub_blocks(src, u0: int, count: int, dtype):
  """Values of sub-blocks u0..u0+count-1 (count a power of two) -> (R, count, 32)."""
  g = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 8), 2)
  u = jax.lax.broadcasted_iota(jnp.int32, (1, count, 1), 1) + u0
  qs = src.load(2 + 8 * u0, 8 * count)
  r = qs.shape[0]
  qs = qs.reshape(r, count, 8)  # low index bits
  qh = src.load(66 + u0, count).reshape(r, count, 1)  # ninth bits
  idx = qs | (((qh >> g) & 1) << 8)
  sg = src.load(74 + 4 * u0, 4 * count)  # 2 groups per byte
  sg = jnp.broadcast_to(sg[..., None], (r, 4 * count, 2)).reshape(r, count, 8)
  if count > 1:  # scale nibble u % 2 of byte 106 + u // 2
    sc = src.load(106 + u0 // 2, count // 2)
    sc = jnp.broadcast_to(sc[..., None], (r, count // 2, 2)).reshape(r, count, 1)
  else:
    sc = src.load(106 + u0 // 2, 1).reshape(r, 1, 1)
  mul = 1 + 2 * ((sc >> ((u & 1) * 4)) & 15)  # (R, count, 1)
  if dtype == jnp.float16:
    p = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 8, 2), 3)
    par = (jax.lax.broadcasted_iota(jnp.int32, (1, 1, 8, 1), 2) & 1) * 4
    # sign bit 4 (g % 2) + 2 p of the group's byte to bit 15, the next bit to 31
    sign = sg[..., None] * ((1 << (15 - 2 * p - par)) + (1 << (30 - 2 * p - par)))
    words = src.lut("grid16", idx[..., None] * 2 + p) ^ (
        sign.astype(jnp.uint32) & jnp.uint32(0x80008000))
    lo = jax.lax.bitcast_convert_type((words & 0xFFFF).astype(jnp.uint16), jnp.float16)
    hi = jax.lax.bitcast_convert_type((words >> 16).astype(jnp.uint16), jnp.float16)
    # 1024 + (1 + 2s) as float16 bits, minus 1024: exact, and no int-to-float conversion
    m = (jax.lax.bitcast_convert_type((mul | 0x6400).astype(jnp.uint16), jnp.float16)
         - 1024)[..., None]
    v = jnp.stack([lo * m, hi * m], axis=-1)
  else:
    j = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 8, 4), 3)
    mag = src.lut("grid32", idx[..., None] * 4 + j)
    bit = (sg[..., None] >> ((g[..., None] & 1) * 4 + j)) & 1
    v = jnp.where(bit == 1, -mag, mag) * mul.astype(jnp.float32)[..., None]
  return v.reshape(r, count, 32).astype(dtype)


def _kernel_terms(src, t, dtype):
  """Values of consecutive terms t (int array (n,)) -> (R, n, 256 / KERNEL_TERMS)."""
  t = np.asarray(t).reshape(-1)
  per = 8 // KERNEL_TERMS
  v = _kernel_sub_blocks(src, int(t[0]) * per, t.size * per, dtype)
  return v.reshape(v.shape[0], t.size, 32 * per)


def _kernel_scale(src):
  bits = src.load(0, 1) | (src.load(1, 1) << 8)
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def kernel_decoder(n: int):
  """The decoder above for the Pallas kernels (``core/kernel_codec.py``), n = 256."""
  block_nbytes(n)
  terms = kernel_codec.Terms(
      terms=KERNEL_TERMS, slots=QK // KERNEL_TERMS,
      columns=np.arange(QK, dtype=np.int32).reshape(KERNEL_TERMS, -1),
      coef=np.ones((KERNEL_TERMS, QK // KERNEL_TERMS), np.float32),
      luts=kernel_codec.pad_luts(_grid_luts()),
      decode=_kernel_terms, scale=_kernel_scale)

  def decode(src):  # natural order: all sub-blocks, scaled
    z = _kernel_sub_blocks(src, 0, 8, jnp.dtype(jnp.float32))
    return z.reshape(z.shape[0], QK) * _kernel_scale(src)

  return kernel_codec.Codec({}, terms.luts, decode, terms=terms)


_COMMON = dict(tail="pad256", block_nbytes=block_nbytes, encode=encode, decode=decode,
               bound=None, max_abs=MAX_ABS, levels=levels, repack=repack, group=4, snap=snap,
               kernel_codec=kernel_decoder)
IQ3_S = registry.register(registry.Format(
    name="iq3_s", transform="none", gguf_type=21,
    description="llama.cpp IQ3_S: 512-point grid of 4-groups, 3.4375 bpw (GGML type 21)",
    **_COMMON))
ITQ3_S = registry.register(registry.Format(
    name="itq3_s", transform="hadamard", gguf_type=41,
    description="published ITQ3_S: IQ3_S codes of H w / 16 per 256-block (GGML type 41)",
    **_COMMON))
