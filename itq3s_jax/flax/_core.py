"""The one functional op behind the NNX and linen layers, and the layer rules.

Both ``QuantizedLinear`` (NNX) and ``QuantizedDense`` (linen) call
:func:`dense`, so their outputs are bit-identical for the same weights; both
surgeries call :func:`quantize_kernel` and :func:`skip_reason`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import itq3s_jax
from itq3s_jax._src import blocks


@functools.partial(jax.jit, static_argnames=("format", "seed"))
def _quantize(w: jax.Array, format: str, seed: int
              ) -> tuple[itq3s_jax.QuantizedTensor, jax.Array, jax.Array]:
  """(quantize(w), all finite, max |coding-domain value|) of w (N, K), one compilation."""
  z = itq3s_jax.rotate_activations(w, format, seed)
  peak = jnp.max(jnp.abs(z), initial=0.0)
  return itq3s_jax.quantize(w, format, seed=seed), jnp.all(jnp.isfinite(w)), peak


def quantize_kernel(kernel: ArrayLike, format: str, seed: int) -> itq3s_jax.QuantizedTensor:
  """Quantizes a Flax kernel (in_features, out_features) as a (out, in) tensor.

  Blocks run along in_features (the contraction axis K), so each output
  feature is one coded row. Runs ``itq3s_jax.quantize`` under ``jax.jit``
  (one compilation per shape instead of one per eager op, which dominates
  model surgery time); the eager value checks of ``quantize`` (NaN/Inf,
  values beyond the format's range) are computed in the same compilation
  and raised here when the kernel is concrete.

  Args:
    kernel: float (in_features, out_features), as ``nnx.Linear``/``nn.Dense``
      store it.
    format: a registered format name.
    seed: sign-vector seed of randomized formats.

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
  fmt = itq3s_jax.get_format(format)
  blocks.check_k(kernel.shape[0])
  qt, finite, peak = _quantize(kernel.T, format, seed)
  if not isinstance(kernel, jax.core.Tracer) and kernel.size:
    if not bool(finite):
      raise ValueError("kernel has NaN/Inf values; fix or mask them before quantizing.")
    if float(peak) > fmt.max_abs:
      raise ValueError(f"values too large for {format}: a coefficient of magnitude "
                       f"{float(peak):.4g} exceeds {fmt.max_abs:.4g}; rescale the kernel "
                       "or keep this layer in float.")
  return qt


def output_dtype(x_dtype, dtype, param_dtype):
  """The dtype ``nnx.Linear`` would return: ``dtype``, else promote(x, param)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(x_dtype, param_dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "param_dtype", "method"))
def dense(x: ArrayLike, qt: itq3s_jax.QuantizedTensor, bias: ArrayLike | None, *,
          dtype=None, param_dtype=jnp.float32, method: str = "auto") -> jax.Array:
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

  Returns:
    (..., out_features) of the output dtype.
  """
  x = jnp.asarray(x)
  out_dtype = output_dtype(x.dtype, dtype, param_dtype)
  y = itq3s_jax.matmul(x, qt, method=method)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(jnp.float32)
  return y.astype(out_dtype)


# ----------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Quantized:
  """One replaced layer: dotted path, weight shape (out, in) and coded bytes."""
  path: str
  shape: tuple[int, int]
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Skipped:
  """One dense layer left in float, and why."""
  path: str
  shape: tuple[int, int]
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
    lines += [f"  skipped   {s.path}: {s.reason}" for s in self.skipped]
    return "\n".join(lines)


def check_rules(format: str, include: str | None, exclude: str | None,
                min_features: int) -> None:
  """Validates surgery arguments eagerly (ValueError/TypeError)."""
  itq3s_jax.get_format(format)
  for name, pattern in (("include", include), ("exclude", exclude)):
    if pattern is None:
      continue
    if not isinstance(pattern, str):
      raise TypeError(f"{name} must be a regex string or None, got {type(pattern).__name__}.")
    try:
      re.compile(pattern)
    except re.error as exc:
      raise ValueError(f"{name}={pattern!r} is not a valid regex: {exc}.") from None
  if not isinstance(min_features, int) or min_features < 0:
    raise ValueError(f"{min_features=} must be a non-negative int.")


def skip_reason(path: str, in_features: int, *, include: str | None,
                exclude: str | None, min_features: int) -> str | None:
  """Why the dense layer at ``path`` stays in float, or None to quantize it.

  ``include``/``exclude`` are regexes searched (``re.search``) in the dotted
  path, e.g. ``"layers.0.mlp.up"``; anchor them with ``^``/``$`` for exact
  matches.
  """
  if exclude is not None and re.search(exclude, path):
    return f"path matches exclude={exclude!r}"
  if include is not None and not re.search(include, path):
    return f"path does not match include={include!r}"
  if in_features % blocks.MIN_K_MULTIPLE:
    return f"in_features={in_features} is not a multiple of {blocks.MIN_K_MULTIPLE}"
  if in_features < min_features:
    return f"in_features={in_features} < min_features={min_features}"
  return None


def dotted(path) -> str:
  """('layers', 0, 'mlp') -> 'layers.0.mlp'."""
  return ".".join(str(p) for p in path)
