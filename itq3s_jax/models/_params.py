"""Filling an abstract NNX model with checkpoint arrays, checked path by path."""

from __future__ import annotations

from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)
Path = tuple[str | int, ...]


def assign(abstract_model: M, arrays: Mapping[Path, np.ndarray]) -> M:
  """Returns ``abstract_model`` with every variable set from ``arrays``.

  Args:
    abstract_model: a model from ``nnx.eval_shape`` (variables hold
      ``jax.ShapeDtypeStruct``s).
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
    spec: jax.ShapeDtypeStruct = var.get_value()
    arr = np.asarray(arrays[path])
    if arr.shape != spec.shape:
      raise ValueError(f"{'/'.join(map(str, path))}: checkpoint shape {arr.shape} != model shape {spec.shape}.")
    var.set_value(jnp.asarray(arr, spec.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
