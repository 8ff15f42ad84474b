"""``QuantizedTensor``: the pytree that holds a quantized weight.

Invariants (checked by :func:`validate`):
  data.dtype == uint8
  data.shape == (*shape[:-1], row_nbytes(format, shape[-1]))
  dequantize(qt).shape == shape
Only ``data`` is a pytree leaf; ``shape``, ``format``, ``seed`` and ``rounding``
are static, so a jitted function recompiles only when those change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src import blocks
from itq3s_jax._src import registry

_MAGIC = b"ITQ3"
_VERSION = 1
# How the encoder chose each code, which decides the bound the bytes certify:
# "nearest": the level nearest the coefficient (eps_q, ``itq3s_jax.error_bound``);
# "two_neighbour": one of the two levels around it (Hessian-aware, 2 eps_q for itq3_t);
# "unrestricted": any level (classical GPTQ): no worst-case bound.
ROUNDINGS = ("nearest", "two_neighbour", "unrestricted")


def row_nbytes(format: str, k: int) -> int:
  """Bytes of one coded row of ``k`` weights in ``format``."""
  fmt = registry.get_format(format)
  return blocks.row_nbytes(blocks.plan(k, fmt.tail, fmt.block_nbytes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A weight of shape ``shape`` quantized along its last axis.

  Attributes:
    data: uint8 (*shape[:-1], row_nbytes): the coded rows (docs/FORMAT.md).
    shape: the logical float shape (..., K).
    format: registered format name.
    seed: sign-vector seed of randomized formats (ignored by the others).
    rounding: how the codes were chosen (``ROUNDINGS``): ``"nearest"`` for
      ``quantize`` without a Hessian, else the GPTQ rounding mode. The bytes
      decode the same either way; only the certified bound differs.
  """

  data: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  format: str = dataclasses.field(metadata=dict(static=True))
  seed: int = dataclasses.field(default=0, metadata=dict(static=True))
  rounding: str = dataclasses.field(default="nearest", metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Stored bytes (the coded data only)."""
    return int(math.prod(self.data.shape))

  @property
  def bits_per_weight(self) -> float:
    """8 * nbytes / number of weights (padding and scales included)."""
    n = math.prod(self.shape)
    return 8.0 * self.nbytes / n if n else 0.0

  def to_bytes(self) -> bytes:
    """Self-describing serialization: b'ITQ3', u32 version, u32 header length, JSON header, data."""
    header = json.dumps({"shape": list(self.shape), "format": self.format,
                         "seed": self.seed, "rounding": self.rounding}).encode()
    return (_MAGIC + struct.pack("<II", _VERSION, len(header)) + header
            + np.asarray(self.data, np.uint8).tobytes())

  @classmethod
  def from_bytes(cls, buf: bytes) -> "QuantizedTensor":
    """Inverse of :meth:`to_bytes`; ValueError on anything malformed."""
    if len(buf) < 12 or buf[:4] != _MAGIC:
      raise ValueError("not an itq3s QuantizedTensor byte string (bad magic).")
    version, hlen = struct.unpack("<II", buf[4:12])
    if version != _VERSION:
      raise ValueError(f"unsupported serialization version {version}; expected {_VERSION}.")
    try:
      header = json.loads(buf[12:12 + hlen])
      shape, fmt, seed = tuple(header["shape"]), header["format"], int(header["seed"])
      rounding = str(header.get("rounding", "nearest"))  # written by every version since
    except (ValueError, KeyError, TypeError) as exc:
      raise ValueError(f"corrupt QuantizedTensor header: {exc}") from None
    body = buf[12 + hlen:]
    want = (*shape[:-1], row_nbytes(fmt, shape[-1]))
    if len(body) != math.prod(want):
      raise ValueError(f"QuantizedTensor data has {len(body)} bytes, expected "
                       f"{math.prod(want)} for shape {shape} in {fmt}.")
    data = jnp.asarray(np.frombuffer(body, np.uint8).reshape(want))
    return validate(cls(data, shape, fmt, seed, rounding))


def validate(qt: QuantizedTensor) -> QuantizedTensor:
  """Checks the invariants in the module docstring; returns ``qt``."""
  if not isinstance(qt, QuantizedTensor):
    raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}.")
  registry.get_format(qt.format)
  if len(qt.shape) < 1:
    raise ValueError("a QuantizedTensor needs at least one axis.")
  if qt.rounding not in ROUNDINGS:
    raise ValueError(f"QuantizedTensor.rounding is {qt.rounding!r}; expected one of {ROUNDINGS}.")
  if qt.data.dtype != jnp.uint8:
    raise ValueError(f"QuantizedTensor.data must be uint8, got {qt.data.dtype}.")
  want = (*qt.shape[:-1], row_nbytes(qt.format, qt.shape[-1]))
  if tuple(qt.data.shape) != want:
    raise ValueError(f"QuantizedTensor.data has shape {tuple(qt.data.shape)}, expected "
                     f"{want} for shape {qt.shape} in format {qt.format!r}.")
  return qt
