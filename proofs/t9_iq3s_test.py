"""T9: IQ3_S-coded formats decode bit-exactly like gguf; no worst-case bound exists.

Every registered format whose blocks are GGML IQ3_S bytes (``gguf_type`` 21 = IQ3_S, and
41 = ITQ3_S, which stores IQ3_S codes of H w / 16) joins automatically:

(a) the codec's coding-domain decode equals ``gguf.quants.dequantize(bytes, IQ3_S)``
    bit for bit, on random valid bytes and on encoder output; the full dequantize of a
    transformed format is within phi(256) ||z_hat|| of the float64 inverse (T2);
(b) no certified bound: error_bound raises ValueError, and the grid has no zero level:
    with d > 0 every decoded |y_i| >= d (odd magnitudes >= 1, multipliers 1 + 2 s >= 1),
    so an error bound from the bytes cannot vanish on blocks with zeros; the worst
    relative error we constructed is a one-hot block (README T9).
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import itq3s_jax
from proofs import harness
from proofs import strategies

IQ3S_TYPES = (21, 41)  # GGML IQ3_S, ITQ3_S (IQ3_S bytes in the Hadamard domain)


def iq3s_formats() -> tuple[str, ...]:
  return tuple(f for f in itq3s_jax.formats() if itq3s_jax.get_format(f).gguf_type in IQ3S_TYPES)


def _gguf(b: np.ndarray) -> np.ndarray:
  return np.asarray(gguf.quants.dequantize(b, gguf.GGMLQuantizationType.IQ3_S), np.float32)


def random_blocks(draw: int, rows: int = 4) -> np.ndarray:
  """uint8 (rows, 110) random IQ3_S blocks with a finite fp16 d (any sign, subnormals too)."""
  rng = np.random.default_rng(draw)
  b = rng.integers(0, 256, (rows, 110)).astype(np.uint8)
  d = rng.integers(0, 0x7C00, rows)  # finite magnitudes
  d |= rng.integers(0, 2, rows) << 15
  b[:, 0], b[:, 1] = d & 0xFF, d >> 8
  return b


@harness.check("T9", st.integers(0, 2**32 - 1))
def decode_matches_gguf_random_bytes(draw: int) -> float | None:
  b = random_blocks(draw)
  for fmt in iq3s_formats():
    got = np.asarray(itq3s_jax.get_format(fmt).decode(jnp.asarray(b), 256))
    np.testing.assert_array_equal(got.view(np.uint32), _gguf(b).view(np.uint32), err_msg=fmt)
  return 0.0 if iq3s_formats() else None


@harness.check("T9", strategies.cases())
def decode_matches_gguf_encoded(case: strategies.Case) -> float | None:
  worst = None
  for fmt in iq3s_formats():
    if not harness.in_range(fmt, case.seed, case.w):
      continue
    coded = harness.code(fmt, case.seed, case.w)
    b = coded.data.reshape(-1, 110)
    ref = _gguf(b).reshape(coded.z_hat.shape)
    np.testing.assert_array_equal(coded.z_hat.astype(np.float32).view(np.uint32),
                                  ref.view(np.uint32), err_msg=fmt)
    if itq3s_jax.get_format(fmt).transform != "none":  # the inverse transform: T2's bound
      zb = harness.split_blocks(harness.f64(ref), fmt, case.w.shape[-1])
      for (lo, hi), z in zip(itq3s_jax.block_columns(fmt, case.w.shape[-1]), zb):
        inv = z @ harness.rotation(fmt, case.seed, 256)
        err = np.linalg.norm(coded.w_hat[..., lo:hi] - inv[..., :hi - lo], axis=-1)
        bound = harness.phi(256) * np.linalg.norm(z, axis=-1)
        assert np.all(err <= bound), (fmt, err, bound)
        if np.any(bound > 0):
          worst = max(worst or 0.0, float(np.max(err[bound > 0] / bound[bound > 0])))
  return worst


@harness.check("T9", st.integers(0, 2**32 - 1))
def no_zero_level(draw: int) -> float | None:
  """|y_i| >= d > 0 for every decoded value: sparse blocks always err by >= sqrt(#zeros) d."""
  b = random_blocks(draw)
  d = np.abs(np.asarray(b[:, 0:2].copy().view(np.float16)[:, 0], np.float32))
  for fmt in iq3s_formats():
    y = np.abs(np.asarray(itq3s_jax.get_format(fmt).decode(jnp.asarray(b), 256)))
    assert np.all(y >= d[:, None]), fmt
  return 0.0 if iq3s_formats() else None


def worst_relative_error() -> dict[str, float]:
  """Largest ||w - w_hat|| / ||w|| over our constructed blocks (README T9 table)."""
  out = {}
  for fmt in iq3s_formats():
    worst = 0.0
    for fam in ("one_hot", "hadamard_rows", "zeros", "outlier_columns", "constant"):
      for draw in range(3):
        c = strategies.make(fam, 256, 0, 0, draw)
        coded = harness.code(fmt, 0, c.w)
        nw = np.linalg.norm(harness.f64(c.w), axis=-1)
        err = np.linalg.norm(harness.f64(c.w) - coded.w_hat, axis=-1)
        worst = max(worst, float(np.max(np.where(nw > 0, err / np.where(nw > 0, nw, 1), 0))))
    out[fmt] = worst
  return out


@settings()
@given(st.integers(0, 2**32 - 1))
@example(0)
def test_decode_matches_gguf_random_bytes(draw):
  if not iq3s_formats():
    pytest.skip("no IQ3_S-coded format registered")
  decode_matches_gguf_random_bytes(draw)


@settings()
@given(strategies.cases())
@example(strategies.make("heavy_tail", 256, 0, 0, 1))
@example(strategies.make("zeros", 256, 0, 0, 2))
def test_decode_matches_gguf_encoded(case):
  if not iq3s_formats():
    pytest.skip("no IQ3_S-coded format registered")
  decode_matches_gguf_encoded(case)


@settings()
@given(st.integers(0, 2**32 - 1))
def test_no_zero_level(draw):
  if not iq3s_formats():
    pytest.skip("no IQ3_S-coded format registered")
  no_zero_level(draw)


@pytest.mark.parametrize("fmt", iq3s_formats())
def test_no_certified_bound(fmt):
  """No bound: error_bound refuses, and a one-hot block errs by >= 10% of its norm."""
  assert not itq3s_jax.has_bound(fmt)
  w = np.zeros((1, 256), np.float32)
  w[0, 5] = 1.0
  with pytest.raises(ValueError):
    itq3s_jax.error_bound(itq3s_jax.quantize(jnp.asarray(w), fmt))
  coded = harness.code(fmt, 0, w)
  assert np.linalg.norm(w - coded.w_hat) >= 0.1
