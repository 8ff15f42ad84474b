"""Every registered format through one list of cross-cutting tests.

FORMATS_UNDER_TEST is the registry itself, so a new codec module joins every
test here by registering. Format-specific byte checks (independent decoders:
gguf's TQ1_0 for itq3_t's trit bytes, numpy for fp16 / bit fields) are at the
end.

Bound tolerance: ``error_bound(qt)`` already includes the float32 rounding slack
(quantize.rounding_slack), so the tests compare the float64 norm of the float32
reconstruction error with it directly, no extra tolerance.
"""

from __future__ import annotations


import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import settings

import itq3s_jax
from itq3s_jax._src.core import bitpack
from tests import helpers
from itq3s_jax._src.formats import itq3_t
from itq3s_jax._src.formats import uniform3

FORMATS_UNDER_TEST = itq3s_jax.formats()
BOUNDED = tuple(f for f in FORMATS_UNDER_TEST if itq3s_jax.has_bound(f))
UNBOUNDED = tuple(f for f in FORMATS_UNDER_TEST if not itq3s_jax.has_bound(f))
K_TAIL = 256 + 128 + 64 + 32  # one full block and every tail block size under "pow2"
# Most tests share this one shape: each new shape compiles the codec again (eager
# mode compiles op by op), which dominates the suite's time.
SHAPE = (2, K_TAIL)
# Every 3-bit scheme codes N(0,1) blocks with rel-MSE <= 0.088 (absmax round-to-nearest
# with 7 levels is the worst of them)
# (absmax 7-level, the worst); a decoding bug gives ~1 or more.
SANITY_REL_MSE = 0.1


def _fmt(name):
  return itq3s_jax.get_format(name)


def _normal(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _block_errors(w: np.ndarray, w_hat: np.ndarray, fmt: str) -> np.ndarray:
  """float64 ||w_b - w_hat_b||_2 per block, (..., nblocks) in error_bound order."""
  d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
  cols = itq3s_jax.block_columns(fmt, w.shape[-1])
  return np.stack([np.linalg.norm(d[..., lo:hi], axis=-1) for lo, hi in cols], axis=-1)


def _roundtrip(fmt: str):
  """(w, seed) -> (data, w_hat, bound) (bound None for unbounded formats).

  Plain calls of the public functions, which compile once per shape and are shared by
  every test: a jax.jit around them would compile a private copy.
  """
  def run(w, seed):
    qt = itq3s_jax.quantize(w, fmt, seed=seed)
    bound = itq3s_jax.error_bound(qt) if itq3s_jax.has_bound(fmt) else None
    return qt.data, itq3s_jax.dequantize(qt), bound
  return run


def _jit_roundtrip(fmt: str):
  """w -> dequantize(quantize(w)) under jax.jit, where the eager value checks cannot run."""
  return jax.jit(lambda w: itq3s_jax.dequantize(itq3s_jax.quantize(w, fmt)))


def _assert_bound_holds(w, fmt, seed=0):
  w = np.asarray(w, np.float32)
  _, w_hat, bound = _roundtrip(fmt)(jnp.asarray(w), seed)
  err = _block_errors(w, np.asarray(w_hat), fmt)
  bound = np.asarray(bound, np.float64)
  assert bound.shape == err.shape
  assert np.all(np.isfinite(bound))
  bad = np.argwhere(err > bound)
  assert bad.size == 0, (f"{fmt}: bound violated at blocks {bad[:5].tolist()}: "
                         f"err {err[tuple(bad[0])]} > bound {bound[tuple(bad[0])]}")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("shape", [SHAPE, (256,), (2, 1, 32)])
def test_round_trip_shapes_and_dtypes(fmt, shape):
  w = _normal(shape)
  data, _, _ = _roundtrip(fmt)(jnp.asarray(w), 0)
  qt = itq3s_jax.QuantizedTensor(data=data, format=fmt, k=shape[-1])
  assert data.dtype == jnp.uint8
  assert data.shape == (*shape[:-1], _row_nbytes(fmt, shape[-1]))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    w_hat = itq3s_jax.dequantize(qt, dtype)
    assert w_hat.shape == shape and w_hat.dtype == dtype
  w_hat = np.asarray(w_hat, np.float64)
  assert np.sum((w_hat - w) ** 2) / np.sum(w.astype(np.float64) ** 2) < SANITY_REL_MSE


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("in_dtype", [jnp.float16, jnp.bfloat16, np.float64])
def test_input_dtypes_code_their_float32_value(fmt, in_dtype):
  # quantize works in float32: an input whose values are exact in float32 gives the
  # same bytes whatever its dtype.
  w = jnp.asarray(_normal(SHAPE), in_dtype) if in_dtype != np.float64 else \
      _normal(SHAPE).astype(np.float64)
  as32 = np.asarray(jnp.asarray(w).astype(jnp.float32)) if in_dtype != np.float64 \
      else w.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(itq3s_jax.quantize(w, fmt).data),
                                np.asarray(itq3s_jax.quantize(as32, fmt).data))


def _row_nbytes(fmt: str, k: int) -> int:
  """Bytes of a row from the block plan: the sum of the format's block sizes."""
  f = _fmt(fmt)
  cols = itq3s_jax.block_columns(fmt, k)
  if f.tail == "pow2":
    return sum(f.block_nbytes(hi - lo) for lo, hi in cols)
  return len(cols) * f.block_nbytes(256)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("k", [32, 96, 224, 256, 576, 4096])
def test_bits_per_weight_accounts_for_every_byte(fmt, k):
  # Shapes only: jax.eval_shape runs no codec arithmetic.
  data = jax.eval_shape(lambda w: itq3s_jax.quantize(w, fmt).data,
                        jax.ShapeDtypeStruct((3, k), jnp.float32))
  assert data.shape == (3, _row_nbytes(fmt, k)) and data.dtype == jnp.uint8
  qt = itq3s_jax.QuantizedTensor(data=jnp.zeros(data.shape, jnp.uint8), format=fmt, k=k)
  assert qt.nbytes == 3 * _row_nbytes(fmt, k)
  assert qt.bits_per_weight == 8 * qt.nbytes / (3 * k)
  header = len(qt.to_bytes()) - qt.nbytes
  assert 12 < header < 200  # magic + version + length + a short JSON header


def test_itq3_t_sizes_meet_issue_2():
  # 110 bytes per 256 weights (the size of IQ3_S / Q3_K) or less; <= 3.6 bpw at K = 576.
  assert _fmt("itq3_t").block_nbytes(256) <= 110
  assert 8 * _row_nbytes("itq3_t", 576) / 576 <= 3.6


# ------------------------------------------------- jit / vmap / recompilation


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_jit_eager_and_vmap_are_bit_identical(fmt):
  w = _normal(SHAPE, seed=1)
  eager = itq3s_jax.quantize(w, fmt)
  jitted = jax.jit(lambda v: itq3s_jax.quantize(v, fmt).data)(w)
  mapped = jax.vmap(lambda v: itq3s_jax.quantize(v, fmt).data)(w)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager.data))
  np.testing.assert_array_equal(np.asarray(mapped), np.asarray(eager.data))
  w_eager = np.asarray(itq3s_jax.dequantize(eager))
  w_jit = jax.jit(itq3s_jax.dequantize)(eager)
  w_map = jax.vmap(lambda d: itq3s_jax.dequantize(
      itq3s_jax.QuantizedTensor(data=d, format=fmt, k=K_TAIL)))(eager.data)
  np.testing.assert_array_equal(np.asarray(w_jit), w_eager)
  np.testing.assert_array_equal(np.asarray(w_map), w_eager)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_no_retrace_on_a_second_call_or_a_new_seed(fmt):
  """The library's compiled programs are reused: same shapes, new values, new seed."""
  def run(w, seed):
    qt = itq3s_jax.quantize(w, fmt, seed=seed)
    out = [qt.data, itq3s_jax.dequantize(qt), itq3s_jax.decode_rotated(qt),
           itq3s_jax.rotate_activations(w, fmt, seed)]
    if itq3s_jax.has_bound(fmt):
      out.append(itq3s_jax.error_bound(qt))
    return out

  jax.block_until_ready(run(_normal(SHAPE, seed=1), 0))
  with helpers.assert_max_traces(0):
    jax.block_until_ready(run(_normal(SHAPE, seed=2), 0))
    jax.block_until_ready(run(_normal(SHAPE, seed=3), 11))  # the seed is not compiled in


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_blocks_are_coded_independently_of_their_row(fmt):
  # benchmarks and `itq3s accuracy` code tensors as (R*K/256, 256) block rows.
  w = _normal((2, 512), seed=5)
  whole = np.asarray(_roundtrip(fmt)(w, 0)[0])
  rows = np.asarray(_roundtrip(fmt)(w.reshape(4, 256), 0)[0])
  np.testing.assert_array_equal(whole.reshape(4, -1), rows)


# ---------------------------------------------------------- certified bounds


def _adversarial(k: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(11)
  had = scipy.linalg.hadamard(256).astype(np.float32)
  tile = lambda row: np.resize(row, k).astype(np.float32)  # noqa: E731
  sign = lambda: rng.choice([-1.0, 1.0], k)  # noqa: E731
  cases = {
      "zeros": np.zeros(k),
      "one_hot": np.eye(1, k, 0)[0],
      "one_hot_big": 1e3 * np.eye(1, k, 200)[0],
      "constant": np.full(k, 1.0),
      "constant_negative": np.full(k, -3.7),
      "hadamard_row": tile(had[5]),
      # A Hadamard row times the seed-0 sign vector rotates to one spike of height 16.
      "signed_hadamard_row": tile(had[5] * itq3s_jax.sign_vector(0, 256)),
      "alternating": tile(np.array([1.0, -1.0])),
      "huge_dynamic_range": sign() * 10.0 ** rng.uniform(-30, 3, k),
      "block_scales_differ": np.concatenate([np.full(256, 1e3), np.full(k - 256, 1e-3)])
                             * sign(),
      "subnormal": sign() * 1e-40,
      "subnormal_mixed": sign() * np.where(rng.random(k) < 0.5, 1e-40, 1e-38),
      "tiny_normal": rng.standard_normal(k) * 1e-30,
      "gauss_outlier": np.where(np.arange(k) == 17, 100.0, rng.standard_normal(k)),
      "sparse": rng.standard_normal(k) * (rng.random(k) < 0.03),
  }
  return {name: np.asarray(v, np.float32) for name, v in cases.items()}


ADVERSARIAL = tuple(_adversarial(K_TAIL))


@pytest.mark.parametrize("fmt", BOUNDED)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_error_within_bound_on_adversarial_blocks(fmt, case):
  w = _adversarial(K_TAIL)[case][None, :]
  _assert_bound_holds(np.concatenate([w, -w]), fmt)  # (2, K_TAIL) = SHAPE


@pytest.mark.parametrize("fmt", BOUNDED)
@settings()
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-25, 5),
    dist=st.sampled_from(["normal", "t3", "uniform", "laplace", "sparse", "one_scale_per_row"]))
def test_error_within_bound_on_random_blocks(fmt, seed, log_scale, dist):
  rng = np.random.default_rng(seed)
  shape = SHAPE
  w = {
      "normal": lambda: rng.standard_normal(shape),
      "t3": lambda: rng.standard_t(3, shape),
      "uniform": lambda: rng.uniform(-1, 1, shape),
      "laplace": lambda: rng.laplace(size=shape),
      "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.05),
      "one_scale_per_row": lambda: rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 3, (2, 1)),
  }[dist]() * 10.0**log_scale
  try:
    _assert_bound_holds(w, fmt, seed=seed % 3)
  except ValueError as e:
    # Beyond its range the encoder refuses (test_values_beyond_the_format_range); the bound
    # is only claimed for what it codes.
    if "too large" not in str(e):
      raise
    hypothesis.reject()


@pytest.mark.parametrize("fmt", BOUNDED)
def test_error_bound_shape_and_exact_part(fmt):
  qt = itq3s_jax.quantize(_normal(SHAPE), fmt)
  with_slack = np.asarray(itq3s_jax.error_bound(qt))
  exact = np.asarray(itq3s_jax.error_bound(qt, include_rounding=False))
  assert with_slack.shape == exact.shape == (2, len(itq3s_jax.block_columns(fmt, K_TAIL)))
  assert np.all(exact > 0) and np.all(with_slack >= exact)
  # The slack is relative float32 rounding: tiny next to eps_q for normal data.
  assert np.all(with_slack <= exact * (1 + 1e-3))


@pytest.mark.parametrize("fmt", UNBOUNDED or ["<none registered>"])
def test_formats_without_a_bound_say_so(fmt):
  if fmt not in FORMATS_UNDER_TEST:
    pytest.skip("no registered format lacks a certified bound")
  qt = itq3s_jax.quantize(_normal(SHAPE), fmt)
  with pytest.raises(ValueError, match="no certified error bound"):
    itq3s_jax.error_bound(qt)


# ------------------------------------------------------ seeds and transforms


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_seed_changes_only_randomized_formats(fmt):
  w = _normal(SHAPE, seed=6)
  a = np.asarray(itq3s_jax.quantize(w, fmt, seed=0).data)
  b = itq3s_jax.quantize(w, fmt, seed=1)
  assert b.seed == 1
  if _fmt(fmt).transform == "rht":
    assert not np.array_equal(a, np.asarray(b.data))
  else:
    np.testing.assert_array_equal(a, np.asarray(b.data))
  w_hat = np.asarray(itq3s_jax.dequantize(b), np.float64)
  assert np.sum((w_hat - w) ** 2) / np.sum(w.astype(np.float64) ** 2) < SANITY_REL_MSE


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_rotated_domain_product_equals_dequantized_product(fmt):
  w = _normal(SHAPE, seed=7)
  x = _normal(SHAPE, seed=8)
  qt = itq3s_jax.quantize(w, fmt, seed=2)
  w_hat = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  z_hat = np.asarray(itq3s_jax.decode_rotated(qt), np.float64)
  x_rot = np.asarray(itq3s_jax.rotate_activations(x, fmt, seed=2), np.float64)
  assert z_hat.shape[:-1] == (2,) and x_rot.shape == (2, z_hat.shape[-1])
  got = x_rot @ z_hat.T
  want = x @ w_hat.T
  # Both sides in float64 from float32 operands; they differ by the float32 rounding of
  # the inverse transform (in w_hat) and the forward one (in x_rot): each <= (log2 256 + 2)
  # u ||.|| per block, so |got - want| <= 2 (8 + 2) u ||z_hat_row|| ||x_row|| (Cauchy-Schwarz).
  tol = 2 * 10 * 2.0**-24 * np.outer(np.linalg.norm(x, axis=-1), np.linalg.norm(z_hat, axis=-1))
  assert np.all(np.abs(got - want) <= tol)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_importance_is_accepted_in_both_shapes(fmt):
  w = _normal(SHAPE, seed=9)
  imp = np.random.default_rng(9).uniform(0.1, 2.0, K_TAIL).astype(np.float32)
  for a in (imp, np.stack([imp, imp[::-1]])):
    qt = itq3s_jax.quantize(w, fmt, importance=a)
    assert qt.data.shape == (2, _row_nbytes(fmt, K_TAIL))
    if itq3s_jax.has_bound(fmt):  # the bound is a worst case: weights cannot break it
      err = _block_errors(w, np.asarray(itq3s_jax.dequantize(qt)), fmt)
      assert np.all(err <= np.asarray(itq3s_jax.error_bound(qt)))
  with pytest.raises(ValueError):
    itq3s_jax.quantize(w, fmt, importance=imp[:32])


# ------------------------------------------------- serialization and pytrees


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_to_bytes_from_bytes_round_trip(fmt):
  qt = itq3s_jax.quantize(_normal(SHAPE, seed=10), fmt, seed=5)
  back = itq3s_jax.QuantizedTensor.from_bytes(qt.to_bytes())
  assert (back.shape, back.format, back.seed) == (qt.shape, qt.format, qt.seed)
  np.testing.assert_array_equal(np.asarray(back.data), np.asarray(qt.data))
  np.testing.assert_array_equal(np.asarray(itq3s_jax.dequantize(back)),
                                np.asarray(itq3s_jax.dequantize(qt)))


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_pytree_flatten_unflatten(fmt):
  qt = itq3s_jax.quantize(_normal(SHAPE), fmt, seed=3)
  leaves, treedef = jax.tree.flatten(qt)
  assert len(leaves) == 1 and leaves[0] is qt.data  # shape/format/seed are static
  back = jax.tree.unflatten(treedef, leaves)
  assert (back.shape, back.format, back.seed) == (qt.shape, qt.format, qt.seed)
  copied = jax.tree.map(lambda a: a + 0, qt)
  assert isinstance(copied, itq3s_jax.QuantizedTensor) and copied.format == fmt
  np.testing.assert_array_equal(np.asarray(copied.data), np.asarray(qt.data))
  # Static fields belong to the treedef: a different seed is a different structure.
  other = itq3s_jax.QuantizedTensor(data=qt.data, format=fmt, k=qt.shape[-1], seed=4)
  assert jax.tree.structure(other) != treedef


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_value_errors_with_count_and_location(fmt, bad):
  w = _normal(SHAPE)
  w[0, 5] = bad
  w[1, 7] = bad
  with pytest.raises(ValueError, match=r"\(2 NaN/Inf values, first at indices \[\[0, 5\], \[1, 7\]\]"):
    itq3s_jax.quantize(w, fmt)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.complex64])
def test_non_float_input_is_a_type_error(fmt, dtype):
  with pytest.raises(TypeError, match="float"):
    itq3s_jax.quantize(np.ones((2, 256), dtype), fmt)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("k", [1, 100, 250, 577])
def test_k_not_a_multiple_of_32_is_a_value_error(fmt, k):
  with pytest.raises(ValueError, match=f"K={k} must be a multiple of 32"):
    itq3s_jax.quantize(np.ones((2, k), np.float32), fmt)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
@pytest.mark.parametrize("shape", [(0, 256), (4, 0), (0,)])
def test_empty_arrays(fmt, shape):
  w = np.zeros(shape, np.float32)
  if shape[-1]:  # codec ops on empty blocks: jit keeps it to one compilation
    qt = itq3s_jax.QuantizedTensor(data=_roundtrip(fmt)(w, 0)[0], format=fmt, k=shape[-1])
  else:
    qt = itq3s_jax.quantize(w, fmt)
  assert qt.data.shape == (*shape[:-1], _row_nbytes(fmt, shape[-1]))
  assert qt.nbytes == 0 and qt.bits_per_weight == 0.0
  w_hat = itq3s_jax.dequantize(qt)
  assert w_hat.shape == shape
  back = itq3s_jax.QuantizedTensor.from_bytes(qt.to_bytes())
  assert back.shape == shape
  if itq3s_jax.has_bound(fmt):
    assert itq3s_jax.error_bound(qt).shape == (*shape[:-1], len(itq3s_jax.block_columns(fmt, shape[-1])))


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_values_beyond_the_format_range(fmt):
  big = 1e30  # beyond every format's scale range (fp16 scales end at 65504)
  w = _normal(SHAPE)
  w[1, 3] = big
  with pytest.raises(ValueError, match="too large"):
    itq3s_jax.quantize(w, fmt)
  # Documented jit behaviour: no value checks, so no error; values are clipped to the
  # format's range and nothing decodes to Inf/NaN (the bound does not hold there).
  w_hat = _jit_roundtrip(fmt)(w)
  assert np.all(np.isfinite(np.asarray(w_hat)))


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_just_below_the_range_is_coded_without_inf(fmt):
  # The largest magnitude the eager check accepts, placed so that the coding-domain
  # coefficient is exactly as large as the input (a one-hot in "none" formats; for
  # rotated ones a signed Hadamard row rotates to a spike of height 16 |value|).
  f = _fmt(fmt)
  w = np.zeros(SHAPE, np.float32)
  if f.transform == "none":
    w[0, 0] = np.float32(f.max_abs) * np.float32(0.99)
  else:
    row = scipy.linalg.hadamard(256)[3].astype(np.float32)
    if f.transform == "rht":
      row = row * itq3s_jax.sign_vector(0, 256)
    w[0, :256] = row * np.float32(0.99 * f.max_abs / 16)
  qt = itq3s_jax.quantize(w, fmt)
  w_hat = np.asarray(itq3s_jax.dequantize(qt))
  assert np.all(np.isfinite(w_hat))
  if itq3s_jax.has_bound(fmt):
    assert np.all(_block_errors(w, w_hat, fmt) <= np.asarray(itq3s_jax.error_bound(qt)))


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST)
def test_nan_under_jit_does_not_raise(fmt):
  # Documented: under jit the value checks cannot run; NaN gives undefined codes.
  w = _normal(SHAPE)
  w[0, 0] = np.nan
  data = jax.jit(lambda v: itq3s_jax.quantize(v, fmt).data)(w)
  assert data.shape == (2, _row_nbytes(fmt, K_TAIL)) and data.dtype == jnp.uint8


def test_unknown_format_and_bad_seed():
  with pytest.raises(ValueError, match="unknown format 'nope'; known formats"):
    itq3s_jax.quantize(np.ones((1, 256), np.float32), "nope")
  with pytest.raises(TypeError, match="format must be a string"):
    itq3s_jax.quantize(np.ones((1, 256), np.float32), 3)
  with pytest.raises(ValueError, match="seed=-1 must be a non-negative int"):
    itq3s_jax.quantize(np.ones((1, 256), np.float32), "itq3_t", seed=-1)
  with pytest.raises(ValueError, match="at least one axis"):
    itq3s_jax.quantize(np.float32(1.0), "itq3_t")


# ------------------------------------------- itq3_t bytes, independently read


def _itq3_t_fields(data: np.ndarray, n: int = 256):
  """Splits itq3_t 256-blocks with numpy: (e, 3-bit step codes, trit bytes)."""
  ns = n // 16
  sb = -(-3 * ns // 8)
  e = data[..., 0]
  bits = np.unpackbits(data[..., 1:1 + sb], axis=-1, bitorder="little")[..., :3 * ns]
  s = (bits.reshape(*bits.shape[:-1], ns, 3) << np.arange(3)).sum(-1)
  return e, s, data[..., 1 + sb:]


def test_itq3_t_trit_bytes_decode_identically_in_gguf_tq1_0():
  import bitpack_test  # noqa: PLC0415  (tests/ is on sys.path under pytest's rootdir)

  w = np.concatenate([_normal((6, 256), seed=12), _adversarial(256)["signed_hadamard_row"][None],
                      _normal((1, 256), seed=13, scale=1e-20)])  # (8, 256)
  data = np.asarray(itq3s_jax.quantize(w, "itq3_t", seed=0).data)
  assert data.shape[-1] == itq3_t.nbytes(256)
  e, s, tbytes = _itq3_t_fields(data)
  assert tbytes.shape[-1] == 103  # 512 trits at 5 per byte
  # Two TQ1_0 blocks of 52 bytes cover the 103 trit bytes (+1 byte of zero trits).
  zero_trits = np.asarray(bitpack.pack_trits(jnp.zeros((1, 5), jnp.int32)))[0, 0]
  padded = np.concatenate([tbytes, np.full((tbytes.shape[0], 1), zero_trits, np.uint8)], -1)
  trits = bitpack_test.gguf_trits(padded.reshape(-1, 52))  # (2 * rows, 256) in TQ1_0 order
  # Back to our byte-major stream: position 5 * byte + n of each 52-byte half.
  stream = np.empty((trits.shape[0], 260), np.int64)
  stream[:, bitpack_test._tq1_0_order()] = trits
  # qh bytes expose only 4 of their 5 trits; the 5th trit of bytes 48..51 is not read by
  # TQ1_0, so rebuild the stream from the first 4 and check the 5th separately with ours.
  ours = np.asarray(bitpack.unpack_trits(jnp.asarray(padded.reshape(-1, 52)), 260))
  readable = np.ones(260, bool)
  readable[[5 * (48 + j) + 4 for j in range(4)]] = False
  np.testing.assert_array_equal(stream[:, readable], ours[:, readable])
  # decode = Delta_b * (3 t1 + t0) with the gguf-read trits (interleaved t0, t1).
  t = ours.reshape(-1, 2 * 260)[:, :512].reshape(-1, 256, 2)
  q = 3 * t[..., 1] + t[..., 0]
  assert q.min() >= -4 and q.max() <= 4
  steps = np.float64(itq3_t.SUPER[e])[:, None] * np.float64(itq3_t.MULT[s])
  z_hat = np.asarray(itq3s_jax.decode_rotated(itq3s_jax.QuantizedTensor(data=jnp.asarray(data), format="itq3_t", k=w.shape[-1])), np.float64)
  np.testing.assert_array_equal(z_hat, np.repeat(steps, 16, axis=-1) * q)


def test_itq3_t_super_scale_and_step_codes():
  # D(e) = 2^((e - 176) / 4) (e = 0: D = 0) with its 2^(k/4) factor rounded to float16
  # (11-bit significands, so step products are exact in float32): within 2^-11 relative.
  e = np.arange(1, 256)
  np.testing.assert_allclose(itq3_t.SUPER[1:], 2.0 ** ((e - 176) / 4.0), rtol=2.0**-11)
  assert itq3_t.SUPER[0] == 0
  mant = np.ldexp(itq3_t.SUPER[1:], -(e // 4 - 44))  # exact power-of-two rescaling
  for table in (mant, itq3_t.MULT):
    np.testing.assert_array_equal(table.astype(np.float16).astype(np.float32), table)
  w = _normal((8, 256), seed=14)
  qt = itq3s_jax.quantize(w, "itq3_t")
  data = np.asarray(qt.data)
  e, s, _ = _itq3_t_fields(data)
  steps = np.asarray(itq3_t.steps(jnp.asarray(data), 256), np.float64)
  np.testing.assert_array_equal(steps, np.float64(itq3_t.SUPER[e])[:, None]
                                * np.float64(itq3_t.MULT[s]))
  # eps_q = 2 ||Delta||_2 over the 16 sub-blocks (16 coefficients, each off by <= Delta/2).
  np.testing.assert_allclose(np.asarray(itq3s_jax.error_bound(qt, include_rounding=False)),
                             2 * np.linalg.norm(steps, axis=-1)[:, None], rtol=2.0**-22)
  # No clipping: every rotated coefficient is within Delta_b / 2 of its code.
  z = np.asarray(itq3s_jax.rotate_activations(w, "itq3_t"), np.float64)
  z_hat = np.asarray(itq3s_jax.decode_rotated(qt), np.float64)
  half = np.repeat(steps, 16, axis=-1) / 2
  # |z - q Delta| <= Delta/2 up to the float32 rounding of z / Delta and of q Delta.
  assert np.all(np.abs(z - z_hat) <= half * (1 + 2.0**-20) + 2.0**-23 * np.abs(z))


# ----------------------------------------------- uniform3 bytes, read by numpy


@pytest.mark.parametrize("fmt", ["uniform3", "uniform3_rot"])
def test_uniform3_fp16_scale_and_codes_read_by_numpy(fmt):
  w = np.concatenate([_normal((6, 256), seed=15), _normal((1, 256), seed=16, scale=1e-6),
                      _normal((1, 256), seed=17, scale=1e4)])  # (8, 256)
  qt = itq3s_jax.quantize(w, fmt, seed=1)
  data = np.asarray(qt.data)
  assert data.shape[-1] == uniform3.nbytes(256) == 2 + 96
  d = data[:, :2].copy().view("<f2")[:, 0].astype(np.float64)
  codes = np.unpackbits(data[:, 2:], axis=-1, bitorder="little").reshape(-1, 256, 3)
  c = (codes << np.arange(3)).sum(-1)
  z = np.asarray(itq3s_jax.rotate_activations(w, fmt, seed=1), np.float64)
  np.testing.assert_array_equal(np.asarray(itq3s_jax.decode_rotated(qt), np.float64),
                                (c - 4) * d[:, None])
  # d = -m/4 rounded to fp16 away from zero: the smallest fp16 magnitude >= |m|/4.
  m = np.take_along_axis(z, np.argmax(np.abs(z), axis=-1)[:, None], -1)[:, 0]
  target = np.abs(np.float32(m) / np.float32(-4.0))
  assert np.all(np.sign(d) == -np.sign(m))
  assert np.all(np.abs(d) >= target)
  below = np.nextafter(np.abs(d).astype(np.float16), np.float16(0)).astype(np.float64)
  assert np.all(below < target)
  # Round to nearest on {-4..3} d: every code is the nearest level (ties either way).
  lev = (np.arange(8) - 4)[None, None, :] * d[:, None, None]
  best = np.min(np.abs(z[..., None] - lev), axis=-1)
  assert np.all(np.abs(z - (c - 4) * d[:, None]) <= best + 2.0**-23 * np.abs(z))
