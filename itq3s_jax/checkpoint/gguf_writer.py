"""GGUF destination: tensors staged as ``.npy`` files, assembled by ``gguf_io.write_gguf``.

GGML has types for ``iq3_s`` (21) and ``itq3_s`` (41) only, so a GGUF
destination needs one of those formats (checked before any work). Each
finished tensor is saved as ``<item>.npy`` (written to a temporary name, then
renamed, so a resumed run never sees half a file). ``finish`` memory-maps the
staged files and streams them into one GGUF file in the staging directory,
which ``convert`` renames to DST. Kept tensors whose dtype GGUF lacks are cast:
bfloat16 -> float32, bool -> int8, uint8 -> int16.

The GGUF keys of a GGUF source are copied (tokenizer, architecture, ...), plus
``itq3s_jax.source_sha256``, ``itq3s_jax.format_version`` and a checksum key
per tensor (``gguf_io.write_gguf(checksums=True)``), verified when read.
"""

from __future__ import annotations

import os

import numpy as np

from itq3s_jax._src import gguf_io
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import errors

_CASTS = {"bfloat16": np.float32, "bool": np.int8, "uint8": np.int16}


def check_format(format: str) -> None:
  if registry.get_format(format).gguf_type is None:
    raise errors.CheckpointError(
        f"GGUF has no tensor type for format {format!r}; use --format itq3_s or iq3_s, "
        "or write an orbax checkpoint (a DST not ending in .gguf).")


class GgufWriter:
  """Stages tensors as .npy and writes the GGUF file at ``finish``."""

  kind = "gguf"

  def __init__(self, stage: str, source_metadata=None):
    self.stage = stage
    self._source_metadata = source_metadata

  def _path(self, item: str) -> str:
    return os.path.join(self.stage, item + ".npy")

  def has(self, item: str) -> bool:
    return os.path.isfile(self._path(item))

  def put(self, item: str, array: np.ndarray, quantized: bool) -> dict:
    """Stages one tensor; returns the entry fields it decides (``parts``, ``sha256``)."""
    if not quantized and array.dtype.name in _CASTS:
      array = array.astype(_CASTS[array.dtype.name])
    tmp = self._path(item) + ".tmp"
    with open(tmp, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, self._path(item))
    return {"parts": 1 if array.size else 0, "sha256": entries.digest(array)}

  def _load(self, entry: dict) -> np.ndarray:
    return np.load(self._path(entry["item"]), mmap_mode="r", allow_pickle=False)

  def verify(self, entry: dict) -> bool:
    """Whether the staged .npy of ``entry`` holds the array its ``sha256`` names."""
    try:
      return entries.digest(self._load(entry)) == entry["sha256"]
    except (OSError, ValueError):
      return False

  def finish(self, meta: dict) -> str:
    tensors = {}
    for e in meta["tensors"]:
      arr = self._load(e)
      if entries.digest(arr) != e["sha256"]:
        raise errors.CheckpointError(f"{self._path(e['item'])}: staged tensor {e['name']!r} "
                                     "changed on disk since it was written.")
      if e["kind"] == "quantized":
        arr = qtensor.QuantizedTensor(data=arr, format=e["format"], k=e["shape"][-1],
                                      seed=e["seed"])
      tensors[e["name"]] = arr
    md = dict(self._source_metadata() if self._source_metadata else {})
    md["itq3s_jax.source_sha256"] = meta["source"]["sha256"]
    md["itq3s_jax.format_version"] = meta["format_version"]
    out = os.path.join(self.stage, "out.gguf")
    try:
      gguf_io.write_gguf(out, tensors, md, checksums=True)
    except (ValueError, TypeError) as exc:
      raise errors.CheckpointError(f"cannot write GGUF: {exc}") from None
    return out

  def close(self) -> None:
    pass
