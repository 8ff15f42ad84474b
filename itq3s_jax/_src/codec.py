"""The one driver every format runs through: rows -> blocks -> transform -> codec.

Blocks run along the last axis (the contraction axis K). All arithmetic is
float32 whatever the input dtype; codecs see float32 (..., count, n) arrays.
The sign vector of a randomized format is passed to the compiled programs as
an array, so a new seed reuses the compiled code.
"""

from __future__ import annotations

import dataclasses
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
_CHUNK_WEIGHTS = 1 << 16
_DECODE_CHUNK = 1 << 30
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
              inverse: bool = False) -> jax.Array:
  """float32 (..., n): weights -> coding domain, or back when ``inverse``."""
  if fmt.transform == "none":
    return x
  s = sig[:x.shape[-1]] if fmt.transform == "rht" else None
  return (fwht_lib.ifwht if inverse else fwht_lib.fwht)(x, signs=s)


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


def _chunked(fn, *xs: jax.Array, width: int | None = None, weights: int = _CHUNK_WEIGHTS):
  """Applies a row-wise ``fn`` ((C, a), (C, b)...) -> pytree of (C, c) to (..., a) inputs.

  Chunks hold about ``weights`` weights of ``width`` per row (default: the
  first input's last axis). Rows are independent, so chunking changes no bits
  of the result.
  """
  lead = xs[0].shape[:-1]
  rows = math.prod(lead)
  flat = [x.reshape(rows, x.shape[-1]) for x in xs]
  chunk = max(1, weights // max(1, width or xs[0].shape[-1]))
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
    z = transform(v, fmt, sig)
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

  The row-major form (bounds.py reads it); dequantize and the matmul use
  :func:`decode_columns`.
  """
  fmt = registry.get_format(format)
  for seg in qtensor.segments(format, k):
    z = fmt.decode(segment_bytes(data, seg), seg.n)
    yield seg, (transform(z, fmt, sig, inverse=True) if inverse else z)


def column_bytes(data: jax.Array, seg: blocks.Segment) -> jax.Array:
  """uint8 (..., row_nbytes) -> (nbytes, count, R): a segment's blocks, byte axis first.

  R = prod(lead) rows, kept minor: the decoders vectorise across rows and
  blocks (bitpack's column-major form).
  """
  b = segment_bytes(data.reshape(-1, data.shape[-1]), seg)  # (R, count, nbytes)
  return jnp.transpose(b, (2, 1, 0))


def decode_columns(data: jax.Array, sig: jax.Array | None, format: str, k: int,
                   inverse: bool = False):
  """Yields (segment, values float32 (n, count, R)): coding domain, or weights if ``inverse``.

  Column-major: value i of block c of row r is ``values[i, c, r]`` (R =
  prod(data.shape[:-1])). The codec's row-major ``decode`` wraps a
  column-major one (bitpack), so the transposes around it cancel in XLA and
  only the (small) byte transpose remains; the inverse transform then runs
  along the leading axis, where its butterflies are contiguous slabs.
  """
  fmt = registry.get_format(format)
  for seg in qtensor.segments(format, k):
    bt = column_bytes(data, seg)
    z = bitpack.columns(fmt.decode(bitpack.rows(bt), seg.n))
    if inverse and fmt.transform != "none":
      s = sig[:seg.n] if fmt.transform == "rht" else None
      z = fwht_lib.ifwht(z, axis=0, signs=s)
    yield seg, z


def _row_major(parts, lead: tuple[int, ...], dtype) -> jax.Array:
  """Per-segment column-major (n, count, R) values [cut to ``valid`` columns] -> (*lead, K)."""
  out = []
  for seg, z in parts:
    z = jnp.transpose(z, (2, 1, 0)).reshape(-1, seg.count * seg.n)[:, :seg.valid]
    out.append(z.reshape(*lead, seg.valid))
  return concat(out, lead, dtype)


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
  def rows(d):
    return _row_major(decode_columns(d, sig, format, k, inverse=True), d.shape[:-1], jnp.float32)
  return _chunked(rows, data, width=k, weights=_DECODE_CHUNK).astype(dtype)


def decode_rotated(qt: QuantizedTensor) -> jax.Array:
  """Coding-domain values z_hat, float32 (..., Kp) (Kp = K plus any block padding).

  For every format, ``dequantize(qt) @ x == decode_rotated(qt) @ rotate_activations(x, ...)``
  in exact arithmetic, the transform being orthonormal (proofs T6).
  """
  qtensor.validate(qt)
  return _decode_rotated(qt.data, format=qt.format, k=qt.k)


@functools.partial(jax.jit, static_argnames=("format", "k"))
def _decode_rotated(data, *, format, k):
  def rows(d):
    parts = [(dataclasses.replace(seg, valid=seg.count * seg.n), z)
             for seg, z in decode_columns(d, None, format, k)]
    return _row_major(parts, d.shape[:-1], jnp.float32)
  return _chunked(rows, data, width=k, weights=_DECODE_CHUNK)


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
