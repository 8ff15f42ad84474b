"""Any dense contraction of an input with one weight, as an (N, K) quantized matmul.

A weight of shape ``kernel_shape`` whose axes ``k_axes`` are contracted with
the input (together, as one group) and whose other axes ``n_axes`` reach the
output is coded as the matrix ``W2 = kernel.transpose(n_axes + k_axes)
.reshape(N, K)`` (N, K the products of those axes' sizes): blocks run along
the flattened contraction, one coded row per output element. Every such layer
(``nnx.LinearGeneral``, ``nnx.Einsum``, linen ``DenseGeneral``/``Einsum``) is
an einsum ``lhs,rhs->out``; :func:`apply` computes it as

  x (lhs) -> transpose(free letters, contracted letters) -> (..., K)
  -> ``itq3s_jax.matmul`` (float32) -> (..., N) -> (..., *n_shape) -> out order,

so the product is exactly ``einsum(x, dequantize(W2) viewed as kernel)`` up to
float32 summation order. :func:`plan` says whether a layer fits (and why not).
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

import itq3s_jax


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a kernel is viewed as (N, K): axes of the kernel, in order."""

  kernel_shape: tuple[int, ...]
  k_axes: tuple[int, ...]  # contracted with the input, flattened row-major in this order
  n_axes: tuple[int, ...]  # reaching the output

  @property
  def n(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.n_axes)

  @property
  def k(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.k_axes)

  def to_nk(self, kernel: ArrayLike) -> jax.Array:
    """kernel (kernel_shape) -> (N, K)."""
    return jnp.transpose(jnp.asarray(kernel), self.n_axes + self.k_axes).reshape(self.n, self.k)

  def from_nk(self, w: ArrayLike) -> jax.Array:
    """(N, K) -> kernel_shape (inverse of :meth:`to_nk`)."""
    shape = tuple(self.kernel_shape[a] for a in self.n_axes + self.k_axes)
    return jnp.transpose(jnp.reshape(w, shape), np.argsort(self.n_axes + self.k_axes))


def split_einsum(einsum_str: str, x_ndim: int | None = None) -> tuple[str, str, str]:
  """``"...d,df->...f"`` -> (lhs, rhs, out) letters; ``...`` expanded when ``x_ndim`` is given.

  Raises:
    NotImplementedError: not an explicit two-operand einsum.
  """
  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise NotImplementedError(f"einsum {einsum_str!r} is not explicit with two operands.")
  ins, out = s.split("->")
  lhs, rhs = ins.split(",")
  if "." in rhs:
    raise NotImplementedError(f"einsum {einsum_str!r}: an ellipsis on the weight.")
  if "..." in lhs and x_ndim is not None:
    used = set(lhs + rhs + out) - {"."}
    free = [c for c in string.ascii_letters if c not in used]
    fill = "".join(free[:x_ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  return lhs, rhs, out


def plan_einsum(einsum_str: str, kernel_shape: tuple[int, ...]) -> Plan:
  """The (N, K) view of an einsum's weight (its second operand).

  Raises:
    NotImplementedError: the weight has a batch axis (a letter in the input,
      the weight and the output), an axis summed on its own, a repeated
      letter, or no contracted / no output axis.
  """
  lhs, rhs, out = split_einsum(einsum_str)
  if len(rhs) != len(kernel_shape):
    raise NotImplementedError(f"einsum {einsum_str!r} names {len(rhs)} weight axes, the "
                              f"weight has {len(kernel_shape)}.")
  if len(set(rhs)) != len(rhs):
    raise NotImplementedError(f"einsum {einsum_str!r}: a repeated weight letter (a diagonal).")
  k_axes = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
  n_axes = tuple(i for i, c in enumerate(rhs) if c in out and c not in lhs)
  batch = [c for c in rhs if c in lhs and c in out]
  if batch:
    raise NotImplementedError(f"einsum {einsum_str!r}: weight axes {batch} are batch axes "
                              "(one matrix per batch index), not one contraction.")
  lone = [c for c in rhs if c not in lhs and c not in out]
  if lone:
    raise NotImplementedError(f"einsum {einsum_str!r}: weight axes {lone} are summed alone.")
  if not k_axes or not n_axes:
    raise NotImplementedError(f"einsum {einsum_str!r}: the weight needs a contracted and an "
                              "output axis.")
  return Plan(tuple(kernel_shape), k_axes, n_axes)


def linear_general_einsum(n_in: int, n_out: int, axis: tuple[int, ...], x_ndim: int) -> str:
  """The einsum of ``LinearGeneral``/``DenseGeneral`` (no batch axes) for an x of ``x_ndim``.

  Kernel axes are (*in, *out), in contracted with x's ``axis`` (normalised
  against x_ndim); the output is x's other axes then the out axes.
  """
  letters = string.ascii_letters
  xs = letters[:x_ndim]
  norm = [a % x_ndim for a in axis]
  k = "".join(xs[a] for a in norm)
  n = letters[x_ndim:x_ndim + n_out]
  free = "".join(c for i, c in enumerate(xs) if i not in norm)
  return f"{xs},{k}{n}->{free}{n}"


def apply(x: ArrayLike, qt: itq3s_jax.QuantizedTensor, plan: Plan, einsum_str: str, *,
          method: str = "auto") -> jax.Array:
  """``einsum(einsum_str, x, kernel)`` with the kernel stored as ``qt`` (N, K), in float32.

  Args:
    x: the input, matching the einsum's first operand (``...`` allowed).
    qt: the weight as (N, K) (:meth:`Plan.to_nk` of the float kernel, coded).
    plan: its (N, K) view of the kernel.
    einsum_str: the layer's einsum.
    method: ``itq3s_jax.matmul`` method.

  Returns:
    float32 array in the einsum's output layout.
  """
  x = jnp.asarray(x)
  lhs, rhs, out = split_einsum(einsum_str, x.ndim)
  contracted = [rhs[a] for a in plan.k_axes]
  produced = "".join(rhs[a] for a in plan.n_axes)
  free = "".join(c for c in lhs if c not in contracted)
  perm = [lhs.index(c) for c in free] + [lhs.index(c) for c in contracted]
  lead = tuple(x.shape[lhs.index(c)] for c in free)
  x2 = jnp.transpose(x, perm).reshape(*lead, plan.k)
  y = itq3s_jax.matmul(x2, qt, method=method)
  y = y.reshape(*lead, *(plan.kernel_shape[a] for a in plan.n_axes))
  return jnp.einsum(f"{free}{produced}->{out}", y) if f"{free}{produced}" != out else y


def bias_shape(einsum_str: str, x_ndim: int, plan: Plan) -> tuple[int, ...]:
  """How a bias over the weight's output axes broadcasts against the output (as Flax does)."""
  _, rhs, out = split_einsum(einsum_str, x_ndim)
  sizes = {c: plan.kernel_shape[i] for i, c in enumerate(rhs)}
  return tuple(sizes.get(c, 1) for c in out)
