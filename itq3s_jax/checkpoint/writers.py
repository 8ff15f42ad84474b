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
``shape``, ``dtype``, ``nbytes``, ``parts`` (items; 0 for an empty array, which
orbax cannot store) and ``sha256`` (``entries.digest`` of the stored array);
quantized entries add ``format``, ``seed``, ``rounding``, ``transposed`` (the
source held the (in, out) Flax kernel) and ``bits_per_weight``. The metadata
carries its own ``sha256`` (``entries.seal``). ``entries.py`` checks all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Iterable

import numpy as np
import orbax.checkpoint as ocp

from itq3s_jax._src.core import qtensor
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import errors

META_ITEM = entries.META_ITEM
FORMAT_VERSION = entries.FORMAT_VERSION
_STANDARD = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_JSON = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"
item_name = entries.item_name
leaf_key = entries.leaf_key
part_items = entries.part_items
PART_BYTES = entries.PART_BYTES


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

  def put(self, item: str, array: np.ndarray, quantized: bool) -> dict:
    """Saves one tensor; returns the entry fields it decides: ``parts`` (items, row
    blocks; 0 for an empty array, which has no item) and ``sha256``."""
    array = np.asarray(array)
    parts = entries.part_count(array.shape, array.dtype.itemsize, quantized, PART_BYTES)
    rows = entries.part_rows(array.shape, array.dtype.itemsize, quantized, PART_BYTES)
    for j, name in enumerate(part_items({"item": item, "parts": parts})):
      block = array[j * rows:(j + 1) * rows] if array.ndim else array
      self._ckpt.save(os.path.join(self.stage, name),
                      args=ocp.args.StandardSave({leaf_key(quantized): block}), force=True)
    return {"parts": parts, "sha256": entries.digest(array)}

  def verify(self, entry: dict) -> bool:
    """Whether the staged items of ``entry`` hold the array its ``sha256`` names."""
    try:
      return entries.digest(read_items(self.stage, entry)) == entry["sha256"]
    except errors.CheckpointError:
      return False

  def finish(self, meta: dict) -> str:
    """Writes the JSON item and the composite metadata; returns the path to rename."""
    self._ckpt.close()
    meta = entries.seal(meta)
    entries.check_metadata(meta, "the metadata being written")  # a writer bug, not input
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
    done = []
    for i, (entry, array, quantized) in enumerate(tensors):
      entry = dict(entry, item=item_name(i))
      entry.update(writer.put(entry["item"], np.asarray(array), quantized))
      done.append(entry)
    result = writer.finish(dict(meta, format_version=FORMAT_VERSION, tensors=done))
  except BaseException:
    writer.close()
    shutil.rmtree(stage, ignore_errors=True)
    raise
  move_into_place(result, dst, overwrite)


def read_items(path: str, entry: dict) -> np.ndarray:
  """The stored array of a checked ``entry`` (codes of a quantized tensor), its items
  restored and concatenated; an empty array is made from the entry.

  Each item's shape and dtype are read from orbax's metadata and compared with what
  the entry allows (the entry's trailing dimensions and dtype, rows adding up to at
  most its row count) before the item is restored, so a damaged item cannot make
  orbax allocate by a size the (sealed) entry does not vouch for.

  Raises:
    CheckpointError: an item is missing, damaged, or not the entry's shape/dtype.
  """
  quantized = entry["kind"] == "quantized"
  shape = tuple(entry["shape"])
  if quantized:
    shape = (*shape[:-1], qtensor.row_nbytes(entry["format"], shape[-1]))
  dtype = np.dtype(np.uint8) if quantized else entries.dtype_of(entry["dtype"])
  if entry.get("parts", 1) == 0:
    return np.zeros(shape, dtype)
  path = os.path.abspath(path)  # orbax refuses relative paths
  key, blocks, left = leaf_key(quantized), [], shape[0] if shape else None
  with ocp.StandardCheckpointer() as c:
    for name in part_items(entry):
      item = os.path.join(path, name)
      if not os.path.isdir(item):
        raise errors.CheckpointError(
            f"{path}: tensor {entry['name']!r} is missing: no item directory {name}/ (the "
            "checkpoint was copied incompletely, or its metadata belongs to another one).")
      try:
        meta = c.metadata(item).item_metadata.tree[key]
        got = (tuple(int(d) for d in meta.shape), np.dtype(meta.dtype))
        if got[1] != dtype or (got[0] != shape if not shape else (
            len(got[0]) != len(shape) or got[0][1:] != shape[1:] or not 0 < got[0][0] <= left)):
          raise ValueError(f"item {name} holds {got[1].name} {list(got[0])}, the entry says "
                           f"{dtype.name} {list(shape)}")
        blocks.append(np.asarray(c.restore(item)[key]))
      except Exception as exc:  # orbax/tensorstore raise many types for damaged items
        raise errors.CheckpointError(
            f"{path}: tensor {entry['name']!r} ({name}) is damaged: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None
      if shape:
        left -= blocks[-1].shape[0]
  arr = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
  if arr.shape != shape or arr.dtype != dtype:
    raise errors.CheckpointError(f"{path}: tensor {entry['name']!r} has {arr.dtype.name} "
                                 f"{list(arr.shape)} stored, the entry says {dtype.name} "
                                 f"{list(shape)}.")
  return arr
