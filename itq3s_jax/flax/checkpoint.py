"""Orbax round trip of a quantized NNX model.

Static fields (format, seed, logical shape, rounding) are not orbax leaves: they
live in the model's structure. So a restore needs an abstract model built the
same way, and :func:`save` also writes a small JSON item recording each
quantized layer's format/seed/shape, which :func:`restore` checks, and its
rounding, which :func:`restore` sets (a GPTQ-coded model restores into an
abstract model built by round-to-nearest) (formats with equal
byte sizes, e.g. ``uniform3`` and ``uniform3_rot``, would otherwise restore
silently into the wrong decoder).

Recipe (what these helpers do)::

  import orbax.checkpoint as ocp
  state = nnx.to_pure_dict(nnx.state(model))            # uint8 codes, float biases
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    c.save(path, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         itq3s=ocp.args.JsonSave(layers)))
  abstract = nnx.eval_shape(lambda: quantize_model(build(), format=...)[0])
  graphdef, abs_state = nnx.split(abstract)
  restored = c.restore(path, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(nnx.to_pure_dict(abs_state)),
      itq3s=ocp.args.JsonRestore()))
  nnx.replace_by_pure_dict(abs_state, restored.state)
  model = nnx.merge(graphdef, abs_state)

Sharded restore: give the abstract leaves concrete shardings, e.g.
``graphdef, abs_state = nnx.get_abstract_model(lambda: quantize_model(build(),
...)[0], mesh)`` and ``restore(path, nnx.merge(graphdef, abs_state))`` (the
kernels annotated with ``out_sharding`` as in tests/sharding_test.py); orbax
then places each array with the sharding of its abstract leaf.

>>> import tempfile, os, jax.numpy as jnp
>>> from flax import nnx
>>> from itq3s_jax import flax as qflax
>>> class Net(nnx.Module):
...   def __init__(self, rngs):
...     self.fc = nnx.Linear(64, 8, rngs=rngs)
>>> def build(seed):
...   return qflax.quantize_model(Net(nnx.Rngs(seed)))[0]
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> qflax.save(path, build(0))
>>> model = qflax.restore(path, nnx.eval_shape(lambda: build(1)))
>>> x = jnp.ones((1, 64))
>>> bool(jnp.all(model.fc(x) == build(0).fc(x)))
True
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import orbax.checkpoint as ocp
from flax import nnx

from itq3s_jax.flax import _core
from itq3s_jax.flax import nnx as qnnx

M = TypeVar("M", bound=nnx.Module)
_VERSION = 1


def _layers(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """{dotted path: {format, seed, shape}} of every QuantizedLinear."""
  return {_core.dotted(path): {"format": m.format, "seed": m.seed,
                               "shape": [m.out_features, m.in_features]}
          for path, m in nnx.iter_modules(model) if isinstance(m, qnnx.QuantizedLinear)}


def _roundings(model: nnx.Module) -> dict[str, str]:
  """{dotted path: rounding} of every QuantizedLinear (which bound its codes certify)."""
  return {_core.dotted(path): m.rounding for path, m in nnx.iter_modules(model)
          if isinstance(m, qnnx.QuantizedLinear)}


def save(path: str | os.PathLike[str], model: nnx.Module, *, force: bool = False) -> None:
  """Writes ``model``'s state (codes, float params) and layer metadata to ``path``.

  Args:
    path: checkpoint directory (made absolute; must not exist unless ``force``).
    model: an NNX model, typically after :func:`quantize_model`.
    force: overwrite an existing checkpoint.
  """
  state = nnx.to_pure_dict(nnx.state(model))
  meta = {"version": _VERSION, "layers": _layers(model), "rounding": _roundings(model)}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(path), force=force,
               args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       itq3s=ocp.args.JsonSave(meta)))


def restore(path: str | os.PathLike[str], abstract_model: M) -> M:
  """Restores a model written by :func:`save` into the structure of ``abstract_model``.

  Args:
    path: checkpoint directory.
    abstract_model: the same architecture, quantized the same way, usually
      ``nnx.eval_shape(lambda: quantize_model(build(), ...)[0])`` (cheap: no
      weights are computed). Leaves carrying a sharding restore sharded.

  Returns:
    A new model with the saved arrays.

  Raises:
    ValueError: the checkpoint's quantized layers (paths, formats, seeds,
      shapes) differ from the abstract model's.
  """
  graphdef, abs_state = nnx.split(abstract_model)
  target = nnx.to_pure_dict(abs_state)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(os.path.abspath(path), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), itq3s=ocp.args.JsonRestore()))
  saved, want = restored.itq3s.get("layers", {}), _layers(abstract_model)
  if saved != want:
    diff = sorted(p for p in set(saved) | set(want) if saved.get(p) != want.get(p))
    raise ValueError(f"checkpoint {path} holds quantized layers that differ from the "
                     f"abstract model at {diff[:5]}: saved {[saved.get(p) for p in diff[:5]]}"
                     f", expected {[want.get(p) for p in diff[:5]]}; build the abstract "
                     "model with the format and seed used when saving.")
  nnx.replace_by_pure_dict(abs_state, restored.state)
  model = nnx.merge(graphdef, abs_state)
  # The abstract model was typically built by round-to-nearest; GPTQ-coded layers
  # get their rounding back so error_bound certifies the right bound.
  roundings = restored.itq3s.get("rounding", {})
  for path, m in nnx.iter_modules(model):
    if isinstance(m, qnnx.QuantizedLinear):
      m.rounding = roundings.get(_core.dotted(path), "nearest")
  return model
