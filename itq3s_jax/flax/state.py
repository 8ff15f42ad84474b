"""NNX model plumbing shared by surgery, calibration, checkpoints and loaders.

Paths are tuples of attribute names and ``nnx.List``/``nnx.Dict`` keys, as
``nnx.iter_modules`` and ``nnx.to_flat_state`` give them; :func:`dotted` is
their one spelling as text (``("layers", 0, "mlp")`` -> ``"layers.0.mlp"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)
Path = tuple[str | int, ...]


def dotted(path: Path) -> str:
  """('layers', 0, 'mlp') -> 'layers.0.mlp'."""
  return ".".join(str(p) for p in path)


def _by_item(parent: Any, key: str | int) -> bool:
  # nnx.List / nnx.Dict and plain lists/dicts are indexed; modules use attributes.
  return isinstance(key, int) or isinstance(parent, (Mapping, Sequence))


def get_submodule(model: nnx.Module, path: Path) -> Any:
  node = model
  for key in path:
    node = node[key] if _by_item(node, key) else getattr(node, key)
  return node


def set_submodule(model: nnx.Module, path: Path, new: Any) -> None:
  """Replaces the child at ``path`` (non-empty) of ``model`` by ``new``, in place."""
  parent = get_submodule(model, path[:-1])
  if _by_item(parent, path[-1]):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def assign(abstract_model: M, arrays: Mapping[Path, Any]) -> M:
  """Returns ``abstract_model`` with every variable set from ``arrays``.

  Args:
    abstract_model: a model from ``nnx.eval_shape`` (variables hold
      ``jax.ShapeDtypeStruct``s; a struct with a sharding places its array so).
      Variables that already hold an array are set too.
    arrays: state path (as in ``nnx.to_flat_state``) -> array of exactly the
      variable's shape; cast to the variable's dtype.

  Raises:
    ValueError: a variable has no array, an array has no variable, or shapes
      differ (names the path, so layout bugs show up at load time).
  """
  graphdef, state = nnx.split(abstract_model)
  flat = nnx.to_flat_state(state)
  paths = {p for p, _ in flat}
  missing = sorted(map(str, paths - set(arrays)))
  extra = sorted(map(str, set(arrays) - paths))
  if missing or extra:
    raise ValueError(f"checkpoint/model mismatch: missing {missing[:5]}, unexpected {extra[:5]}.")
  for path, var in flat:
    spec = var.get_value()
    arr = arrays[path]
    if tuple(np.shape(arr)) != tuple(spec.shape):
      raise ValueError(f"{'/'.join(map(str, path))}: checkpoint shape {np.shape(arr)} != "
                       f"model shape {spec.shape}.")
    value = jnp.asarray(arr, spec.dtype)
    sharding = getattr(spec, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
      value = jax.device_put(value, sharding)
    var.set_value(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
