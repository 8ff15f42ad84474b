"""``inspect``: per-tensor format, shape, bits per weight and certified error bound.

The bound of a quantized tensor comes from its bytes alone
(``itq3s_jax.error_bound``: per 256/128/64/32-block L2 bounds). Blocks are
disjoint, so ||W - W_hat||_F <= sqrt(sum_b bound_b^2) =: frob_bound; the
report gives that relative to ||W_hat||_F and the largest block bound. Formats
without a worst-case bound (iq3_s, itq3_s) say so.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import itq3s_jax
from itq3s_jax.checkpoint import reader


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  kind: str  # "quantized" | "array"
  format: str  # format name, or the dtype of a kept array
  shape: tuple[int, ...]
  bits_per_weight: float
  nbytes: int
  max_block_bound: float | None  # None: no certified bound (or not quantized)
  rel_frob_bound: float | None  # frob_bound / ||W_hat||_F
  note: str


@dataclasses.dataclass(frozen=True)
class Report:
  path: str
  source: dict
  rows: tuple[Row, ...]

  @property
  def total_weights(self) -> int:
    return sum(math.prod(r.shape) for r in self.rows)

  @property
  def total_bytes(self) -> int:
    return sum(r.nbytes for r in self.rows)

  @property
  def quantized(self) -> tuple[Row, ...]:
    return tuple(r for r in self.rows if r.kind == "quantized")


def _row(entry: dict, t) -> Row:
  if entry["kind"] != "quantized":
    arr = np.asarray(t)
    bpw = 8.0 * arr.dtype.itemsize
    return Row(entry["name"], "array", arr.dtype.name, tuple(arr.shape), bpw,
               int(arr.nbytes), None, None, entry.get("reason", "kept"))
  if not itq3s_jax.has_bound(t.format):
    return Row(entry["name"], "quantized", t.format, t.shape, t.bits_per_weight, t.nbytes,
               None, None, "no certified bound for this format")
  bound = np.asarray(itq3s_jax.error_bound(t), np.float64)
  frob = float(np.sqrt(np.sum(bound**2)))
  norm = float(np.linalg.norm(np.asarray(itq3s_jax.dequantize(t), np.float64)))
  rel = frob / norm if norm else (0.0 if frob == 0 else math.inf)
  return Row(entry["name"], "quantized", t.format, t.shape, t.bits_per_weight, t.nbytes,
             float(bound.max()) if bound.size else 0.0, rel, "")


def inspect(path: str) -> Report:
  """Summarises a converted checkpoint, reading one tensor at a time.

  Args:
    path: an itq3s orbax checkpoint directory.

  Returns:
    A :class:`Report` (rows in checkpoint order).

  Raises:
    CheckpointError: not an itq3s checkpoint, or a damaged one.
  """
  meta = reader.read_metadata(path)
  rows = tuple(_row(entry, t) for entry, t in reader.iter_tensors(path))
  return Report(str(path), meta.get("source", {}), rows)
