"""The one driver every format runs through: rows -> blocks -> transform -> codec.

Blocks run along the last axis (the contraction axis K). All arithmetic is
float32 whatever the input dtype; codecs see float32 (..., count, n) arrays.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from itq3s_jax._src import blocks
from itq3s_jax._src import fwht as fwht_lib
from itq3s_jax._src import qtensor
from itq3s_jax._src import registry

QuantizedTensor = qtensor.QuantizedTensor
_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_U = 2.0**-24  # float32 unit roundoff
# Blocks are coded in chunks of about this many weights (lax.map over chunks): each
# chunk's transform stages, search and packing then stay in cache, where one pass per
# butterfly stage over the whole tensor is memory-bound (measured ~2.5x faster on CPU).
_CHUNK_WEIGHTS = 1 << 16


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _transform(x: jax.Array, fmt: registry.Format, seed: int, inverse: bool = False) -> jax.Array:
  """float32 (..., n): weights -> coding domain, or back when ``inverse``."""
  if fmt.transform == "none":
    return x
  signs = fwht_lib.sign_vector(seed, x.shape[-1]) if fmt.transform == "rht" else None
  return (fwht_lib.ifwht if inverse else fwht_lib.fwht)(x, signs=signs)


def _segments(fmt: registry.Format, k: int):
  return blocks.plan(k, fmt.tail, fmt.block_nbytes)


def _blocks_of(x: jax.Array, seg: blocks.Segment) -> jax.Array:
  """(..., K) -> (..., count, n): the segment's columns, zero-padded to whole blocks."""
  part = x[..., seg.start:seg.start + seg.valid]
  pad = seg.count * seg.n - seg.valid
  if pad:
    part = jnp.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, pad)])
  return part.reshape(*x.shape[:-1], seg.count, seg.n)


def _chunked(fn, *xs: jax.Array) -> jax.Array:
  """Applies a row-wise ``fn`` ((C, a), (C, b)...) -> (C, c) to (..., count, a) inputs.

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
    out = out.reshape(-1, out.shape[-1])[:rows]
  return out.reshape(*lead, out.shape[-1])


def _check_input(w: jax.Array, fmt: registry.Format, seed: int) -> None:
  if w.dtype not in _FLOATS:
    raise TypeError(f"quantize needs a float array (float16/bfloat16/float32/float64), "
                    f"got dtype {w.dtype}.")
  if w.ndim < 1:
    raise ValueError("quantize needs at least one axis; blocks run along the last one.")
  blocks.check_k(w.shape[-1])
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"{seed=} must be a non-negative int.")
  if not _is_concrete(w) or w.size == 0:
    return
  bad = ~np.isfinite(np.asarray(w, np.float32))
  if bad.any():
    where = np.argwhere(bad)[:5].tolist()
    raise ValueError(f"weight has {int(bad.sum())} NaN/Inf values (first at indices "
                     f"{where}); fix or mask them before quantizing.")


def quantize(w: ArrayLike, format: str = "itq3_t", *, seed: int = 0,
             importance: ArrayLike | None = None,
             hessian: ArrayLike | None = None, **gptq_options) -> QuantizedTensor:
  """Quantizes ``w`` along its last axis.

  Args:
    w: float array (..., K), K a multiple of 32 (float16/bfloat16/float32/
      float64; coded from its float32 value).
    format: a registered format name (``itq3s_jax.formats()``).
    seed: sign-vector seed of randomized formats.
    importance: optional non-negative per-column weights (K,) or (..., K)
      (an "imatrix"): the encoder minimises sum_i a_i (w_i - w_hat_i)^2 where
      the format can. Rotated formats see a_i through their rotation, whose
      diagonal is the block mean of a.
    hessian: optional (K, K) input second moment Sigma = E[x x^T] of the layer
      (``itq3s_jax.calibrate``): rounds with GPTQ in the coding domain to
      minimise tr(dW Sigma dW^T), each coefficient to one of its two neighbouring
      levels (bound: ``itq3s_jax.two_neighbour_bound``; options: ``gptq.quantize``).
    **gptq_options: with ``hessian`` only: ``rounding``, ``scales``, ``damp``,
      ``act_order`` of ``itq3s_jax.calibration.gptq_quantize``.

  Returns:
    A :class:`QuantizedTensor` with ``data`` uint8 (..., row_nbytes).

  Raises:
    TypeError: non-float ``w``.
    ValueError: unknown format, K not a multiple of 32, NaN/Inf (eager mode),
      or values beyond the format's range (eager mode). Under ``jax.jit`` the
      value checks cannot run: NaN/Inf give undefined codes and out-of-range
      values are clipped (the certified bound then does not hold).

  >>> import jax.numpy as jnp, itq3s_jax
  >>> qt = itq3s_jax.quantize(jnp.ones((4, 256)))
  >>> qt.data.shape, qt.bits_per_weight
  ((4, 110), 3.4375)
  """
  if hessian is not None:
    if importance is not None:
      raise ValueError("give importance or hessian, not both (the hessian's diagonal is "
                       "the importance GPTQ uses).")
    from itq3s_jax._src import gptq  # pylint: disable=g-import-not-at-top  (gptq builds on this module)
    return gptq.quantize(w, format, hessian, seed=seed, **gptq_options)
  if gptq_options:
    raise TypeError(f"options {sorted(gptq_options)} apply to Hessian-aware rounding only; "
                    "pass hessian=Sigma as well.")
  fmt = registry.get_format(format)
  w = jnp.asarray(w)
  _check_input(w, fmt, seed)
  imp = None if importance is None else jnp.asarray(importance, jnp.float32)
  data, top = _encode(w, imp, fmt.name, int(seed))
  if _is_concrete(top) and float(top) > fmt.max_abs:
    raise ValueError(f"values too large for {fmt.name}: a coefficient of magnitude "
                     f"{float(top):.4g} exceeds {fmt.max_abs:.4g}; rescale the tensor first.")
  return QuantizedTensor(data, tuple(w.shape), fmt.name, int(seed))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _encode(w: jax.Array, imp: jax.Array | None, format: str, seed: int):
  """Jitted body of :func:`quantize`: (uint8 (..., row_nbytes), max |coding-domain value|).

  One compiled program per shape: eagerly, each of the many small ops would be
  dispatched (and compiled) on its own.
  """
  fmt = registry.get_format(format)
  x = w.astype(jnp.float32)
  if imp is not None:
    imp = jnp.broadcast_to(imp, x.shape)
  out, top = [], jnp.zeros((), jnp.float32)
  for seg in _segments(fmt, x.shape[-1]):
    xb = _blocks_of(x, seg)
    if xb.size:
      top = jnp.maximum(top, jnp.max(jnp.abs(_chunked(
          lambda v: jnp.max(jnp.abs(_transform(v, fmt, seed)), -1, keepdims=True), xb))))
    if imp is None:
      code = _chunked(lambda v: fmt.encode(_transform(v, fmt, seed), None), xb)
    else:
      a = _blocks_of(imp, seg)
      if fmt.transform != "none":  # diag(R diag(a) R^T) = mean(a) for a Hadamard R
        a = jnp.broadcast_to(jnp.mean(a, axis=-1, keepdims=True), a.shape)
      code = _chunked(lambda v, a: fmt.encode(_transform(v, fmt, seed), a), xb, a)
    out.append(code.reshape(*x.shape[:-1], seg.count * seg.nbytes))
  data = jnp.concatenate(out, axis=-1) if out else jnp.zeros((*x.shape[:-1], 0), jnp.uint8)
  return data, top


def _segment_bytes(qt: QuantizedTensor, seg: blocks.Segment) -> jax.Array:
  """uint8 (..., count, nbytes): the coded blocks of one segment."""
  b = qt.data[..., seg.byte_start:seg.byte_start + seg.count * seg.nbytes]
  return b.reshape(*qt.data.shape[:-1], seg.count, seg.nbytes)


def _decoded_segments(qt: QuantizedTensor, inverse: bool = False):
  """Yields (segment, format, values (..., count, n)): coding-domain, or weights if ``inverse``.

  Unlike encoding, decoding is not chunked: its few fused passes stream well, and
  lax.map over chunks measured up to 10x slower (IQ3_S grid lookups).
  """
  qtensor.validate(qt)
  fmt = registry.get_format(qt.format)
  for seg in _segments(fmt, qt.shape[-1]):
    z = fmt.decode(_segment_bytes(qt, seg), seg.n)
    yield seg, fmt, (_transform(z, fmt, qt.seed, inverse=True) if inverse else z)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """Decodes ``qt`` to a dense array of shape ``qt.shape`` (computed in float32).

  Args:
    qt: a :class:`QuantizedTensor`.
    dtype: output dtype.

  Returns:
    Array ``qt.shape`` of ``dtype``.
  """
  parts = []
  for seg, _, x in _decoded_segments(qt, inverse=True):
    x = x.reshape(*x.shape[:-2], seg.count * seg.n)
    parts.append(x[..., :seg.valid])
  lead = qt.shape[:-1]
  if not parts:
    return jnp.zeros(qt.shape, dtype)
  return jnp.concatenate(parts, axis=-1).reshape(*lead, qt.shape[-1]).astype(dtype)


@jax.jit
def decode_rotated(qt: QuantizedTensor) -> jax.Array:
  """Coding-domain values z_hat, float32 (..., Kp) (Kp = K plus any block padding).

  For every format, ``dequantize(qt) @ x == decode_rotated(qt) @ rotate_activations(x, ...)``
  in exact arithmetic, the transform being orthonormal (proofs T6).
  """
  parts = [z.reshape(*z.shape[:-2], seg.count * seg.n) for seg, _, z in _decoded_segments(qt)]
  return jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((*qt.shape[:-1], 0))


def rotate_activations(x: ArrayLike, format: str, seed: int = 0) -> jax.Array:
  """Applies a format's block transform to activations: (..., K) -> float32 (..., Kp)."""
  fmt = registry.get_format(format)
  x = jnp.asarray(x, jnp.float32)
  parts = []
  for seg in _segments(fmt, x.shape[-1]):
    z = _transform(_blocks_of(x, seg), fmt, seed)
    parts.append(z.reshape(*x.shape[:-1], seg.count * seg.n))
  return jnp.concatenate(parts, axis=-1)


def rounding_slack(n: int) -> float:
  """Relative float32 slack of the certified bound for a block of n weights.

  ||w - w_hat_fp32|| <= eps_q + rounding_slack(n) * (||z_hat|| + eps_q) with
  rounding_slack(n) = (2 L' + n/32 + 13) u (1 + 2^-10), u = 2^-24: the encoder's
  forward and the decoder's inverse transform each err by at most L' u ||.||
  (L' = log2 n, plus 2 when log2 n is odd and 1/sqrt(n) is inexact), the float32
  evaluation of eps_q itself by (n/32 + 3) u eps_q, the encoder's quotient
  rounding by 9 u eps_q, and the step products and input cast by a few u; the
  last factor covers second-order terms (derivation: proofs/README.md, T3).
  It is used for every format, rotated or not (an upper bound for unrotated ones).
  """
  levels = int(math.log2(n))
  rot = levels if levels % 2 == 0 else levels + 2
  return (2 * rot + n / 32 + 13) * _U * (1 + 2.0**-10)


def underflow_slack(n: int) -> float:
  """Absolute float32 slack of the bound for a block of n weights.

  XLA on CPU flushes float32 subnormals to zero, so each of the at most
  2 log2(n) + 8 roundings a value goes through may also lose up to 2^-126
  absolutely; over n values that is (2 log2(n) + 8) sqrt(n) 2^-126 in L2 norm
  (about 4.5e-36 for n = 256: invisible unless the block itself is subnormal).
  """
  return (2 * math.log2(n) + 8) * math.sqrt(n) * float(np.finfo(np.float32).tiny)


def error_bound(qt: QuantizedTensor, *, include_rounding: bool = True) -> jax.Array:
  """Certified per-block L2 error bound, computed from the stored bytes alone.

  Which bound depends on ``qt.rounding``: ``"nearest"`` (every ``quantize``
  without ``hessian``) certifies the format's eps_q; ``"two_neighbour"``
  (``quantize(..., hessian=...)``) certifies sqrt(sum_i step_i^2), 2 eps_q for
  itq3_t (``two_neighbour_bound``, proofs T10); ``"unrestricted"`` certifies
  nothing.

  Args:
    qt: a :class:`QuantizedTensor` of a format with a bound (``has_bound``).
    include_rounding: add the float32 rounding slack of :func:`rounding_slack` and
      the subnormal flush slack of :func:`underflow_slack` (True: a bound on the
      float32 computation; False: the bound in exact arithmetic).

  Returns:
    float32 (..., nblocks): for each block b of each row,
    ||w_b - dequantize(qt)_b||_2 <= bound[..., b].

  Raises:
    ValueError: the format has no worst-case bound (``iq3_s``, ``itq3_s``), or
      ``qt.rounding == "unrestricted"``.
  """
  fmt = registry.get_format(qt.format)
  if fmt.bound is None:
    raise ValueError(f"format {fmt.name!r} has no certified error bound; use itq3_t, "
                     "uniform3 or uniform3_rot.")
  if qt.rounding != "nearest":
    from itq3s_jax._src import gptq  # pylint: disable=g-import-not-at-top (gptq imports us)
    return gptq.error_bound(qt, include_rounding=include_rounding)
  return _error_bound(qt, include_rounding)


@functools.partial(jax.jit, static_argnums=1)
def _error_bound(qt: QuantizedTensor, include_rounding: bool) -> jax.Array:
  fmt = registry.get_format(qt.format)
  lead = qt.data.shape[:-1]
  out = []
  for seg, _, z in _decoded_segments(qt):
    eps = fmt.bound(_segment_bytes(qt, seg), seg.n)
    if include_rounding:
      eps = (eps + rounding_slack(seg.n) * (jnp.linalg.norm(z, axis=-1) + eps)
             + underflow_slack(seg.n))
    out.append(eps)
  return jnp.concatenate(out, axis=-1) if out else jnp.zeros((*lead, 0))


def has_bound(format: str) -> bool:
  """Whether ``format`` certifies a worst-case error bound."""
  return registry.get_format(format).bound is not None


def block_columns(format: str, k: int) -> list[tuple[int, int]]:
  """(start, stop) columns of each block of a row of k weights, in bound order."""
  fmt = registry.get_format(format)
  cols = []
  for seg in _segments(fmt, k):
    for i in range(seg.count):
      lo = seg.start + i * seg.n
      cols.append((lo, min(lo + seg.n, seg.start + seg.valid)))
  return cols
