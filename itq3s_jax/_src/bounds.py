"""The certified error bounds, computed from a tensor's bytes alone, and their float slack.

Two bounds, chosen by how the codes were rounded (``QuantizedTensor.rounding``):

  "nearest":       eps_q, the format's own bound (``Format.bound``; 2 ||Delta||_2
                   for itq3_t, proofs T3);
  "two_neighbour": eps_2 = sqrt(sum_i step_i^2) from the stored steps
                   (``Format.levels``; 2 eps_q for itq3_t, proofs T10), which also
                   covers nearest rounding.
  "unrestricted":  no bound.

Both are exact-arithmetic bounds; :func:`rounding_slack` and :func:`underflow_slack`
add what float32 evaluation can lose (derivation: proofs/README.md, T3).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src import codec
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry

_U = 2.0**-24  # float32 unit roundoff


def rounding_slack(n: int) -> float:
  """Relative float32 slack of the certified bound for a block of n weights.

  ||w - w_hat_fp32|| <= eps + rounding_slack(n) * (||z_hat|| + eps) with
  rounding_slack(n) = (2 L' + n/32 + 13) u (1 + 2^-10), u = 2^-24: the encoder's
  forward and the decoder's inverse transform each err by at most L' u ||.||
  (L' = log2 n, plus 2 when log2 n is odd and 1/sqrt(n) is inexact), the float32
  evaluation of eps_q itself by (n/32 + 3) u eps_q, the encoder's quotient
  rounding by 9 u eps_q, and the step products and input cast by a few u; the
  last factor covers second-order terms (derivation: proofs/README.md, T3).
  It is used for every format, rotated or not (an upper bound for unrotated ones).
  """
  levels = int(math.log2(n))
  rot = levels if levels % 2 == 0 else levels + 2
  return (2 * rot + n / 32 + 13) * _U * (1 + 2.0**-10)


def underflow_slack(n: int) -> float:
  """Absolute float32 slack of the bound for a block of n weights.

  XLA on CPU flushes float32 subnormals to zero, so each of the at most
  2 log2(n) + 8 roundings a value goes through may also lose up to 2^-126
  absolutely; over n values that is (2 log2(n) + 8) sqrt(n) 2^-126 in L2 norm
  (about 4.5e-36 for n = 256: invisible unless the block itself is subnormal).
  """
  return (2 * math.log2(n) + 8) * math.sqrt(n) * float(np.finfo(np.float32).tiny)


def has_bound(format: str) -> bool:
  """Whether ``format`` certifies a worst-case error bound."""
  return registry.get_format(format).bound is not None


def check_certifiable(format: str, rounding: str) -> None:
  """ValueError unless tensors of ``format`` rounded with ``rounding`` certify a bound."""
  fmt = registry.get_format(format)
  if fmt.bound is None:
    bounded = [f for f in registry.format_names() if has_bound(f)]
    raise ValueError(f"format {fmt.name!r} has no certified error bound; use one of {bounded}.")
  if rounding == "unrestricted":
    raise ValueError("this tensor was GPTQ-rounded with rounding='unrestricted': a coefficient "
                     "may sit several levels from its value, so no bound is certified.")
  if rounding not in qtensor.ROUNDINGS:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {qtensor.ROUNDINGS}.")


def error_bound(qt: qtensor.QuantizedTensor, *, include_rounding: bool = True) -> jax.Array:
  """Certified per-block L2 error bound, computed from the stored bytes alone.

  Which bound depends on ``qt.rounding`` (module docstring): eps_q for
  ``"nearest"`` (every ``quantize`` without a Hessian), eps_2 for
  ``"two_neighbour"`` (GPTQ), none for ``"unrestricted"``.

  Args:
    qt: a :class:`QuantizedTensor` (..., K) of a format with a bound.
    include_rounding: add the float32 rounding slack of :func:`rounding_slack` and
      the subnormal flush slack of :func:`underflow_slack` (True: a bound on the
      float32 computation; False: the bound in exact arithmetic).

  Returns:
    float32 (..., nblocks): for each block b of each row,
    ||w_b - dequantize(qt)_b||_2 <= bound[..., b] (blocks in
    ``block_columns`` order).

  Raises:
    ValueError: the format has no worst-case bound (``iq3_s``, ``itq3_s``), or
      ``qt.rounding == "unrestricted"``.

  >>> import jax.numpy as jnp, itq3s_jax
  >>> itq3s_jax.error_bound(itq3s_jax.quantize(jnp.ones((2, 512)))).shape
  (2, 2)
  """
  qtensor.validate(qt)
  check_certifiable(qt.format, qt.rounding)
  return _error_bound(qt.data, format=qt.format, k=qt.k, rounding=qt.rounding,
                      include_rounding=bool(include_rounding))


def two_neighbour_bound(qt: qtensor.QuantizedTensor, *,
                        include_rounding: bool = True) -> jax.Array:
  """eps_2 of ``qt`` whatever its rounding field says: float32 (..., nblocks).

  The bound a two-neighbour (GPTQ) rounding certifies; for a "nearest" tensor
  it is a valid, looser bound than :func:`error_bound`'s eps_q.
  """
  qtensor.validate(qt)
  rounding = "two_neighbour" if qt.rounding == "nearest" else qt.rounding
  check_certifiable(qt.format, rounding)
  if registry.get_format(qt.format).levels is None:
    raise ValueError(f"format {qt.format!r} has no levels hook, so no eps_2.")
  return _error_bound(qt.data, format=qt.format, k=qt.k, rounding=rounding,
                      include_rounding=bool(include_rounding))


@functools.partial(jax.jit, static_argnames=("format", "k", "rounding", "include_rounding"))
def _error_bound(data, *, format, k, rounding, include_rounding):
  fmt = registry.get_format(format)
  out = []
  for seg, z in codec.decoded_segments(data, None, format, k):
    b = codec.segment_bytes(data, seg)
    if rounding == "nearest":
      eps = fmt.bound(b, seg.n)
    else:
      step, _, _ = fmt.levels(b, seg.n)
      eps = jnp.sqrt(jnp.sum(step * step, axis=-1))
    if include_rounding:
      eps = (eps + rounding_slack(seg.n) * (jnp.linalg.norm(z, axis=-1) + eps)
             + underflow_slack(seg.n))
    out.append(eps)
  return codec.concat(out, data.shape[:-1], jnp.float32)
