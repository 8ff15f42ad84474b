"""Orthonormal fast Walsh-Hadamard transform (FWHT) and the randomized variant.

Butterfly order (bit-exact reproducibility depends on it): for an input of
length n = 2^L, stages h = 1, 2, 4, ..., n/2 each map the pair at positions
(j, j + h) of every chunk of 2h elements to (a + b, a - b), computed in the
input dtype. The result equals ``scipy.linalg.hadamard(n) @ x`` (Sylvester,
natural order, H[i, j] = (-1)^popcount(i & j)) up to rounding, and is then
multiplied by ``c = float(1/sqrt(n))`` rounded to the working dtype. For
even L (n = 256, 64, 16, ...) c is a power of two and the scaling is exact.

The randomized transform multiplies by a fixed +-1 sign vector sigma first:
``rht(x) = fwht(sigma * x)`` and its inverse ``irht(z) = sigma * fwht(z)``;
both are orthonormal and, H being symmetric with H @ H = n I, fwht is its own
inverse.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from itq3s_jax._src.core import blocks

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _check_length(n: int) -> int:
  if n < 1 or n & (n - 1):
    raise ValueError(f"FWHT length {n=} must be a power of two (1, 2, 4, ...).")
  return n.bit_length() - 1


FUSE_MIN_SIZE = 1 << 17  # arrays this large (a full decode tile: 2^17-2^18) get four stages a pass


def hadamard_unnormalized(x: jax.Array, axis: int = -1,
                          stages_per_pass: int | None = None) -> jax.Array:
  """Applies the Sylvester Hadamard matrix H (entries +-1) along ``axis``.

  Args:
    x: float array with x.shape[axis] = n a power of two.
    axis: the transformed axis.
    stages_per_pass: butterfly stages written as one expression (1 to 4);
      a speed knob only, every value gives the same bits. None: 4 for
      arrays of at least FUSE_MIN_SIZE elements, else 2.

  Returns:
    H @ x along ``axis``, same shape and dtype, by the butterfly order
    documented in the module docstring, bit for bit: each element sees the
    same additions in the same order whichever axis is transformed (a leading
    axis keeps every stage's operands contiguous: column-major decode tiles).

  XLA fuses each group of stages into one pass over the data where it would
  write every single stage out. Measured on the 2-core CPU (4096 x 4096
  itq3_t): four stages a pass (two passes for n = 256) decode column-major
  tiles 2.3x faster than two a pass and rotate activations 1.7x faster; the
  row-major encoder is 8 % faster at two (its transform fuses with the code
  search); eight a pass (256 slices in one expression) is 10-30x slower.
  Four a pass also doubles XLA's compile time of every program holding the
  transform (0.6 -> 1.2 s for a small dequantize), which small arrays never
  win back: hence the size rule (it kept the test suite at its old length).
  """
  if stages_per_pass is None:
    stages_per_pass = 4 if x.size >= FUSE_MIN_SIZE else 2
  if not 1 <= stages_per_pass <= 4:
    raise ValueError(f"{stages_per_pass=} must be 1, 2, 3 or 4.")
  axis = axis % x.ndim
  stages = _check_length(x.shape[axis])
  s = 0
  while s < stages:
    width = min(stages_per_pass, stages - s)
    x = _radix(x, axis, 1 << s, width)
    s += width
  return x


def _radix(x: jax.Array, axis: int, h: int, width: int) -> jax.Array:
  """Butterfly stages h, 2h, ..., 2^(width-1) h along ``axis`` as one expression.

  Element j of each chunk of 2^width h: the stage-h pairs (a, b) -> (a + b,
  a - b), then the stage-2h pairs of those results, and so on, in the
  documented order.
  """
  n = x.shape[axis]
  lead, rest = x.shape[:axis], x.shape[axis + 1:]
  r = 1 << width
  y = x.reshape(*lead, n // (r * h), r, h, *rest)
  v = [jax.lax.index_in_dim(y, j, axis + 1, keepdims=False) for j in range(r)]
  step = 1
  while step < r:
    v = [v[j] + v[j + step] if not j & step else v[j - step] - v[j] for j in range(r)]
    step *= 2
  return jnp.stack(v, axis=axis + 1).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("axis", "stages_per_pass"))
def fwht(x: ArrayLike, axis: int = -1, signs: ArrayLike | None = None, *,
         stages_per_pass: int | None = None) -> jax.Array:
  """Orthonormal (randomized) Walsh-Hadamard transform along ``axis``.

  Args:
    x: float array (..., n, ...) with n = x.shape[axis] a power of two;
      float16 / bfloat16 / float32 / float64 (arithmetic in that dtype).
    axis: the transformed axis.
    signs: optional +-1 vector (n,); when given the result is
      ``fwht(signs * x)`` (the randomized Hadamard transform).
    stages_per_pass: see :func:`hadamard_unnormalized` (speed only, same bits).

  Returns:
    Array of the same shape and dtype: H (signs * x) / sqrt(n).

  Raises:
    TypeError: for a non-float dtype.
    ValueError: for a length that is not a power of two, or a sign vector of
      the wrong length.

  >>> import jax.numpy as jnp
  >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0]))
  Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  x = jnp.asarray(x)
  if x.dtype not in _FLOAT_DTYPES:
    raise TypeError(f"fwht needs a float array, got dtype {x.dtype}; cast it first.")
  n = x.shape[axis]
  _check_length(n)
  if signs is not None:
    x = x * _along(_check_signs(signs, n, x.dtype), axis, x.ndim)
  return (hadamard_unnormalized(x, axis, stages_per_pass)
          * jnp.asarray(1.0 / math.sqrt(n), x.dtype))


@functools.partial(jax.jit, static_argnames=("axis", "stages_per_pass"))
def ifwht(z: ArrayLike, axis: int = -1, signs: ArrayLike | None = None, *,
          stages_per_pass: int | None = None) -> jax.Array:
  """Inverse of :func:`fwht` with the same ``signs``: signs * (H z / sqrt(n)).

  Args:
    z: float array (..., n, ...), n = z.shape[axis] a power of two.
    axis: the transformed axis.
    signs: the +-1 vector (n,) that was passed to :func:`fwht`, or None.
    stages_per_pass: see :func:`hadamard_unnormalized` (speed only, same bits).

  Returns:
    Array of the same shape and dtype.
  """
  y = fwht(z, axis=axis, stages_per_pass=stages_per_pass)
  if signs is None:
    return y
  return y * _along(_check_signs(signs, y.shape[axis], y.dtype), axis, y.ndim)


def _check_signs(signs: ArrayLike, n: int, dtype) -> jax.Array:
  signs = jnp.asarray(signs, dtype)
  if signs.shape != (n,):
    raise ValueError(f"signs has shape {signs.shape}, expected ({n},).")
  return signs


def _along(v: jax.Array, axis: int, ndim: int) -> jax.Array:
  """A vector (n,) shaped to broadcast along ``axis`` of an ndim-array."""
  return v.reshape((-1,) + (1,) * (ndim - 1 - axis % ndim))


def sign_vector(seed: int, n: int = 256) -> np.ndarray:
  """The format sign vector: float32 (n,) of +-1 drawn from ``seed``.

  Generator (part of the format spec, docs/FORMAT.md): take
  ``b = numpy.random.default_rng(seed).integers(0, 2, 256)`` and set
  sigma = -1 where b == 1, else +1. A block of n <= 256 weights uses the first
  n entries. numpy's PCG64 stream is stable across numpy versions.
  """
  seed, n = check_seed(seed), blocks.as_index(n, "n")
  if not 1 <= n <= 256:
    raise ValueError(f"sign vectors are defined for 1 <= n <= 256, got {n=}.")
  return _signs256(seed)[:n].copy()


def check_seed(seed) -> int:
  """The sign-vector seed as an int; TypeError/ValueError unless a non-negative int."""
  seed = blocks.as_index(seed, "seed")
  if seed < 0:
    raise ValueError(f"{seed=} must be a non-negative integer.")
  return seed


@functools.lru_cache(maxsize=64)
def _signs256(seed: int) -> np.ndarray:
  bits = np.random.default_rng(seed).integers(0, 2, 256)
  out = np.where(bits == 1, -1.0, 1.0).astype(np.float32)
  out.setflags(write=False)
  return out
