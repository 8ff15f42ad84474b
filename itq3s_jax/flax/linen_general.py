"""Linen ``Dense``/``DenseGeneral``/``Einsum`` with quantized kernels, without editing the model.

A linen parameter tree does not say how a kernel of 3 or more axes is
contracted, and a linen module reads its kernel with its float shape. Both are
solved with linen's public method interception (``nn.intercept_methods``):

* :func:`contractions` runs ``module.init`` abstractly (``jax.eval_shape``) and
  records every dense layer it calls: its parameter path, type and the (N, K)
  view of its kernel (``contraction.Plan``); ``quantize_params(..., module=,
  args=)`` uses it to code ``DenseGeneral`` and ``Einsum`` kernels.
* :func:`apply` is ``module.apply`` where each dense layer whose ``kernel``
  is a QuantizedTensor computes its output from the codes
  (``contraction.apply``; a 2-D ``Dense`` through the same op as
  ``QuantizedDense``, so outputs match it bit for bit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import itq3s_jax
from itq3s_jax.flax import _core
from itq3s_jax.flax import contraction

DENSE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class Layer:
  """A dense layer seen during ``init``: its type, the (N, K) view and its einsum."""
  kind: str
  plan: contraction.Plan | None
  einsum_str: str | None
  why_not: str | None = None  # set when the kernel is not one contraction


def _normalized(axis, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


def describe(module: nn.Module, x_ndim: int) -> Layer:
  """The contraction of a bound linen dense layer called on an input of ``x_ndim`` axes."""
  kind = type(module).__name__
  try:
    if isinstance(module, nn.Einsum):
      return Layer(kind, contraction.plan_einsum(module.einsum_str, tuple(module.shape)),
                   module.einsum_str)
    if isinstance(module, nn.Dense):
      features, axis = (module.features,), (-1,)
    else:
      if module.batch_dims:
        raise NotImplementedError(f"batch_dims={module.batch_dims}: one matrix per batch "
                                  "index, not one contraction")
      features = ((module.features,) if isinstance(module.features, int)
                  else tuple(module.features))
      axis = module.axis
    axis = _normalized(axis, x_ndim)
    shape = tuple(module.get_variable("params", "kernel").shape)
    n_in = len(axis)
    plan = contraction.Plan(shape, tuple(range(n_in)), tuple(range(n_in, len(shape))))
    return Layer(kind, plan, contraction.linear_general_einsum(n_in, len(features), axis,
                                                               x_ndim))
  except NotImplementedError as exc:
    return Layer(kind, None, None, str(exc))


def contractions(module: nn.Module, *args, **kwargs) -> dict[str, Layer]:
  """{dotted parameter path: Layer} of every dense layer ``module.init(key, *args)`` calls.

  Runs under ``jax.eval_shape``: nothing is computed or allocated.
  """
  seen: dict[str, Layer] = {}

  def interceptor(next_fun, fargs, fkwargs, context):
    out = next_fun(*fargs, **fkwargs)
    m = context.module
    if context.method_name == "__call__" and isinstance(m, DENSE) and fargs:
      seen[".".join(m.path)] = describe(m, jnp.ndim(fargs[0]))
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return seen


def _plan_from_input(m: nn.Module, qt: itq3s_jax.QuantizedTensor, x) -> tuple:
  """(Plan, einsum) of a coded layer, its float kernel shape rebuilt from x and the features."""
  if isinstance(m, nn.Einsum):
    return contraction.plan_einsum(m.einsum_str, tuple(m.shape)), m.einsum_str
  if isinstance(m, nn.DenseGeneral) and m.batch_dims:
    raise NotImplementedError(f"{m.path}: batch_dims are not supported.")
  features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
  axis = _normalized(-1 if isinstance(m, nn.Dense) else m.axis, x.ndim)
  shape = tuple(x.shape[a] for a in axis) + features
  plan = contraction.Plan(shape, tuple(range(len(axis))), tuple(range(len(axis), len(shape))))
  if (plan.n, plan.k) != tuple(qt.shape):
    raise ValueError(f"{'/'.join(m.path)}: coded kernel is {qt.shape} (N, K), the layer "
                     f"needs {(plan.n, plan.k)} for an input of shape {x.shape}.")
  return plan, contraction.linear_general_einsum(len(axis), len(features), axis, x.ndim)


def _quantized_call(m: nn.Module, qt: itq3s_jax.QuantizedTensor, x, method: str):
  x = jnp.asarray(x)
  bias = m.get_variable("params", "bias") if m.use_bias else None
  if isinstance(m, nn.Dense):  # the op QuantizedDense/QuantizedLinear use
    return _core.dense(x, qt, bias, dtype=m.dtype, param_dtype=m.param_dtype, method=method)
  plan, es = _plan_from_input(m, qt, x)
  y = contraction.apply(x, qt, plan, es, method=method)
  if bias is not None:
    y = y + jnp.reshape(bias, contraction.bias_shape(es, x.ndim, plan)).astype(jnp.float32)
  return y.astype(_core.output_dtype(x.dtype, m.dtype, m.param_dtype))


def apply(module: nn.Module, variables: Any, *args, method_name: str = "auto", **kwargs):
  """``module.apply(variables, *args, **kwargs)`` with coded kernels used as such.

  Every ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` whose ``kernel`` in
  ``variables`` is a QuantizedTensor (``quantize_params``) computes from the
  codes; the others run unchanged. Jit it like ``module.apply``.

  Args:
    module: the float linen model (unchanged).
    variables: ``{"params": quantized params, ...}``.
    *args, **kwargs: as ``module.apply`` (``method=``, ``mutable=``...).
    method_name: ``itq3s_jax.matmul`` method of the quantized products.
  """

  def interceptor(next_fun, fargs, fkwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, DENSE) or not fargs:
      return next_fun(*fargs, **fkwargs)
    qt = m.get_variable("params", "kernel") if m.has_variable("params", "kernel") else None
    if not isinstance(qt, itq3s_jax.QuantizedTensor):
      return next_fun(*fargs, **fkwargs)
    if len(fargs) > 1 or fkwargs:
      raise NotImplementedError(f"{'/'.join(m.path)}: call-time arguments with a coded kernel.")
    return _quantized_call(m, qt, fargs[0], method_name)

  with nn.intercept_methods(interceptor):
    return module.apply(variables, *args, **kwargs)
