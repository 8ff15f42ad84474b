"""An orbax checkpoint of (Flax) params as a conversion source, one leaf at a time.

The tree's shapes and dtypes come from orbax's metadata (no array is read);
each leaf is then restored alone with ``PyTreeRestore(partial_restore=True)``
as a NumPy array. Names are the dict keys joined with ``/``. Flax ``kernel``
leaves are ``(in, out)``: they are marked ``k_axis=0`` so conversion
transposes them to the library's ``(out, in)`` before quantizing.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import source_types


def _key_str(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def open_orbax(path: str) -> "source_types.Source":
  """Opens an orbax pytree checkpoint directory (the one holding ``_METADATA``)."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "itq3s.json")) or os.path.isdir(
      os.path.join(path, "itq3s")):
    raise errors.CheckpointError(f"{path}: already an itq3s checkpoint; nothing to convert.")
  if not os.path.isfile(os.path.join(path, "_METADATA")):
    raise errors.CheckpointError(
        f"{path}: an orbax directory without a pytree _METADATA; point at the item "
        "directory that holds the params (e.g. CKPT/<step>/<item>).")
  try:
    with ocp.StandardCheckpointer() as c:
      tree = c.metadata(path).item_metadata.tree
  except Exception as exc:  # orbax raises many types for a bad directory
    raise errors.CheckpointError(f"{path}: unreadable orbax metadata ({exc}).") from None
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  infos, keys = [], {}
  for kp, meta in leaves:
    parts = tuple(_key_str(k) for k in kp)
    name = "/".join(parts)
    shape = tuple(int(d) for d in getattr(meta, "shape", ()))
    try:
      dtype = np.dtype(getattr(meta, "dtype", None))
    except TypeError:
      raise errors.CheckpointError(f"{path}: leaf {name!r} is not an array.") from None
    k_axis = 0 if parts[-1] == "kernel" and len(shape) == 2 else -1
    infos.append(source_types.TensorInfo(name, shape, dtype, k_axis))
    keys[name] = parts
  files = tuple(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)

  def read(name: str) -> np.ndarray:
    item = restore_args = None
    for part in reversed(keys[name]):
      item = {part: item if item is not None else 0}
      restore_args = {part: restore_args if restore_args is not None
                      else ocp.RestoreArgs(restore_type=np.ndarray)}
    try:
      with ocp.PyTreeCheckpointer() as c:
        out = c.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    except Exception as exc:  # a truncated/corrupt array file
      raise errors.CheckpointError(f"{path}: cannot restore leaf {name!r} ({exc}).") from None
    for part in keys[name]:
      out = out[part]
    return np.asarray(out)

  return source_types.Source("orbax", path, files, tuple(infos), read)
