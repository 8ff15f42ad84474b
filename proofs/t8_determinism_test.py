"""T8: eager, jit and vmap give bit-identical bytes and values; batch shape does not matter.

Rows are coded independently (blocks never cross rows), so quantize(W)[i] must equal
quantize(W[i]) bit for bit, whatever the leading shape, the chunking of rows (lax.map above
``quantize._CHUNK_WEIGHTS`` weights) or the transformation (README T8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings

import itq3s_jax
from proofs import harness
from proofs import strategies

BIG_ROWS = 300  # > 65536 / 256 rows: the chunked (lax.map) path with padding


def _outputs(qt):
  out = [qt.data, itq3s_jax.dequantize(qt), itq3s_jax.decode_rotated(qt)]
  if itq3s_jax.has_bound(qt.format):
    out.append(itq3s_jax.error_bound(qt))
  return out


@functools.lru_cache(maxsize=None)
def _jitted(fmt: str, seed: int):
  return jax.jit(lambda w: _outputs(itq3s_jax.quantize(w, fmt, seed=seed)))


@functools.lru_cache(maxsize=None)
def _vmapped(fmt: str, seed: int):
  return jax.jit(jax.vmap(lambda r: _outputs(itq3s_jax.quantize(r[None], fmt, seed=seed))))


def _same(a, b, what, bound_ulps: float = 0.0):
  """Bit-identical outputs; the error_bound (last output) within ``bound_ulps`` float32 ulps."""
  for i, (x, y) in enumerate(zip(a, b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, (what, x.shape, y.shape)
    if i == 3 and bound_ulps:
      np.testing.assert_array_less(np.abs(x - y), bound_ulps * harness.U * np.abs(y) + 1e-45,
                                   err_msg=f"{what}: error_bound")
    else:
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=what)


@harness.check("T8", strategies.cases())
def bit_identical(case: strategies.Case, eager: bool = False, chunked: bool = False
                  ) -> float | None:
  """jit == vmap == one row == leading axis (== eager, == 300-row chunked when asked)."""
  w = case.w
  for fmt in itq3s_jax.formats():
    if not harness.in_range(fmt, case.seed, w):
      continue
    ref = [np.asarray(a) for a in _jitted(fmt, case.seed)(w)]
    if eager:
      _same(_outputs(itq3s_jax.quantize(jnp.asarray(w), fmt, seed=case.seed)), ref, f"{fmt} eager")
    vm = _vmapped(fmt, case.seed)(w)
    _same([np.asarray(a)[:, 0] for a in vm], ref, f"{fmt} vmap")
    one = _jitted(fmt, case.seed)(w[:1])
    _same(one, [r[:1] for r in ref], f"{fmt} one row")
    lead = _jitted(fmt, case.seed)(np.stack([w, w[::-1]]))
    _same([np.asarray(a)[0] for a in lead], ref, f"{fmt} leading axis")
    if chunked:
      big = np.resize(w, (BIG_ROWS, w.shape[-1]))  # row i = w[i % ROWS]
      got = [np.asarray(a)[-strategies.ROWS:] for a in _jitted(fmt, case.seed)(big)]
      # error_bound's float32 sums (||z_hat||, sum Delta^2 over n/16 steps) may be reduced in
      # another order inside lax.map: README T8 allows (n/16 + 4) u relative there.
      _same(got, ref, f"{fmt} chunked rows", bound_ulps=256 / 16 + 4)
  return 0.0


@settings()
@given(strategies.cases())
@example(strategies.make("llama_cos", 256, 0, 0, 1))
@example(strategies.make("dynamic_range", 256, 0, 0, 2))
@example(strategies.make("constant", 256, 0, -1, 0))  # iq4_nl near-tie: jit and vmap differed
def test_bit_identical(case):
  bit_identical(case)


def test_eager_and_chunked():
  """Eager op-by-op and the lax.map chunked path (compiles per op / per shape: pinned once)."""
  bit_identical(strategies.make("heavy_tail", 256, 0, 0, 3), eager=True, chunked=True)
