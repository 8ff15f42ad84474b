"""The one list of formats: every codec registers a :class:`Format` here.

A format codes blocks of ``n`` consecutive weights along the last (contraction)
axis. The shared driver (``codec.py``) cuts rows into blocks, applies the
format's transform, and calls the codec's ``encode``/``decode`` on arrays with a
trailing block axis. Codecs therefore never see rows, padding or rotations.
A format also declares what the rest of the library needs of it: its GGML
type, its Hessian-aware rounding hooks and its kernel decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Protocol

import jax

Transform = Literal["none", "rht", "hadamard"]
TailPolicy = Literal["pow2", "pad256"]


class EncodeFn(Protocol):

  def __call__(self, z: jax.Array, importance: jax.Array | None) -> jax.Array:
    """float32 (..., n) coding-domain values [+ weights] -> uint8 (..., nbytes(n))."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
  """How one format codes a block.

  Attributes:
    name: public name, e.g. ``"itq3_t"``.
    transform: coding domain of a block: ``"none"`` (the weights), ``"rht"``
      (seeded random signs then orthonormal FWHT) or ``"hadamard"`` (natural
      order orthonormal FWHT, no signs: the published ITQ3_S).
    tail: how a K that is not a multiple of 256 is cut: ``"pow2"`` (256-blocks
      then power-of-two tail blocks 128/64/32) or ``"pad256"`` (the last block
      zero-padded to 256; formats whose block structure is fixed at 256).
    block_nbytes: bytes of one coded block of n weights.
    encode: (..., n) float32 -> (..., block_nbytes(n)) uint8.
    decode: (uint8 (..., nbytes), n) -> float32 (..., n) coding-domain values.
    bound: (uint8 (..., nbytes), n) -> float32 (...): the certified L2 error
      bound of a block in exact arithmetic, from its bytes alone; None when the
      format has no worst-case bound.
    max_abs: largest |coding-domain value| the codec represents without
      clipping; quantize raises beyond it in eager mode.
    gguf_type: GGML type id when the 256-blocks are byte-compatible, else None.
    kernel_codec: optional ``n -> kernel_codec.Codec``: the block decoder in the
      elementwise form the Pallas kernels run (``core/kernel_codec.py``); None:
      the fused kernels decline the format.
    description: one line for tables and ``itq3s inspect``.
    levels: optional Hessian-aware rounding hook (gptq.py): (uint8 (..., nbytes),
      n) -> (step, lo, hi), each (..., n): with the block's scales as stored,
      coefficient i may take the values step_i * q for integers lo_i <= q <= hi_i.
      None: the format cannot be re-rounded with fixed scales.
    repack: optional companion of ``levels``: (uint8 (..., nbytes), int32 q
      (..., n), n) -> uint8 (..., nbytes), the block with its scales kept and its
      codes replaced by q (lo <= q <= hi, or q from ``snap``).
    group: coefficients chosen jointly by ``snap`` (consecutive, within one
      step); 1 for formats whose codes are a per-coefficient integer range.
    snap: optional, for codebooks that are not such a range (the IQ3_S grid):
      (x float32 (..., group), step float32 (..., group) > 0) -> int32 q
      (..., group), the codes of the admissible point step * q nearest x.
      None: each coefficient takes clip(round(x / step), lo, hi).
  """

  name: str
  transform: Transform
  tail: TailPolicy
  block_nbytes: Callable[[int], int]
  encode: EncodeFn
  decode: Callable[[jax.Array, int], jax.Array]
  bound: Callable[[jax.Array, int], jax.Array] | None
  max_abs: float
  gguf_type: int | None = None
  description: str = ""
  levels: Callable[[jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]] | None = None
  repack: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None
  group: int = 1
  snap: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  kernel_codec: Callable[[int], "object"] | None = None


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  """Adds ``fmt`` to the registry (idempotent for the same object)."""
  if fmt.name in _REGISTRY and _REGISTRY[fmt.name] is not fmt:
    raise ValueError(f"format {fmt.name!r} is already registered.")
  _REGISTRY[fmt.name] = fmt
  return fmt


def get_format(name: str) -> Format:
  """Looks a format up by name; ValueError listing the known ones otherwise."""
  if not isinstance(name, str):
    raise TypeError(f"format must be a string, got {type(name).__name__}.")
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown format {name!r}; known formats: {sorted(_REGISTRY)}.") from None


def format_names() -> tuple[str, ...]:
  """Names of all registered formats, in registration order."""
  return tuple(_REGISTRY)
