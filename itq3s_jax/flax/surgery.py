"""``quantize_model``: NNX surgery replacing ``nnx.Linear`` by ``QuantizedLinear``.

Selection is one :class:`itq3s_jax.QuantRule` (shared with the linen
``quantize_params`` and with checkpoint conversion): a layer at dotted path
``p`` (``"layers.0.mlp.up"``; integers index ``nnx.List``) is quantized when
``rule.decide(p, kernel.shape, kernel.dtype, k_axis=0)`` says so. Every other
``nnx.Linear`` is kept in float and reported with its reason. Embeddings,
norms and other modules are never touched.

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

from flax import nnx

from itq3s_jax._src import config
from itq3s_jax.flax import _core
from itq3s_jax.flax import calibrate
from itq3s_jax.flax import nnx as qnnx
from itq3s_jax.flax import state as state_lib

M = TypeVar("M", bound=nnx.Module)


def quantize_model(model: M, rule: config.QuantRule | None = None, *,
                   hessians: Mapping[str, Any] | None = None,
                   gptq: config.GptqConfig | None = None,
                   method: str = "auto") -> tuple[M, _core.QuantizationReport]:
  """Replaces the selected ``nnx.Linear`` layers of ``model`` by ``QuantizedLinear``.

  The model is modified in place (like Flax's surgery guide) and returned.
  Each layer is quantized eagerly from its kernel (in, out) transposed to
  (out, in); biases and kernel sharding annotations carry over. A Linear
  shared by several paths is selected by its first path and every reference
  gets the same QuantizedLinear. Under ``nnx.eval_shape`` the same call builds
  the abstract quantized model.

  Args:
    model: an NNX module; its ``nnx.Linear`` descendants are candidates (the
      root itself is never replaced: use ``QuantizedLinear.from_linear``).
    rule: which layers and which format (:class:`itq3s_jax.QuantRule`); None:
      ``QuantRule()`` (every layer, itq3_t, seed 0).
    hessians: optional calibration statistics {dotted path: Sigma (K, K)}
      (``itq3s_jax.calibration.calibrate``): selected layers found here are
      rounded with GPTQ in the coding domain, the others round to nearest.
      Layers sharing one Sigma array are rounded in one call.
    gptq: options of the GPTQ rounding (:class:`itq3s_jax.GptqConfig`).
    method: ``itq3s_jax.matmul`` method of the new layers.

  Returns:
    ``(model, report)``: the same model object, and a
    :class:`QuantizationReport` listing quantized and skipped layers.

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
      if isinstance(m, nnx.Linear) and name in hessians and _decide(rule, name, m).quantize:
        selected[name] = hessians[name]
    calibrated = calibrate.quantize_weights(model, selected, format=rule.format,
                                            seed=rule.seed, gptq=gptq)
  quantized, skipped = [], []
  done: dict[int, qnnx.QuantizedLinear] = {}  # id(linear) -> its replacement
  kept: set[int] = set()
  while True:
    # Collect first: replacing while iterating would walk the new modules. A
    # Linear shared by several paths is listed once per pass (at its first
    # path), so passes repeat until every reference to it is replaced by the
    # same QuantizedLinear: weight tying survives the surgery.
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if path and isinstance(m, nnx.Linear) and id(m) not in kept]
    if not targets:
      break
    for path, linear in targets:
      if id(linear) not in done:
        name = state_lib.dotted(path)
        shape = (linear.out_features, linear.in_features)
        decision = _decide(rule, name, linear)
        if not decision.quantize:
          skipped.append(_core.Skipped(name, shape, decision.reason))
          kept.add(id(linear))
          continue
        done[id(linear)] = qnnx.QuantizedLinear.from_linear(
            linear, format=rule.format, seed=rule.seed, method=method,
            weight=calibrated.get(name))
        quantized.append(_core.Quantized(name, shape, int(done[id(linear)].weight[...].size)))
      state_lib.set_submodule(model, path, done[id(linear)])
  return model, _core.QuantizationReport(rule.format, tuple(quantized), tuple(skipped))


def _decide(rule: config.QuantRule, name: str, linear: nnx.Linear) -> config.Decision:
  kernel = linear.kernel
  return rule.decide(name, (linear.in_features, linear.out_features),
                     getattr(kernel, "dtype", linear.param_dtype), k_axis=0)
