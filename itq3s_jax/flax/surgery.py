"""``quantize_model``: NNX surgery replacing ``nnx.Linear`` by ``QuantizedLinear``.

Selection (shared with the linen ``quantize_params``): a layer at dotted path
``p`` (``"layers.0.mlp.up"``; integers index ``nnx.List``) is quantized when
``exclude`` is not found in ``p``, ``include`` is (``re.search``; None matches
everything), its in_features is a multiple of 32 and at least
``min_features``. Every other ``nnx.Linear`` is kept in float and reported
with its reason. Embeddings, norms and other modules are never touched.

>>> from flax import nnx
>>> from itq3s_jax import flax as qflax
>>> class MLP(nnx.Module):
...   def __init__(self, rngs):
...     self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)])
>>> model, report = qflax.quantize_model(MLP(nnx.Rngs(0)), exclude=r"\\.1$")
>>> [q.path for q in report.quantized], [s.path for s in report.skipped]
(['layers.0'], ['layers.1'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from flax import nnx

from itq3s_jax.flax import _core
from itq3s_jax.flax import nnx as qnnx

M = TypeVar("M", bound=nnx.Module)


def _by_item(parent: Any, key: str | int) -> bool:
  # nnx.List / nnx.Dict and plain lists/dicts are indexed; modules use attributes.
  return isinstance(key, int) or isinstance(parent, (Mapping, Sequence))


def _get_child(parent: Any, key: str | int) -> Any:
  return parent[key] if _by_item(parent, key) else getattr(parent, key)


def _set_child(parent: Any, key: str | int, value: nnx.Module) -> None:
  if _by_item(parent, key):
    parent[key] = value
  else:
    setattr(parent, key, value)


def quantize_model(model: M, *, format: str = "itq3_t", include: str | None = None,
                   exclude: str | None = None, min_features: int = 0, seed: int = 0,
                   method: str = "auto", hessians: Mapping[str, Any] | None = None,
                   **gptq_options) -> tuple[M, _core.QuantizationReport]:
  """Replaces the selected ``nnx.Linear`` layers of ``model`` by ``QuantizedLinear``.

  The model is modified in place (like Flax's surgery guide) and returned.
  Each layer is quantized eagerly from its kernel (in, out) transposed to
  (out, in); biases and kernel sharding annotations carry over. A Linear
  shared by several paths is selected by its first path and every reference
  gets the same QuantizedLinear. Under
  ``nnx.eval_shape`` the same call builds the abstract quantized model that
  :func:`itq3s_jax.flax.restore` needs.

  Args:
    model: an NNX module; its ``nnx.Linear`` descendants are candidates (the
      root itself is never replaced: use ``QuantizedLinear.from_linear``).
    format: registered format name.
    include: regex searched in the dotted path; None selects every layer.
    exclude: regex searched in the dotted path; matches stay in float.
    min_features: layers with in_features below this stay in float.
    seed: sign-vector seed of randomized formats (the same for every layer).
    method: ``itq3s_jax.matmul`` method of the new layers.
    hessians: optional calibration statistics {dotted path: Sigma (K, K)}
      (``itq3s_jax.calibrate``): selected layers found here are rounded with
      GPTQ in the coding domain (``itq3s_jax.quantize(..., hessian=Sigma)``),
      the others round to nearest. Layers sharing one Sigma array are rounded
      in one call.
    **gptq_options: options of the GPTQ rounding (``rounding``, ``scales``,
      ``damp``, ``act_order``; see ``itq3s_jax.calibration.gptq_quantize``).

  Returns:
    ``(model, report)``: the same model object, and a
    :class:`QuantizationReport` listing quantized and skipped layers.

  Raises:
    ValueError: unknown format, bad regex or min_features; a weight the
      format cannot code (NaN/Inf, values beyond its range).
    TypeError: ``model`` is not an ``nnx.Module``.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"quantize_model needs an nnx.Module, got {type(model).__name__}; "
                    "for linen parameter trees use quantize_params.")
  _core.check_rules(format, include, exclude, min_features)
  if gptq_options and hessians is None:
    raise TypeError(f"GPTQ options {sorted(gptq_options)} need hessians=...")
  calibrated = {}
  if hessians is not None:
    from itq3s_jax._src import calibrate  # pylint: disable=g-import-not-at-top (imports flax)
    selected = {}
    for path, m in nnx.iter_modules(model):
      name = _core.dotted(path)
      if isinstance(m, nnx.Linear) and name in hessians and _core.skip_reason(
          name, m.in_features, include=include, exclude=exclude,
          min_features=min_features) is None:
        selected[name] = hessians[name]
    calibrated = calibrate.quantize_weights(model, selected, format=format, seed=seed,
                                            **gptq_options)
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
        name = _core.dotted(path)
        shape = (linear.out_features, linear.in_features)
        reason = _core.skip_reason(name, linear.in_features, include=include,
                                   exclude=exclude, min_features=min_features)
        if reason is not None:
          skipped.append(_core.Skipped(name, shape, reason))
          kept.add(id(linear))
          continue
        done[id(linear)] = qnnx.QuantizedLinear.from_linear(
            linear, format=format, seed=seed, method=method, weight=calibrated.get(name))
        quantized.append(_core.Quantized(name, shape, int(done[id(linear)].weight[...].size)))
      parent = model
      for key in path[:-1]:
        parent = _get_child(parent, key)
      _set_child(parent, path[-1], done[id(linear)])
  return model, _core.QuantizationReport(format, tuple(quantized), tuple(skipped))
