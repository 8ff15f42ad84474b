"""The Pallas kernels in interpret mode against a float64 reference, outputs poisoned.

Error model (|.| elementwise, u = 2^-24 the float32 unit roundoff, x_m a row
of x, w_n = dequantize(qt)[n] the float32 reference weights; Cauchy-Schwarz
turns sum_i |x_i||w_i| into ||x_m|| ||w_n||, in either domain since the
block transform is orthonormal):
  * decoded coding-domain tiles equal the codec's decode bit for bit
    (test_decoder_matches_codec), so only arithmetic rounding remains;
  * float32 accumulation of K products (kernel loop, XLA tail):
    <= K u ||x_m|| ||w_n||;
  * the 256-point transform (weight_ifwht: in-kernel butterfly vs the core's;
    act_rotate: rotating x): 8 stages of one rounding each, an element errs by
    <= 8 u (sum of 256 |inputs|) / 16 <= 8 u ||block||, so the dot errs by
    <= 8 u ||block|| ||other block||_1 <= 128 u per block pair, twice when both
    the reference's and the kernel's transforms round: <= 256 u ||x_m|| ||w_n||;
  * bf16/f16 dots: each operand rounded once to the half type (u_h = 2^-9
    bf16, 2^-11 f16): <= (2 u_h + u_h^2) ||x_m|| ||w_n||.
The tolerance is 1.25 x the sum (the 25% absorbs second-order terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import itq3s_jax
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry
from itq3s_jax.pallas_kernels import driver as _driver
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import weight_ifwht

KERNELS = {"weight_ifwht": weight_ifwht.weight_ifwht, "act_rotate": act_rotate.act_rotate}
KERNEL_FORMATS = sorted(kernel_codec.formats())
_U32 = 2.0**-24
_U_HALF = {jnp.dtype(jnp.bfloat16): 2.0**-9, jnp.dtype(jnp.float16): 2.0**-11}


def _weights(n, k, seed=0):
  return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _check(name, x, qt, config=None):
  """Runs kernel ``name`` on a NaN-poisoned output and compares with float64."""
  x = jnp.asarray(x)
  n, k = qt.shape
  x2 = x.reshape(-1, k)
  config = config or _driver.heuristic(x2.shape[0], n, k)
  mp = -(-x2.shape[0] // config.block_m) * config.block_m
  np_ = -(-n // config.block_n) * config.block_n
  poison = jnp.full((mp, np_), jnp.nan, jnp.float32)
  y = np.asarray(KERNELS[name](x, qt, config=config, interpret=True, out_init=poison))
  assert y.shape == (*x.shape[:-1], n)
  x64 = np.asarray(x2.astype(jnp.float32), np.float64)
  w64 = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  want = x64 @ w64.T
  norms = np.outer(np.linalg.norm(x64, axis=-1), np.linalg.norm(w64, axis=-1))
  u_h = _U_HALF.get(x.dtype, 0.0)
  tol = 1.25 * ((k + 256) * _U32 + 2 * u_h + u_h * u_h) * norms
  got = y.reshape(-1, n)
  assert np.isfinite(got).all(), "an output element was never written (still NaN)"
  err = np.abs(got - want)
  assert (err <= tol).all(), f"max err {err.max():.3g}, at tol {tol.flat[err.argmax()]:.3g}"
  return got, want


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("m", [1, 3, 64, 256])
def test_rows_sweep(name, m):
  """M from GEMV to several row blocks; N=40 is not a multiple of the 32/64 tiles; K=576 has a 64 tail."""
  qt = itq3s_jax.quantize(_weights(40, 576), "itq3_t", seed=3)
  x = np.random.default_rng(m).standard_normal((m, 576)).astype(np.float32)
  _check(name, x, qt)


@pytest.mark.parametrize("name,fmt", [("weight_ifwht", "uniform3_rot"),
                                      ("act_rotate", "uniform3_rot"), ("act_rotate", "uniform3")])
def test_other_formats(name, fmt):
  qt = itq3s_jax.quantize(_weights(24, 800, seed=1), fmt, seed=5)  # tail 32
  x = np.random.default_rng(2).standard_normal((3, 800)).astype(np.float32)
  _check(name, x, qt)


@pytest.mark.parametrize("name,dtype", [("weight_ifwht", jnp.bfloat16),
                                        ("act_rotate", jnp.bfloat16), ("act_rotate", jnp.float16)])
def test_half_precision_inputs(name, dtype):
  qt = itq3s_jax.quantize(_weights(48, 512, seed=2), "itq3_t")
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 512)), dtype)
  _check(name, x, qt)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_explicit_tiling_many_programs(name):
  """A 4 x 3 grid with partial last blocks in both directions."""
  qt = itq3s_jax.quantize(_weights(40, 256 + 128 + 32, seed=6), "itq3_t")
  x = np.random.default_rng(7).standard_normal((50, 416)).astype(np.float32)
  _check(name, x, qt, config=_driver.Config(block_m=16, block_n=16))


def test_poison_detects_unwritten_output(monkeypatch):
  """The poisoning can fail: a kernel that writes nothing leaves the NaN in place."""

  def write_nothing(*refs, **kw):
    del refs, kw

  monkeypatch.setattr(_driver, "_kernel", write_nothing)
  _driver.fused.clear_cache()
  qt = itq3s_jax.quantize(_weights(40, 256), "itq3_t")
  try:
    with pytest.raises(AssertionError, match="never written"):
      _check("act_rotate", np.ones((1, 256), np.float32), qt)
  finally:
    monkeypatch.undo()
    _driver.fused.clear_cache()


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@pytest.mark.parametrize("n", [256, 128, 64, 32])
def test_decoder_matches_codec(fmt, n):
  """kernel_decode's decoder equals Format.decode bit for bit (coded and random bytes)."""
  codec = registry.get_format(fmt)
  rng = np.random.default_rng(n)
  coded = codec.encode(jnp.asarray(rng.standard_normal((7, n)), jnp.float32), None)
  noise = jnp.asarray(rng.integers(0, 256, coded.shape), jnp.uint8)
  if fmt.startswith("uniform3"):  # keep the fp16 scale finite (exponent bits not all ones)
    noise = noise.at[:, 1].set(noise[:, 1] & 0x7B)
  for b in (coded, noise):
    np.testing.assert_array_equal(kernel_codec.decode_blocks(b, fmt, n), codec.decode(b, n))


@pytest.mark.parametrize("n", [2, 16, 256])
def test_constant_geometry_hadamard_is_sylvester(n):
  """Exact on small integers (sums < 2^24 in float32): equals scipy's Sylvester matrix."""
  x = np.random.default_rng(n).integers(-50, 50, (5, n)).astype(np.float32)
  got = np.asarray(kernel_codec.hadamard(jnp.asarray(x)))
  np.testing.assert_array_equal(got, x @ scipy.linalg.hadamard(n).T)


def test_unsupported_format_raises_not_implemented(monkeypatch):
  monkeypatch.setitem(registry._REGISTRY, "uniform3", dataclasses.replace(
      registry.get_format("uniform3"), kernel_codec=None))
  qt = itq3s_jax.quantize(_weights(4, 256), "uniform3")
  assert not act_rotate.supports(jax.ShapeDtypeStruct((1, 256), jnp.float32), qt)
  with pytest.raises(NotImplementedError, match="no kernel decoder"):
    weight_ifwht.weight_ifwht(np.ones((1, 256), np.float32), qt, interpret=True)


def test_supports_shapes_and_dtypes():
  qt = itq3s_jax.quantize(_weights(4, 288), "itq3_t")
  assert weight_ifwht.supports(jax.ShapeDtypeStruct((2, 5, 288), jnp.bfloat16), qt)
  assert not weight_ifwht.supports(jax.ShapeDtypeStruct((2, 256), jnp.float32), qt)
  assert not weight_ifwht.supports(jax.ShapeDtypeStruct((2, 288), jnp.int32), qt)
  small = itq3s_jax.quantize(_weights(4, 96), "itq3_t")  # no 256-block for the kernel
  assert not act_rotate.supports(jax.ShapeDtypeStruct((2, 96), jnp.float32), small)


@pytest.mark.parametrize("kw", [dict(block_m=8, block_n=32), dict(block_m=16, block_n=48),
                                dict(block_m=16, block_n=16, num_stages=0)])
def test_config_validation(kw):
  with pytest.raises(ValueError, match="Config"):
    _driver.Config(**kw)


def test_poison_buffer_shape_checked():
  qt = itq3s_jax.quantize(_weights(4, 256), "itq3_t")
  with pytest.raises(ValueError, match="out_init has shape"):
    act_rotate.act_rotate(np.ones((1, 256), np.float32), qt, interpret=True,
                          out_init=jnp.zeros((3, 3)))
