"""The shared driver (rows -> blocks -> transform -> codec): plans, transforms, tails.

Per-format behaviour (round trips, bounds, bad input) is in formats_test.py;
these tests pin what the driver itself promises.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import itq3s_jax
from itq3s_jax._src import codec
from itq3s_jax._src.core import bitpack
from itq3s_jax._src.formats import itq3_t

FORMATS = itq3s_jax.formats()


def _padded_k(fmt: str, k: int) -> int:
  return -(-k // 256) * 256 if itq3s_jax.get_format(fmt).tail == "pad256" else k


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [32, 96, 224, 576, 4096])
def test_block_columns_tile_the_row(fmt, k):
  cols = itq3s_jax.block_columns(fmt, k)
  assert cols[0][0] == 0 and cols[-1][1] == k
  assert all(a[1] == b[0] for a, b in zip(cols, cols[1:]))
  sizes = [hi - lo for lo, hi in cols]
  if itq3s_jax.get_format(fmt).tail == "pow2":
    assert all(s in (32, 64, 128, 256) for s in sizes)
    assert sizes == sorted(sizes, reverse=True)  # 256-blocks first, then 128/64/32
  else:
    assert all(s == 256 for s in sizes[:-1]) and 0 < sizes[-1] <= 256


@pytest.mark.parametrize("fmt", FORMATS)
def test_rotate_activations_is_the_documented_block_transform(fmt):
  k = 256 + 128 + 64 + 32  # formats_test.SHAPE: shares its compiled eager ops
  x = np.random.default_rng(0).standard_normal((2, k)).astype(np.float32)
  got = np.asarray(itq3s_jax.rotate_activations(x, fmt, seed=3))
  f = itq3s_jax.get_format(fmt)
  assert got.shape == (2, _padded_k(fmt, k))
  xp = np.pad(x, ((0, 0), (0, _padded_k(fmt, k) - k)))
  start = 0
  for lo, hi in itq3s_jax.block_columns(fmt, k):
    n = 256 if f.tail == "pad256" else hi - lo
    block = xp[:, start:start + n]
    if f.transform == "none":
      want = block
    else:
      signs = itq3s_jax.sign_vector(3, n) if f.transform == "rht" else None
      want = np.asarray(itq3s_jax.fwht(block, signs=signs))
    np.testing.assert_array_equal(got[:, start:start + n], want)
    start += n


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_rotated_inverts_to_dequantize(fmt):
  k = 256 + 128 + 64 + 32  # formats_test.SHAPE: shares its compiled eager ops
  w = np.random.default_rng(1).standard_normal((2, k)).astype(np.float32)
  qt = itq3s_jax.quantize(w, fmt)
  z_hat = np.asarray(itq3s_jax.decode_rotated(qt), np.float64)
  w_hat = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  assert z_hat.shape == (2, _padded_k(fmt, k))
  f = itq3s_jax.get_format(fmt)
  start = 0
  for lo, hi in itq3s_jax.block_columns(fmt, k):
    n = 256 if f.tail == "pad256" else hi - lo
    z = z_hat[:, start:start + n]
    if f.transform != "none":
      # Exact inverse in float64: x = signs * H z / sqrt(n).
      z = z @ scipy.linalg.hadamard(n) / math.sqrt(n)
      if f.transform == "rht":
        z = z * itq3s_jax.sign_vector(0, n)
    # float32 inverse transform vs exact: <= (log2 n + 2) u ||z|| (fwht_test error model).
    tol = (math.log2(n) + 2) * 2.0**-24 * np.linalg.norm(z, axis=-1) + 1e-30
    assert np.all(np.linalg.norm(w_hat[:, lo:hi] - z[:, :hi - lo], axis=-1) <= tol)
    start += n


def test_rounding_slack_matches_its_derivation():
  # proofs/README.md T3: c(n) = 2 L' + n/32 + 13 float32 roundoffs, L' = log2 n (+2 if odd),
  # times (1 + 2^-10) for second-order terms.
  u = 2.0**-24
  for n, c in ((32, 28), (64, 27), (128, 35), (256, 37)):
    assert itq3s_jax.rounding_slack(n) == pytest.approx(c * u * (1 + 2.0**-10), rel=1e-12)


def test_tail_widths_keep_the_bound_under_jit():
  # K = 32, 96, 224, 576 in one jitted call (one compilation).
  ks = (32, 96, 224, 576)
  rng = np.random.default_rng(2)
  ws = [rng.standard_normal((2, k)).astype(np.float32) for k in ks]

  @jax.jit
  def run(ws):
    out = []
    for w in ws:
      qt = itq3s_jax.quantize(w, "itq3_t")
      out.append((itq3s_jax.dequantize(qt), itq3s_jax.error_bound(qt)))
    return out

  for w, (w_hat, bound), k in zip(ws, run(ws), ks):
    cols = itq3s_jax.block_columns("itq3_t", k)
    d = w.astype(np.float64) - np.asarray(w_hat, np.float64)
    err = np.stack([np.linalg.norm(d[:, lo:hi], axis=-1) for lo, hi in cols], -1)
    assert np.all(err <= np.asarray(bound)), k


def test_has_bound_matches_the_registry():
  for fmt in FORMATS:
    assert itq3s_jax.has_bound(fmt) == (itq3s_jax.get_format(fmt).bound is not None)
  with pytest.raises(ValueError, match="unknown format"):
    itq3s_jax.has_bound("nope")


def test_decode_tiles_change_no_bits(monkeypatch):
  """dequantize over several column-major tiles (the last one padded) equals the one-tile
  result bit for bit: rows are independent (decode_rotated runs the same tiles)."""
  k = 256 + 128 + 64 + 32  # formats_test.SHAPE
  qt = itq3s_jax.quantize(np.random.default_rng(2).standard_normal((2, 11, k)).astype(
      np.float32), "itq3_t")
  sig = jnp.asarray(codec.signs("itq3_t", 0))
  whole = np.asarray(itq3s_jax.dequantize(qt))
  monkeypatch.setattr(codec, "DECODE_TILE", 8 * k)  # 8 rows a tile: 3 tiles, 2 pad rows
  assert codec.tile_rows(22, k) == 8
  tiled = jax.jit(lambda d: codec._decode_rows(d, sig, "itq3_t", k, True, True))(qt.data)
  np.testing.assert_array_equal(np.asarray(tiled).view(np.uint32), whole.view(np.uint32))


def test_fp16_table_is_the_conversion_for_every_code():
  """The decoders' fp16 scales come from a 65536-entry table: it equals astype, code by code."""
  codes = np.arange(1 << 16, dtype=np.uint16)
  got = np.asarray(bitpack.fp16_rows_to_f32(jnp.asarray(codes & 0xFF), jnp.asarray(codes >> 8)))
  want = codes.view(np.float16).astype(np.float32)
  nan = np.isnan(want)
  np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
  assert np.isnan(got[nan]).all()


def test_itq3_t_digit_packing_is_pack_trits_for_every_digit_group():
  """itq3_t's division-free packer equals bitpack.pack_trits of the interleaved trit stream
  on all 9^5 groups of 5 digits (= 2 bytes, every byte value), and on a ragged tail."""
  q = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 5, indexing="ij"), -1).reshape(-1, 5)
  q = np.concatenate([q, q[::-1, :1]], axis=-1)  # 6 digits: 2 full bytes + a 1-byte tail
  t0 = (q + 1) % 3 - 1
  t1 = (q - t0) // 3
  stream = np.stack([t0, t1], -1).reshape(len(q), -1)
  want = np.asarray(bitpack.pack_trits(jnp.asarray(stream)))
  np.testing.assert_array_equal(np.asarray(itq3_t._pack_digits(jnp.asarray(q))), want)
