"""How a row of K weights is cut into coded blocks (the block plan), and the one walker.

A plan is a tuple of segments; a segment is ``count`` consecutive blocks of
``n`` weights starting at column ``start``, of which the last ``n - valid``
columns are zero padding (only under the ``pad256`` policy). Segments are
laid out in the row's byte string in the same order, and in the coding
domain (the concatenated, padded blocks) at offset ``coded_start``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable

QK = 256
MIN_K_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int  # first column of the segment in the row
  n: int  # block length (power of two)
  count: int  # number of blocks
  valid: int  # columns of real data in the segment (count * n minus padding)
  byte_start: int  # first byte of the segment in the row's byte string
  nbytes: int  # bytes of one block
  coded_start: int  # first coefficient of the segment in the coding-domain row

  @property
  def byte_stop(self) -> int:
    return self.byte_start + self.count * self.nbytes

  @property
  def coded_stop(self) -> int:
    return self.coded_start + self.count * self.n


def as_index(value, name: str) -> int:
  """``value`` as a Python int (numpy ints accepted); TypeError for floats, bools, strings."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int, got a bool.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.") from None


def check_k(k: int) -> int:
  """Returns K as an int; ValueError unless it is a non-negative multiple of 32."""
  k = as_index(k, "K")
  if k < 0 or k % MIN_K_MULTIPLE:
    raise ValueError(
        f"the last axis K={k} must be a multiple of {MIN_K_MULTIPLE}; pad the "
        "weight with zero columns (and the activations to match) or keep this "
        "tensor in float.")
  return k


def plan(k: int, tail: str, block_nbytes: Callable[[int], int]) -> tuple[Segment, ...]:
  """Block plan of a row of ``k`` weights.

  ``pow2``: floor(k/256) blocks of 256, then the binary digits of k mod 256
  (128, 64, 32) as one block each, largest first. ``pad256``: ceil(k/256)
  blocks of 256, the last zero-padded.

  Raises:
    TypeError: ``k`` is not an int (the plan cache is keyed on validated ints
      only, so a bad value never poisons it).
    ValueError: ``k`` is not a non-negative multiple of 32, or an unknown tail.
  """
  return _plan(check_k(k), tail, block_nbytes)


@functools.lru_cache(maxsize=256)
def _plan(k: int, tail: str, block_nbytes) -> tuple[Segment, ...]:
  full, rem = divmod(k, QK)
  parts: list[tuple[int, int, int]] = []  # (n, count, valid)
  if full:
    parts.append((QK, full, full * QK))
  if rem:
    if tail == "pad256":
      parts.append((QK, 1, rem))
    elif tail == "pow2":
      for n in (128, 64, 32):
        if rem & n:
          parts.append((n, 1, n))
    else:
      raise ValueError(f"unknown tail policy {tail!r}.")
  segs, col, byte, coded = [], 0, 0, 0
  for n, count, valid in parts:
    nb = block_nbytes(n)
    segs.append(Segment(col, n, count, valid, byte, nb, coded))
    col += valid
    byte += count * nb
    coded += count * n
  return tuple(segs)


def row_nbytes(segments: tuple[Segment, ...]) -> int:
  return sum(s.count * s.nbytes for s in segments)


def coded_length(segments: tuple[Segment, ...]) -> int:
  """Kp: coefficients of a coded row (K plus block padding)."""
  return sum(s.count * s.n for s in segments)


def columns(segments: tuple[Segment, ...]) -> list[tuple[int, int]]:
  """(start, stop) columns of each block of a row, in byte (and bound) order."""
  cols = []
  for seg in segments:
    for i in range(seg.count):
      lo = seg.start + i * seg.n
      cols.append((lo, min(lo + seg.n, seg.start + seg.valid)))
  return cols
