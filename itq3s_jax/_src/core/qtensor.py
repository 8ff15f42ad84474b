"""``QuantizedTensor``: the pytree that holds a quantized weight.

Invariants (checked by :func:`validate`):
  data.dtype == uint8
  data.shape == (*lead, row_nbytes(format, k)),  shape == (*lead, k)
  dequantize(qt).shape == shape
Only ``data`` is a pytree leaf; ``format``, ``k``, ``seed`` and ``rounding`` are
static. ``shape`` is derived from ``data``, so ``vmap`` over leading axes and
``shard_map`` over rows see a consistent tensor without rebuilding it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import registry

_MAGIC = b"ITQ3"
_VERSION = 1
_MAX_HEADER = 1 << 16  # a header is a few dozen bytes; anything larger is not ours
_MAX_RANK = 32
# How the encoder chose each code, which decides the bound the bytes certify:
# "nearest": the level nearest the coefficient (eps_q);
# "two_neighbour": one of the two levels around it (Hessian-aware, 2 eps_q for itq3_t);
# "unrestricted": any level (classical GPTQ): no worst-case bound.
ROUNDINGS = ("nearest", "two_neighbour", "unrestricted")


def segments(format: str, k: int) -> tuple[blocks.Segment, ...]:
  """The block plan of a row of ``k`` weights in ``format`` (``blocks.plan``)."""
  fmt = registry.get_format(format)
  return blocks.plan(k, fmt.tail, fmt.block_nbytes)


def row_nbytes(format: str, k: int) -> int:
  """Bytes of one coded row of ``k`` weights in ``format``."""
  return blocks.row_nbytes(segments(format, k))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
  """A weight of shape (..., k) quantized along its last axis.

  Attributes:
    data: uint8 (..., row_nbytes): the coded rows (docs/FORMAT.md).
    format: registered format name.
    k: logical length of a row (the contraction axis K).
    seed: sign-vector seed of randomized formats (ignored by the others).
    rounding: how the codes were chosen (``ROUNDINGS``): ``"nearest"`` for
      ``quantize`` without a Hessian, else the GPTQ rounding mode. The bytes
      decode the same either way; only the certified bound differs.
  """

  data: jax.Array
  format: str = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))
  seed: int = dataclasses.field(default=0, metadata=dict(static=True))
  rounding: str = dataclasses.field(default="nearest", metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical float shape (..., k)."""
    return (*self.data.shape[:-1], self.k)

  @property
  def nbytes(self) -> int:
    """Stored bytes (the coded data only)."""
    return int(math.prod(self.data.shape))

  @property
  def bits_per_weight(self) -> float:
    """8 * nbytes / number of weights (padding and scales included)."""
    n = math.prod(self.shape)
    return 8.0 * self.nbytes / n if n else 0.0

  def replace(self, **changes) -> "QuantizedTensor":
    return dataclasses.replace(self, **changes)

  def to_bytes(self) -> bytes:
    """Self-describing serialization: b'ITQ3', u32 version, u32 header length, JSON header, data."""
    header = json.dumps({"shape": list(self.shape), "format": self.format,
                         "seed": self.seed, "rounding": self.rounding}).encode()
    return (_MAGIC + struct.pack("<II", _VERSION, len(header)) + header
            + np.asarray(self.data, np.uint8).tobytes())

  @classmethod
  def from_bytes(cls, buf: bytes) -> "QuantizedTensor":
    """Inverse of :meth:`to_bytes`; ValueError on anything malformed.

    Every field of the header is type-checked, the data length must match the
    shape, and the codes must decode to finite values (:func:`check_values`).
    """
    buf = bytes(buf)
    if len(buf) < 12 or buf[:4] != _MAGIC:
      raise ValueError("not an itq3s QuantizedTensor byte string (bad magic).")
    version, hlen = struct.unpack("<II", buf[4:12])
    if version != _VERSION:
      raise ValueError(f"unsupported serialization version {version}; expected {_VERSION}.")
    if hlen > min(_MAX_HEADER, len(buf) - 12):
      raise ValueError(f"corrupt QuantizedTensor header: declares {hlen} bytes.")
    try:
      header = json.loads(buf[12:12 + hlen])
    except (ValueError, RecursionError) as exc:
      raise ValueError(f"corrupt QuantizedTensor header: {type(exc).__name__}") from None
    shape, fmt, seed, rounding = _header_fields(header)
    body = buf[12 + hlen:]
    want = (*shape[:-1], row_nbytes(fmt, shape[-1]))
    if len(body) != math.prod(want):
      raise ValueError(f"QuantizedTensor data has {len(body)} bytes, expected "
                       f"{math.prod(want)} for shape {shape} in {fmt}.")
    data = jnp.asarray(np.frombuffer(body, np.uint8).reshape(want))
    return check_values(cls(data=data, format=fmt, k=shape[-1], seed=seed, rounding=rounding))


def _header_fields(header) -> tuple[tuple[int, ...], str, int, str]:
  """(shape, format, seed, rounding) of a to_bytes header, every field type-checked."""
  if not isinstance(header, dict):
    raise ValueError("corrupt QuantizedTensor header: not a JSON object.")
  shape, fmt = header.get("shape"), header.get("format")
  seed, rounding = header.get("seed"), header.get("rounding", "nearest")
  if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_RANK
      or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
    raise ValueError(f"corrupt QuantizedTensor header: shape {shape!r} is not a list of "
                     f"1 to {_MAX_RANK} non-negative ints.")
  if not isinstance(fmt, str) or fmt not in registry.format_names():
    raise ValueError(f"corrupt QuantizedTensor header: unknown format {fmt!r}.")
  if type(seed) is not int or not 0 <= seed < 1 << 63:
    raise ValueError(f"corrupt QuantizedTensor header: seed {seed!r} is not a non-negative int.")
  if rounding not in ROUNDINGS:
    raise ValueError(f"corrupt QuantizedTensor header: rounding {rounding!r} not in {ROUNDINGS}.")
  if shape[-1] % blocks.MIN_K_MULTIPLE:
    raise ValueError(f"corrupt QuantizedTensor header: K={shape[-1]} is not a multiple of "
                     f"{blocks.MIN_K_MULTIPLE}.")
  return tuple(shape), fmt, seed, rounding


def validate(qt: QuantizedTensor) -> QuantizedTensor:
  """Checks the invariants in the module docstring; returns ``qt``."""
  if not isinstance(qt, QuantizedTensor):
    raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}.")
  registry.get_format(qt.format)
  if qt.rounding not in ROUNDINGS:
    raise ValueError(f"QuantizedTensor.rounding is {qt.rounding!r}; expected one of {ROUNDINGS}.")
  blocks.as_index(qt.seed, "QuantizedTensor.seed")
  if qt.seed < 0:
    raise ValueError(f"QuantizedTensor.seed={qt.seed} must be non-negative.")
  if not hasattr(qt.data, "dtype") or qt.data.dtype != jnp.uint8:
    raise ValueError(f"QuantizedTensor.data must be uint8, got "
                     f"{getattr(qt.data, 'dtype', type(qt.data).__name__)}.")
  if qt.data.ndim < 1:
    raise ValueError("QuantizedTensor.data needs at least one axis (the coded bytes).")
  want = row_nbytes(qt.format, qt.k)
  if qt.data.shape[-1] != want:
    raise ValueError(f"QuantizedTensor.data has {qt.data.shape[-1]} bytes per row, expected "
                     f"{want} for K={qt.k} in format {qt.format!r}.")
  return qt


# Largest |coding-domain value| a stored block may decode to: the unnormalized
# Hadamard sums of the inverse transform (n <= 256 terms) then stay finite in
# float32. Real codes decode to at most each format's max_abs (< 1e8).
DECODE_LIMIT = float(np.finfo(np.float32).max) / 256


@functools.partial(jax.jit, static_argnames=("format", "k"))
def _decoded_peak(data, *, format, k):
  fmt = registry.get_format(format)
  peak = jnp.zeros((), jnp.float32)
  for seg in segments(format, k):
    b = data[..., seg.byte_start:seg.byte_stop].reshape(*data.shape[:-1], seg.count, seg.nbytes)
    z = fmt.decode(b, seg.n)
    peak = jnp.maximum(peak, jnp.max(jnp.where(jnp.isfinite(z), jnp.abs(z), jnp.inf),
                                     initial=0.0))
  return peak


def check_values(qt: QuantizedTensor) -> QuantizedTensor:
  """:func:`validate`, then ValueError unless every block decodes to finite values.

  Random or damaged code bytes can hold non-finite or huge stored scales (an fp16
  Inf/NaN), which decode to Inf/NaN weights. Readers of untrusted bytes
  (``from_bytes``, the checkpoint and GGUF readers) call this; ``quantize``
  never produces such codes. Skipped for traced data (nothing to inspect).
  """
  validate(qt)
  if isinstance(qt.data, jax.core.Tracer) or not math.prod(qt.data.shape):
    return qt
  peak = float(_decoded_peak(qt.data, format=qt.format, k=qt.k))
  if not peak <= DECODE_LIMIT:
    raise ValueError(f"QuantizedTensor codes of format {qt.format!r} decode to "
                     f"{'non-finite values' if not math.isfinite(peak) else f'|z| = {peak:.3g}'}"
                     " (damaged or random scale bytes); refusing them.")
  return qt
