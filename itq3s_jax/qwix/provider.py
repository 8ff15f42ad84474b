"""The qwix provider for itq3s formats: array type, qarray shim, contractions, params."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

import itq3s_jax
from itq3s_jax._src.core import qtensor
from itq3s_jax.flax import contraction
from itq3s_jax.qwix import _hooks

_hooks.check()
_SEP = "@"


def qtype(format: str, seed: int = 0) -> str:
  """The ``weight_qtype`` of ``format`` with sign seed ``seed`` (``"itq3_t@7"``)."""
  itq3s_jax.QuantRule(format, seed=seed)  # validates both
  return format if seed == 0 else f"{format}{_SEP}{seed}"


def parse_qtype(q: Any) -> tuple[str, int] | None:
  """(format, seed) of an itq3s ``weight_qtype``, or None for any other qtype."""
  if not isinstance(q, str):
    return None
  name, _, seed = q.partition(_SEP)
  if name not in itq3s_jax.formats():
    return None
  return name, int(seed or 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ItqArray:
  """A qwix weight coded in an itq3s format.

  Attributes:
    data: uint8 (N, row_nbytes): the coded rows of the kernel's (N, K) view.
    rounding_code: int8 scalar, index into ``qtensor.ROUNDINGS``: a leaf, so
      GPTQ's ``"two_neighbour"`` survives pure-dict ``nnx.update`` and orbax.
    shape: the float kernel's shape (static).
    k_axes: its contracted axes, flattened into K in this order (static).
    format, seed: the coding (static); dtype: the float kernel's dtype.
  """

  data: jax.Array
  rounding_code: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  k_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  format: str = dataclasses.field(metadata=dict(static=True))
  seed: int = dataclasses.field(default=0, metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def plan(self) -> contraction.Plan:
    n_axes = tuple(a for a in range(len(self.shape)) if a not in self.k_axes)
    return contraction.Plan(self.shape, self.k_axes, n_axes)

  @property
  def rounding(self) -> str:
    """How the codes were chosen (read from the leaf: not under jit)."""
    return qtensor.ROUNDINGS[int(self.rounding_code)]

  def qt(self, rounding: str | None = None) -> itq3s_jax.QuantizedTensor:
    """The codes as a QuantizedTensor (N, K); ``rounding`` defaults to the stored one."""
    return itq3s_jax.QuantizedTensor(data=self.data, format=self.format, k=self.plan.k,
                                     seed=self.seed, rounding=rounding or self.rounding)

  def dequantize(self) -> jax.Array:
    """The float kernel (``shape``, ``dtype``)."""
    return self.plan.from_nk(itq3s_jax.dequantize(self.qt("nearest"))).astype(self.dtype)

  def astype(self, dtype) -> "ItqArray":
    return dataclasses.replace(self, dtype=jnp.dtype(dtype))


nnx.register_data_type(ItqArray)


def from_tensor(qt: itq3s_jax.QuantizedTensor, shape: tuple[int, ...], k_axes: tuple[int, ...],
                dtype=jnp.float32) -> ItqArray:
  """An ItqArray for a kernel of ``shape`` whose (N, K) view is ``qt``."""
  code = np.int8(qtensor.ROUNDINGS.index(qt.rounding))
  return ItqArray(data=qt.data, rounding_code=jnp.asarray(code), shape=tuple(shape),
                  k_axes=tuple(k_axes), format=qt.format, seed=qt.seed, dtype=jnp.dtype(dtype))


def _k_axes(how, ndim: int) -> tuple[int, ...]:
  if how.tiled_axes:
    raise ValueError(f"tile_size={dict(how.tiled_axes)} does not apply to {how.qtype!r}: its "
                     "blocks of 256 along K are fixed; leave tile_size unset.")
  return tuple(a for a in range(ndim) if a not in set(how.channelwise_axes))


class _QArrayModule:
  """qwix's qarray module, with ``quantize`` coding itq3s qtypes as ItqArray."""

  def __getattr__(self, name):
    return getattr(_hooks.qarray_module, name)

  def quantize(self, array, how, *args, **kwargs):
    parsed = parse_qtype(how.qtype)
    if parsed is None:
      return _hooks.qarray_module.quantize(array, how, *args, **kwargs)
    fmt, seed = parsed
    array = jnp.asarray(array)
    k_axes = _k_axes(how, array.ndim)
    plan = contraction.Plan(tuple(array.shape), k_axes,
                            tuple(a for a in range(array.ndim) if a not in k_axes))
    qt = _hooks.disable_interceptions(itq3s_jax.quantize)(plan.to_nk(array), fmt, seed=seed)
    return from_tensor(qt, array.shape, plan.k_axes, array.dtype)


QARRAY = _QArrayModule()


@functools.partial(jax.jit, static_argnames=("dimension_numbers",))
def _dot(lhs, rhs: ItqArray, dimension_numbers):
  (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
  out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  if lhs_ba or rhs_ba or sorted(rhs_ca) != sorted(rhs.k_axes):
    # Batch axes or another grouping: exact, through the dense weight.
    return jax.lax.dot_general(lhs, rhs.dequantize(), dimension_numbers,
                               precision=jax.lax.Precision.HIGHEST).astype(out_dtype)
  plan = rhs.plan
  order = [lhs_ca[list(rhs_ca).index(a)] for a in plan.k_axes]  # lhs axes in K order
  free = [a for a in range(lhs.ndim) if a not in lhs_ca]
  lead = tuple(lhs.shape[a] for a in free)
  x2 = jnp.transpose(lhs, free + order).reshape(*lead, plan.k)
  y = itq3s_jax.matmul(x2, rhs.qt("nearest"))
  return y.reshape(*lead, *(plan.kernel_shape[a] for a in plan.n_axes)).astype(out_dtype)


def dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
  """qwix's dot_general, with ItqArray weights computed by ``itq3s_jax.matmul``."""
  if not isinstance(rhs, ItqArray):
    return _hooks.qwix_dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
  if not isinstance(lhs, jax.Array):
    raise NotImplementedError("itq3s weights are weight-only: leave act_qtype unset.")
  dn = tuple(tuple(tuple(int(a) for a in axes) for axes in pair) for pair in dimension_numbers)
  return _hooks.disable_interceptions(_dot)(lhs, rhs, dn)


def einsum(einsum_str, *operands, **kwargs):
  """qwix's einsum, with an ItqArray second operand computed as a dot_general."""
  if len(operands) != 2 or not isinstance(operands[1], ItqArray):
    return _hooks.qwix_einsum(einsum_str, *operands, **kwargs)
  lhs, rhs = operands
  lhs_s, rhs_s, out = contraction.split_einsum(einsum_str, lhs.ndim)
  contracted = [c for c in rhs_s if c in lhs_s and c not in out]
  if any(c in lhs_s and c in out for c in rhs_s) or any(
      c not in lhs_s and c not in out for c in rhs_s):
    raise NotImplementedError(f"einsum {einsum_str!r}: batch or lone weight axes.")
  dn = ((tuple(lhs_s.index(c) for c in contracted), tuple(rhs_s.index(c) for c in contracted)),
        ((), ()))
  y = dot_general(lhs, rhs, dn)  # axes: lhs free, then weight outputs
  free = [c for c in lhs_s if c not in contracted]
  letters = "".join(free) + "".join(c for c in rhs_s if c not in contracted)
  extra = tuple(i for i, c in enumerate(letters) if c not in out)
  if extra:  # input letters summed away
    y = jnp.sum(y, axis=extra)
    letters = "".join(c for c in letters if c in out)
  return jnp.transpose(y, [letters.index(c) for c in out])


class PtqProvider(qwix.PtqProvider):
  """``qwix.PtqProvider`` that also takes itq3s formats as ``weight_qtype``.

  Use it wherever qwix takes a provider: ``qwix.quantize_model(model,
  PtqProvider(rules), *inputs)`` (NNX) or ``qwix.quantize_model(module,
  PtqProvider(rules))`` (linen).
  """

  def __init__(self, rules, **kwargs):
    for r in rules:
      if parse_qtype(getattr(r, "weight_qtype", None)) and getattr(r, "act_qtype", None):
        raise ValueError(f"rule {r}: itq3s formats are weight-only; leave act_qtype unset.")
    _hooks.init_ptq_provider(self, rules, qarray_module=QARRAY, dot_general_fn=dot_general,
                             einsum_fn=einsum, **kwargs)


def quantize_params(params, abstract_quantized, **kwargs):
  """``qwix.quantize_params`` that codes itq3s weights (offline PTQ, round to nearest).

  Args:
    params: float params (linen: unboxed dict; NNX: ``nnx.to_pure_dict``).
    abstract_quantized: the PTQ model (NNX, possibly ``nnx.eval_shape``) or its
      abstract params (linen), from :class:`PtqProvider`.
    **kwargs: as ``qwix.quantize_params``.

  Returns:
    The quantized params tree (``nnx.update(abstract, tree)`` for NNX).
  """
  return _hooks.quantize_params(params, abstract_quantized, qarray_module=QARRAY, **kwargs)


def gptq_quantize_params(params, abstract_quantized, gptq_quant_stats, *,
                         gptq: itq3s_jax.GptqConfig | None = None, **kwargs):
  """GPTQ for itq3s weights from ``qwix.contrib.gptq.GptqCalibrationProvider`` statistics.

  Weights with statistics and one contracted axis are rounded with
  ``itq3s_jax.quantize(w, fmt, hessian=H, gptq=gptq)`` (coding-domain GPTQ;
  for itq3_t/uniform3* the default two-neighbour rounding keeps a certified
  bound, recorded in ``ItqArray.rounding``); every other weight as
  :func:`quantize_params` does.

  Args:
    params, abstract_quantized: as :func:`quantize_params`.
    gptq_quant_stats: the ``quant_stats`` collection the calibration provider
      filled (``{..., "<weight>_gptq": {"sum_of_hessian": ..., "count": ...}}``).
    gptq: rounding options (:class:`itq3s_jax.GptqConfig`).
    **kwargs: as ``qwix.quantize_params``.
  """
  from qwix.contrib import calibration  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top

  flat = flax.traverse_util.flatten_dict(params)
  with_stats = {}
  for path, w in flat.items():
    abs_w = _value_at(abstract_quantized, path)
    stats = _value_at(gptq_quant_stats, (*path[:-1], path[-1] + "_gptq"))
    if (isinstance(abs_w, _hooks.WithAux) and parse_qtype(abs_w.how.qtype) and stats is not None
        and len(_k_axes(abs_w.how, np.ndim(w))) == 1):
      with_stats[path] = w

  def _quantize(ctx):
    fmt, seed = parse_qtype(ctx.abs_w.how.qtype)
    qt = _hooks.disable_interceptions(itq3s_jax.quantize)(
        ctx.weight, fmt, seed=seed, hessian=ctx.calibration_stats["hessian"], gptq=gptq)
    w = flat[ctx.path]
    return ctx.abs_w.replace(array=from_tensor(qt, w.shape, (ctx.contracting_axis,), w.dtype))

  gptq_part = calibration.quantize_params_with_calibration(
      flax.traverse_util.unflatten_dict(with_stats), abstract_quantized, gptq_quant_stats,
      "_gptq", _quantize, **kwargs)
  rest = {p: w for p, w in flat.items() if p not in with_stats}
  out = flax.traverse_util.flatten_dict(quantize_params(
      flax.traverse_util.unflatten_dict(rest), abstract_quantized, **kwargs))
  out.update(flax.traverse_util.flatten_dict(gptq_part))
  return flax.traverse_util.unflatten_dict(out)


def _value_at(tree, path):
  node = tree
  for key in path:
    try:
      node = node[key]
    except (KeyError, TypeError, IndexError):
      node = getattr(node, key, None) if isinstance(key, str) else None
    if node is None:
      return None
  return node
