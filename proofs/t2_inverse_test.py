"""T2: the inverse transform adds no error beyond the grid.

Exact arithmetic: ||w - R^T z_hat||_2 = ||R w - z_hat||_2 (R orthonormal). In float32
the decoder's w_hat differs from R^T z_hat by at most phi(n) ||z_hat||_2 (README T2),
so | ||w - w_hat|| - ||R w - z_hat|| | <= phi(n) ||z_hat||_2 per block.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings

from proofs import harness
from proofs import strategies


def _check(case: strategies.Case, fmt: str) -> float | None:
  if not harness.in_range(fmt, case.seed, case.w):
    return None
  coded = harness.code(fmt, case.seed, case.w)
  k = case.w.shape[-1]
  w_hat = coded.w_hat
  z_hat = harness.split_blocks(coded.z_hat, fmt, k)
  worst = 0.0
  cols = harness.itq3s_jax.block_columns(fmt, k)
  for (wb, zb), zh, (lo, hi) in zip(harness.blocks64(fmt, case.seed, case.w), z_hat, cols):
    n = zb.shape[-1]
    r = harness.rotation(fmt, case.seed, n)
    exact_inv = zh @ r  # R^T z_hat in float64 (rows of zh times R)
    # (i) real-arithmetic identity, checked in float64: its own rounding is ~n 2^-53 relative.
    lhs = np.linalg.norm(wb - exact_inv, axis=-1)
    rhs = np.linalg.norm(zb - zh, axis=-1)
    tol64 = 4 * n * 2.0**-53 * (np.linalg.norm(wb, axis=-1) + np.linalg.norm(zh, axis=-1))
    assert np.all(np.abs(lhs - rhs) <= tol64 + 1e-300), (lhs, rhs)
    # (ii) float32 decoder: ||w_hat - R^T z_hat|| <= phi(n) ||z_hat|| (no underflow: README T2).
    dec = np.linalg.norm(w_hat[..., lo:hi] - exact_inv[..., :hi - lo], axis=-1)
    bound = harness.phi(n) * np.linalg.norm(zh, axis=-1)
    assert np.all(dec <= bound), (fmt, dec, bound)
    # (iii) hence the float32 error equals the coding-domain error up to that bound.
    err32 = np.linalg.norm(wb[..., :hi - lo] - w_hat[..., lo:hi], axis=-1)
    if hi - lo == n:
      assert np.all(np.abs(err32 - rhs) <= bound + tol64), (fmt, err32, rhs, bound)
    else:  # pad256 tail: the decoded padding columns are dropped, so only one side holds
      assert np.all(err32 <= rhs + bound + tol64), (fmt, err32, rhs, bound)
    ratio = np.where(bound > 0, dec / np.where(bound > 0, bound, 1), 0.0)
    worst = max(worst, float(np.max(ratio)))
  return worst


@harness.check("T2", strategies.cases())
def inverse_adds_no_error(case: strategies.Case) -> float | None:
  """For every rotated format with or without a bound (decode_rotated is generic)."""
  ratios = [_check(case, f) for f in harness.rotated_formats()]
  ratios = [r for r in ratios if r is not None]
  return max(ratios) if ratios else None


@settings()
@given(strategies.cases())
@example(strategies.make("hadamard_rows", 256, 0, 0, 1))
@example(strategies.make("fp16_max", 480, 0, 0, 2))
def test_inverse_adds_no_error(case):
  inverse_adds_no_error(case)
