"""How a row of K weights is cut into coded blocks (the block plan).

A plan is a tuple of segments; a segment is ``count`` consecutive blocks of
``n`` weights starting at column ``start``, of which the last ``n - valid``
columns are zero padding (only under the ``pad256`` policy). Segments are
laid out in the row's byte string in the same order.
"""

from __future__ import annotations

import dataclasses
import functools

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


def check_k(k: int) -> None:
  if k % MIN_K_MULTIPLE:
    raise ValueError(
        f"the last axis K={k} must be a multiple of {MIN_K_MULTIPLE}; pad the "
        "weight with zero columns (and the activations to match) or keep this "
        "tensor in float.")


@functools.lru_cache(maxsize=None)
def plan(k: int, tail: str, block_nbytes) -> tuple[Segment, ...]:
  """Block plan of a row of ``k`` weights.

  ``pow2``: floor(k/256) blocks of 256, then the binary digits of k mod 256
  (128, 64, 32) as one block each, largest first. ``pad256``: ceil(k/256)
  blocks of 256, the last zero-padded.
  """
  check_k(k)
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
  segs, col, byte = [], 0, 0
  for n, count, valid in parts:
    nb = block_nbytes(n)
    segs.append(Segment(col, n, count, valid, byte, nb))
    col += valid
    byte += count * nb
  return tuple(segs)


def row_nbytes(segments: tuple[Segment, ...]) -> int:
  return sum(s.count * s.nbytes for s in segments)
