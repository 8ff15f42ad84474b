"""Typed configuration: which weights to quantize (:class:`QuantRule`) and how GPTQ rounds.

One rule object serves model surgery (``itq3s_jax.flax``) and checkpoint
conversion (``itq3s convert``): both call :meth:`QuantRule.decide` with a
weight's name, shape and dtype, so a model and its converted checkpoint keep
the same tensors in float for the same reasons.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import fwht
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry

ROUNDINGS = qtensor.ROUNDINGS
GPTQ_ROUNDINGS = ROUNDINGS[1:]  # what GPTQ may be asked for ("nearest" is plain quantize)
SCALES = ("rtn", "weighted")
_FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")
# HF, GGUF and Flax spellings of token/position embeddings and the output head.
EMBEDDING_RE = r"(embed|wte|wpe|token_embd|tok_embeddings|lm_head|(^|[./])output\.weight$)"


def _check_regex(name: str, pattern: str | None) -> None:
  if pattern is None:
    return
  if not isinstance(pattern, str):
    raise TypeError(f"{name} must be a regex string or None, got {type(pattern).__name__}.")
  try:
    re.compile(pattern)
  except re.error as exc:
    raise ValueError(f"{name}={pattern!r} is not a valid regex: {exc}.") from None


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """Which weights to quantize, and in which format.

  Rules, in order (the first that applies decides; :meth:`decide`):

  | rule | weight | action |
  |---|---|---|
  | dtype | not float16/bfloat16/float32/float64 | keep |
  | ``exclude`` | name matches (``re.search``) | keep |
  | ``include`` | given, and the name does not match | keep |
  | rank | not 2-D (with several ``k_axis`` axes: fewer than 2 axes) | keep |
  | empty | no weights | keep |
  | embedding | name looks like an embedding or output head, unless ``quantize_embeddings`` | keep |
  | size | fewer than ``min_size`` weights | keep |
  | K | the contraction axes' size is not a multiple of 32 | keep, with the reason |
  | otherwise | a linear weight | quantize |

  Names are dotted paths in a model (``"layers.0.mlp.up_proj"``) or tensor
  names in a checkpoint (``"model.layers.0.mlp.up_proj.weight"``); anchor the
  regexes with ``^``/``$`` for exact matches.

  >>> rule = QuantRule("uniform3", exclude="lm_head")
  >>> rule.decide("layers.0.fc", (64, 256), "float32")
  Decision(quantize=True, reason='quantized: uniform3')
  """

  format: str = "itq3_t"  # a registered format name
  _: dataclasses.KW_ONLY
  seed: int = 0  # sign-vector seed of randomized formats (the same for every weight)
  include: str | None = None  # regex; None: every name is a candidate
  exclude: str | None = None  # regex; None: nothing is excluded
  min_size: int = 0  # smallest number of weights worth quantizing
  quantize_embeddings: bool = False  # also embeddings and the output head

  def __post_init__(self):
    registry.get_format(self.format)
    fwht.check_seed(self.seed)
    _check_regex("include", self.include)
    _check_regex("exclude", self.exclude)
    if blocks.as_index(self.min_size, "min_size") < 0:
      raise ValueError(f"min_size={self.min_size} must be a non-negative int.")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def decide(self, name: str, shape: tuple[int, ...], dtype,
             k_axis: int | tuple[int, ...] = -1) -> "Decision":
    """Applies the rules of the class docstring to one weight.

    Args:
      name: dotted model path or checkpoint tensor name.
      shape: the weight's shape as stored.
      dtype: its dtype (anything ``np.dtype`` takes, or a name).
      k_axis: its contraction axis: -1 for (out, in), 0 for Flax kernels (in,
        out); or a tuple of axes contracted together (``nnx.LinearGeneral``,
        ``nnx.Einsum``): the weight is then coded as (N, K) with K the product
        of those axes and N of the others, so any rank >= 2 qualifies.
    """
    dname = np.dtype(dtype).name
    if dname not in _FLOAT_KINDS:
      return Decision(False, f"kept: {dname} is not a float type")
    if self.exclude is not None and re.search(self.exclude, name):
      return Decision(False, f"kept: matches exclude={self.exclude!r}")
    if self.include is not None and not re.search(self.include, name):
      return Decision(False, f"kept: does not match include={self.include!r}")
    k_axes = k_axis_tuple(k_axis, len(shape))
    if len(shape) < 2 or (len(shape) != 2 and isinstance(k_axis, int)):
      return Decision(False, f"kept: {len(shape)}-D (norm, bias or non-linear)")
    if math.prod(shape) == 0:
      return Decision(False, "kept: empty")
    if not self.quantize_embeddings and re.search(EMBEDDING_RE, name, re.IGNORECASE):
      return Decision(False, "kept: embedding/output head")
    if math.prod(shape) < self.min_size:
      return Decision(False, f"kept: fewer than min_size={self.min_size} weights")
    k = math.prod(shape[a] for a in k_axes)
    if len(k_axes) == len(shape):
      return Decision(False, "kept: every axis is contracted (no output axis)")
    if k % blocks.MIN_K_MULTIPLE:
      return Decision(False, f"kept: K={k} is not a multiple of {blocks.MIN_K_MULTIPLE}")
    return Decision(True, f"quantized: {self.format}")


def k_axis_tuple(k_axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  """``k_axis`` as a tuple of distinct non-negative axes of an ``ndim``-D weight.

  Raises:
    ValueError: an axis out of range or repeated.
  """
  axes = (k_axis,) if isinstance(k_axis, int) else tuple(k_axis)
  if not axes or not all(isinstance(a, int) and -max(ndim, 1) <= a < max(ndim, 1) for a in axes):
    raise ValueError(f"k_axis={k_axis!r} must name axes of a {ndim}-D weight.")
  out = tuple(a % max(ndim, 1) for a in axes)
  if len(set(out)) != len(out):
    raise ValueError(f"k_axis={k_axis!r} names an axis twice.")
  return out


@dataclasses.dataclass(frozen=True)
class Decision:
  quantize: bool
  reason: str  # one short phrase for reports and tables


@dataclasses.dataclass(frozen=True, kw_only=True)
class GptqConfig:
  """How Hessian-aware rounding (GPTQ in the coding domain) picks codes.

  >>> GptqConfig(act_order=False).resolve("itq3_t").rounding
  'two_neighbour'
  """

  rounding: str | None = None  # "two_neighbour" | "unrestricted"; None: default_rounding(format)
  scales: str = "weighted"  # "rtn": the format's plain encoder; "weighted": weighted by diag(Sigma_z)
  damp: float = 0.01  # diagonal damping relative to mean(diag Sigma_z); > 0
  act_order: bool = True  # round the columns of largest diag(Sigma_z) first
  refit: int = 0  # itq3_t: rounds of re-fitting the step codes to the codes, then re-rounding

  def __post_init__(self):
    if self.rounding is not None and self.rounding not in GPTQ_ROUNDINGS:
      raise ValueError(f"unknown rounding={self.rounding!r}; choose one of {GPTQ_ROUNDINGS}.")
    if self.scales not in SCALES:
      raise ValueError(f"unknown scales={self.scales!r}; choose one of {SCALES}.")
    if not (isinstance(self.damp, (int, float)) and self.damp > 0 and math.isfinite(self.damp)):
      raise ValueError(f"damp={self.damp!r} must be a finite number > 0 (e.g. 0.01).")
    if not isinstance(self.act_order, bool):
      raise TypeError(f"act_order must be a bool, got {type(self.act_order).__name__}.")
    if blocks.as_index(self.refit, "refit") < 0:
      raise ValueError(f"refit={self.refit} must be a non-negative int.")

  def resolve(self, format: str) -> "GptqConfig":
    """This config with ``rounding`` chosen for ``format``; ValueError if it cannot apply."""
    fmt = registry.get_format(format)
    rounding = default_rounding(format) if self.rounding is None else self.rounding
    if rounding == "two_neighbour" and fmt.snap is not None:
      raise ValueError(f"rounding='two_neighbour' needs a per-coefficient grid; {fmt.name!r} "
                       "codes groups on a codebook (and has no bound): use rounding='unrestricted'.")
    if self.refit and fmt.name != "itq3_t":
      raise NotImplementedError(f"refit re-fits itq3_t's step codes; {fmt.name!r} has other "
                                "scales: use refit=0.")
    return dataclasses.replace(self, rounding=rounding, damp=float(self.damp))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def default_rounding(format: str) -> str:
  """``"two_neighbour"`` for formats with a certified bound (it keeps one), else ``"unrestricted"``."""
  return "two_neighbour" if registry.get_format(format).bound is not None else "unrestricted"
