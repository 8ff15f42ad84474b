"""Destinations, written tensor by tensor into a staging directory.

A writer ``put``s each finished tensor into the staging directory as its own
small file set (so a resumed conversion keeps what is done), then ``finish``
turns the staging directory into the destination, which is renamed into place
(:func:`move_into_place`), so it appears complete or not at all. This one
layout is written by ``itq3s convert`` and by ``itq3s_jax.flax.save``
(:func:`save_tensors`) and read by ``reader.py``.

Orbax layout (an orbax *composite* checkpoint, restorable without a target)::

  DST/_CHECKPOINT_METADATA     item handlers, as orbax's CompositeCheckpointHandler writes it
  DST/itq3s/metadata           JSON item: format version, source hash, one entry per tensor
  DST/t00000/ ...              one StandardCheckpointHandler item per tensor:
                               {"data": uint8 (..., row_nbytes)} (quantized) or {"value": array}
  DST/t00000_0001/ ...         further row blocks of a large kept array (``parts`` > 1)

Static fields of ``QuantizedTensor`` (shape, format, seed, rounding) are not
orbax leaves, so they live in the JSON entries (orbax stores no dataclass
fields). An entry: ``name``, ``item``, ``kind`` ("quantized" | "array"),
``shape``, ``dtype``, ``nbytes``; quantized entries add ``format``, ``seed``,
``rounding``, ``transposed`` (the source held the (in, out) Flax kernel) and
``bits_per_weight``; large arrays add ``parts``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Iterable

import numpy as np
import orbax.checkpoint as ocp

from itq3s_jax.checkpoint import errors

META_ITEM = "itq3s"
FORMAT_VERSION = 1
_STANDARD = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_JSON = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"


def item_name(index: int) -> str:
  return f"t{index:05d}"


def leaf_key(quantized: bool) -> str:
  return "data" if quantized else "value"


def part_items(entry: dict) -> list[str]:
  """Items of one tensor: ``t00007`` or, for a large kept array saved in row
  blocks, ``t00007``, ``t00007_0001``, ... (concatenate along axis 0)."""
  return [entry["item"]] + [f"{entry['item']}_{j:04d}" for j in range(1, entry.get("parts", 1))]


# Orbax's save holds about two extra copies of an array while it writes; kept arrays
# larger than this are saved in row blocks of at most this size, one item each, so the
# extra memory stays a constant instead of twice the largest tensor.
PART_BYTES = 16 << 20


class OrbaxWriter:
  """Writes the orbax layout of the module docstring into ``stage``."""

  kind = "orbax"

  def __init__(self, stage: str):
    self.stage = os.path.abspath(stage)
    # Synchronous: an async checkpointer's background threads outlive a Ctrl-C and
    # print tracebacks (or hang the exit); every put waits for its write anyway.
    self._ckpt = ocp.Checkpointer(ocp.StandardCheckpointHandler())

  def has(self, item: str) -> bool:
    return os.path.isfile(os.path.join(self.stage, item, "_METADATA"))

  def put(self, item: str, array: np.ndarray, quantized: bool) -> int:
    """Saves one tensor; returns the number of items (row blocks) it took."""
    rows = len(array) if array.ndim else 1
    if not quantized and array.ndim and array.nbytes > PART_BYTES:
      rows = max(1, PART_BYTES // max(1, array.nbytes // len(array)))
    starts = range(0, len(array), rows) if array.ndim and len(array) else [None]
    names = part_items({"item": item, "parts": len(starts)})
    for name, lo in zip(names, starts):
      block = array if lo is None else array[lo:lo + rows]
      self._ckpt.save(os.path.join(self.stage, name),
                      args=ocp.args.StandardSave({leaf_key(quantized): block}), force=True)
    return len(names)

  def finish(self, meta: dict) -> str:
    """Writes the JSON item and the composite metadata; returns the path to rename."""
    self._ckpt.close()
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      c.save(os.path.join(self.stage, META_ITEM), args=ocp.args.JsonSave(meta), force=True)
    handlers = {META_ITEM: _JSON}
    for e in meta["tensors"]:
      handlers.update({name: _STANDARD for name in part_items(e)})
    now = time.time_ns()
    with open(os.path.join(self.stage, "_CHECKPOINT_METADATA"), "w", encoding="utf-8") as f:
      json.dump({"item_handlers": handlers, "metrics": {}, "performance_metrics": {},
                 "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
                 "custom_metadata": {}}, f)
    return self.stage

  def close(self) -> None:
    self._ckpt.close()


def staging_path(dst: str) -> str:
  """The temporary sibling a checkpoint written to ``dst`` is staged in."""
  head, tail = os.path.split(os.path.abspath(dst))
  return os.path.join(head, f".{tail}.itq3s-partial")


def move_into_place(result: str, dst: str, overwrite: bool) -> None:
  """Renames ``result`` to ``dst``; an old ``dst`` is removed only after that succeeds."""
  old = None
  if os.path.lexists(dst):
    if not overwrite:
      raise errors.CheckpointError(f"{dst} appeared while writing; not replacing it.")
    old = staging_path(dst) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
  os.replace(result, dst)
  if old is not None:
    if os.path.isdir(old):
      shutil.rmtree(old)
    else:
      os.remove(old)


def save_tensors(dst: str, tensors: Iterable[tuple[dict, np.ndarray, bool]], meta: dict, *,
                 overwrite: bool = False) -> None:
  """Writes a checkpoint of in-memory tensors atomically (staging dir, then a rename).

  Args:
    dst: checkpoint directory (relative or absolute).
    tensors: (entry without ``item``/``parts``, array, quantized) in order; the
      array is the coded data of a quantized entry.
    meta: the JSON metadata without ``tensors`` (``format_version`` is set here).
    overwrite: replace an existing ``dst``.

  Raises:
    CheckpointError: ``dst`` exists and not ``overwrite``.
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.lexists(dst) and not overwrite:
    raise errors.CheckpointError(f"{dst} already exists; pass overwrite=True to replace it.")
  stage = staging_path(dst)
  shutil.rmtree(stage, ignore_errors=True)
  os.makedirs(stage)
  writer = OrbaxWriter(stage)
  try:
    entries = []
    for i, (entry, array, quantized) in enumerate(tensors):
      entry = dict(entry, item=item_name(i))
      entry["parts"] = writer.put(entry["item"], np.asarray(array), quantized)
      entries.append(entry)
    result = writer.finish(dict(meta, format_version=FORMAT_VERSION, tensors=entries))
  except BaseException:
    writer.close()
    shutil.rmtree(stage, ignore_errors=True)
    raise
  move_into_place(result, dst, overwrite)
