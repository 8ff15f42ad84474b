"""QuantizedTensor: invariants, validate(), serialization errors (no codec arithmetic)."""

from __future__ import annotations

import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax._src.core import qtensor

FMT = "uniform3"  # any registered format; these tests only look at shapes and bytes


def _qt(shape=(2, 256), fmt=FMT, seed=0):
  nb = qtensor.row_nbytes(fmt, shape[-1])
  data = jnp.asarray(np.arange(np.prod(shape[:-1], dtype=int) * nb) % 251, jnp.uint8)
  return itq3s_jax.QuantizedTensor(data=data.reshape(*shape[:-1], nb), format=fmt,
                                   k=shape[-1], seed=seed)


def test_row_nbytes_is_the_block_plan_sum():
  f = itq3s_jax.get_format(FMT)
  assert qtensor.row_nbytes(FMT, 576) == 2 * f.block_nbytes(256) + f.block_nbytes(64)
  assert qtensor.row_nbytes(FMT, 0) == 0


def test_nbytes_and_bits_per_weight():
  qt = _qt((3, 4, 576))
  assert qt.nbytes == 12 * qtensor.row_nbytes(FMT, 576)
  assert qt.bits_per_weight == pytest.approx(8 * qt.nbytes / (12 * 576), rel=1e-15)
  assert _qt((0, 256)).bits_per_weight == 0.0


def test_validate_accepts_a_consistent_tensor():
  qt = _qt()
  assert qtensor.validate(qt) is qt


def test_validate_rejects_each_broken_invariant():
  qt = _qt()
  with pytest.raises(TypeError, match="expected a QuantizedTensor"):
    qtensor.validate(qt.data)
  with pytest.raises(ValueError, match="must be uint8"):
    qtensor.validate(qt.replace(data=qt.data.astype(jnp.int8)))
  with pytest.raises(ValueError, match=r"has 97 bytes per row, expected 98 for K=256"):
    qtensor.validate(qt.replace(data=qt.data[:, :-1]))
  with pytest.raises(ValueError, match="unknown format"):
    qtensor.validate(qt.replace(format="nope"))
  with pytest.raises(ValueError, match="at least one axis"):
    qtensor.validate(qt.replace(data=jnp.zeros((), jnp.uint8)))
  with pytest.raises(ValueError, match="rounding is 'stochastic'"):
    qtensor.validate(qt.replace(rounding="stochastic"))
  with pytest.raises(TypeError, match="seed must be an int"):
    qtensor.validate(qt.replace(seed=1.0))


def test_dequantize_validates_its_input():
  qt = _qt()
  with pytest.raises(ValueError, match="expected"):
    itq3s_jax.dequantize(qt.replace(k=288))


def test_to_bytes_layout():
  qt = _qt(seed=7)
  buf = qt.to_bytes()
  assert buf[:4] == b"ITQ3"
  version, hlen = struct.unpack("<II", buf[4:12])
  assert version == 1
  assert json.loads(buf[12:12 + hlen]) == {"shape": [2, 256], "format": FMT, "seed": 7,
                                           "rounding": "nearest"}
  assert buf[12 + hlen:] == np.asarray(qt.data).tobytes()


@pytest.mark.parametrize("rounding", qtensor.ROUNDINGS)
def test_from_bytes_round_trip_is_exact(rounding):
  qt = dataclasses.replace(_qt((3, 576), seed=2), rounding=rounding)
  back = itq3s_jax.QuantizedTensor.from_bytes(qt.to_bytes())
  assert (back.shape, back.format, back.seed, back.rounding) == (
      qt.shape, qt.format, qt.seed, rounding)
  np.testing.assert_array_equal(np.asarray(back.data), np.asarray(qt.data))


def test_header_without_rounding_reads_as_nearest():
  """Byte strings written before the rounding field existed certify the nearest bound."""
  buf = _with_header(b'{"shape": [1, 256], "format": "uniform3", "seed": 0}', bytes(98))
  assert itq3s_jax.QuantizedTensor.from_bytes(buf).rounding == "nearest"


def _with_header(header: bytes, body: bytes, version: int = 1) -> bytes:
  return b"ITQ3" + struct.pack("<II", version, len(header)) + header + body


@pytest.mark.parametrize("buf, match", [
    (b"", "bad magic"),
    (b"GGUF" + bytes(20), "bad magic"),
    (_with_header(b"{}", b"", version=2), "unsupported serialization version 2"),
    (_with_header(b"not json", b""), "corrupt QuantizedTensor header"),
    (_with_header(b'{"shape": [1, 256]}', b""), "corrupt QuantizedTensor header"),
    (_with_header(b'{"shape": [1, 256], "format": "uniform3", "seed": 0}', bytes(97)),
     "has 97 bytes, expected 98"),
    (_with_header(b'{"shape": [1, 256], "format": "nope", "seed": 0}', bytes(98)),
     "unknown format"),
    (_with_header(b'{"shape": [4.0, 256.0], "format": "uniform3", "seed": 0}', bytes(392)),
     "not a list of 1 to 32 non-negative ints"),
    (_with_header(b'{"shape": [1, 256], "format": "uniform3", "seed": -1}', bytes(98)),
     "seed -1 is not a non-negative int"),
    (_with_header(b'[' * 100000 + b']' * 100000, b""), "corrupt QuantizedTensor header"),
    (_with_header(b'{"shape": [1, 256], "format": ["uniform3"], "seed": 0}', bytes(98)),
     "unknown format"),
])
def test_from_bytes_rejects_malformed_input(buf, match):
  with pytest.raises(ValueError, match=match):
    itq3s_jax.QuantizedTensor.from_bytes(buf)


def test_shape_follows_the_data_under_vmap():
  qt = _qt((3, 2, 256))
  shapes = jax.vmap(lambda q: jnp.zeros(q.shape))(qt).shape
  assert shapes == (3, 2, 256)
  np.testing.assert_array_equal(
      np.asarray(jax.vmap(itq3s_jax.dequantize)(qt)), np.asarray(itq3s_jax.dequantize(qt)))


def test_pytree_leaves_are_the_data_only():
  qt = _qt()
  assert jax.tree.leaves(qt) == [qt.data]
  out = jax.jit(lambda q: q)(qt)
  assert isinstance(out, itq3s_jax.QuantizedTensor)
  assert (out.shape, out.format, out.seed, out.rounding) == (
      qt.shape, qt.format, qt.seed, qt.rounding)


@pytest.mark.parametrize("fmt", ["uniform3", "iq3_s", "itq3_s"])
def test_from_bytes_rejects_codes_that_decode_to_non_finite_values(fmt):
  """Random code bytes can hold an fp16 Inf/NaN scale; from_bytes used to pass them."""
  qt = itq3s_jax.quantize(np.ones((2, 256), np.float32), fmt)
  data = np.asarray(qt.data).copy()
  data[0, :2] = (0x00, 0x7C)  # the first block's fp16 scale (both layouts): +Inf
  with pytest.raises(ValueError, match="decode to non-finite values"):
    itq3s_jax.QuantizedTensor.from_bytes(qt.replace(data=jnp.asarray(data)).to_bytes())
  assert itq3s_jax.QuantizedTensor.from_bytes(qt.to_bytes()).format == fmt
