"""``quantize``: the one public entry point that codes a weight, with or without a Hessian."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from itq3s_jax._src import codec
from itq3s_jax._src import config
from itq3s_jax._src import gptq as gptq_lib
from itq3s_jax._src.core import fwht
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry


def quantize(w: ArrayLike, format: str = "itq3_t", *, seed: int = 0,
             importance: ArrayLike | None = None, hessian: ArrayLike | None = None,
             gptq: config.GptqConfig | None = None) -> qtensor.QuantizedTensor:
  """Quantizes ``w`` along its last axis.

  Args:
    w: float array (..., K), K a multiple of 32 (float16/bfloat16/float32/
      float64; coded from its float32 value).
    format: a registered format name (``itq3s_jax.formats()``).
    seed: sign-vector seed of randomized formats (a non-negative int; a new
      seed reuses the compiled encoder).
    importance: optional non-negative per-column weights (K,) or (..., K)
      (an "imatrix"): the encoder minimises sum_i a_i (w_i - w_hat_i)^2 where
      the format can. Rotated formats see a_i through their rotation, whose
      diagonal is the block mean of a.
    hessian: optional (K, K) input second moment Sigma = E[x x^T] of the layer
      (``itq3s_jax.calibration``): rounds with GPTQ in the coding domain to
      minimise tr(dW Sigma dW^T); by default each coefficient goes to one of its
      two neighbouring levels, so the bytes still certify a bound.
    gptq: with ``hessian`` only: a :class:`GptqConfig` (rounding, scales,
      damping, act-order); None: the defaults.

  Returns:
    A :class:`QuantizedTensor` with ``data`` uint8 (..., row_nbytes).

  Raises:
    TypeError: non-float ``w``, or a seed that is not an int.
    ValueError: unknown format, K not a multiple of 32, NaN/Inf (eager mode),
      or values beyond the format's range, including rotated blocks that
      overflow float32 (eager mode). Under ``jax.jit`` the value checks cannot
      raise: NaN/Inf give undefined codes and out-of-range values are clipped
      (the certified bound then does not hold), so check inputs first.

  >>> import jax.numpy as jnp, itq3s_jax
  >>> qt = itq3s_jax.quantize(jnp.ones((4, 256)))
  >>> qt.data.shape, qt.bits_per_weight
  ((4, 110), 3.4375)
  """
  fmt = registry.get_format(format)
  seed = fwht.check_seed(seed)
  if hessian is not None:
    if importance is not None:
      raise ValueError("give importance or hessian, not both (the hessian's diagonal is "
                       "the importance GPTQ uses).")
    return gptq_lib.quantize(w, fmt.name, hessian, seed=seed,
                             gptq=gptq if gptq is not None else config.GptqConfig())
  if gptq is not None:
    raise TypeError("gptq= applies to Hessian-aware rounding only; pass hessian=Sigma as well.")
  w = jnp.asarray(w)
  codec.check_input(w)
  imp = None if importance is None else jnp.asarray(importance, jnp.float32)
  data, peak, finite = codec.encode(w, imp, codec.signs(fmt.name, seed), format=fmt.name)
  codec.raise_if_unrepresentable(fmt.name, peak, finite, w)
  return qtensor.QuantizedTensor(data=data, format=fmt.name, k=w.shape[-1], seed=seed)
