"""fwht / ifwht / sign_vector against a float64 dense Hadamard oracle.

Error model (tolerances below): the unnormalized butterfly has L = log2(n)
stages; each output of a stage is one rounded add/sub, so the stage adds a
relative error <= u per element, i.e. <= u * ||stage output||_2 in norm, and
the L stages together add <= ((1 + u)^L - 1) ||H x|| ~ L u sqrt(n) ||x||. After
the 1/sqrt(n) scale (exact for even L, one more rounding for odd L):
||fwht(x) - H x / sqrt(n)||_2 <= (L + 1) u ||x||_2 (+ O(u^2)). Tests allow
(L + 2) u ||x||, u the unit roundoff of the dtype.
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import settings

import itq3s_jax
from itq3s_jax._src.core import fwht as fwht_lib

UNIT_ROUNDOFF = {
    jnp.float16: 2.0**-11,
    jnp.bfloat16: 2.0**-8,
    jnp.float32: 2.0**-24,
}


def _reference(x: np.ndarray, signs=None) -> np.ndarray:
  """float64 H (signs * x) / sqrt(n) along the last axis (dense scipy Hadamard)."""
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  if signs is not None:
    x = x * np.asarray(signs, np.float64)
  return x @ scipy.linalg.hadamard(n).T.astype(np.float64) / math.sqrt(n)


def _tol(n: int, dtype, norm: float) -> float:
  return (math.log2(n) + 2) * UNIT_ROUNDOFF[dtype] * norm


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 1024])
def test_matches_dense_hadamard_float32(n):
  x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
  got = np.asarray(itq3s_jax.fwht(x), np.float64)
  want = _reference(x)
  err = np.linalg.norm(got - want, axis=-1)
  assert np.all(err <= _tol(n, jnp.float32, 1.0) * np.linalg.norm(x, axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_matches_dense_hadamard_low_precision(dtype):
  n = 256
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, n)), dtype)
  got = itq3s_jax.fwht(x)
  assert got.dtype == dtype
  x64 = np.asarray(x.astype(jnp.float32), np.float64)  # the dtype-rounded input
  err = np.linalg.norm(np.asarray(got.astype(jnp.float32), np.float64) - _reference(x64), axis=-1)
  assert np.all(err <= _tol(n, dtype, 1.0) * np.linalg.norm(x64, axis=-1))


def test_float64_matches_dense_hadamard():
  n = 256
  x = np.random.default_rng(2).standard_normal((2, n))
  with jax.enable_x64(True):
    got = itq3s_jax.fwht(jnp.asarray(x, jnp.float64))
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  # float64: u = 2^-53, same (L + 2) u ||x|| model.
  tol = (math.log2(n) + 2) * 2.0**-53 * np.linalg.norm(x, axis=-1)
  assert np.all(np.linalg.norm(got - _reference(x), axis=-1) <= tol)


@pytest.mark.parametrize("n", [2, 16, 64, 256])
def test_unnormalized_butterfly_is_exact_on_small_integers(n):
  # Integer inputs with |x| <= 8 keep every partial sum below 2^24: exact in float32,
  # so the documented butterfly must equal the Sylvester matrix product exactly.
  x = np.random.default_rng(n).integers(-8, 9, (3, n)).astype(np.float32)
  got = np.asarray(fwht_lib.hadamard_unnormalized(jnp.asarray(x)))
  np.testing.assert_array_equal(got, x @ scipy.linalg.hadamard(n).T.astype(np.float32))


@pytest.mark.parametrize("axis", [0, -1])
def test_stages_per_pass_changes_no_bits(axis):
  """Grouping stages into passes is a speed knob: the additions, and so the bits, are the
  same for 1-4 stages a pass (and the size rule of None), along a leading axis (decode tiles)
  or the last one."""
  x = np.random.default_rng(4).standard_normal((256, 3, 256)).astype(np.float32) * 1e3
  run = jax.jit(fwht_lib.hadamard_unnormalized, static_argnums=(1, 2))  # eager: an op per slice
  outs = [np.asarray(run(jnp.asarray(x), axis, p)).view(np.uint32) for p in (1, 2, 3, 4, None)]
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  with pytest.raises(ValueError, match="stages_per_pass"):
    fwht_lib.hadamard_unnormalized(jnp.asarray(x), axis, 5)


@settings()
@hypothesis.given(log_n=st.sampled_from([0, 1, 5, 8]),  # few shapes: each compiles
                  seed=st.integers(0, 2**31 - 1),
                  scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
def test_matches_dense_hadamard_property(log_n, seed, scale):
  n = 1 << log_n
  x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
  err = np.linalg.norm(np.asarray(itq3s_jax.fwht(x), np.float64) - _reference(x))
  # Subnormal-range inputs lose relative precision: add the absolute rounding of
  # n outputs at the smallest normal spacing (tiny, ~1e-45 * sqrt(n) * L).
  floor = (log_n + 2) * math.sqrt(n) * float(np.finfo(np.float32).smallest_subnormal)
  assert err <= _tol(n, jnp.float32, float(np.linalg.norm(x.astype(np.float64)))) + floor


def test_is_orthonormal_and_self_inverse():
  x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
  y = itq3s_jax.fwht(x)
  # Norm preserved up to the forward error; fwht(fwht(x)) = x up to twice the error.
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=_tol(256, jnp.float32, 1.0))
  back = np.asarray(itq3s_jax.fwht(y), np.float64)
  err = np.linalg.norm(back - x, axis=-1)
  assert np.all(err <= 2 * _tol(256, jnp.float32, 1.0) * np.linalg.norm(x, axis=-1))


def test_signs_randomize_and_ifwht_inverts():
  s = itq3s_jax.sign_vector(7, 256)
  x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
  y = itq3s_jax.fwht(x, signs=s)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(itq3s_jax.fwht(x * s)))
  err = np.linalg.norm(np.asarray(y, np.float64) - _reference(x, s), axis=-1)
  assert np.all(err <= _tol(256, jnp.float32, 1.0) * np.linalg.norm(x, axis=-1))
  back = np.asarray(itq3s_jax.ifwht(y, signs=s), np.float64)
  assert np.all(np.linalg.norm(back - x, axis=-1)
                <= 2 * _tol(256, jnp.float32, 1.0) * np.linalg.norm(x, axis=-1))


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
def test_axis_argument_moves_the_transformed_axis(axis):
  x = np.random.default_rng(5).standard_normal((8, 16, 4)).astype(np.float32)
  if x.shape[axis] & (x.shape[axis] - 1):
    pytest.skip("axis length is not a power of two")
  got = np.asarray(itq3s_jax.fwht(x, axis=axis))
  want = np.moveaxis(np.asarray(itq3s_jax.fwht(np.moveaxis(x, axis, -1))), -1, axis)
  np.testing.assert_array_equal(got, want)
  back = np.asarray(itq3s_jax.ifwht(got, axis=axis))
  np.testing.assert_allclose(back, x, atol=2 * _tol(16, jnp.float32, 1.0) * np.abs(x).max()
                             * math.sqrt(16))


def test_leading_axis_butterfly_is_bit_identical():
  """Column-major blocks (codec.decode_tile) transform axis 0: the same additions, same bits."""
  x = np.random.default_rng(8).standard_normal((256, 3, 5)).astype(np.float32)
  s = itq3s_jax.sign_vector(2, 256)
  got = np.asarray(itq3s_jax.ifwht(x, axis=0, signs=s))
  want = np.moveaxis(np.asarray(itq3s_jax.ifwht(np.moveaxis(x, 0, -1), signs=s)), -1, 0)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_jit_and_vmap_are_bit_identical_to_eager():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((6, 256)), jnp.float32)
  s = itq3s_jax.sign_vector(1, 256)
  eager = itq3s_jax.fwht(x, signs=s)
  jitted = jax.jit(lambda v: itq3s_jax.fwht(v, signs=s))(x)
  mapped = jax.vmap(lambda v: itq3s_jax.fwht(v, signs=s))(x)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
  np.testing.assert_array_equal(np.asarray(mapped), np.asarray(eager))


def test_grad_is_the_transposed_transform():
  # d/dx <c, H x / sqrt(n)> = H c / sqrt(n) (H symmetric): fwht(c) up to its rounding.
  c = np.random.default_rng(7).standard_normal(256).astype(np.float32)
  x = jnp.zeros(256, jnp.float32)
  g = jax.grad(lambda v: jnp.vdot(jnp.asarray(c), itq3s_jax.fwht(v)))(x)
  err = np.linalg.norm(np.asarray(g, np.float64) - _reference(c))
  assert err <= _tol(256, jnp.float32, float(np.linalg.norm(c)))


@pytest.mark.parametrize("n", [3, 6, 12, 100, 0])
def test_non_power_of_two_length_is_a_value_error(n):
  with pytest.raises(ValueError, match="power of two"):
    itq3s_jax.fwht(jnp.ones((2, n)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_non_float_dtype_is_a_type_error(dtype):
  with pytest.raises(TypeError, match="float"):
    itq3s_jax.fwht(jnp.ones((4,), dtype))


def test_wrong_sign_length_is_a_value_error():
  with pytest.raises(ValueError, match="signs has shape"):
    itq3s_jax.fwht(jnp.ones(8), signs=jnp.ones(4))
  with pytest.raises(ValueError, match="signs has shape"):
    itq3s_jax.ifwht(jnp.ones(8), signs=jnp.ones(16))


def test_sign_vector_follows_its_documented_generator():
  for seed in (0, 1, 12345):
    s = itq3s_jax.sign_vector(seed, 256)
    bits = np.random.default_rng(seed).integers(0, 2, 256)
    np.testing.assert_array_equal(s, np.where(bits == 1, -1.0, 1.0))
    assert s.dtype == np.float32
    np.testing.assert_array_equal(itq3s_jax.sign_vector(seed, 64), s[:64])
  assert not np.array_equal(itq3s_jax.sign_vector(0), itq3s_jax.sign_vector(1))


@pytest.mark.parametrize("n", [0, 257])
def test_sign_vector_length_range(n):
  with pytest.raises(ValueError, match="1 <= n <= 256"):
    itq3s_jax.sign_vector(0, n)


def test_sign_vector_negative_seed():
  with pytest.raises(ValueError, match="non-negative"):
    itq3s_jax.sign_vector(-1)
