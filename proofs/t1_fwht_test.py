"""T1: the randomized FWHT is orthonormal, self-inverse and preserves norms (Parseval).

Reference: the dense float64 R = H diag(sigma) / sqrt(n) built from
scipy.linalg.hadamard. Tolerances are the derived float32 rounding bound phi(n)
(README T1); integer inputs with even log2(n) must match bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import itq3s_jax
from proofs import harness
from proofs import strategies

POW2 = (32, 64, 128, 256)
_fwht = itq3s_jax.fwht  # jitted by the library
_ifwht = itq3s_jax.ifwht


def _signs(n: int, seed: int) -> jnp.ndarray:
  return jnp.asarray(itq3s_jax.sign_vector(seed, n))


def _absolute(n: int) -> float:
  # FTZ/DAZ: flushed inputs and stage results, README T1 (2 + 1/(sqrt2 - 1)) sqrt(n) 2^-126.
  return 4.5 * np.sqrt(n) * harness.MU


@harness.check("T1", strategies.cases(ks=POW2))
def fwht_matches_dense_float64(case: strategies.Case) -> float:
  """||fwht_fp32(x) - R x||_2 <= phi(n) ||x||_2 per row, R the dense float64 matrix."""
  x = case.w
  n = x.shape[-1]
  r = harness.rotation("itq3_t", case.seed, n)
  got = harness.f64(_fwht(x, signs=_signs(n, case.seed)))
  want = harness.f64(x) @ r.T
  err = np.linalg.norm(got - want, axis=-1)
  bound = harness.phi(n) * np.linalg.norm(harness.f64(x), axis=-1) + _absolute(n)
  assert np.all(err <= bound), (err, bound)
  return float(np.max(err / bound))


@harness.check("T1", strategies.cases(ks=POW2))
def self_inverse_and_parseval(case: strategies.Case) -> float:
  """ifwht(fwht(x)) = x and ||fwht(x)|| = ||x|| within (2 phi + phi^2) ||x|| and phi ||x||."""
  x = case.w
  n = x.shape[-1]
  s = _signs(n, case.seed)
  z = _fwht(x, signs=s)
  back = harness.f64(_ifwht(z, signs=s))
  nx = np.linalg.norm(harness.f64(x), axis=-1)
  p = harness.phi(n)
  inv_err = np.linalg.norm(back - harness.f64(x), axis=-1)
  inv_bound = (2 * p + p * p) * nx + 2 * _absolute(n)
  par_err = np.abs(np.linalg.norm(harness.f64(z), axis=-1) - nx)
  par_bound = p * nx + _absolute(n)
  assert np.all(inv_err <= inv_bound), (inv_err, inv_bound)
  assert np.all(par_err <= par_bound), (par_err, par_bound)
  return float(max(np.max(inv_err / inv_bound), np.max(par_err / par_bound)))


_INTS = st.builds(
    lambda n, seed, s: (np.random.default_rng(s).integers(-8, 9, (2, n)).astype(np.float32), seed),
    st.sampled_from((64, 256)), st.sampled_from(strategies.SEEDS), st.integers(0, 2**32 - 1))


@harness.check("T1", _INTS)
def exact_on_integers(args) -> float:
  """Even log2(n): integer inputs (|x| <= 8) give R x exactly (sums < 2^24, 1/sqrt(n) a power of 2)."""
  x, seed = args
  n = x.shape[-1]
  got = harness.f64(_fwht(x, signs=_signs(n, seed)))
  want = harness.f64(x) @ harness.rotation("itq3_t", seed, n).T
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(harness.f64(_fwht(_fwht(x))), harness.f64(x))  # H H = n I
  return 0.0


@harness.check("T1", st.sampled_from(POW2))
def orthonormal_columns(n: int) -> float:
  """fwht(I) = R^T... column by column: R R^T = I within 2 phi(n) + phi^2 entrywise."""
  eye = np.eye(n, dtype=np.float32)
  r = harness.f64(_fwht(eye, signs=_signs(n, 0)))  # row i = R e_i = column i of R
  dense = harness.rotation("itq3_t", 0, n)
  p = harness.phi(n)
  err_r = np.max(np.abs(r - dense.T))
  gram = np.max(np.abs(r @ r.T - np.eye(n)))
  assert err_r <= p, (err_r, p)
  assert gram <= 2 * p + p * p, gram
  return float(max(err_r / p, gram / (2 * p + p * p)))


@settings()
@given(strategies.cases(ks=POW2))
@example(strategies.make("one_hot", 256, 0, 0, 1))
@example(strategies.make("dynamic_range", 128, 7, 0, 2))
def test_fwht_matches_dense_float64(case):
  fwht_matches_dense_float64(case)


@settings()
@given(strategies.cases(ks=POW2))
@example(strategies.make("fp16_max", 32, 0, 0, 3))
def test_self_inverse_and_parseval(case):
  self_inverse_and_parseval(case)


@settings()
@given(_INTS)
def test_exact_on_integers(args):
  exact_on_integers(args)


def test_orthonormal_columns():
  for n in POW2:
    orthonormal_columns(n)
