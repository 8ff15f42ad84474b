"""Block plans: how a row of K weights is cut into coded blocks (pure Python, exact)."""

from __future__ import annotations

import pytest

from itq3s_jax._src.core import blocks


def _nbytes(n: int) -> int:
  return 1000 + n  # distinct per block size, so byte offsets reveal mistakes


@pytest.mark.parametrize("k, want", [
    (32, [(32, 1)]),
    (96, [(64, 1), (32, 1)]),
    (224, [(128, 1), (64, 1), (32, 1)]),
    (256, [(256, 1)]),
    (576, [(256, 2), (64, 1)]),
    (4096, [(256, 16)]),
    (4096 + 160, [(256, 16), (128, 1), (32, 1)]),
])
def test_pow2_plan_is_256_blocks_then_binary_digits(k, want):
  segs = blocks.plan(k, "pow2", _nbytes)
  assert [(s.n, s.count) for s in segs] == want
  _check_layout(segs, k)
  assert all(s.valid == s.n * s.count for s in segs)  # pow2 never pads


@pytest.mark.parametrize("k", [32, 96, 224, 256, 576, 800])
def test_pad256_plan_pads_only_the_last_block(k):
  segs = blocks.plan(k, "pad256", _nbytes)
  assert all(s.n == 256 for s in segs)
  assert sum(s.count for s in segs) == -(-k // 256)
  padding = sum(s.count * s.n - s.valid for s in segs)
  assert padding == -(-k // 256) * 256 - k
  _check_layout(segs, k)


def _check_layout(segs, k):
  """Segments tile [0, k) in order and their bytes are laid out back to back."""
  col = byte = 0
  for s in segs:
    assert s.start == col and s.byte_start == byte and s.nbytes == _nbytes(s.n)
    col += s.valid
    byte += s.count * s.nbytes
  assert col == k
  assert blocks.row_nbytes(segs) == byte


def test_empty_row_has_an_empty_plan():
  assert blocks.plan(0, "pow2", _nbytes) == ()
  assert blocks.row_nbytes(()) == 0


@pytest.mark.parametrize("k", [1, 16, 100, 250, 577])
def test_k_not_a_multiple_of_32_is_a_value_error(k):
  with pytest.raises(ValueError, match=f"K={k} must be a multiple of 32"):
    blocks.check_k(k)
  with pytest.raises(ValueError, match="multiple of 32"):
    blocks.plan(k, "pow2", _nbytes)


def test_unknown_tail_policy_is_a_value_error():
  with pytest.raises(ValueError, match="unknown tail policy"):
    blocks.plan(288, "pad128", _nbytes)
