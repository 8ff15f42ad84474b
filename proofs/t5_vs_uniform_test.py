"""T5: when is itq3_t below uniform 3-bit? Exact conditions and counterexamples.

Per block of n weights, M = ||R w||_inf (rotated), m = ||w||_inf (README T5):

  (a) M <= theta_lo(n) m  ==>  eps_t < eps_u   (itq3_t's certified bound is smaller),
  (b) M >= theta_hi(n) m  ==>  eps_t > eps_u,
  theta_lo = 9 / (8 r^2 (1 + 2^-20)) ~ 0.895, theta_hi ~ 4.49 at n = 256, r the largest
  ratio of consecutive step multipliers. Random signs give M <= ||w||_2 sqrt(2 ln(2n/delta)/n)
  with probability >= 1 - delta (Hoeffding), so (a) holds with that probability whenever the
  block's crest factor m sqrt(n)/||w||_2 exceeds sqrt(2 ln(2n/delta)) / theta_lo.
Counterexamples (pinned): signed Hadamard rows (M = sqrt(n) m: the bound is worse),
data on uniform3's grid (its error is 0, itq3_t's is not), and U(-1, 1) blocks, where the
rotation makes uniform3 worse (uniform3_rot's error > uniform3's).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from itq3s_jax._src.formats import itq3_t
from proofs import harness
from proofs import strategies

ALL_K = strategies.ALL_K


def _ratios(table: np.ndarray) -> float:
  t = np.asarray(table, np.float64)
  return float(np.max(t[1:] / t[:-1]))


def theta_lo(n: int) -> float:
  """M below theta_lo m guarantees eps_t < eps_u (README T5 (a))."""
  r = _ratios(itq3_t.MULT)
  q = _ratios(itq3_t.SUPER[1:])
  assert float(itq3_t.MULT[0]) * q * q <= r  # the smin = 0 branch is dominated (README)
  return 9.0 / (8.0 * r * r * (1 + 2.0**-20))


def theta_hi(n: int) -> float:
  """M above theta_hi m guarantees eps_t > eps_u (README T5 (b))."""
  ns = n // itq3_t.SUB
  m0 = float(itq3_t.MULT[0])
  return (math.sqrt(n) / 4 * (1 + 2.0**-10)) / (4.0 / 9.0 * math.sqrt(1 + (ns - 1) * m0 * m0))


def _valid(mx: np.ndarray, zmax: np.ndarray) -> np.ndarray:
  # The analysis assumes the super-scale search is not clamped at e = 1 and uniform3's
  # scale m/4 is a normal fp16 (so |d| <= (m/4)(1 + 2^-10)).
  return (zmax >= 4.5 * float(itq3_t.SUPER[2])) & (mx / 4 >= 2.0**-14)


@harness.check("T5", strategies.cases(ks=ALL_K))
def bound_conditions(case: strategies.Case) -> float | None:
  t = harness.code("itq3_t", case.seed, case.w)
  u = harness.code("uniform3", case.seed, case.w)
  worst = None
  for i, ((wb, zb), n) in enumerate(zip(harness.blocks64("itq3_t", case.seed, case.w),
                                        harness.block_ns("itq3_t", case.w.shape[-1]))):
    mx, zmax = np.max(np.abs(wb), -1), np.max(np.abs(zb), -1)
    ok = _valid(mx, zmax)
    et, eu = t.eps[..., i], u.eps[..., i]
    lo = ok & (zmax <= theta_lo(n) * mx)
    hi = ok & (zmax >= theta_hi(n) * mx)
    assert np.all(et[lo] < eu[lo]), ("(a)", et[lo], eu[lo])
    assert np.all(et[hi] > eu[hi]), ("(b)", et[hi], eu[hi])
    if lo.any():
      worst = max(worst or 0.0, float(np.max(et[lo] / eu[lo])))
  return worst


def _sse(fmt: str, w: np.ndarray, seed: int = 0) -> float:
  return float(np.sum((harness.f64(w) - harness.code(fmt, seed, w).w_hat)**2))


def grid_case(draw: int) -> np.ndarray:
  """Rows on uniform3's grid: integers in -4..3 with a -4 first (d = 1 reproduces them)."""
  g = np.random.default_rng(draw).integers(-4, 4, (strategies.ROWS, 256)).astype(np.float32)
  g[:, 0] = -4
  return g


@harness.check("T5", st.integers(0, 2**32 - 1))
def counterexamples(draw: int) -> float:
  """Each pinned family contradicts "itq3_t (or a rotation) is always better"."""
  # Signed Hadamard rows: M = sqrt(n) m >= theta_hi m, so itq3_t's bound is larger.
  h = strategies.make("hadamard_rows", 256, 0, 0, draw).w
  assert np.all(harness.code("itq3_t", 0, h).eps > harness.code("uniform3", 0, h).eps)
  # uniform3's grid: uniform3 is exact, itq3_t is not.
  g = grid_case(draw)
  assert _sse("uniform3", g) == 0.0 < _sse("itq3_t", g)
  # U(-1, 1): the rotation makes uniform 3-bit worse (benchmarks/anchors.py, B1b vs B2b on e: 0.021 -> 0.050).
  x = np.random.default_rng(draw).uniform(-1, 1, (32, 256)).astype(np.float32)
  ratio = _sse("uniform3", x) / _sse("uniform3_rot", x)
  assert ratio < 1.0, ratio
  return ratio


@settings()
@given(strategies.cases(ks=ALL_K))
@example(strategies.make("hadamard_rows", 256, 0, 0, 1))  # (b): M = 16 m
@example(strategies.make("one_hot", 256, 0, 0, 2))  # (a): M = m / 16
@example(strategies.make("uniform", 256, 0, 0, 3))
@example(strategies.make("outlier_columns", 256, 0, 0, 4))
def test_bound_conditions(case):
  bound_conditions(case)


@settings()
@given(st.integers(0, 2**32 - 1))
@example(0)
def test_counterexamples(draw):
  counterexamples(draw)
