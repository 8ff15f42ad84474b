"""NNX ``QuantizedEinsum``: an ``nnx.Einsum`` or ``nnx.LinearGeneral`` with a 3-bit weight.

The kernel (any rank) is stored as its (N, K) view (``contraction.Plan``):
contracted axes flattened into K, output axes into N, one coded row per output
element, in a :class:`QuantizedWeight` variable like ``QuantizedLinear``'s.
The bias keeps its shape. The call is the layer's einsum computed by
``contraction.apply`` (float32), then cast like the float layer's output.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

import itq3s_jax
from itq3s_jax.flax import _core
from itq3s_jax.flax import contraction
from itq3s_jax.flax import nnx as qnnx

GENERAL_LAYERS = (nnx.LinearGeneral, nnx.Einsum)


def plan_of(module: nnx.Module) -> contraction.Plan:
  """The (N, K) view of an ``nnx.LinearGeneral``/``nnx.Einsum`` (or a QuantizedEinsum) kernel.

  Raises:
    NotImplementedError: a layer whose weight is not one contraction (batch
      axes, a call-time einsum string, ...), with the reason.
  """
  if isinstance(module, QuantizedEinsum):
    return module.plan
  shape = tuple(module.kernel.shape)
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise NotImplementedError(f"batch_axis={dict(module.batch_axis)}: one weight matrix per "
                                "batch index, not one contraction")
    n_in = len(module.in_features)
    return contraction.Plan(shape, tuple(range(n_in)), tuple(range(n_in, len(shape))))
  if isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise NotImplementedError("the einsum string is given at call time, so the contraction "
                                "is unknown before the model runs")
    return contraction.plan_einsum(module.einsum_str, shape)
  raise TypeError(f"not an nnx.LinearGeneral/Einsum: {type(module).__name__}.")


class QuantizedEinsum(nnx.Module):
  """``nnx.Einsum`` / ``nnx.LinearGeneral`` with the weight coded as (N, K).

  Attributes:
    weight: :class:`QuantizedWeight` uint8 (N, row_nbytes).
    bias: ``nnx.Param`` of the float layer's bias shape, or None.
    plan: static ``contraction.Plan`` (kernel shape, contracted and output axes).
    einsum_str: the einsum (Einsum), or None for a LinearGeneral, whose einsum
      is built per input rank from ``axis``.
    axis, format, seed, rounding, dtype, param_dtype, method: static.
  """

  def __init__(self, weight: itq3s_jax.QuantizedTensor, plan: contraction.Plan, *,
               einsum_str: str | None = None, axis: tuple[int, ...] | None = None,
               bias: ArrayLike | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, method: str = "auto",
               weight_metadata: Mapping[str, Any] = MappingProxyType({}),
               bias_metadata: Mapping[str, Any] = MappingProxyType({})):
    if (einsum_str is None) == (axis is None):
      raise TypeError("give exactly one of einsum_str= (an Einsum) or axis= (a LinearGeneral).")
    if not isinstance(weight, itq3s_jax.QuantizedTensor):
      raise TypeError(f"weight must be a QuantizedTensor, got {type(weight).__name__}.")
    if weight.shape != (plan.n, plan.k):
      raise ValueError(f"weight has shape {weight.shape}, the plan's (N, K) is "
                       f"{(plan.n, plan.k)}.")
    self.weight = qnnx.QuantizedWeight(weight.data, **weight_metadata)
    self.bias = nnx.data(None) if bias is None else nnx.Param(
        jnp.asarray(bias, param_dtype), **bias_metadata)
    self.plan = plan
    self.einsum_str = einsum_str
    self.axis = None if axis is None else tuple(axis)
    self.format, self.seed, self.rounding = weight.format, weight.seed, weight.rounding
    self.dtype, self.param_dtype, self.method = dtype, param_dtype, method

  @property
  def qt(self) -> itq3s_jax.QuantizedTensor:
    """The weight as a QuantizedTensor (N, K)."""
    return itq3s_jax.QuantizedTensor(data=self.weight[...], format=self.format,
                                     k=self.plan.k, seed=self.seed, rounding=self.rounding)

  def einsum_for(self, x_ndim: int) -> str:
    if self.einsum_str is not None:
      return self.einsum_str
    n_in = len(self.plan.k_axes)
    return contraction.linear_general_einsum(n_in, len(self.plan.n_axes), self.axis, x_ndim)

  def __call__(self, x: ArrayLike) -> jax.Array:
    """The float layer's output (same shape and dtype rule), from the coded weight."""
    x = jnp.asarray(x)
    es = self.einsum_for(x.ndim)
    y = contraction.apply(x, self.qt, self.plan, es, method=self.method)
    if self.bias is not None:
      b = jnp.reshape(self.bias[...], contraction.bias_shape(es, x.ndim, self.plan))
      y = y + b.astype(jnp.float32)
    return y.astype(_core.output_dtype(x.dtype, self.dtype, self.param_dtype))

  @classmethod
  def from_module(cls, module: nnx.Module, *, format: str = "itq3_t", seed: int = 0,
                  method: str = "auto", weight: itq3s_jax.QuantizedTensor | None = None
                  ) -> "QuantizedEinsum":
    """Quantizes an ``nnx.LinearGeneral`` or ``nnx.Einsum`` (its (N, K) view, to nearest
    unless ``weight`` is given). Sharding metadata is not carried over (the (N, K)
    view mixes axes); the bias keeps its own.

    Raises:
      NotImplementedError: the layer is not one contraction (:func:`plan_of`).
    """
    plan = plan_of(module)
    if weight is None:
      weight = itq3s_jax.quantize(plan.to_nk(module.kernel[...]), format, seed=seed)
    bias_meta = {} if module.bias is None else qnnx.sharding_metadata(module.bias, False)
    kw = ({"axis": tuple(module.axis)} if isinstance(module, nnx.LinearGeneral)
          else {"einsum_str": module.einsum_str})
    return cls(weight, plan, bias=None if module.bias is None else module.bias[...],
               dtype=module.dtype, param_dtype=module.param_dtype, method=method,
               bias_metadata=bias_meta, **kw)
