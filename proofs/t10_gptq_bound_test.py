"""T10: Hessian-aware two-neighbour rounding keeps a certified bound (proofs/README.md, T10).

For every format with a bound and rounding hooks, every input and every positive
semi-definite Sigma, ``itq3s_jax.quantize(w, fmt, hessian=Sigma)`` (rounding="two_neighbour"):

  (a) coding domain, per coefficient: |z32_i - z_hat_i| <= step_i (1 + 6u) + 2^-126 * 4.5,
      z32 the float32 coefficients the rounding saw, step_i from the stored bytes;
  (b) float32 end to end, per block: ||w_b - w_hat_b|| <= eps2_b + c(n) u (||z_hat_b|| + eps2_b)
      + tau(n), eps2_b = sqrt(sum_{i in b} step_i^2) (``itq3s_jax.two_neighbour_bound``, include_rounding=False),
      c(n) and tau(n) the T3 constants;
  (c) the same for round-to-nearest tensors (nearest is one of the two neighbours), so
      ``itq3s_jax.two_neighbour_bound`` is valid for every tensor of these formats.
For itq3_t, eps2 = 4 ||Delta||_2 = 2 eps_q.
"""

from __future__ import annotations


import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import itq3s_jax
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from proofs import harness
from proofs import strategies

ALL_K = strategies.K_MAIN + strategies.K_TAILS
HESSIANS = ("identity", "correlated", "outlier_channel", "low_rank", "diagonal_spread")


def formats() -> tuple[str, ...]:
  return tuple(f for f in harness.bound_formats() if registry.get_format(f).levels is not None)


def hessian(kind: str, k: int, draw_seed: int) -> np.ndarray:
  """float32 (k, k) positive semi-definite Sigma = X^T X / n of a named family."""
  rng = np.random.default_rng(draw_seed)
  if kind == "identity":
    return np.eye(k, dtype=np.float32)
  if kind == "diagonal_spread":
    return np.diag(10.0**rng.uniform(-4, 4, k)).astype(np.float32)
  rank = max(2, k // 16) if kind == "low_rank" else 2 * k
  x = rng.standard_normal((rank, k))
  if kind == "correlated":
    x = x @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))
  if kind == "outlier_channel":
    x[:, rng.integers(0, k, 2)] *= 100.0
  return (x.T @ x / len(x)).astype(np.float32)


def _coder(fmt: str, seed: int, rounding_free: bool):
  # The library's compiled programs, shared with every other test of the same shapes.
  def run(w, h):
    qt = itq3s_jax.quantize(w, fmt, seed=seed, hessian=None if rounding_free else h)
    return (itq3s_jax.decode_rotated(qt), itq3s_jax.dequantize(qt),
            itq3s_jax.two_neighbour_bound(qt, include_rounding=False), qt.data)

  return run


def _steps(fmt: str, data: np.ndarray, k: int) -> np.ndarray:
  """Per-coefficient steps (rows, Kp) read from the bytes through the format's hook."""
  f = registry.get_format(fmt)
  out = []
  for seg in qtensor.segments(fmt, k):
    b = data[:, seg.byte_start:seg.byte_start + seg.count * seg.nbytes]
    s, _, _ = f.levels(b.reshape(len(data), seg.count, seg.nbytes), seg.n)
    out.append(np.asarray(s, np.float64).reshape(len(data), -1))
  return np.concatenate(out, axis=-1)


def _check(case: strategies.Case, h: np.ndarray, nearest_rtn: bool) -> float | None:
  worst = None
  k = case.w.shape[-1]
  for fmt in formats():
    if not harness.in_range(fmt, case.seed, case.w):
      continue
    f = itq3s_jax.get_format(fmt)
    z_hat, w_hat, eps2, data = (np.asarray(a) for a in _coder(fmt, case.seed, nearest_rtn)(
        case.w, h))
    z32 = harness.f64(harness.rotate_fn(fmt, case.seed)(case.w))
    step = np.abs(_steps(fmt, data, k))
    coef = np.abs(z32 - harness.f64(z_hat))
    assert np.all(coef <= step * (1 + 6 * harness.U) + 4.5 * harness.MU), (fmt, "(a)")
    eps2 = harness.f64(eps2)
    cols = itq3s_jax.block_columns(fmt, k)
    zb = harness.split_blocks(harness.f64(z_hat), fmt, k)
    for i, ((wb, _), (lo, hi), n) in enumerate(zip(harness.blocks64(fmt, case.seed, case.w), cols,
                                                  harness.block_ns(fmt, k))):
      wh = np.zeros_like(wb)
      wh[..., :hi - lo] = harness.f64(w_hat)[..., lo:hi]
      err = np.linalg.norm(wb - wh, axis=-1)
      zn = np.linalg.norm(zb[i], axis=-1)
      bound = eps2[..., i] + harness.rigorous_slack(f, n) * (zn + eps2[..., i]) + harness.tau(n)
      assert np.all(err <= bound), (fmt, i, err, bound)
      worst = max(worst or 0.0, float(np.max(np.where(bound > 0, err / np.where(
          bound > 0, bound, 1), 0))))
  return worst


_HESS = st.tuples(strategies.cases(ks=ALL_K), st.sampled_from(HESSIANS),
                  st.integers(0, 2**32 - 1))


@harness.check("T10", _HESS)
def two_neighbour_certified(args) -> float | None:
  case, kind, draw = args
  return _check(case, hessian(kind, case.w.shape[-1], draw), nearest_rtn=False)


@harness.check("T10", strategies.cases(ks=ALL_K))
def nearest_satisfies_two_neighbour_bound(case) -> float | None:
  return _check(case, np.eye(case.w.shape[-1], dtype=np.float32), nearest_rtn=True)


@settings()
@given(_HESS)
@example((strategies.make("outlier_columns", 256, 0, 0, 1), "outlier_channel", 2))
@example((strategies.make("hadamard_rows", 480, 0, -2, 3), "low_rank", 4))
@example((strategies.make("zeros", 256, 0, 0, 5), "correlated", 6))
@example((strategies.make("dynamic_range", 480, 0, 0, 7), "diagonal_spread", 8))
def test_two_neighbour_certified(args):
  two_neighbour_certified(args)


@settings()
@given(strategies.cases(ks=ALL_K))
@example(strategies.make("llama_cos", 256, 0, 0, 9))
def test_nearest_satisfies_two_neighbour_bound(case):
  nearest_satisfies_two_neighbour_bound(case)
