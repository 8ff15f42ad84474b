"""T6: rotation-domain matmul equals dequantize-then-matmul up to a derived rounding bound.

A = decode_rotated(qt) . rotate_activations(x) (float32 dot), B = matmul(x, qt, method)
for every registered method. Exact arithmetic: z_hat . R x = (R^T z_hat) . x. float32
(README T6):

  |A - B| <= sum_b ||z_hat_b|| (2 phi(n) ||x_b|| + 4.5 sqrt(n) 2^-126)
             + gamma_Kp sum |z_hat| |x_rot| + gamma_K sum |w_hat| |x|.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings

import itq3s_jax
from proofs import harness
from proofs import strategies


def rotation_bound(fmt: str, seed: int, coded: harness.Coded, x: np.ndarray) -> np.ndarray:
  """(batch, rows): the rotation-domain path's rounding beyond w_hat . x (README T6)."""
  k = x.shape[-1]
  x_rot = harness.f64(harness.rotate_fn(fmt, seed)(x))
  zb = harness.split_blocks(coded.z_hat, fmt, k)
  out = np.zeros((x.shape[0], coded.z_hat.shape[0]))
  for z, (lo, hi), n in zip(zb, itq3s_jax.block_columns(fmt, k), harness.block_ns(fmt, k)):
    xn = np.linalg.norm(harness.f64(x[..., lo:hi]), axis=-1)
    ab = 4.5 * math.sqrt(n) * harness.MU
    out += (2 * harness.phi(n) * xn[:, None] + ab) * np.linalg.norm(z, axis=-1)[None, :]
  out += harness.gamma(x_rot.shape[-1]) * (np.abs(x_rot) @ np.abs(coded.z_hat).T)
  return out


@jax.jit
def _dot(a, b):
  return jnp.dot(a, b.T, preferred_element_type=jnp.float32)


@harness.check("T6", strategies.matvec_cases(ks=strategies.ALL_K))
def rotated_matmul(args, every: bool | None = None) -> float | None:
  case, x = args
  worst = None
  for fmt in itq3s_jax.formats():
    if not harness.in_range(fmt, case.seed, case.w):
      continue
    coded = harness.code(fmt, case.seed, case.w)
    qt = itq3s_jax.QuantizedTensor(data=jnp.asarray(coded.data), format=fmt, k=case.w.shape[-1], seed=case.seed)
    a = harness.f64(_dot(itq3s_jax.rotate_activations(x, fmt, case.seed),
                         itq3s_jax.decode_rotated(qt)))
    x64 = harness.f64(x)
    bound = (rotation_bound(fmt, case.seed, coded, x)
             + harness.gamma(x.shape[-1]) * (np.abs(x64) @ np.abs(coded.w_hat).T))
    # float64 evaluation of the exact identity: z_hat . R x vs w_hat . x is inside `bound`.
    for method in harness.matmul_methods(every):
      b = harness.run_matmul(method, x, qt)
      if b is None:
        continue
      err = np.abs(a - b)
      assert np.all(err <= bound), (fmt, method, err, bound)
      ok = bound > 0
      if ok.any():
        worst = max(worst or 0.0, float(np.max(err[ok] / bound[ok])))
  return worst


@settings()
@given(strategies.matvec_cases(ks=strategies.ALL_K))
@example((strategies.make("heavy_tail", 256, 0, 0, 1),
          strategies.activations(256, 2, "heavy_tail")))
def test_rotated_matmul(args):
  rotated_matmul(args)


def test_rotated_matmul_every_method():
  """Each registered method (Pallas ones in interpret mode on CPU) once, pinned."""
  rotated_matmul((strategies.make("heavy_tail", 256, 0, 0, 21),
                  strategies.activations(256, 22, "outliers")), every=True)
