"""Block decoders in a kernel-friendly form, shared by XLA and the Pallas kernels.

A Triton Pallas kernel cannot slice or gather an in-register array, and every
array it loads must have a power-of-two size (docs: jax_notes.md §5). It *can*
load bytes from a ref at computed column offsets. So a block's decoder is
written here as elementwise integer arithmetic on bytes fetched through a
:class:`Source`, with all per-column constants (which byte holds coefficient
i, which trit digit, which bit shift) precomputed in numpy as ``tables``
and all value tables (``SUPER``, ``MULT``) passed as ``luts``. The same
decoder runs

  * in XLA on a (..., nbytes) byte array (:func:`decode_blocks`), where a test
    checks it equals the codec's own ``Format.decode`` bit for bit, and
  * inside a kernel on a ref of coded rows (``pallas_kernels/_driver.py``).

Only the formats listed in :data:`CODECS` have a kernel decoder; the others
(e.g. ``itq3_s`` until a decoder is added here) make :func:`get` raise
NotImplementedError so the matmul dispatcher falls back to XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src import bitpack
from itq3s_jax._src.formats import itq3_t
from itq3s_jax._src.formats import uniform3


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


def _field_tables(first_byte: int, n: int, width: int, group: int, nbytes: int):
  """Columns of field i // group (LSB-first, ``width`` bits) for i < n."""
  bit = (np.arange(n) // group) * width
  lo = first_byte + bit // 8
  return dict(lo=lo, hi=np.minimum(lo + 1, nbytes - 1), shift=bit % 8)


def _pad_pow2(a: np.ndarray) -> np.ndarray:
  size = 1 << max(int(len(a)) - 1, 0).bit_length()
  return np.concatenate([a, np.zeros(size - len(a), a.dtype)])


def _itq3_t_codec(n: int) -> Codec:
  nb = itq3_t.nbytes(n)
  tbyte = 1 + -(-3 * (n // itq3_t.SUB) // 8)  # first trit byte
  j = 2 * np.arange(n)  # trit index of t0_i; t1_i follows
  f = _field_tables(1, n, 3, itq3_t.SUB, nb)
  tables = dict(s_lo=f["lo"], s_hi=f["hi"], s_shift=f["shift"],
                t0_col=tbyte + j // 5, t0_pow=3 ** (j % 5),
                t1_col=tbyte + (j + 1) // 5, t1_pow=3 ** ((j + 1) % 5))

  def decode(src: Source) -> jax.Array:
    e = src.byte(jnp.zeros((1, 1), jnp.int32))
    s = bit_field(src.byte(src.table("s_lo")), src.byte(src.table("s_hi")),
                  src.table("s_shift"), 3)
    delta = src.lut("super", e) * src.lut("mult", s)  # as itq3_t.steps: fp32(D * MULT[s])
    t0 = trit(src.byte(src.table("t0_col")), src.table("t0_pow"))
    t1 = trit(src.byte(src.table("t1_col")), src.table("t1_pow"))
    return (3 * t1 + t0).astype(jnp.float32) * delta

  return Codec({k: v.astype(np.int32) for k, v in tables.items()},
               dict(super=itq3_t.SUPER, mult=itq3_t.MULT), decode)


def _uniform3_codec(n: int) -> Codec:
  f = _field_tables(2, n, 3, 1, uniform3.nbytes(n))

  def decode(src: Source) -> jax.Array:
    zero = jnp.zeros((1, 1), jnp.int32)
    bits = src.byte(zero) | (src.byte(zero + 1) << 8)  # little-endian fp16 scale
    d = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    c = bit_field(src.byte(src.table("lo")), src.byte(src.table("hi")), src.table("shift"), 3)
    return (c - 4).astype(jnp.float32) * d.astype(jnp.float32)

  return Codec({k: v.astype(np.int32) for k, v in f.items()}, {}, decode)


CODECS: dict[str, Callable[[int], Codec]] = {
    "itq3_t": _itq3_t_codec,
    "uniform3": _uniform3_codec,
    "uniform3_rot": _uniform3_codec,
}


def get(format: str, n: int) -> Codec:
  """The kernel decoder of ``format`` for blocks of n; NotImplementedError if none."""
  if format not in CODECS:
    raise NotImplementedError(
        f"format {format!r} has no kernel decoder yet (kernel_decode.CODECS knows "
        f"{sorted(CODECS)}); use matmul(..., method='xla').")
  codec = CODECS[format](n)
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
  stack on the last axis, the forms the Triton lowering accepts (jax_notes.md
  §6), and equals ``fwht.hadamard_unnormalized`` up to float rounding (the
  additions happen in a different order).
  """
  n = x.shape[-1]
  for _ in range(n.bit_length() - 1):
    a, b = jnp.split(x, 2, axis=-1)
    x = jnp.stack([a + b, a - b], axis=-1).reshape(x.shape)
  return x
