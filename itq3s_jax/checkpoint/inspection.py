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
import os

import numpy as np

import itq3s_jax
from itq3s_jax.checkpoint import errors
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
  if not itq3s_jax.has_bound(t.format) or t.rounding == "unrestricted":
    why = ("no certified bound for this format" if not itq3s_jax.has_bound(t.format) else
           "GPTQ rounding 'unrestricted': no certified bound")
    return Row(entry["name"], "quantized", t.format, t.shape, t.bits_per_weight, t.nbytes,
               None, None, why)
  bound = np.asarray(itq3s_jax.error_bound(t), np.float64)
  frob = float(np.sqrt(np.sum(bound**2)))
  norm = float(np.linalg.norm(np.asarray(itq3s_jax.dequantize(t), np.float64)))
  rel = frob / norm if norm else (0.0 if frob == 0 else math.inf)
  return Row(entry["name"], "quantized", t.format, t.shape, t.bits_per_weight, t.nbytes,
             float(bound.max()) if bound.size else 0.0, rel, "")


def _gguf_tensors(path: str):
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  try:
    f = gguf_io.TensorFile(path)
    md = gguf_io.read_metadata(path)
    for name in f.names:  # one tensor in memory at a time
      t = f.read_quantized(name)
      kind = "quantized" if isinstance(t, itq3s_jax.QuantizedTensor) else "array"
      yield {"name": name, "kind": kind, "reason": "GGUF tensor"}, t
  except (ValueError, NotImplementedError) as exc:
    raise errors.CheckpointError(str(exc)) from None
  source = {"kind": "gguf", "sha256": md.get("itq3s_jax.source_sha256")}
  yield None, source


def inspect(path: str) -> Report:
  """Summarises a converted checkpoint, reading one tensor at a time.

  Args:
    path: an itq3s orbax checkpoint directory, or a GGUF file (its iq3_s /
      itq3_s tensors are shown as quantized, the others as arrays).

  Returns:
    A :class:`Report` (rows in checkpoint order).

  Raises:
    CheckpointError: not an itq3s checkpoint, or a damaged one.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and _magic(path) == b"GGUF":
    rows, source = [], {}
    for entry, t in _gguf_tensors(path):
      if entry is None:
        source = t
      else:
        rows.append(_row(entry, t))
    return Report(path, source, tuple(rows))
  meta = reader.read_metadata(path)
  rows = tuple(_row(entry, t) for entry, t in reader.iter_tensors(path))
  return Report(path, meta.get("source", {}), rows)


def _magic(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(4)
