"""The one driver every format runs through: rows -> blocks -> transform -> codec.

Blocks run along the last axis (the contraction axis K). All arithmetic is
float32 whatever the input dtype; codecs see float32 (..., count, n) arrays.
The sign vector of a randomized format is passed to the compiled programs as
an array, so a new seed reuses the compiled code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import fwht as fwht_lib
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry

QuantizedTensor = qtensor.QuantizedTensor
FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
# Blocks are coded in chunks of about this many weights (lax.map over chunks): each
# chunk's transform stages, search and packing then stay in cache, where one pass per
# butterfly stage over the whole tensor is memory-bound (measured ~2.5x faster on CPU).
# 2^17 against 2^16 on the 2-core CPU, 4096 x 4096, fastest of 4, two alternated runs:
# iq3_s / itq3_s encode 2.85e7 -> 3.4e7 w/s, itq3_t 7.6e7 -> 8.3e7 (2^18: itq3_t 8.9e7,
# iq3_s 3.1-3.3e7; 2^15: iq3_s 3.3e7, itq3_t 6.3e7). Chunks change no bits.
_CHUNK_WEIGHTS = 1 << 17
# Decoding runs on tiles of about this many values (2^18 float32 = 1 MiB, in a
# core's L2): each tile's decode, inverse transform and dot stay in cache, where
# one pass per step over a tensor-sized buffer is memory-bound and pages in a
# fresh allocation on every call.
DECODE_TILE = 1 << 18
# Off CPU the tiles' lax.map runs them one after another, each with its own kernel
# launches, and no cache needs them small. On an H200 (jax 0.11.2,
# benchmarks/results/gpu_check_h200.log) a 2^18 tile cost 9-20 us in xla_act_rotate and
# ~66 us in dequantize whatever it held: a 4096^2 dequantize took 4.2 ms, 64 tiles. There
# a tile holds up to 2^26 values (256 MiB of float32): most weights decode in one.
ACCEL_DECODE_TILE = 1 << 26
_ONES = np.ones(blocks.QK, np.float32)


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def signs(format: str, seed: int) -> np.ndarray:
  """float32 (256,): the sign vector a format's transform uses (all ones if unrandomized)."""
  seed = fwht_lib.check_seed(seed)
  if registry.get_format(format).transform != "rht":
    return _ONES
  return fwht_lib.sign_vector(seed, blocks.QK)


def transform(x: jax.Array, fmt: registry.Format, sig: jax.Array,
              inverse: bool = False, stages_per_pass: int | None = None) -> jax.Array:
  """float32 (..., n): weights -> coding domain, or back when ``inverse``."""
  if fmt.transform == "none":
    return x
  s = sig[:x.shape[-1]] if fmt.transform == "rht" else None
  return (fwht_lib.ifwht if inverse else fwht_lib.fwht)(x, signs=s,
                                                         stages_per_pass=stages_per_pass)


def blocks_of(x: jax.Array, seg: blocks.Segment) -> jax.Array:
  """(..., K) -> (..., count, n): the segment's columns, zero-padded to whole blocks."""
  part = x[..., seg.start:seg.start + seg.valid]
  pad = seg.count * seg.n - seg.valid
  if pad:
    part = jnp.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, pad)])
  return part.reshape(*x.shape[:-1], seg.count, seg.n)


def segment_bytes(data: jax.Array, seg: blocks.Segment) -> jax.Array:
  """uint8 (..., row_nbytes) -> (..., count, nbytes): the coded blocks of one segment."""
  b = data[..., seg.byte_start:seg.byte_stop]
  return b.reshape(*data.shape[:-1], seg.count, seg.nbytes)


def _chunked(fn, *xs: jax.Array):
  """Applies a row-wise ``fn`` ((C, a), (C, b)...) -> pytree of (C, c) to (..., a) inputs.

  Rows are independent, so chunking changes no bits of the result.
  """
  lead = xs[0].shape[:-1]
  rows = math.prod(lead)
  flat = [x.reshape(rows, x.shape[-1]) for x in xs]
  chunk = max(1, _CHUNK_WEIGHTS // xs[0].shape[-1])
  if rows <= chunk:
    out = fn(*flat)
  else:
    pad = -rows % chunk
    flat = [jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1]) for x in flat]
    out = jax.lax.map(lambda args: fn(*args), tuple(flat))
    out = jax.tree.map(lambda o: o.reshape(-1, o.shape[-1])[:rows], out)
  return jax.tree.map(lambda o: o.reshape(*lead, o.shape[-1]), out)


def concat(parts: list[jax.Array], lead: tuple[int, ...], dtype) -> jax.Array:
  """Concatenates per-segment parts along the last axis; (*lead, 0) for K = 0."""
  return jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((*lead, 0), dtype)


def check_input(w: jax.Array) -> None:
  """Static checks of a weight to quantize (dtype, rank, K); raises TypeError/ValueError."""
  if w.dtype not in FLOATS:
    raise TypeError(f"quantize needs a float array (float16/bfloat16/float32/float64), "
                    f"got dtype {w.dtype}.")
  if w.ndim < 1:
    raise ValueError("quantize needs at least one axis; blocks run along the last one.")
  blocks.check_k(w.shape[-1])


@functools.partial(jax.jit, static_argnames="format")
def encode(w: jax.Array, importance: jax.Array | None, sig: jax.Array, *, format: str):
  """The checked encoder: (uint8 (..., row_nbytes), peak, all finite).

  Args:
    w: float (..., K).
    importance: optional float32 per-column weights, broadcastable to w.
    sig: float32 (256,) sign vector (:func:`signs`).
    format: registered format name.

  Returns:
    ``data``; ``peak`` = the largest |coding-domain value| over all blocks,
    +inf where a transformed block is not finite (float32 overflow of the
    rotation, or a NaN/Inf weight); ``finite`` = every weight is finite.
    The forward transform is computed once per block and serves the codes and
    both checks.
  """
  fmt = registry.get_format(format)
  x = w.astype(jnp.float32)
  imp = None if importance is None else jnp.broadcast_to(importance, x.shape)
  out, peak = [], jnp.zeros((), jnp.float32)

  def code(v, a=None):
    z = transform(v, fmt, sig, stages_per_pass=2)  # fastest here (fwht.hadamard_unnormalized)
    top = jnp.max(jnp.where(jnp.isfinite(z), jnp.abs(z), jnp.inf), axis=-1, keepdims=True)
    return fmt.encode(z, a), top

  for seg in qtensor.segments(fmt.name, x.shape[-1]):
    xb = blocks_of(x, seg)
    if imp is None:
      c, top = _chunked(code, xb)
    else:
      a = blocks_of(imp, seg)
      if fmt.transform != "none":  # diag(R diag(a) R^T) = mean(a) for a Hadamard R
        a = jnp.broadcast_to(jnp.mean(a, axis=-1, keepdims=True), a.shape)
      c, top = _chunked(code, xb, a)
    if top.size:
      peak = jnp.maximum(peak, jnp.max(top))
    out.append(c.reshape(*x.shape[:-1], seg.count * seg.nbytes))
  return concat(out, x.shape[:-1], jnp.uint8), peak, jnp.all(jnp.isfinite(x))


def raise_if_unrepresentable(format: str, peak, finite, w=None, what: str = "weight") -> None:
  """Raises the eager value errors of the encoder's checks (no-op for traced values).

  Args:
    format: the format coded to.
    peak, finite: from :func:`encode` (or the GPTQ encoder).
    w: the weight, to locate NaN/Inf values in the message (optional).
    what: the noun used in the message ("weight", "tensor 'x'").

  Raises:
    ValueError: NaN/Inf weights, or a coding-domain value beyond the format's
      range (including a rotation that overflows float32).
  """
  if not (is_concrete(peak) and is_concrete(finite)):
    return
  fmt = registry.get_format(format)
  if not bool(finite):
    where = ""
    if w is not None and is_concrete(w):
      bad = ~np.isfinite(np.asarray(w, np.float32))
      where = f" ({int(bad.sum())} NaN/Inf values, first at indices {np.argwhere(bad)[:5].tolist()})"
    raise ValueError(f"{what} has NaN/Inf values{where}; fix or mask them before quantizing.")
  peak = float(peak)
  if not math.isfinite(peak):
    raise ValueError(f"{what} is too large for {fmt.name}: its rotated blocks overflow "
                     "float32; rescale it first or keep it in float.")
  if peak > fmt.max_abs:
    raise ValueError(f"{what} is too large for {fmt.name}: a coefficient of magnitude "
                     f"{peak:.4g} exceeds {fmt.max_abs:.4g}; rescale it first or keep it "
                     "in float.")


def decoded_segments(data: jax.Array, sig: jax.Array | None, format: str, k: int,
                     inverse: bool = False):
  """Yields (segment, values (..., count, n)): coding-domain, or weights if ``inverse``.

  The row-major form (bounds.py reads it); dequantize, decode_rotated and the
  matmul decode column-major tiles (:func:`decode_tile`).
  """
  fmt = registry.get_format(format)
  for seg in qtensor.segments(format, k):
    z = fmt.decode(segment_bytes(data, seg), seg.n)
    yield seg, (transform(z, fmt, sig, inverse=True) if inverse else z)


def tile_values(backend: str | None = None) -> int:
  """Values per decode tile on ``backend`` (default: jax's): DECODE_TILE on CPU, else
  ACCEL_DECODE_TILE."""
  return DECODE_TILE if (backend or jax.default_backend()) == "cpu" else ACCEL_DECODE_TILE


def tile_rows(n_rows: int, width: int, weights: int | None = None) -> int:
  """Rows per decode tile: at most about ``weights`` (:func:`tile_values`) values, a
  multiple of 8, or all rows.

  The rows are split evenly over the fewest tiles that fit, so the zero rows
  padding the last tile are fewer than 8 per tile (a fixed tile height padded
  SmolLM2's 1536-row MLP weights to 1792 rows: 17 % of the decode wasted).
  """
  most = max(8, (weights or tile_values()) // max(width, 1) // 8 * 8)
  if most * 2 > n_rows:
    return n_rows
  per_tile = -(-n_rows // -(-n_rows // most))
  return -(-per_tile // 8) * 8


def column_tiles(data: jax.Array, format: str, k: int, rows: int) -> list[jax.Array]:
  """uint8 (R, row_nbytes) -> per segment uint8 (tiles, nbytes, count, rows).

  The coded rows cut into tiles of ``rows`` rows (zero rows pad the last
  tile; they decode to finite values and are cut off by the caller), each
  segment's blocks byte axis first and rows minor: bitpack's column-major form,
  which the decoders vectorise across rows. Transposed here, once, outside the
  per-tile loop, so XLA writes these small arrays rather than fusing a strided
  transpose into every decoder read.
  """
  r = data.shape[0]
  tiles = -(-r // rows)
  if tiles * rows != r:
    data = jnp.pad(data, ((0, tiles * rows - r), (0, 0)))
  data = data.reshape(tiles, rows, data.shape[-1])
  out = []
  for seg in qtensor.segments(format, k):
    b = data[..., seg.byte_start:seg.byte_stop].reshape(tiles, rows, seg.count, seg.nbytes)
    out.append(jnp.transpose(b, (0, 3, 2, 1)))
  return out


def decode_tile(bt: jax.Array, seg: blocks.Segment, format: str, sig: jax.Array | None = None,
                inverse: bool = False) -> jax.Array:
  """uint8 (nbytes, count, rows) -> float32 (n, count, rows): coding domain, or weights if ``inverse``.

  Column-major: value i of block c of row r is ``[i, c, r]``. The codec's
  row-major ``decode`` wraps a column-major one (bitpack), so the transposes
  around it cancel in XLA; the inverse transform runs along the leading axis,
  where its butterflies are contiguous slabs (the same butterfly, bit for bit).
  """
  fmt = registry.get_format(format)
  z = bitpack.columns(fmt.decode(bitpack.rows(bt), seg.n))
  if inverse and fmt.transform != "none":
    z = fwht_lib.ifwht(z, axis=0, signs=sig[:seg.n] if fmt.transform == "rht" else None)
  return z


def map_tiles(fn, tiles: list[jax.Array]) -> jax.Array:
  """Stacks ``fn(per-segment tile bytes)`` over the tiles (lax.map when there are several)."""
  if tiles and tiles[0].shape[0] > 1:
    return jax.lax.map(lambda bts: fn(list(bts)), tuple(tiles))
  return fn([t[0] for t in tiles])[None]


def _decode_rows(data, sig, format, k, inverse, valid_only):
  """(..., row_nbytes) -> float32 (..., K or Kp) row-major, decoded in column-major tiles."""
  lead = data.shape[:-1]
  r = math.prod(lead)
  segs = qtensor.segments(format, k)
  width = blocks.coded_length(segs)
  if r == 0 or not segs:
    return jnp.zeros((*lead, k if valid_only else width), jnp.float32)
  rows = tile_rows(r, width)

  def tile(bts):  # -> (rows, K)
    parts = []
    for seg, bt in zip(segs, bts):
      z = decode_tile(bt, seg, format, sig, inverse)
      z = jnp.transpose(z, (2, 1, 0)).reshape(rows, seg.count * seg.n)
      parts.append(z[:, :seg.valid] if valid_only else z)
    return concat(parts, (rows,), jnp.float32)

  out = map_tiles(tile, column_tiles(data.reshape(r, data.shape[-1]), format, k, rows))
  out = out.reshape(-1, out.shape[-1])[:r]
  return out.reshape(*lead, out.shape[-1])


def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """Decodes ``qt`` to a dense array of shape ``qt.shape`` (computed in float32).

  Args:
    qt: a :class:`QuantizedTensor` (..., K).
    dtype: output dtype.

  Returns:
    Array ``qt.shape`` of ``dtype``.

  >>> import jax.numpy as jnp, itq3s_jax
  >>> itq3s_jax.dequantize(itq3s_jax.quantize(jnp.ones((2, 256)))).shape
  (2, 256)
  """
  qtensor.validate(qt)
  return _dequantize(qt.data, signs(qt.format, qt.seed), format=qt.format, k=qt.k,
                     dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("format", "k", "dtype"))
def _dequantize(data, sig, *, format, k, dtype):
  return _decode_rows(data, sig, format, k, inverse=True, valid_only=True).astype(dtype)


def decode_rotated(qt: QuantizedTensor) -> jax.Array:
  """Coding-domain values z_hat, float32 (..., Kp) (Kp = K plus any block padding).

  For every format, ``dequantize(qt) @ x == decode_rotated(qt) @ rotate_activations(x, ...)``
  in exact arithmetic, the transform being orthonormal (proofs T6).
  """
  qtensor.validate(qt)
  return _decode_rotated(qt.data, format=qt.format, k=qt.k)


@functools.partial(jax.jit, static_argnames=("format", "k"))
def _decode_rotated(data, *, format, k):
  return _decode_rows(data, None, format, k, inverse=False, valid_only=False)


def rotate_activations(x: ArrayLike, format: str, seed: int = 0) -> jax.Array:
  """Applies a format's block transform to activations: (..., K) -> float32 (..., Kp).

  Blocks are cut as the format cuts a weight row of length K (pad256 blocks
  zero-padded), so ``rotate_activations(x) @ decode_rotated(qt).T`` equals
  ``x @ dequantize(qt).T`` up to rounding.
  """
  x = jnp.asarray(x)
  blocks.check_k(x.shape[-1])
  return _rotate(x, signs(format, seed), format=registry.get_format(format).name)


def rotate(x: jax.Array, sig: jax.Array, format: str) -> jax.Array:
  """:func:`rotate_activations` with the sign vector given: float32 (..., Kp), traceable."""
  fmt = registry.get_format(format)
  x = x.astype(jnp.float32)
  parts = []
  for seg in qtensor.segments(format, x.shape[-1]):
    z = transform(blocks_of(x, seg), fmt, sig)
    parts.append(z.reshape(*x.shape[:-1], seg.count * seg.n))
  return concat(parts, x.shape[:-1], jnp.float32)


_rotate = jax.jit(rotate, static_argnames="format")


def block_columns(format: str, k: int) -> list[tuple[int, int]]:
  """(start, stop) columns of each block of a row of k weights, in bound order."""
  return blocks.columns(qtensor.segments(format, k))
