"""The one functional op behind the NNX and linen layers, and the layer rules.

Both ``QuantizedLinear`` (NNX) and ``QuantizedDense`` (linen) call
:func:`dense`, so their outputs are bit-identical for the same weights; both
surgeries call :func:`quantize_kernel` and select with ``QuantRule.decide``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import itq3s_jax
from itq3s_jax._src.matmul import xla


def quantize_kernel(kernel: ArrayLike, format: str, seed: int, *,
                    hessian: ArrayLike | None = None,
                    gptq: itq3s_jax.GptqConfig | None = None) -> itq3s_jax.QuantizedTensor:
  """Quantizes a Flax kernel (in_features, out_features) as a (out, in) tensor.

  Blocks run along in_features (the contraction axis K), so each output
  feature is one coded row; ``itq3s_jax.quantize`` does the work (one
  compilation per shape, its value checks raised when the kernel is concrete).

  Args:
    kernel: float (in_features, out_features), as ``nnx.Linear``/``nn.Dense``
      store it.
    format: a registered format name.
    seed: sign-vector seed of randomized formats.
    hessian: optional (in, in) input second moment: GPTQ rounding.
    gptq: GPTQ options with ``hessian``.

  Returns:
    A QuantizedTensor of shape (out_features, in_features).

  Raises:
    ValueError: kernel not 2-D, in_features not a multiple of 32, unknown
      format, NaN/Inf, or values the format cannot represent.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"a dense kernel must be 2-D (in_features, out_features), "
                     f"got shape {kernel.shape}.")
  return itq3s_jax.quantize(kernel.T, format, seed=seed, hessian=hessian, gptq=gptq)


def output_dtype(x_dtype, dtype, param_dtype):
  """The dtype ``nnx.Linear`` would return: ``dtype``, else promote(x, param)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(x_dtype, param_dtype)


def takes_decode_tiles(x: jax.Array | jax.ShapeDtypeStruct, qt: itq3s_jax.QuantizedTensor,
                       method: str) -> bool:
  """Whether ``dense(x, qt, ..., method=method)`` reads decode tiles prepared once
  (``matmul.xla.decode_tiles(qt, 1)``): x has one row and the product runs
  ``"xla_act_rotate"``."""
  if math.prod(x.shape[:-1]) != 1:
    return False
  return (method if method != "auto" else itq3s_jax.choose_method(x, qt)) == "xla_act_rotate"


@functools.partial(jax.jit, static_argnames=("dtype", "param_dtype", "method"))
def dense(x: ArrayLike, qt: itq3s_jax.QuantizedTensor, bias: ArrayLike | None, *,
          dtype=None, param_dtype=jnp.float32, method: str = "auto",
          tiles: tuple[jax.Array, ...] | None = None) -> jax.Array:
  """``x @ dequantize(qt).T + bias`` computed in float32, cast to the layer dtype.

  Jitted so that eager layer calls compile once per shape rather than once
  per decode op; inside a jitted model it is inlined.

  Args:
    x: activations (..., in_features).
    qt: weight of shape (out_features, in_features).
    bias: float (out_features,) or None.
    dtype: output dtype; None promotes x's dtype with ``param_dtype``.
    param_dtype: dtype of the layer's float parameters (the bias).
    method: ``itq3s_jax.matmul`` method.
    tiles: None, or the weight's codes prepared for one activation row
      (``matmul.xla.decode_tiles(qt, 1)``): used when x has one row and
      ``method`` runs ``"xla_act_rotate"``, ignored otherwise.

  Returns:
    (..., out_features) of the output dtype.
  """
  x = jnp.asarray(x)
  out_dtype = output_dtype(x.dtype, dtype, param_dtype)
  if tiles is not None and takes_decode_tiles(x, qt, method):
    y = xla.act_rotate_dot(x, qt, tiles)
  else:
    y = itq3s_jax.matmul(x, qt, method=method)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(jnp.float32)
  return y.astype(out_dtype)


# ----------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Quantized:
  """One replaced layer: dotted path, coded weight shape (N, K) and coded bytes."""
  path: str
  shape: tuple[int, int]
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Skipped:
  """One weight left in float, and why: a dense layer (path of the layer, (N, K) shape
  or the kernel's) or another parameter of two or more axes (its own path and shape)."""
  path: str
  shape: tuple[int, ...]
  reason: str


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
  """What a surgery quantized and what it skipped.

  Attributes:
    format: the format used.
    quantized: the replaced layers, in traversal order.
    skipped: the dense layers kept in float, each with its reason.
  """
  format: str
  quantized: tuple[Quantized, ...]
  skipped: tuple[Skipped, ...]

  @property
  def nbytes(self) -> int:
    """Coded bytes of all quantized weights (biases not included)."""
    return sum(q.nbytes for q in self.quantized)

  @property
  def num_weights(self) -> int:
    """Number of quantized weights."""
    return sum(q.shape[0] * q.shape[1] for q in self.quantized)

  def __str__(self) -> str:
    lines = [f"{len(self.quantized)} layers quantized to {self.format} "
             f"({self.nbytes} bytes), {len(self.skipped)} kept in float"]
    lines += [f"  quantized {q.path} {q.shape[0]}x{q.shape[1]}" for q in self.quantized]
    lines += [f"  skipped   {s.path} {'x'.join(map(str, s.shape))}: {s.reason}"
              for s in self.skipped]
    return "\n".join(lines)


def check_rule(rule) -> "itq3s_jax.QuantRule":
  """``rule`` or the default QuantRule; TypeError for anything else."""
  if rule is None:
    return itq3s_jax.QuantRule()
  if not isinstance(rule, itq3s_jax.QuantRule):
    raise TypeError(f"rule must be an itq3s_jax.QuantRule, got {type(rule).__name__}; "
                    "e.g. QuantRule('uniform3', exclude='lm_head').")
  return rule
