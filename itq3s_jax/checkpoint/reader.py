"""Reading converted checkpoints back: ``load`` (all tensors) and ``iter_tensors``.

The orbax layout is described in ``writers.py``. Every tensor is checked
against its JSON entry (``qtensor.validate``: dtype, code bytes per row), so a
damaged checkpoint raises CheckpointError instead of restoring wrong weights.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import itq3s_jax
from itq3s_jax._src.core import qtensor
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import writers

Tensor = "itq3s_jax.QuantizedTensor | np.ndarray"


def read_metadata(path: str) -> dict:
  """The JSON metadata of an itq3s orbax checkpoint (format version checked)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise errors.CheckpointError(f"{path}: no such file or directory.")
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"{path}: not a directory; an itq3s orbax checkpoint "
                                 "is a directory made by `itq3s convert`.")
  meta_path = os.path.join(path, writers.META_ITEM, "metadata")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise errors.CheckpointError(f"{path}: not an itq3s checkpoint (no {writers.META_ITEM}/"
                                 "metadata); was the conversion finished?") from None
  except (OSError, ValueError) as exc:
    raise errors.CheckpointError(f"{meta_path}: corrupt metadata ({exc}).") from None
  if not isinstance(meta, dict) or meta.get("format_version") != writers.FORMAT_VERSION:
    raise errors.CheckpointError(
        f"{path}: unsupported itq3s checkpoint version "
        f"{meta.get('format_version') if isinstance(meta, dict) else None!r}; this "
        f"library reads version {writers.FORMAT_VERSION}.")
  tensors = meta.get("tensors")
  if not isinstance(tensors, list) or not all(
      isinstance(e, dict) and {"name", "item", "kind", "shape"} <= set(e) for e in tensors):
    raise errors.CheckpointError(f"{meta_path}: corrupt tensor list.")
  return meta


def _restore(path: str, entry: dict) -> Tensor:
  quantized = entry["kind"] == "quantized"
  path = os.path.abspath(path)  # orbax refuses relative paths
  items = writers.part_items(entry)
  for name in items:
    if not os.path.isdir(os.path.join(path, name)):
      raise errors.CheckpointError(
          f"{path}: tensor {entry['name']!r} is missing: no item directory {name}/ (the "
          "checkpoint was copied incompletely, or its metadata belongs to another one).")
  try:
    blocks = []
    with ocp.StandardCheckpointer() as c:
      for name in items:
        blocks.append(np.asarray(c.restore(os.path.join(path, name))[
            writers.leaf_key(quantized)]))
    arr = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
  except Exception as exc:  # orbax/tensorstore raise many types for damaged items
    raise errors.CheckpointError(
        f"{path}: tensor {entry['name']!r} ({entry['item']}) is damaged: "
        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None
  if not quantized:
    if list(arr.shape) != list(entry["shape"]):
      raise errors.CheckpointError(
          f"{path}: tensor {entry['name']!r} has shape {list(arr.shape)}, metadata says "
          f"{entry['shape']}.")
    return arr
  try:
    qt = qtensor.validate(itq3s_jax.QuantizedTensor(
        data=jnp.asarray(arr), format=entry["format"], k=int(entry["shape"][-1]),
        seed=int(entry["seed"]), rounding=entry.get("rounding", "nearest")))
    if list(qt.shape) != list(entry["shape"]):
      raise ValueError(f"codes of shape {list(qt.shape)}, metadata says {entry['shape']}")
    return qt
  except (ValueError, TypeError, KeyError) as exc:
    raise errors.CheckpointError(f"{path}: tensor {entry['name']!r}: {exc}") from None


def iter_tensors(path: str) -> Iterator[tuple[dict, Tensor]]:
  """Yields (metadata entry, tensor) one at a time, in checkpoint order."""
  meta = read_metadata(path)
  for entry in meta["tensors"]:
    yield entry, _restore(os.fspath(path), entry)


def load(path: str) -> dict[str, Tensor]:
  """Restores an itq3s orbax checkpoint without a target tree.

  Args:
    path: a directory written by ``convert`` (or ``itq3s convert``).

  Returns:
    {tensor name: QuantizedTensor (data uint8 (N, row_nbytes), shape (N, K))
    for quantized weights, or np.ndarray (original dtype) for kept ones}.
    Transposed Flax kernels come back as (out, in) QuantizedTensors.

  Raises:
    CheckpointError: not an itq3s checkpoint, or a damaged one.
  """
  return {entry["name"]: t for entry, t in iter_tensors(path)}


def load_tree(path: str, sep: str = "/") -> dict:
  """``load`` nested by splitting names on ``sep`` (orbax sources join keys with "/").

  ``load_tree(path)["params"]`` of a converted linen checkpoint is a params
  tree for ``itq3s_jax.flax.QuantizedDense`` layers: kernels are (out, in)
  QuantizedTensors, exactly what ``itq3s_jax.flax.quantize_params`` makes.
  """
  tree: dict = {}
  for name, t in load(path).items():
    *parents, leaf = name.split(sep)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise errors.CheckpointError(f"{path}: tensor name {name!r} clashes with another.")
    node[leaf] = t
  return tree
