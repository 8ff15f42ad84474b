"""``matmul(x, qt)``: x @ dequantize(qt).T with one dispatch entry point.

Methods (the implementations table :data:`METHODS`):
  ``"xla"``: dequantize, then ``jnp.dot`` in float32; the reference, any
    backend, any format (``xla.py``).
  ``"xla_act_rotate"``: the act_rotate algebra in XLA: rotate x once per
    block, decode the codes to the coding domain (no weight transform), dot;
    any backend, any format (``xla.py``). The default off GPU where the next
    method does not apply.
  ``"cpu_native"``: the same algebra with the codes decoded inside a C++ loop
    (``native.py``, ``cpu_dot.cc``: an XLA FFI custom call, built at first use
    with the machine's compiler); CPU, ``native.FORMATS`` (itq3_t, itq3_s,
    iq3_s). The default on CPU up to
    NATIVE_MAX_ROWS activation rows in a single-device process when it could be
    built.
  ``"weight_ifwht"``: Pallas kernel (``itq3s_jax/pallas_kernels/weight_ifwht.py``)
    that decodes 256-wide weight tiles, inverse-transforms them and dots.
  ``"act_rotate"``: Pallas kernel (``itq3s_jax/pallas_kernels/act_rotate.py``) that
    rotates x once per 256 columns and dots with the coding-domain tiles.
  ``"auto"``: :func:`choose`.

The Pallas methods compile for GPUs (Triton) and run in interpret mode on CPU
(correct but slow: for tests). They raise NotImplementedError for formats
without a kernel decoder (``Format.kernel_codec``). They are registered only
when Pallas imports, so a jax without it still has the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.matmul import native
from itq3s_jax._src.matmul import xla

try:
  from itq3s_jax import pallas_kernels
  from itq3s_jax.pallas_kernels import terms as kernel_terms
except ImportError:  # a jax build without Pallas/Triton: the XLA path only
  pallas_kernels = None

# GPU dispatch, measured on an H200 (jax 0.11.2, bf16 x, itq3_t and itq3_s weights,
# M in {1, 16, 64, 256, 1024}: benchmarks/results/gpu_check_h200.log). Both kernels beat
# "xla" (dequantize + dot) at every measured M, by 3.2-3.4x still at M = 1024; the
# kernels' time grows about linearly with M there, xla's is flat, so they cross near
# 3000 rows (4096^2 and 8192^2): above AUTO_MAX_ROWS rows xla runs. Up to the GEMV tile
# (AUTO_GEMV_ROWS, block_m 16) act_rotate wins for every format; above it, a decoder that
# widens the dot (itq3_t: 4 terms x 128 slots = 512 columns per 256-block) makes it lose
# to weight_ifwht (765 vs 348 us at M = 256, 4096^2), while one that does not (itq3_s:
# 2 x 128) stays fastest (107 us).
AUTO_MAX_ROWS = 2048
AUTO_GEMV_ROWS = 16
_GPU_BACKENDS = ("gpu", "cuda", "rocm")
# CPU dispatch, measured on the 2-core x86-64 CPU (benchmarks/speed.py): the native kernel
# decodes each block once for all activation rows, so it wins by most at M = 1 (2.6-2.9x
# faster than xla_act_rotate on SmolLM2's and 4096^2 weights) and by less as the rows grow
# (2.1-2.3x at M = 8, 0.96-1.2x at M = 32), where XLA's dot reuses each decoded tile well.
NATIVE_MAX_ROWS = 16


METHODS = {"xla": xla.dequantize_dot, "xla_act_rotate": xla.act_rotate_dot,
           "cpu_native": native.native_dot}
if pallas_kernels is not None:
  METHODS.update(weight_ifwht=pallas_kernels.weight_ifwht.weight_ifwht,
                 act_rotate=pallas_kernels.act_rotate.act_rotate)


def choose(x: jax.ShapeDtypeStruct | jax.Array, qt: qtensor.QuantizedTensor,
           backend: str | None = None) -> str:
  """The method ``"auto"`` runs for this x (..., K), weight and backend.

  CPU: ``"cpu_native"`` for a weight in ``native.FORMATS`` and at most
  NATIVE_MAX_ROWS rows of x in a single-device process when the kernel could
  be built (``native.available()``; the first call builds it), else
  ``"xla_act_rotate"``. TPU: ``"xla_act_rotate"`` (the kernels are Triton;
  interpret mode is for tests): no weight-side transform per call. GPU, where
  the kernels take the format and shape and x has at most AUTO_MAX_ROWS rows:
  ``"act_rotate"`` up to
  AUTO_GEMV_ROWS rows or where its decoder does not widen the dot (terms x
  slots = 256), else ``"weight_ifwht"``;
  otherwise ``"xla"``.
  """
  backend = backend or jax.default_backend()
  rows = 1
  for d in x.shape[:-1]:
    rows *= d
  # The custom call has no partitioning rule: with several devices (a mesh) XLA would
  # gather its operands onto each, so there the XLA method, which shards, stays.
  if (backend == "cpu" and rows <= NATIVE_MAX_ROWS and native.supports(qt)
      and jax.device_count() == 1 and native.available()):
    return "cpu_native"
  if backend not in _GPU_BACKENDS:
    return "xla_act_rotate"
  if pallas_kernels is None:
    return "xla"
  if rows > AUTO_MAX_ROWS or not pallas_kernels.act_rotate.supports(x, qt):
    return "xla"
  dec = kernel_terms.get(qt.format)
  if rows <= AUTO_GEMV_ROWS or dec.terms * dec.slots == blocks.QK:
    return "act_rotate"
  return "weight_ifwht"


@functools.partial(jax.jit, static_argnames="method")
def matmul(x: ArrayLike, qt: qtensor.QuantizedTensor, *, method: str = "auto") -> jax.Array:
  """Computes ``x @ dequantize(qt).T`` in float32.

  Args:
    x: float activations (..., K).
    qt: a 2-D quantized weight of shape (N, K).
    method: ``"auto"`` (:func:`choose`) or one of ``"xla"``, ``"xla_act_rotate"``,
      ``"cpu_native"``, ``"weight_ifwht"``, ``"act_rotate"``.

  Returns:
    float32 (..., N).

  Raises:
    ValueError: unknown method, weight not 2-D, K mismatch.
    NotImplementedError: a Pallas method for a format without a kernel decoder
      (e.g. ``itq3_s``), K < 256, or a non-GPU, non-CPU backend; ``"cpu_native"``
      for a format outside ``native.FORMATS`` or where the kernel could not be built.

  >>> import jax.numpy as jnp, itq3s_jax
  >>> qt = itq3s_jax.quantize(jnp.eye(2, 256))
  >>> itq3s_jax.matmul(jnp.ones((1, 256)), qt, method="xla").shape
  (1, 2)
  """
  x = jnp.asarray(x)
  qtensor.validate(qt)
  if len(qt.shape) != 2:
    raise ValueError(f"matmul needs a 2-D weight (N, K), got shape {qt.shape}.")
  if x.shape[-1] != qt.shape[-1]:
    raise ValueError(f"x has K={x.shape[-1]} but the weight has K={qt.shape[-1]}.")
  if method == "auto":
    method = choose(x, qt)
  if method not in METHODS:
    raise ValueError(f"unknown matmul method {method!r}; known: {sorted(METHODS)} or 'auto'.")
  return METHODS[method](x, qt)
