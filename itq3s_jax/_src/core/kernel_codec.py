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

Two forms. :class:`Codec` (``decode``) yields a block in natural column order,
one gathered byte per field per coefficient: what ``weight_ifwht`` needs (its
butterfly mixes columns). :class:`Terms` yields a block as ``T`` dot operands
of ``S`` slots in whatever order the bytes are cheapest to read (whole
contiguous fields, byte lookup tables), with a per-block scale factored out;
the activations are expanded to the same slot order once, in XLA
(:func:`expand`). ``act_rotate`` runs this form: it is what makes its K loop
short (benchmarks/KERNELS.md).
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
    """Lookup of the codec's LUT ``name`` at int32 ``idx`` (any shape), in the LUT's dtype."""

  def load(self, start: int, width: int) -> jax.Array:
    """int32 (R, width): bytes start..start+width-1 of the block (one vector load)."""

  def gather(self, cols: jax.Array) -> jax.Array:
    """int32 (1, ...) byte offsets in the block, computed from iotas -> int32 (R, ...).

    One load per element in a kernel (cached, but each needs its address).
    """


@dataclasses.dataclass(frozen=True)
class Codec:
  """A kernel-friendly decoder of one format's blocks of n coefficients.

  Attributes:
    tables: int32 (n,) per-column constants, by name.
    luts: float32 1-D value tables whose length is a power of two, by name.
    decode: (Source) -> float32 (R, n) coding-domain values z_hat.
    terms: the same decoder as :class:`Terms` (n = 256 only), or None.
  """

  tables: dict[str, np.ndarray]
  luts: dict[str, np.ndarray]
  decode: Callable[[Source], jax.Array]
  terms: "Terms | None" = None


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
  return dataclasses.replace(codec, luts=pad_luts(codec.luts))


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

  def load(self, start, width):
    return self.data[:, start:start + width].astype(jnp.int32)

  def gather(self, cols):
    out = jnp.take(self.data, cols[0].reshape(-1), axis=-1).astype(jnp.int32)
    return out.reshape(self.data.shape[0], *cols.shape[1:])


def decode_blocks(b: jax.Array, format: str, n: int) -> jax.Array:
  """uint8 (..., nbytes) -> float32 (..., n): the kernel decoder run by XLA.

  Equal bit for bit to ``get_format(format).decode(b, n)`` (tested).
  """
  codec = get(format, n)
  flat = b.reshape(-1, b.shape[-1])
  return codec.decode(ArraySource(flat, codec)).reshape(*b.shape[:-1], n)


@dataclasses.dataclass(frozen=True)
class Terms:
  """A block of 256 coefficients as ``terms`` dot operands of ``slots`` values each.

  Coefficient ``c`` of the block (coding domain) is

    z_hat[c] = scale * sum over (t, s) with columns[t, s] == c of coef[t, s] * V_t[s]

  where ``V_t = decode(src, t, dtype)`` and ``scale = scale(src)``. So
  ``x . z_hat = scale * sum_t V_t . xe_t`` with ``xe_t[s] = coef[t, s] *
  x[columns[t, s]]`` (:func:`expand`): a kernel dots each decoded term with a
  slice of the expanded activations and multiplies by the block scale once.

  Attributes:
    terms: T, operands per block.
    slots: S, values per operand (a power of two >= 16: Triton's dot minimum).
    columns: int32 (T, S) block column each slot contributes to, -1 for none.
    coef: float32 (T, S) its multiplier (0 where ``columns`` is -1).
    luts: lookup tables the decoder reads (``Source.lut``), any dtype, length a
      power of two.
    decode: (Source, t: int array (n,), dtype) -> (R, n, S) values of terms t
      in ``dtype`` (float32: exact; float16: each value rounded once). Kernels
      call it with one term; ``weight_ifwht`` with all of a natural-order
      decoder's terms.
    scale: (Source) -> float32 (R, 1) the block scale.
    residual: None when every float16 term value is exact; else (Source, t) ->
      float16 (R, n, S), the float32 value minus its float16 rounding (exact in
      float16), for float32 accuracy from float16 dots.
  """

  terms: int
  slots: int
  columns: np.ndarray
  coef: np.ndarray
  luts: dict[str, np.ndarray]
  decode: Callable[[Source, int, jnp.dtype], jax.Array]
  scale: Callable[[Source], jax.Array]
  residual: Callable[[Source, np.ndarray], jax.Array] | None = None

  @property
  def natural(self) -> bool:
    """Whether term t slot s is column t * S + s with coefficient 1 (no expansion)."""
    return (self.terms * self.slots == 256
            and np.array_equal(self.columns.reshape(-1), np.arange(256))
            and np.all(self.coef == 1))


def pad_luts(luts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """LUTs zero-padded to a power-of-two length (the kernels load them whole)."""
  return {k: _pad_pow2(np.asarray(v)) for k, v in luts.items()}


def expand(x: jax.Array, terms: Terms) -> jax.Array:
  """(..., nb * 256) block-ordered activations -> (..., nb * T * S) in slot order."""
  if terms.natural:
    return x
  nb = x.shape[-1] // 256
  xb = x.reshape(*x.shape[:-1], nb, 256)
  xb = jnp.concatenate([xb, jnp.zeros((*xb.shape[:-1], 1), xb.dtype)], axis=-1)
  cols = np.where(terms.columns < 0, 256, terms.columns).reshape(-1)
  xe = jnp.take(xb, jnp.asarray(cols), axis=-1) * jnp.asarray(terms.coef.reshape(-1), xb.dtype)
  return xe.reshape(*x.shape[:-1], nb * terms.terms * terms.slots)


def decode_terms(b: jax.Array, terms: Terms) -> jax.Array:
  """uint8 (..., nbytes) -> float32 (..., 256): a term decoder run by XLA.

  Sums the float32 terms into columns in slot order; for the formats here
  every column is one slot or a trit pair whose parts add exactly, so this
  equals ``Format.decode`` bit for bit (tested).
  """
  flat = b.reshape(-1, b.shape[-1])
  src = ArraySource(flat, Codec({}, terms.luts, None))
  z = jnp.zeros((flat.shape[0], 257), jnp.float32)
  for t in range(terms.terms):
    v = terms.decode(src, np.array([t]), jnp.dtype(jnp.float32))
    v = v.reshape(flat.shape[0], terms.slots) * jnp.asarray(terms.coef[t])
    z = z.at[:, np.where(terms.columns[t] < 0, 256, terms.columns[t])].add(v)
  return (z[:, :256] * terms.scale(src)).reshape(*b.shape[:-1], 256)


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
