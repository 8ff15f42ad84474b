"""Reading converted checkpoints back: ``load`` (all tensors) and ``iter_tensors``.

The orbax layout is described in ``writers.py``. The metadata is checked
(sealed, every field typed: ``entries.py``) and every tensor against its entry
(shape and dtype before it is restored, its sha256 after; quantized codes must
decode to finite values: ``qtensor.check_values``), so a damaged or edited
checkpoint raises CheckpointError instead of restoring wrong weights.
"""

from __future__ import annotations

import os
from typing import Iterator

import jax.numpy as jnp

import itq3s_jax
from itq3s_jax._src import safe_files
from itq3s_jax._src.core import qtensor
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import writers

Tensor = "itq3s_jax.QuantizedTensor | np.ndarray"


def read_metadata(path: str) -> dict:
  """The JSON metadata of an itq3s orbax checkpoint: version, seal and every entry checked.

  Raises:
    CheckpointError: not an itq3s checkpoint, another version, or metadata that
      is malformed, edited or damaged (``entries.parse_metadata``).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise errors.CheckpointError(f"{path}: no such file or directory.")
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"{path}: not a directory; an itq3s orbax checkpoint "
                                 "is a directory made by `itq3s convert`.")
  meta_path = os.path.join(path, writers.META_ITEM, "metadata")
  if not os.path.lexists(meta_path):
    raise errors.CheckpointError(f"{path}: not an itq3s checkpoint (no {writers.META_ITEM}/"
                                 "metadata); was the conversion finished?")
  try:
    raw = safe_files.read_bounded(meta_path, entries.MAX_META_BYTES, "metadata file")
  except safe_files.Unreadable as exc:
    raise errors.CheckpointError(f"corrupt metadata: {exc}") from None
  return entries.parse_metadata(raw, meta_path)


def _restore(path: str, entry: dict) -> Tensor:
  """One tensor of a checked entry; its bytes verified against the entry's sha256."""
  arr = writers.read_items(path, entry)
  if entries.digest(arr) != entry["sha256"]:
    raise errors.CheckpointError(
        f"{path}: tensor {entry['name']!r} ({entry['item']}) is damaged: its bytes do not "
        "match the sha256 recorded when it was written.")
  if entry["kind"] != "quantized":
    return arr
  try:
    return qtensor.check_values(itq3s_jax.QuantizedTensor(
        data=jnp.asarray(arr), format=entry["format"], k=entry["shape"][-1],
        seed=entry["seed"], rounding=entry["rounding"]))
  except (ValueError, TypeError) as exc:
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
