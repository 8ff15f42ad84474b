"""``quantize_model``: NNX surgery replacing every dense layer by a quantized one.

``nnx.Linear`` -> ``QuantizedLinear``; ``nnx.LinearGeneral`` / ``nnx.Einsum``
-> ``QuantizedEinsum``. Selection is one :class:`itq3s_jax.QuantRule` (shared
with the linen ``quantize_params`` and with checkpoint conversion): a layer at
dotted path ``p`` (``"layers.0.mlp.up"``; integers index ``nnx.List``) is
quantized when ``rule.decide(p, kernel.shape, kernel.dtype, k_axis=...)`` says
so, ``k_axis`` naming the kernel's contracted axes. Every other weight of two
or more axes is left float and reported with its reason. Embeddings, norms
and other modules are never touched.

>>> from flax import nnx
>>> import itq3s_jax
>>> from itq3s_jax import flax as qflax
>>> class MLP(nnx.Module):
...   def __init__(self, rngs):
...     self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)])
>>> model, report = qflax.quantize_model(MLP(nnx.Rngs(0)), itq3s_jax.QuantRule(exclude=r"\\.1$"))
>>> [q.path for q in report.quantized], [s.path for s in report.skipped]
(['layers.0'], ['layers.1'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import tqdm
from flax import nnx

from itq3s_jax._src import config
from itq3s_jax.flax import _core
from itq3s_jax.flax import calibrate
from itq3s_jax.flax import nnx as qnnx
from itq3s_jax.flax import nnx_general as qgeneral
from itq3s_jax.flax import state as state_lib

M = TypeVar("M", bound=nnx.Module)


LAYERS = (nnx.Linear,) + qgeneral.GENERAL_LAYERS


def quantize_model(model: M, rule: config.QuantRule | None = None, *,
                   hessians: Mapping[str, Any] | None = None,
                   gptq: config.GptqConfig | None = None,
                   method: str = "auto", progress: bool = False
                   ) -> tuple[M, _core.QuantizationReport]:
  """Replaces the selected dense layers of ``model`` by quantized ones.

  ``nnx.Linear`` becomes ``QuantizedLinear``; ``nnx.LinearGeneral`` and
  ``nnx.Einsum`` become ``QuantizedEinsum`` (their kernel coded as its (N, K)
  view: contracted axes flattened into K). The model is modified in place
  (like Flax's surgery guide) and returned. Biases and kernel sharding
  annotations carry over. A layer shared by several paths is selected by its
  first path and every reference gets the same replacement. Under
  ``nnx.eval_shape`` the same call builds the abstract quantized model.

  Every other float ``nnx.Param`` of 2 or more axes is listed in the report's
  ``skipped`` with its reason: kept by the rule (embeddings, ``exclude``...),
  or selected but not quantizable by surgery (an ``nnx.Embed`` table, a
  convolution, a bare ``nnx.Param`` contracted by the module's own code,
  an einsum with batch weight axes); ``itq3s_jax.qwix`` intercepts the
  contractions themselves and covers the bare-parameter case.

  Args:
    model: an NNX module; its dense layers are candidates (the root itself is
      never replaced: use ``QuantizedLinear.from_linear``).
    rule: which layers and which format (:class:`itq3s_jax.QuantRule`); None:
      ``QuantRule()`` (every layer, itq3_t, seed 0).
    hessians: optional calibration statistics {dotted path: Sigma (K, K)}
      (``itq3s_jax.calibration.calibrate``): selected ``nnx.Linear`` layers
      found here are rounded with GPTQ in the coding domain, the others round
      to nearest. Layers sharing one Sigma array are rounded in one call.
    gptq: options of the GPTQ rounding (:class:`itq3s_jax.GptqConfig`).
    method: ``itq3s_jax.matmul`` method of the new layers.
    progress: show tqdm bars (stderr) over the GPTQ groups and the layers.

  Returns:
    ``(model, report)``: the same model object, and a
    :class:`QuantizationReport` listing quantized and skipped weights.

  Raises:
    ValueError: a weight the format cannot code (NaN/Inf, values beyond its
      range).
    TypeError: ``model`` is not an ``nnx.Module``, ``rule`` not a QuantRule,
      or ``gptq`` without ``hessians``.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"quantize_model needs an nnx.Module, got {type(model).__name__}; "
                    "for linen parameter trees use quantize_params.")
  rule = _core.check_rule(rule)
  if gptq is not None and hessians is None:
    raise TypeError("gptq= options need hessians=...")
  calibrated = {}
  if hessians is not None:
    selected = {}
    for path, m in nnx.iter_modules(model):
      name = state_lib.dotted(path)
      if isinstance(m, nnx.Linear) and name in hessians and _decide(rule, name, m)[0].quantize:
        selected[name] = hessians[name]
    calibrated = calibrate.quantize_weights(model, selected, format=rule.format,
                                            seed=rule.seed, gptq=gptq, progress=progress)
  quantized, skipped = [], []
  done: dict[int, nnx.Module] = {}  # id(layer) -> its replacement
  kept: set[int] = set()
  while True:
    # Collect first: replacing while iterating would walk the new modules. A
    # layer shared by several paths is listed once per pass (at its first
    # path), so passes repeat until every reference to it is replaced by the
    # same module: weight tying survives the surgery.
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if path and isinstance(m, LAYERS) and id(m) not in kept]
    if not targets:
      break
    for path, layer in tqdm.tqdm(targets, desc="quantize", unit="layer", leave=False,
                                 disable=not progress):
      if id(layer) not in done:
        name = state_lib.dotted(path)
        decision, shape = _decide(rule, name, layer)
        if not decision.quantize:
          skipped.append(_core.Skipped(name, shape, decision.reason))
          kept.add(id(layer))
          continue
        done[id(layer)] = _replacement(layer, rule, method, calibrated.get(name))
        quantized.append(_core.Quantized(name, shape, int(done[id(layer)].weight[...].size)))
      state_lib.set_submodule(model, path, done[id(layer)])
  skipped += _unquantized_params(model, rule, {s.path for s in skipped})
  return model, _core.QuantizationReport(rule.format, tuple(quantized), tuple(skipped))


def _replacement(layer, rule: config.QuantRule, method: str, weight):
  if isinstance(layer, nnx.Linear):
    return qnnx.QuantizedLinear.from_linear(layer, format=rule.format, seed=rule.seed,
                                            method=method, weight=weight)
  return qgeneral.QuantizedEinsum.from_module(layer, format=rule.format, seed=rule.seed,
                                              method=method)


def _decide(rule: config.QuantRule, name: str, layer) -> tuple[config.Decision, tuple]:
  """(the rule's decision, the weight's (N, K) shape) for a dense layer."""
  kernel = layer.kernel
  dtype = getattr(kernel, "dtype", layer.param_dtype)
  if isinstance(layer, nnx.Linear):
    shape = (layer.out_features, layer.in_features)
    return rule.decide(name, (layer.in_features, layer.out_features), dtype, k_axis=0), shape
  try:
    plan = qgeneral.plan_of(layer)
  except NotImplementedError as exc:
    shape = tuple(kernel.shape)
    decision = rule.decide(name, shape, dtype, k_axis=tuple(range(len(shape) - 1)))
    if decision.quantize or decision.reason.startswith("kept: K="):
      decision = config.Decision(False, f"not quantizable: {exc}")
    return decision, shape
  return rule.decide(name, plan.kernel_shape, dtype, k_axis=plan.k_axes), (plan.n, plan.k)


def _unquantized_params(model: nnx.Module, rule: config.QuantRule, listed: set[str]):
  """Skipped entries for float Params of >= 2 axes outside the dense layers handled above."""
  owners = dict(nnx.iter_modules(model))
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    if getattr(value, "ndim", 0) < 2 or state_lib.dotted(path[:-1]) in listed:
      continue
    owner = owners.get(path[:-1])
    if isinstance(owner, LAYERS + (qnnx.QuantizedLinear, qgeneral.QuantizedEinsum)):
      continue  # a bias, or a layer listed already (kept by the rule)
    name = state_lib.dotted(path)
    k_axis = 0 if value.ndim == 2 else tuple(range(value.ndim - 1))
    decision = rule.decide(name, tuple(value.shape), value.dtype, k_axis=k_axis)
    reason = decision.reason
    if decision.quantize:
      what = "a bare nnx.Param used by the module's own code" if owner is None or not \
          isinstance(owner, (nnx.Embed, nnx.Conv, nnx.ConvTranspose)) else \
          f"an {type(owner).__name__} weight"
      reason = (f"not quantizable by surgery: {what}, not a dense layer "
                "(itq3s_jax.qwix intercepts the contraction itself)")
    out.append(_core.Skipped(name, tuple(value.shape), reason))
  return out
