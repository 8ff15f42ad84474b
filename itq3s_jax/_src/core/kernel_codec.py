"""Block decoders in a kernel-friendly form, shared by XLA and the Pallas kernels.

A Triton Pallas kernel cannot slice or gather an in-register array, and every
array it loads must have a power-of-two size. It *can*
load bytes from a ref at computed column offsets. So a block's decoder is
written here as elementwise integer arithmetic on bytes fetched through a
:class:`Source`, with all per-column constants (which byte holds coefficient
i, which trit digit, which bit shift) precomputed in numpy as ``tables``
and all value tables (``SUPER``, ``MULT``) passed as ``luts``. The same
decoder runs

  * in XLA on a (..., nbytes) byte array (:func:`decode_blocks`), where a test
    checks it equals the codec's own ``Format.decode`` bit for bit, and
  * inside a kernel on a ref of coded rows (``pallas_kernels/driver.py``).

Each format declares its decoder (``Format.kernel_codec``, written beside its
codec); a format without one makes :func:`get` raise NotImplementedError so
the matmul dispatcher falls back to XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import registry


class Source(Protocol):
  """Where a decoder reads one tile of R coded blocks (R rows, one block each)."""

  def byte(self, cols: jax.Array) -> jax.Array:
    """int32 (1, c) byte offsets within the block -> int32 (R, c) byte values."""

  def table(self, name: str) -> jax.Array:
    """An int32 (1, n) column table of the codec."""

  def lut(self, name: str, idx: jax.Array) -> jax.Array:
    """float32 lookup of the codec's LUT ``name`` at int32 ``idx`` (any shape)."""


@dataclasses.dataclass(frozen=True)
class Codec:
  """A kernel-friendly decoder of one format's blocks of n coefficients.

  Attributes:
    tables: int32 (n,) per-column constants, by name.
    luts: float32 1-D value tables whose length is a power of two, by name.
    decode: (Source) -> float32 (R, n) coding-domain values z_hat.
  """

  tables: dict[str, np.ndarray]
  luts: dict[str, np.ndarray]
  decode: Callable[[Source], jax.Array]


trit = bitpack.trit  # the one TQ1_0 trit formula, shared with the core codecs


def bit_field(lo: jax.Array, hi: jax.Array, shift: jax.Array, width: int) -> jax.Array:
  """A ``width``-bit LSB-first field starting ``shift`` bits into byte ``lo`` (``hi`` follows)."""
  return ((lo | (hi << 8)) >> shift) & ((1 << width) - 1)


def field_tables(first_byte: int, n: int, width: int, group: int, nbytes: int):
  """Columns of field i // group (LSB-first, ``width`` bits) for i < n: lo, hi, shift."""
  bit = (np.arange(n) // group) * width
  lo = first_byte + bit // 8
  return dict(lo=lo, hi=np.minimum(lo + 1, nbytes - 1), shift=bit % 8)


def _pad_pow2(a: np.ndarray) -> np.ndarray:
  size = 1 << max(int(len(a)) - 1, 0).bit_length()
  return np.concatenate([a, np.zeros(size - len(a), a.dtype)])


def formats() -> tuple[str, ...]:
  """Registered formats that declare a kernel decoder."""
  return tuple(f for f in registry.format_names() if registry.get_format(f).kernel_codec)


def get(format: str, n: int) -> Codec:
  """The kernel decoder of ``format`` for blocks of n; NotImplementedError if none."""
  make = registry.get_format(format).kernel_codec
  if make is None:
    raise NotImplementedError(
        f"format {format!r} has no kernel decoder (formats with one: {formats()}); "
        "use matmul(..., method='xla').")
  codec = make(n)
  return dataclasses.replace(codec, luts={k: _pad_pow2(np.asarray(v, np.float32))
                                          for k, v in codec.luts.items()})


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A :class:`Source` over a byte array (R, nbytes): the XLA form of the decoders."""

  data: jax.Array
  codec: Codec

  def byte(self, cols):
    return jnp.take(self.data, cols[0], axis=-1).astype(jnp.int32)

  def table(self, name):
    return jnp.asarray(self.codec.tables[name])[None, :]

  def lut(self, name, idx):
    return jnp.asarray(self.codec.luts[name])[idx]


def decode_blocks(b: jax.Array, format: str, n: int) -> jax.Array:
  """uint8 (..., nbytes) -> float32 (..., n): the kernel decoder run by XLA.

  Equal bit for bit to ``get_format(format).decode(b, n)`` (tested).
  """
  codec = get(format, n)
  flat = b.reshape(-1, b.shape[-1])
  return codec.decode(ArraySource(flat, codec)).reshape(*b.shape[:-1], n)


def hadamard(x: jax.Array) -> jax.Array:
  """Unnormalised Sylvester H @ x along the last axis (length a power of two).

  The constant-geometry butterfly: every stage splits the row into halves a, b
  and interleaves (a + b, a - b). It uses only equal splits and a two-operand
  stack on the last axis, the forms the Triton lowering accepts, and equals ``fwht.hadamard_unnormalized`` up to float rounding (the
  additions happen in a different order).
  """
  n = x.shape[-1]
  for _ in range(n.bit_length() - 1):
    a, b = jnp.split(x, 2, axis=-1)
    x = jnp.stack([a + b, a - b], axis=-1).reshape(x.shape)
  return x
