"""NNX ``QuantizedLinear``: an ``nnx.Linear`` whose kernel is 3-bit coded.

The coded bytes live in a :class:`QuantizedWeight` variable, not an
``nnx.Param``, so ``nnx.state(model, nnx.Param)`` and optimizers built on it
(``nnx.Optimizer(model, tx, wrt=nnx.Param)``) see only the float parameters
(biases, norms, embeddings). Format, shape and seed are static Python
attributes: a jitted model recompiles only when they change.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

import itq3s_jax
from itq3s_jax._src.core import blocks
from itq3s_jax.flax import _core

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


class QuantizedWeight(nnx.Variable):
  """uint8 (out_features, row_nbytes): the coded rows of a quantized weight.

  Not an ``nnx.Param``: parameter filters, optimizers and gradients skip it.
  """


SHARDING_KEYS = ("mesh", "sharding_rules", "eager_sharding")


def _shard_count(mesh, names) -> int | None:
  """Devices along mesh axis name(s) ``names`` (a name or a tuple of names); None if unknown."""
  if mesh is None or not getattr(mesh, "shape", None):
    return None
  names = names if isinstance(names, tuple) else (names,)
  try:
    return math.prod(int(mesh.shape[n]) for n in names)
  except KeyError:
    return None


def check_k_shards(k: int | None, names, mesh) -> None:
  """Row-parallel kernels: K split over devices must split into whole 256-weight blocks.

  Each coded row is a sequence of 256-weight blocks along K, so a K shard is a
  contiguous run of whole blocks (its bytes a contiguous slice of the row)
  exactly when K / shards is a multiple of 256.

  Raises:
    ValueError: K / shards is not a multiple of the block.
  """
  m = _shard_count(mesh, names)
  if k is None or m is None or m == 1:
    return
  if k % (blocks.QK * m):
    raise ValueError(f"the kernel's K={k} is sharded {m} ways along {names!r}: each shard "
                     f"would hold {k / m:g} weights, not a whole number of {blocks.QK}-weight "
                     f"blocks; use K a multiple of {blocks.QK * m}, or shard the output axis "
                     "instead.")


def transposed_sharding(sharding, k: int | None = None):
  """The NamedSharding of a kernel (in, out) as the coded rows' (out, in); else None.

  A sharded ``in`` (K, row-parallel) shards the byte axis: whole blocks per
  shard (:func:`check_k_shards`).
  """
  if not isinstance(sharding, jax.sharding.NamedSharding) or len(sharding.spec) != 2:
    return None
  spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
  if spec[0] is not None:
    check_k_shards(k, spec[0], sharding.mesh)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[1], spec[0]))


def sharding_metadata(var: nnx.Variable, transpose: bool, k: int | None = None
                      ) -> dict[str, Any]:
  """Sharding metadata of a float Variable, carried over to its replacement.

  With ``transpose``, kernel names (in_ax, out_ax) become the coded data's
  (out_ax, in_ax): rows (output features) shard along out_ax, and a K shard
  (row-parallel) is a slice of each row's bytes, which needs whole blocks per
  shard (checked against the mesh when one is known; ``k`` = in_features).
  """
  meta = var.get_metadata()
  out = {k_: meta[k_] for k_ in SHARDING_KEYS if k_ in meta}
  names = meta.get("out_sharding")
  if names:
    if transpose:
      if len(names) != 2:
        raise ValueError(f"kernel out_sharding must name 2 axes, got {names}.")
      if names[0] is not None:
        value = var.get_value()
        mesh = (meta.get("mesh") or getattr(getattr(value, "sharding", None), "mesh", None)
                or jax.sharding.get_abstract_mesh())
        check_k_shards(k, names[0], mesh)
      names = (names[1], names[0])
    out["out_sharding"] = tuple(names)
  return out


class QuantizedLinear(nnx.Module):
  """A linear layer ``y = x @ W.T + b`` with W stored in a 3-bit format.

  Mirrors ``nnx.Linear``; the weight is a :class:`itq3s_jax.QuantizedTensor`
  of shape (out_features, in_features), blocks running along in_features.
  The product runs through ``itq3s_jax.matmul`` in float32 and is cast to
  the layer dtype.

  >>> from flax import nnx
  >>> from itq3s_jax import flax as qflax
  >>> layer = qflax.QuantizedLinear(256, 8, rngs=nnx.Rngs(0))
  >>> layer.weight[...].shape, layer.weight[...].dtype, layer.bias[...].shape
  ((8, 110), dtype('uint8'), (8,))

  Attributes:
    weight: :class:`QuantizedWeight` uint8 (out_features, row_nbytes).
    bias: ``nnx.Param`` (out_features,) of param_dtype, or None.
    in_features, out_features, format, seed, rounding, use_bias, dtype,
    param_dtype, method: static configuration.
  """

  def __init__(self, in_features: int, out_features: int, *,
               format: str = "itq3_t", seed: int = 0, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               kernel_init: nnx.Initializer = _default_kernel_init,
               bias_init: nnx.Initializer = _default_bias_init,
               method: str = "auto",
               rngs: nnx.Rngs | None = None,
               weight: itq3s_jax.QuantizedTensor | None = None,
               bias: ArrayLike | None = None,
               weight_metadata: Mapping[str, Any] = MappingProxyType({}),
               bias_metadata: Mapping[str, Any] = MappingProxyType({})):
    """Builds the layer from a random float init, or from given ``weight``/``bias``.

    Args:
      in_features: K, a multiple of 32.
      out_features: N.
      format: registered format name (``itq3s_jax.formats()``).
      seed: sign-vector seed of randomized formats.
      use_bias: whether to add a bias.
      dtype: output dtype; None promotes the input dtype with param_dtype.
      param_dtype: dtype of the bias (and of the float kernel before coding).
      kernel_init: float kernel initializer, called with shape (in, out)
        like ``nnx.Linear``'s; the result is quantized.
      bias_init: bias initializer.
      method: ``itq3s_jax.matmul`` method (``"auto"``, ``"xla"``, ...).
      rngs: random streams; required unless ``weight`` is given.
      weight: an already quantized (out_features, in_features) tensor; its
        format and seed must match ``format`` and ``seed``.
      bias: float (out_features,) used instead of ``bias_init`` when given.
      weight_metadata: Variable metadata of :class:`QuantizedWeight`, e.g.
        ``{"out_sharding": ("model", None)}`` to shard output features.
      bias_metadata: Variable metadata of the bias, e.g.
        ``{"out_sharding": ("model",)}``.
    """
    if weight is None:
      if rngs is None:
        raise TypeError("QuantizedLinear needs rngs=nnx.Rngs(...) to initialise its "
                        "weight, or an already quantized weight=QuantizedTensor.")
      kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
      weight = _core.quantize_kernel(kernel, format, seed)
    elif not isinstance(weight, itq3s_jax.QuantizedTensor):
      raise TypeError(f"weight must be a QuantizedTensor, got {type(weight).__name__}.")
    if weight.shape != (out_features, in_features):
      raise ValueError(f"weight has shape {weight.shape}, expected (out_features, "
                       f"in_features) = {(out_features, in_features)}.")
    if (weight.format, weight.seed) != (format, seed):
      raise ValueError(f"weight is {weight.format!r} with seed {weight.seed} but the layer "
                       f"was asked for {format!r} with seed {seed}; pass format="
                       f"{weight.format!r}, seed={weight.seed}.")
    self.weight = QuantizedWeight(weight.data, **weight_metadata)
    if use_bias:
      if bias is None:
        key = rngs.params() if rngs is not None else jax.random.key(0)
        bias = bias_init(key, (out_features,), param_dtype)
      bias = jnp.asarray(bias, param_dtype)
      if bias.shape != (out_features,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({out_features},).")
      self.bias = nnx.Param(bias, **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.format = weight.format
    self.seed = weight.seed
    self.rounding = weight.rounding  # which bound error_bound(layer.qt) certifies
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.method = method

  @property
  def qt(self) -> itq3s_jax.QuantizedTensor:
    """The weight as a QuantizedTensor of shape (out_features, in_features)."""
    return itq3s_jax.QuantizedTensor(data=self.weight[...], format=self.format,
                                     k=self.in_features, seed=self.seed, rounding=self.rounding)

  def __call__(self, x: ArrayLike) -> jax.Array:
    """(..., in_features) -> (..., out_features) of the layer dtype."""
    bias = self.bias[...] if self.bias is not None else None
    return _core.dense(x, self.qt, bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       method=self.method)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, format: str = "itq3_t", seed: int = 0,
                  method: str = "auto", weight: itq3s_jax.QuantizedTensor | None = None
                  ) -> "QuantizedLinear":
    """Quantizes an ``nnx.Linear`` (kernel (in, out)) into a new layer.

    The bias is copied; the kernel's ``out_sharding`` (in_ax, out_ax) becomes
    the weight's (out_ax, None), so output features keep their sharding.

    Args:
      linear: the float layer.
      format: registered format name.
      seed: sign-vector seed of randomized formats.
      method: ``itq3s_jax.matmul`` method.
      weight: the kernel already quantized (e.g. with GPTQ), shape
        (out_features, in_features); None quantizes it to nearest here.

    Returns:
      A QuantizedLinear computing ``x @ dequantize(qt).T + b``.
    """
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"from_linear needs an nnx.Linear, got {type(linear).__name__}.")
    if weight is None:
      weight = _core.quantize_kernel(linear.kernel[...], format, seed)
    weight_metadata = sharding_metadata(linear.kernel, transpose=True, k=linear.in_features)
    bias_metadata = {}
    if linear.bias is not None:
      bias_metadata = sharding_metadata(linear.bias, transpose=False)
    return cls(linear.in_features, linear.out_features, format=format, seed=seed,
               use_bias=linear.bias is not None, dtype=linear.dtype,
               param_dtype=linear.param_dtype, method=method, weight=weight,
               bias=None if linear.bias is None else linear.bias[...],
               weight_metadata=weight_metadata, bias_metadata=bias_metadata)
