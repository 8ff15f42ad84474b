"""Which tensors of a checkpoint are quantized, and why the others are kept.

The rules, in order (the first that applies decides; see :func:`decide`):

| rule | tensor | action |
|---|---|---|
| dtype | not float16/bfloat16/float32/float64 | keep |
| ``exclude`` | name matches ``--exclude`` | keep |
| ``include`` | ``--include`` given and the name does not match it | keep |
| rank | not 2-D (norm scales, biases, conv kernels, scalars) | keep |
| embedding | name looks like an embedding or output head, unless ``quantize_embeddings`` | keep |
| size | fewer than ``min_size`` weights | keep |
| K | K (the contraction axis) not a multiple of 32 | skip, with the reason |
| otherwise | a 2-D linear weight | quantize |

Kept tensors are copied unchanged (same dtype) into the destination.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from itq3s_jax._src import blocks
from itq3s_jax._src import registry

_FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")
# HF, GGUF and Flax spellings of token/position embeddings and the output head.
EMBEDDING_RE = r"(embed|wte|wpe|token_embd|tok_embeddings|lm_head|(^|[./])output\.weight$)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
  """How ``convert`` chooses and codes tensors.

  Attributes:
    format: registered format name for quantized tensors.
    seed: sign-vector seed of randomized formats (the same for every tensor).
    include: regex (``re.search``); None means every name is a candidate.
    exclude: regex; None means nothing is excluded.
    min_size: smallest number of weights worth quantizing.
    quantize_embeddings: also quantize embeddings and the output head.

  Calibration (input statistics per tensor, GPTQ rounding) is not a policy
  field: it is the ``calibration`` argument of ``convert``.
  """

  format: str = "itq3_t"
  seed: int = 0
  include: str | None = None
  exclude: str | None = None
  min_size: int = 4096
  quantize_embeddings: bool = False

  def __post_init__(self):
    registry.get_format(self.format)
    for regex in (self.include, self.exclude):
      if regex is not None:
        try:
          re.compile(regex)
        except re.error as exc:
          raise ValueError(f"invalid regular expression {regex!r}: {exc}.") from None
    if self.min_size < 0 or self.seed < 0:
      raise ValueError(f"min_size={self.min_size} and seed={self.seed} must be >= 0.")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Decision:
  quantize: bool
  reason: str  # one short phrase for the summary table


def decide(policy: Policy, name: str, shape: tuple[int, ...], dtype: np.dtype,
           k_axis: int = -1) -> Decision:
  """Applies the rules of the module docstring to one tensor."""
  if np.dtype(dtype).name not in _FLOAT_KINDS:
    return Decision(False, f"kept: {np.dtype(dtype).name} is not a float type")
  if policy.exclude is not None and re.search(policy.exclude, name):
    return Decision(False, "kept: matches --exclude")
  if policy.include is not None and not re.search(policy.include, name):
    return Decision(False, "kept: does not match --include")
  if len(shape) != 2:
    return Decision(False, f"kept: {len(shape)}-D (norm, bias or non-linear)")
  if not policy.quantize_embeddings and re.search(EMBEDDING_RE, name, re.IGNORECASE):
    return Decision(False, "kept: embedding/output head")
  if math.prod(shape) < policy.min_size:
    return Decision(False, f"kept: fewer than {policy.min_size} weights")
  k = shape[k_axis]
  if k % blocks.MIN_K_MULTIPLE:
    return Decision(False, f"skipped: K={k} is not a multiple of {blocks.MIN_K_MULTIPLE}")
  return Decision(True, f"quantized: {policy.format}")
