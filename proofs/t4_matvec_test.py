"""T4: the matvec bound |w_hat . x - w . x| <= sum_b eps_b ||x_b||_2 (Cauchy-Schwarz per block).

Checked twice: in float64 on the decoded weights (eps_b the float32-rigorous bound of T3),
and for every ``itq3s_jax.matmul`` method in float32, whose own rounding is bounded
by gamma_K sum |w_hat_i x_i| (dot product) plus, for rotation-domain methods, the T6
term (README T4).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

import itq3s_jax
from proofs import harness
from proofs import strategies
from proofs import t6_rotated_matmul_test as t6


methods = harness.matmul_methods
run_matmul = harness.run_matmul


def block_bounds(fmt: str, case: strategies.Case, coded: harness.Coded) -> np.ndarray:
  """(rows, nblocks) float32-rigorous per-block bounds of T3."""
  f = itq3s_jax.get_format(fmt)
  k = case.w.shape[-1]
  zh = harness.split_blocks(coded.z_hat, fmt, k)
  out = []
  for i, (z, n) in enumerate(zip(zh, harness.block_ns(fmt, k))):
    eps = coded.eps[..., i]
    out.append(eps + harness.rigorous_slack(f, n) * (np.linalg.norm(z, axis=-1) + eps)
               + harness.tau(n))
  return np.stack(out, axis=-1)


def _xnorms(fmt: str, x: np.ndarray) -> np.ndarray:
  """(batch, nblocks) ||x_b||_2 in bound order."""
  return np.stack([np.linalg.norm(harness.f64(x[..., lo:hi]), axis=-1)
                   for lo, hi in itq3s_jax.block_columns(fmt, x.shape[-1])], axis=-1)


@harness.check("T4", strategies.matvec_cases(ks=strategies.ALL_K))
def matvec_bound(args, every: bool | None = None) -> float | None:
  case, x = args
  worst = None
  for fmt in harness.bound_formats():
    if not harness.in_range(fmt, case.seed, case.w):
      continue
    coded = harness.code(fmt, case.seed, case.w)
    w64, x64 = harness.f64(case.w), harness.f64(x)
    exact = x64 @ w64.T  # (batch, rows); float64 rounding ~K 2^-53 relative, covered below
    bound = _xnorms(fmt, x) @ block_bounds(fmt, case, coded).T  # (batch, rows)
    slack64 = 4 * x.shape[-1] * 2.0**-53 * (np.abs(x64) @ (np.abs(w64) + np.abs(coded.w_hat)).T)
    err = np.abs(x64 @ coded.w_hat.T - exact)
    assert np.all(err <= bound + slack64), (fmt, err, bound)
    worst = max(worst or 0.0, float(np.max(err / (bound + slack64 + 1e-300))))
    # Aligned activations x_b = (w_hat_b - w_b) ||x_b|| / ||w_hat_b - w_b|| (row 0): the
    # Cauchy-Schwarz equality case, where the error is sum_b ||e_b|| ||x_b||: checks the
    # per-block bound is not under-reported.
    e0 = coded.w_hat[0] - w64[0]
    xa = np.concatenate([e0[lo:hi] / max(np.linalg.norm(e0[lo:hi]), 1e-300) * np.linalg.norm(
        x64[0, lo:hi]) for lo, hi in itq3s_jax.block_columns(fmt, x.shape[-1])])
    err_a = abs(float(xa @ e0))
    bound_a = float((_xnorms(fmt, x[:1]) @ block_bounds(fmt, case, coded)[0])[0])
    assert err_a <= bound_a * (1 + 1e-12) + 1e-300, (fmt, "aligned", err_a, bound_a)
    qt = itq3s_jax.QuantizedTensor(data=jnp.asarray(coded.data), format=fmt, k=case.w.shape[-1], seed=case.seed)
    dot_slack = harness.gamma(x.shape[-1]) * (np.abs(x64) @ np.abs(coded.w_hat).T)
    rot_slack = t6.rotation_bound(fmt, case.seed, coded, x)
    for method in methods(every):
      y = run_matmul(method, x, qt)
      if y is None:
        continue
      total = bound + slack64 + dot_slack + rot_slack
      err = np.abs(y - exact)
      assert np.all(err <= total), (fmt, method, err, total)
      worst = max(worst, float(np.max(err / (total + 1e-300))))
  return worst


@settings()
@given(strategies.matvec_cases(ks=strategies.ALL_K))
@example((strategies.make("outlier_columns", 256, 0, 0, 1), strategies.activations(256, 2)))
@example((strategies.make("hadamard_rows", 256, 0, 0, 3),
          strategies.activations(256, 4, "outliers")))
def test_matvec_bound(args):
  matvec_bound(args)


@pytest.mark.parametrize("method", methods(every=True))
def test_matvec_bound_every_method(method):
  case = strategies.make("outlier_columns", 256, 0, 0, 11)
  x = strategies.activations(256, 12, "heavy_tail")
  for fmt in harness.bound_formats():
    coded = harness.code(fmt, 0, case.w)
    qt = itq3s_jax.QuantizedTensor(data=jnp.asarray(coded.data), format=fmt, k=case.w.shape[-1], seed=0)
    y = run_matmul(method, x, qt)
    if y is None:
      continue
    bound = _xnorms(fmt, x) @ block_bounds(fmt, case, coded).T
    bound += harness.gamma(256) * (np.abs(harness.f64(x)) @ np.abs(coded.w_hat).T)
    bound += t6.rotation_bound(fmt, 0, coded, x)
    assert np.all(np.abs(y - harness.f64(x) @ harness.f64(case.w).T) <= bound), (fmt, method)
