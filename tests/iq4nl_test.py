"""iq4_nl: GGML IQ4_NL bytes, read by gguf; the encoder's choices; the GPTQ hooks.

The cross-cutting checks (shapes, jit/vmap, serialization, bad input) run in
formats_test.py, which iterates the registry; here is what is specific to
IQ4_NL. Decoding is compared with ``gguf.quants`` as uint32 bit patterns (gguf
is bit-exact with ggml's ``dequantize_row_iq4_nl``: both compute fp32(d) * level
in one float32 rounding).
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import testing
from itq3s_jax._src import gptq
from itq3s_jax._src.formats import iq4nl

K = 96  # 64 + 32: a row the pow2 plan cuts into two segments, one GGML row of 3 blocks
IQ4 = gguf.GGMLQuantizationType.IQ4_NL


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def test_any_bytes_decode_like_gguf():
  # Random blocks: every fp16 d except Inf/NaN, every index; rows of 3 blocks.
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (64, 3 * 18), dtype=np.uint8)
  d = data.reshape(64, 3, 18)[..., :2].copy().view(np.float16)
  data.reshape(64, 3, 18)[..., :2] = np.where(np.isfinite(d), d, np.float16(1.5)).view(np.uint8)
  qt = itq3s_jax.QuantizedTensor(data=jnp.asarray(data), format="iq4_nl", k=K)
  np.testing.assert_array_equal(_bits(itq3s_jax.dequantize(qt)),
                                _bits(gguf.quants.dequantize(data, IQ4)))


def test_levels_are_ggmls():
  # The levels come from gguf; they must be ggml's kvalues_iq4nl (llama.cpp files).
  assert iq4nl.KVALUES.tolist() == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38,
                                    53, 69, 89, 113]
  assert iq4nl.GGML_TYPE == 20 and iq4nl.block_nbytes(256) == 8 * 18


def test_every_code_is_the_nearest_level_at_the_stored_scale():
  w = np.concatenate([_normal((6, K)), _normal((1, K)) * 1e-3, np.zeros((1, K), np.float32)])
  qt = itq3s_jax.quantize(w, "iq4_nl")
  data = np.asarray(qt.data).reshape(8, 3, 18)
  d = data[..., :2].copy().view(np.float16).astype(np.float64)  # (8, 3, 1)
  y = np.asarray(itq3s_jax.dequantize(qt), np.float64).reshape(8, 3, 32)
  x = w.astype(np.float64).reshape(8, 3, 32)
  best = np.min(np.abs(x[..., None] - d[..., None] * iq4nl.KVALUES), axis=-1)
  # Codes are chosen on x / d in float32: a near-tie may go either way by float32 rounding
  # of that ratio, i.e. by <= 2^-23 |x| relative.
  assert np.all(np.abs(x - y) <= best + 2.0**-22 * np.abs(x))
  assert np.all(y[7] == 0) and np.all(d[7] == 0)  # an all-zero block: d = 0


def test_scale_search_beats_absmax_and_llama_cpps_iq4_xs():
  # Candidate 0 of the search is llama.cpp's start (d = m / -127): the search can only
  # lower the total error. And at 4.5 bpw it must beat llama.cpp's IQ4_XS (4.25 bpw,
  # same 16 levels, imatrix NULL) on N(0,1): 0.0059 (ggml's C library, measured outside this repo).
  w = testing.test_tensors(["a"], rows=64)["a"]
  ours = np.asarray(itq3s_jax.dequantize(itq3s_jax.quantize(w, "iq4_nl")), np.float64)
  blocks = w.reshape(-1, 32).astype(np.float64)
  m = np.take_along_axis(blocks, np.argmax(np.abs(blocks), -1)[:, None], -1)
  d = (m / -127).astype(np.float16).astype(np.float64)
  lv = d[..., None] * iq4nl.KVALUES
  absmax = np.take_along_axis(lv[:, 0], np.argmin(np.abs(blocks[..., None] - lv), -1), -1)
  err = lambda y: np.sum((y.reshape(-1) - w.reshape(-1)) ** 2)  # noqa: E731
  assert err(ours) < err(absmax)
  assert err(ours) / np.sum(w.astype(np.float64) ** 2) < 0.0059


def test_importance_weights_the_error():
  w = _normal((8, K), seed=1)
  a = np.random.default_rng(2).uniform(0.05, 5.0, K).astype(np.float32)
  werr = lambda qt: float(np.sum(a * (np.asarray(itq3s_jax.dequantize(qt)) - w) ** 2))  # noqa
  assert werr(itq3s_jax.quantize(w, "iq4_nl", importance=a)) < werr(
      itq3s_jax.quantize(w, "iq4_nl"))


@jax.jit
def _hooks_round_trip(b):
  """levels -> snap at the decoded values -> repack (one compiled program)."""
  step, lo, hi = iq4nl.levels(b, 32)
  safe = jnp.where(step == 0, 1.0, step)
  q = jnp.where(step == 0, 0, iq4nl.snap(iq4nl.decode(b, 32)[..., None], safe[..., None])[..., 0])
  inside = jnp.all(((q >= lo) & (q <= hi)) | (step == 0))
  return iq4nl.repack(b, q, 32), inside


def test_gptq_hooks_reproduce_the_encoders_bytes():
  w = np.concatenate([_normal((7, K), 3), np.zeros((1, K), np.float32)])
  b = jnp.asarray(itq3s_jax.quantize(w, "iq4_nl").data).reshape(8, 3, 18)
  again, inside = _hooks_round_trip(b)
  assert bool(inside)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(b))


def test_gptq_lowers_the_output_error():
  rng = np.random.default_rng(4)
  w = _normal((32, 256), seed=5)
  x = rng.standard_normal((1024, 256)).astype(np.float32) * rng.uniform(0.1, 3, 256)
  x[:, 1::2] += x[:, ::2]  # correlated inputs: where error feedback pays
  h = (x.T @ x / len(x)).astype(np.float32)
  rtn = float(gptq.output_error(w, itq3s_jax.quantize(w, "iq4_nl"), h))
  qt = itq3s_jax.quantize(w, "iq4_nl", hessian=h)
  assert qt.rounding == "unrestricted"
  assert float(gptq.output_error(w, qt, h)) < 0.8 * rtn


@pytest.mark.parametrize("n", [33, 0, 16])
def test_block_sizes(n):
  with pytest.raises(ValueError, match="32-value blocks"):
    iq4nl.block_nbytes(n)
