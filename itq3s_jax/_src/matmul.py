"""``matmul(x, qt)``: x @ dequantize(qt).T with one dispatch entry point.

Methods:
  ``"xla"``: dequantize, then ``jnp.dot`` in float32; the reference and the
    fallback, any backend, any format.
  ``"weight_ifwht"``: Pallas kernel (``pallas_kernels/weight_ifwht.py``) that
    decodes 256-wide weight tiles, inverse-transforms them and dots.
  ``"act_rotate"``: Pallas kernel (``pallas_kernels/act_rotate.py``) that
    rotates x once per 256 columns and dots with the coding-domain tiles.
  ``"auto"``: :func:`choose`.

The Pallas methods compile for GPUs (Triton) and run in interpret mode on CPU
(correct but slow: for tests). They raise NotImplementedError for formats
without a kernel decoder (``kernel_decode.CODECS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from itq3s_jax._src import qtensor
from itq3s_jax._src import quantize as quantize_lib

# Above this many activation rows the product is compute-bound and cuBLAS on a
# dequantized weight wins over the fused kernels' Triton dot (not yet measured:
# benchmarks/gpu_check.py decides it on a GPU).
AUTO_MAX_ROWS = 256
_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def _xla(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  w = quantize_lib.dequantize(qt, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def _kernel(name: str):
  def run(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
    import pallas_kernels  # pylint: disable=g-import-not-at-top  (pallas_kernels imports this module)
    module = getattr(pallas_kernels, name)
    return getattr(module, name)(x, qt)
  return run


_METHODS = {"xla": _xla, "weight_ifwht": _kernel("weight_ifwht"),
            "act_rotate": _kernel("act_rotate")}


def choose(x: jax.ShapeDtypeStruct | jax.Array, qt: qtensor.QuantizedTensor,
           backend: str | None = None) -> str:
  """The method ``"auto"`` runs for this x (..., K), weight and backend.

  CPU/TPU: ``"xla"`` (the kernels are Triton; interpret mode is for tests). GPU:
  ``"act_rotate"`` (no weight-side transform, jax_notes.md §8) when the kernel
  supports the format and shape and x has at most AUTO_MAX_ROWS rows, else
  ``"xla"``.
  """
  backend = backend or jax.default_backend()
  if backend not in _GPU_BACKENDS:
    return "xla"
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  rows = 1
  for d in x.shape[:-1]:
    rows *= d
  if rows <= AUTO_MAX_ROWS and pallas_kernels.act_rotate.supports(x, qt):
    return "act_rotate"
  return "xla"


def matmul(x: ArrayLike, qt: qtensor.QuantizedTensor, *, method: str = "auto") -> jax.Array:
  """Computes ``x @ dequantize(qt).T`` in float32.

  Args:
    x: float activations (..., K).
    qt: a 2-D quantized weight of shape (N, K).
    method: ``"auto"`` (:func:`choose`) or one of ``"xla"``, ``"weight_ifwht"``,
      ``"act_rotate"``.

  Returns:
    float32 (..., N).

  Raises:
    ValueError: unknown method, weight not 2-D, K mismatch.
    NotImplementedError: a Pallas method for a format without a kernel decoder
      (e.g. ``itq3_s``), K < 256, or a non-GPU, non-CPU backend.

  >>> import jax.numpy as jnp, itq3s_jax
  >>> qt = itq3s_jax.quantize(jnp.eye(2, 256))
  >>> itq3s_jax.matmul(jnp.ones((1, 256)), qt, method="xla").shape
  (1, 2)
  """
  x = jnp.asarray(x)
  if len(qt.shape) != 2:
    raise ValueError(f"matmul needs a 2-D weight (N, K), got shape {qt.shape}.")
  if x.shape[-1] != qt.shape[-1]:
    raise ValueError(f"x has K={x.shape[-1]} but the weight has K={qt.shape[-1]}.")
  if method == "auto":
    method = choose(x, qt)
  if method not in _METHODS:
    raise ValueError(f"unknown matmul method {method!r}; known: {sorted(_METHODS)} or 'auto'.")
  return _METHODS[method](x, qt)
