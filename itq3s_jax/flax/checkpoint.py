"""Save an NNX model to, and restore it from, the one itq3s checkpoint layout.

:func:`save` writes the layout of ``itq3s convert`` (``checkpoint/writers.py``):
one entry per state variable, named by its dotted path; a ``QuantizedLinear``'s
codes are the entry ``<layer>.kernel`` with ``transposed: true``, exactly as a
conversion of the float model's Flax params names them. So :func:`restore`
reads either writer's checkpoints, and ``itq3s inspect`` opens both.

:func:`restore` fills an abstract model (``nnx.eval_shape(build)``): every
``nnx.Linear`` whose kernel the checkpoint holds quantized becomes a
``QuantizedLinear`` with the stored format, seed and rounding (so the float
architecture is enough), and every other variable takes the stored array.
Names are compared with ``/`` and ``.`` as the same separator (orbax sources
join keys with ``/``). Leaves whose abstract value carries a sharding are
placed with it.

>>> import tempfile, os, jax.numpy as jnp
>>> from flax import nnx
>>> from itq3s_jax import flax as qflax
>>> class Net(nnx.Module):
...   def __init__(self, rngs):
...     self.fc = nnx.Linear(64, 8, rngs=rngs)
>>> model, _ = qflax.quantize_model(Net(nnx.Rngs(0)))
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> qflax.save(path, model)
>>> restored = qflax.restore(path, nnx.eval_shape(lambda: Net(nnx.Rngs(1))))
>>> x = jnp.ones((1, 64))
>>> type(restored.fc).__name__, bool(jnp.all(restored.fc(x) == model.fc(x)))
('QuantizedLinear', True)
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import reader
from itq3s_jax.checkpoint import writers
from itq3s_jax.flax import nnx as qnnx
from itq3s_jax.flax import state as state_lib

M = TypeVar("M", bound=nnx.Module)
KERNEL = "kernel"


def canonical(name: str) -> str:
  """A tensor name with ``/`` and ``.`` as one separator: ``layers/0/fc`` -> ``layers.0.fc``."""
  return name.replace("/", ".")


def _entries(model: nnx.Module):
  """(entry, array, quantized) for every state variable of ``model``, in state order."""
  layers = {path: m for path, m in nnx.iter_modules(model)
            if isinstance(m, qnnx.QuantizedLinear)}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var.get_value()
    owner = layers.get(path[:-1])
    if owner is not None and path[-1] == "weight":
      qt = owner.qt
      yield ({"name": state_lib.dotted(path[:-1] + (KERNEL,)), "kind": "quantized",
              "format": qt.format, "seed": qt.seed, "rounding": qt.rounding,
              "shape": list(qt.shape), "transposed": True, "nbytes": qt.nbytes,
              "bits_per_weight": qt.bits_per_weight,
              "dtype": np.dtype(owner.param_dtype).name}, np.asarray(qt.data), True)
      continue
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
      raise TypeError(f"{state_lib.dotted(path)} holds PRNG keys; split them off "
                      "(nnx.split(model, nnx.RngState, ...)) before saving.")
    arr = np.asarray(value)
    yield ({"name": state_lib.dotted(path), "kind": "array", "shape": list(arr.shape),
            "dtype": arr.dtype.name, "nbytes": int(arr.nbytes)}, arr, False)


def save(path: str | os.PathLike[str], model: nnx.Module, *, force: bool = False) -> None:
  """Writes ``model``'s state (codes, float params) to the checkpoint directory ``path``.

  Args:
    path: checkpoint directory, relative or absolute (must not exist unless
      ``force``); written atomically.
    model: an NNX model, typically after :func:`quantize_model`.
    force: overwrite an existing checkpoint.
  """
  writers.save_tensors(os.fspath(path), _entries(model),
                       {"created_by": "itq3s_jax.flax.save", "source": {"kind": "nnx"}},
                       overwrite=force)


def restore(path: str | os.PathLike[str], abstract_model: M) -> M:
  """Restores a checkpoint written by :func:`save` or ``itq3s convert`` into a model.

  Args:
    path: checkpoint directory (relative or absolute).
    abstract_model: the architecture, usually ``nnx.eval_shape(build)`` (float
      or already quantized; no weights are computed). It is consumed: its
      ``nnx.Linear`` layers stored quantized are replaced.

  Returns:
    The model with the stored arrays.

  Raises:
    CheckpointError: not an itq3s checkpoint, a damaged one, or one whose
      tensors do not fit the model (names the first mismatches).
  """
  path = os.fspath(path)
  stored = {canonical(e["name"]): (e, t) for e, t in reader.iter_tensors(path)}
  used: set[str] = set()
  arrays: dict[tuple, Any] = {}
  for mpath, module in list(nnx.iter_modules(abstract_model)):
    if not mpath or not isinstance(module, (nnx.Linear, qnnx.QuantizedLinear)):
      continue
    name = state_lib.dotted(mpath + (KERNEL,))
    entry, qt = stored.get(name, (None, None))
    if entry is None or entry["kind"] != "quantized":
      if isinstance(module, qnnx.QuantizedLinear):
        raise errors.CheckpointError(f"{path}: the model's quantized layer "
                                     f"{state_lib.dotted(mpath)} has no quantized {name!r}.")
      continue
    state_lib.set_submodule(abstract_model, mpath, _quantized_layer(path, name, module, qt))
    arrays[mpath + ("weight",)] = np.asarray(qt.data)
    used.add(name)
  for vpath, var in nnx.to_flat_state(nnx.state(abstract_model)):
    if vpath in arrays:
      continue
    name = state_lib.dotted(vpath)
    if name not in stored:
      raise errors.CheckpointError(f"{path}: no tensor {name!r} for the model's variable "
                                   f"of shape {tuple(var.get_value().shape)}.")
    entry, t = stored[name]
    if entry["kind"] == "quantized":
      raise errors.CheckpointError(f"{path}: {name!r} is stored quantized but the model "
                                   "holds it as a float array (not an nnx.Linear kernel).")
    arrays[vpath] = t
    used.add(name)
  extra = sorted(set(stored) - used)
  if extra:
    raise errors.CheckpointError(f"{path}: {len(extra)} stored tensors fit no variable of the "
                                 f"model (first: {extra[:3]}); restore into the model the "
                                 "checkpoint was made from.")
  try:
    return state_lib.assign(abstract_model, arrays)
  except ValueError as exc:
    raise errors.CheckpointError(f"{path}: {exc}") from None


def _quantized_layer(path: str, name: str, module, qt) -> qnnx.QuantizedLinear:
  """An abstract QuantizedLinear for a stored kernel, checked against the model's layer.

  Its weight is a ShapeDtypeStruct placed like the layer's (the kernel's
  sharding transposed for an nnx.Linear); its bias is the layer's abstract bias.
  """
  want = (module.out_features, module.in_features)
  if tuple(qt.shape) != want:
    raise errors.CheckpointError(f"{path}: {name!r} is {tuple(qt.shape)} (out, in) but the "
                                 f"model's layer is {want}.")
  if isinstance(module, qnnx.QuantizedLinear):
    if (module.format, module.seed) != (qt.format, qt.seed):
      raise errors.CheckpointError(
          f"{path}: {name!r} is {qt.format!r} with seed {qt.seed}; the model's layer is "
          f"{module.format!r} with seed {module.seed}.")
    method, bias_var, weight_var = module.method, module.bias, module.weight
    sharding = getattr(weight_var.get_value(), "sharding", None)
    weight_meta = qnnx.sharding_metadata(weight_var, transpose=False)
  else:
    method, bias_var, weight_var = "auto", module.bias, module.kernel
    sharding = qnnx.transposed_sharding(getattr(weight_var.get_value(), "sharding", None))
    weight_meta = qnnx.sharding_metadata(weight_var, transpose=True)
  new = qnnx.QuantizedLinear(
      module.in_features, module.out_features, format=qt.format, seed=qt.seed,
      use_bias=bias_var is not None, dtype=module.dtype, param_dtype=module.param_dtype,
      method=method, weight=qt,
      bias=None if bias_var is None else np.zeros(module.out_features, module.param_dtype))
  new.rounding = qt.rounding
  new.weight.set_metadata(**weight_meta)  # after construction: no mesh context is needed
  new.weight.set_value(jax.ShapeDtypeStruct(qt.data.shape, qt.data.dtype, sharding=sharding))
  if bias_var is not None:  # filled from the checkpoint with the other float arrays
    new.bias.set_value(bias_var.get_value())
  return new
