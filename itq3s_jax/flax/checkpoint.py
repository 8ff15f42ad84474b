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
from typing import Any, Mapping, TypeVar

import jax
import numpy as np
from flax import nnx

import itq3s_jax
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import reader
from itq3s_jax.checkpoint import writers
from itq3s_jax.flax import nnx as qnnx
from itq3s_jax.flax import nnx_general as qgeneral
from itq3s_jax.flax import state as state_lib

M = TypeVar("M", bound=nnx.Module)
KERNEL = "kernel"
QUANTIZED = (qnnx.QuantizedLinear, qgeneral.QuantizedEinsum)
DENSE = (nnx.Linear,) + qgeneral.GENERAL_LAYERS + QUANTIZED


def canonical(name: str) -> str:
  """A tensor name with ``/`` and ``.`` as one separator: ``layers/0/fc`` -> ``layers.0.fc``."""
  return name.replace("/", ".")


def _entries(model: nnx.Module):
  """(entry, array, quantized) for every state variable of ``model``, in state order."""
  layers = {path: m for path, m in nnx.iter_modules(model)
            if isinstance(m, QUANTIZED)}
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
  return restore_tensors(abstract_model, {e["name"]: t for e, t in reader.iter_tensors(path)},
                         origin=path)


def restore_tensors(abstract_model: M, tensors: Mapping[str, Any], *, origin: str = "tensors"
                    ) -> M:
  """:func:`restore` from tensors already in memory, named by model path.

  Loaders that rename a foreign checkpoint (Hugging Face, GGUF) to model paths
  call this, so every source fills a model the same way.

  Args:
    abstract_model: as for :func:`restore`; consumed.
    tensors: {dotted state path (``/`` or ``.``): float array, or a
      QuantizedTensor (out, in) for an ``nnx.Linear`` kernel stored quantized,
      named ``<layer>.kernel``}.
    origin: where the tensors came from, for error messages.

  Returns:
    The model with the given arrays; every ``nnx.Linear`` whose kernel is a
    QuantizedTensor becomes a ``QuantizedLinear`` with its format, seed and
    rounding.

  Raises:
    CheckpointError: a variable without a tensor, a tensor without a
      variable, or a shape mismatch.
  """
  stored = {canonical(k): v for k, v in tensors.items()}
  used: set[str] = set()
  arrays: dict[tuple, Any] = {}
  for mpath, module in list(nnx.iter_modules(abstract_model)):
    if not mpath or not isinstance(module, DENSE):
      continue
    name = state_lib.dotted(mpath + (KERNEL,))
    qt = stored.get(name)
    if not isinstance(qt, itq3s_jax.QuantizedTensor):
      if isinstance(module, QUANTIZED):
        raise errors.CheckpointError(f"{origin}: the model's quantized layer "
                                     f"{state_lib.dotted(mpath)} has no quantized {name!r}.")
      continue
    build = (_quantized_layer if isinstance(module, (nnx.Linear, qnnx.QuantizedLinear))
             else _quantized_general)
    state_lib.set_submodule(abstract_model, mpath, build(origin, name, module, qt))
    arrays[mpath + ("weight",)] = np.asarray(qt.data)
    used.add(name)
  for vpath, var in nnx.to_flat_state(nnx.state(abstract_model)):
    if vpath in arrays:
      continue
    name = state_lib.dotted(vpath)
    if name not in stored:
      raise errors.CheckpointError(f"{origin}: no tensor {name!r} for the model's variable "
                                   f"of shape {tuple(var.get_value().shape)}.")
    t = stored[name]
    if isinstance(t, itq3s_jax.QuantizedTensor):
      raise errors.CheckpointError(f"{origin}: {name!r} is stored quantized but the model "
                                   "holds it as a float array (not an nnx.Linear kernel).")
    arrays[vpath] = t
    used.add(name)
  extra = sorted(set(stored) - used)
  if extra:
    raise errors.CheckpointError(f"{origin}: {len(extra)} stored tensors fit no variable of the "
                                 f"model (first: {extra[:3]}); restore into the model the "
                                 "checkpoint was made from.")
  try:
    return state_lib.assign(abstract_model, arrays)
  except ValueError as exc:
    raise errors.CheckpointError(f"{origin}: {exc}") from None


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
    sharding = qnnx.transposed_sharding(getattr(weight_var.get_value(), "sharding", None),
                                        module.in_features)
    weight_meta = qnnx.sharding_metadata(weight_var, transpose=True, k=module.in_features)
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


def _quantized_general(path: str, name: str, module, qt) -> qgeneral.QuantizedEinsum:
  """An abstract QuantizedEinsum for a stored (N, K) kernel of a LinearGeneral/Einsum layer."""
  try:
    plan = qgeneral.plan_of(module)
  except NotImplementedError as exc:
    raise errors.CheckpointError(f"{path}: {name!r} is stored quantized but the model's "
                                 f"layer cannot take it: {exc}.") from None
  if tuple(qt.shape) != (plan.n, plan.k):
    raise errors.CheckpointError(f"{path}: {name!r} is {tuple(qt.shape)} (N, K) but the "
                                 f"model's layer is {(plan.n, plan.k)}.")
  if isinstance(module, qgeneral.QuantizedEinsum):
    kw = {"einsum_str": module.einsum_str} if module.axis is None else {"axis": module.axis}
    method = module.method
  else:
    kw = ({"axis": tuple(module.axis)} if isinstance(module, nnx.LinearGeneral)
          else {"einsum_str": module.einsum_str})
    method = "auto"
  bias_var = module.bias
  new = qgeneral.QuantizedEinsum(
      qt, plan, dtype=module.dtype, param_dtype=module.param_dtype, method=method,
      bias=None if bias_var is None else np.zeros(bias_var.shape, module.param_dtype), **kw)
  new.weight.set_value(jax.ShapeDtypeStruct(qt.data.shape, qt.data.dtype))
  if bias_var is not None:
    new.bias.set_value(bias_var.get_value())
  return new
