"""bitpack: trit bytes (the TQ1_0 byte code) and LSB-first bit fields.

Packing is integer arithmetic, so every check here is exact. The trit bytes are
checked against an independent decoder, the ``gguf`` package's TQ1_0
dequantizer: 52 of our bytes are laid into one ``block_tq1_0`` (qs[48], qh[4],
fp16 d = 1.0) and gguf's trits must equal ours. TQ1_0 element order
(llama.cpp's TQ1_0 block): qs[m] trit n -> element 32n + m (m < 32); qs[32 + m] trit n ->
160 + 16n + m (m < 16); qh[j] trit n -> 240 + 4n + j (n < 4, the byte's 5th
trit is not read).
"""

from __future__ import annotations

import itertools

import gguf
import gguf.quants
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

from itq3s_jax._src.core import bitpack

TQ1_0 = gguf.GGMLQuantizationType.TQ1_0


def _tq1_0_order() -> np.ndarray:
  """perm[e] = index into our byte-major trit stream (5 * byte + n) of TQ1_0 element e."""
  perm = np.empty(256, np.int64)
  for n, m in itertools.product(range(5), range(32)):
    perm[32 * n + m] = 5 * m + n
  for n, m in itertools.product(range(5), range(16)):
    perm[160 + 16 * n + m] = 5 * (32 + m) + n
  for n, j in itertools.product(range(4), range(4)):
    perm[240 + 4 * n + j] = 5 * (48 + j) + n
  return perm


def gguf_trits(trit_bytes: np.ndarray) -> np.ndarray:
  """uint8 (nb, 52) -> int (nb, 256) trits as decoded by gguf's TQ1_0 (d = 1.0)."""
  nb = trit_bytes.shape[0]
  d = np.full((nb, 1), 1.0, np.float16).view(np.uint8)  # fp16 1.0, little-endian
  blocks = np.concatenate([trit_bytes.astype(np.uint8), d], axis=-1)
  assert blocks.shape[-1] == gguf.GGML_QUANT_SIZES[TQ1_0][1]
  out = gguf.quants.dequantize(blocks.reshape(-1), TQ1_0).reshape(nb, 256)
  return out.astype(np.int64)


def _check_against_gguf(trit_bytes: np.ndarray) -> None:
  ours = np.asarray(bitpack.unpack_trits(jnp.asarray(trit_bytes), 5 * 52), np.int64)
  np.testing.assert_array_equal(gguf_trits(trit_bytes), ours[:, _tq1_0_order()])


def test_every_five_trit_byte_round_trips_and_gguf_agrees():
  # All 3^5 = 243 trit quintuples, exhaustively.
  t = np.array(list(itertools.product((-1, 0, 1), repeat=5)), np.int32)
  b = np.asarray(bitpack.pack_trits(jnp.asarray(t)))
  assert b.shape == (243, 1) and b.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_trits(jnp.asarray(b), 5)), t)
  # The byte is ceil(q * 256 / 243) with q the base-3 number of u = t + 1, first trit
  # most significant (TQ1_0's code), computed here independently in Python integers.
  q = [sum((u + 1) * 3 ** (4 - k) for k, u in enumerate(row)) for row in t.tolist()]
  np.testing.assert_array_equal(b[:, 0], [-(-qq * 256 // 243) for qq in q])
  assert len(set(b[:, 0].tolist())) == 243
  # Laid out as TQ1_0 blocks (243 bytes padded to 5 blocks of 52), gguf decodes the same trits.
  padded = np.concatenate([b[:, 0], np.full(260 - 243, b[121, 0])]).reshape(5, 52)
  _check_against_gguf(padded)


@settings()
@hypothesis.given(seed=st.integers(0, 2**32 - 1), nblocks=st.sampled_from([1, 3]))
def test_packed_random_trits_decode_identically_in_gguf(seed, nblocks):
  t = np.random.default_rng(seed).integers(-1, 2, (nblocks, 260)).astype(np.int32)
  b = np.asarray(bitpack.pack_trits(jnp.asarray(t)))
  assert b.shape == (nblocks, 52)
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_trits(jnp.asarray(b), 260)), t)
  _check_against_gguf(b)


@settings()
# Few distinct lengths (each new shape compiles the eager ops); the values vary freely.
@hypothesis.given(m=st.sampled_from([0, 3, 5, 11]), seed=st.integers(0, 2**32 - 1))
def test_trit_round_trip_any_length(m, seed):
  t = np.random.default_rng(seed).integers(-1, 2, (3, m)).astype(np.int32)
  b = bitpack.pack_trits(jnp.asarray(t))
  assert b.shape == (3, -(-m // 5)) and b.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_trits(b, m)), t)
  # Padding trits are zeros (u = 1): the unused tail of the last byte decodes to 0.
  tail = np.asarray(bitpack.unpack_trits(b, 5 * b.shape[-1]))[:, m:]
  assert not tail.any()


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_bit_fields_match_numpy_lsb_first(width):
  rng = np.random.default_rng(width)
  v = rng.integers(0, 2**width, (4, 37)).astype(np.int32)
  b = np.asarray(bitpack.pack_bits(jnp.asarray(v), width))
  assert b.dtype == np.uint8 and b.shape == (4, -(-37 * width // 8))
  # Independent oracle: the LSB-first bit string of the fields, packed little-endian.
  bits = ((v[..., None] >> np.arange(width)) & 1).astype(np.uint8).reshape(4, -1)
  np.testing.assert_array_equal(b, np.packbits(bits, axis=-1, bitorder="little"))
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_bits(jnp.asarray(b), width, 37)), v)


@settings()
@hypothesis.given(width=st.sampled_from([3, 5]), m=st.sampled_from([0, 13]),
                  seed=st.integers(0, 2**32 - 1))
def test_bit_field_round_trip_property(width, m, seed):
  v = np.random.default_rng(seed).integers(0, 2**width, (2, m)).astype(np.int32)
  b = bitpack.pack_bits(jnp.asarray(v), width)
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_bits(b, width, m)), v)


def test_packing_is_jit_and_vmap_invariant():
  t = jnp.asarray(np.random.default_rng(0).integers(-1, 2, (6, 40)), jnp.int32)
  eager = bitpack.pack_trits(t)
  np.testing.assert_array_equal(np.asarray(jax.jit(bitpack.pack_trits)(t)), np.asarray(eager))
  np.testing.assert_array_equal(np.asarray(jax.vmap(bitpack.pack_trits)(t)), np.asarray(eager))
  v = jnp.asarray(np.random.default_rng(1).integers(0, 8, (6, 16)), jnp.int32)
  eager = bitpack.pack_bits(v, 3)
  jitted = jax.jit(bitpack.pack_bits, static_argnums=1)(v, 3)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
