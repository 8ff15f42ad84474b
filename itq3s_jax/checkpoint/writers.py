"""Destinations, written tensor by tensor into a staging directory.

A writer ``put``s each finished tensor into the staging directory as its own
small file set (so a resumed conversion keeps what is done), then ``finish``
turns the staging directory into the destination. ``convert`` renames the
result into place, so the destination appears complete or not at all.

Orbax layout (an orbax *composite* checkpoint, restorable without a target)::

  DST/_CHECKPOINT_METADATA     item handlers, as orbax's CompositeCheckpointHandler writes it
  DST/itq3s/metadata           JSON item: format version, source hash, one entry per tensor
  DST/t00000/ ...              one StandardCheckpointHandler item per tensor:
                               {"data": uint8 (..., row_nbytes)} (quantized) or {"value": array}

Static fields of ``QuantizedTensor`` (shape, format, seed) are not orbax
leaves, so they live in the JSON entries (orbax stores no dataclass fields).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp

META_ITEM = "itq3s"
FORMAT_VERSION = 1
_STANDARD = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_JSON = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"


def item_name(index: int) -> str:
  return f"t{index:05d}"


def leaf_key(quantized: bool) -> str:
  return "data" if quantized else "value"


class OrbaxWriter:
  """Writes the orbax layout of the module docstring into ``stage``."""

  kind = "orbax"

  def __init__(self, stage: str):
    self.stage = stage
    self._ckpt = ocp.StandardCheckpointer()

  def has(self, item: str) -> bool:
    return os.path.isfile(os.path.join(self.stage, item, "_METADATA"))

  def put(self, item: str, array: np.ndarray, quantized: bool) -> None:
    path = os.path.join(self.stage, item)
    self._ckpt.save(path, {leaf_key(quantized): array}, force=True)
    self._ckpt.wait_until_finished()

  def finish(self, meta: dict) -> str:
    """Writes the JSON item and the composite metadata; returns the path to rename."""
    self._ckpt.close()
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      c.save(os.path.join(self.stage, META_ITEM), args=ocp.args.JsonSave(meta), force=True)
    handlers = {META_ITEM: _JSON, **{e["item"]: _STANDARD for e in meta["tensors"]}}
    now = time.time_ns()
    with open(os.path.join(self.stage, "_CHECKPOINT_METADATA"), "w", encoding="utf-8") as f:
      json.dump({"item_handlers": handlers, "metrics": {}, "performance_metrics": {},
                 "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
                 "custom_metadata": {}}, f)
    return self.stage

  def close(self) -> None:
    self._ckpt.close()
