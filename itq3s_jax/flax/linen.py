"""Linen ``QuantizedDense`` and ``quantize_params`` for linen parameter trees.

A linen model keeps its weights outside the module, so quantizing one takes
two steps: build the model with :class:`QuantizedDense` where it had
``nn.Dense`` (same parameter names: ``kernel``, ``bias``; give both the same
``name=`` or rely on a ``dense_cls`` attribute), and convert the float
parameters with :func:`quantize_params`, which replaces each dense ``kernel``
(in, out) by a QuantizedTensor of its transpose (out, in).

>>> import jax, jax.numpy as jnp
>>> import flax.linen as nn
>>> from itq3s_jax import flax as qflax
>>> params = nn.Dense(8, name="fc").init(jax.random.key(0), jnp.ones((1, 64)))["params"]
>>> qparams, report = qflax.quantize_params(params)
>>> qparams["kernel"].shape, qparams["kernel"].data.shape
((8, 64), (8, 29))
>>> qflax.QuantizedDense(8).apply({"params": qparams}, jnp.ones((1, 64))).shape
(1, 8)

The outputs equal those of the NNX ``QuantizedLinear`` with the same weights
bit for bit (both call one functional op).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import itq3s_jax
from itq3s_jax.flax import _core
from itq3s_jax.flax import contraction
from itq3s_jax.flax import linen_general
from itq3s_jax.flax import state as state_lib


class QuantizedDense(nn.Module):
  """``nn.Dense`` with its kernel stored as a 3-bit QuantizedTensor.

  Params: ``kernel``, a QuantizedTensor (features, in_features) whose data is
  uint8 (features, row_nbytes); ``bias`` (features,) of param_dtype. The
  format and seed of an existing kernel are read from the parameter (its
  static fields), so ``format``/``seed`` only matter at ``init``.

  Attributes:
    features: output features N.
    format: registered format name used by ``init``.
    seed: sign-vector seed used by ``init``.
    use_bias: whether to add a bias.
    dtype: output dtype; None promotes the input dtype with param_dtype.
    param_dtype: dtype of the bias and of the float kernel before coding.
    kernel_init: float kernel initializer, shape (in, out) like nn.Dense.
    bias_init: bias initializer.
    method: ``itq3s_jax.matmul`` method.
  """

  features: int
  format: str = "itq3_t"
  seed: int = 0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  method: str = "auto"

  @nn.compact
  def __call__(self, x: ArrayLike) -> jax.Array:
    """(..., in_features) -> (..., features) of the layer dtype."""
    x = jnp.asarray(x)
    k = x.shape[-1]

    def init(key, shape, dtype):
      return _core.quantize_kernel(self.kernel_init(key, shape, dtype), self.format, self.seed)

    if self.has_variable("params", "kernel"):
      # Read it directly: self.param would compare it with the shape of an init
      # in self.format and reject kernels coded in other formats.
      qt = self.get_variable("params", "kernel")
    else:
      qt = self.param("kernel", init, (k, self.features), self.param_dtype)
    if not isinstance(qt, itq3s_jax.QuantizedTensor):
      raise TypeError(f"QuantizedDense kernel must be a QuantizedTensor, got "
                      f"{type(qt).__name__}; convert float params with quantize_params.")
    if qt.shape != (self.features, k):
      raise ValueError(f"kernel has shape {qt.shape}, expected (features, in_features) = "
                       f"{(self.features, k)}.")
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return _core.dense(x, qt, bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       method=self.method)


def _is_float_kernel(v: Any) -> bool:
  return (hasattr(v, "ndim") and hasattr(v, "dtype") and v.ndim >= 2
          and jnp.issubdtype(v.dtype, jnp.floating))


def quantize_params(params: Mapping[str, Any], rule: "itq3s_jax.QuantRule | None" = None, *,
                    module: nn.Module | None = None, args: tuple = ()
                    ) -> tuple[dict[str, Any], _core.QuantizationReport]:
  """Replaces dense kernels in a linen tree by QuantizedTensors of their (N, K) view.

  A dense layer is any sub-dict holding a float ``kernel``; its path is the
  dotted key path to that sub-dict (``"Dense_0"``, or ``"params.Dense_0"``
  when the whole variable dict is passed). A 2-D kernel (in, out) is a
  ``Dense`` and becomes (out, in). Kernels of more axes (``DenseGeneral``,
  ``Einsum``) need their contraction, which ``module`` and sample ``args``
  give (``linen_general.contractions``: an abstract ``init``); without them
  they are reported as skipped. Selection is ``rule.decide`` on the path and
  the contracted axes, as in :func:`itq3s_jax.flax.quantize_model`. Run the
  result with :func:`itq3s_jax.flax.apply_quantized` (any dense layer), or
  with ``QuantizedDense`` layers in place of ``nn.Dense``. The input is not
  modified.

  Args:
    params: a (nested) linen parameter dict, e.g. ``variables["params"]``.
    rule: which layers and which format; None: ``QuantRule()``.
    module: the float linen model the params belong to (optional).
    args: sample inputs of ``module.init`` (shapes only matter).

  Returns:
    ``(new_params, report)``: plain nested dicts with the selected kernels
    replaced, and a :class:`QuantizationReport` (every float kernel left
    float is listed with its reason).

  Raises:
    ValueError: a weight the format cannot code.
    TypeError: ``params`` is not a mapping, or ``rule`` not a QuantRule.
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"quantize_params needs a nested dict of params, got {type(params).__name__}.")
  rule = _core.check_rule(rule)
  layers = linen_general.contractions(module, *args) if module is not None else {}
  quantized, skipped = [], []

  def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
      out[key] = walk(value, (*path, key)) if isinstance(value, Mapping) else value
    kernel = out.get("kernel")
    if not _is_float_kernel(kernel):
      return out
    name = state_lib.dotted(path)
    layer = layers.get(name.removeprefix("params."))
    if layer is not None and layer.plan is None:
      skipped.append(_core.Skipped(name, tuple(kernel.shape),
                                   f"not quantizable: {layer.why_not}"))
      return out
    if layer is None and kernel.ndim != 2:
      skipped.append(_core.Skipped(name, tuple(kernel.shape), (
          f"not quantized: a {kernel.ndim}-D kernel whose contracted axes are unknown; pass "
          "module= and args= (sample inputs)")))
      return out
    plan = layer.plan if layer is not None else contraction.Plan(kernel.shape, (0,), (1,))
    decision = rule.decide(name, kernel.shape, kernel.dtype, k_axis=plan.k_axes)
    if not decision.quantize:
      skipped.append(_core.Skipped(name, (plan.n, plan.k), decision.reason))
      return out
    if kernel.ndim == 2 and plan.k_axes == (0,):
      out["kernel"] = _core.quantize_kernel(kernel, rule.format, rule.seed)
    else:
      out["kernel"] = itq3s_jax.quantize(plan.to_nk(kernel), rule.format, seed=rule.seed)
    quantized.append(_core.Quantized(name, (plan.n, plan.k), out["kernel"].nbytes))
    return out

  new = walk(params, ())
  return new, _core.QuantizationReport(rule.format, tuple(quantized), tuple(skipped))
