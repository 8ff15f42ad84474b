"""The Pallas kernels in interpret mode against a float64 reference, outputs poisoned.

Error model (|.| elementwise, u = 2^-24 the float32 unit roundoff, x_m a row
of x, w_n = dequantize(qt)[n] the float32 reference weights; Cauchy-Schwarz
turns sum_i |x_i||w_i| into ||x_m|| ||w_n||, in either domain since the
block transform is orthonormal):
  * decoded coding-domain blocks equal the codec's decode bit for bit, in
    both decoder forms (test_decoder_matches_codec, test_terms_match_codec),
    so only arithmetic rounding remains;
  * float32 accumulation of K products (kernel loop, XLA tail, the per-block
    scale, split-K partial sums): <= K u ||x_m|| ||w_n||;
  * the 256-point transform (weight_ifwht: in-kernel butterfly vs the core's;
    act_rotate: rotating x): 8 stages of one rounding each, an element errs by
    <= 8 u (sum of 256 |inputs|) / 16 <= 8 u ||block||, so the dot errs by
    <= 8 u ||block|| ||other block||_1 <= 128 u per block pair, twice when both
    the reference's and the kernel's transforms round: <= 256 u ||x_m|| ||w_n||;
  * bf16/f16 inputs: each dot operand rounded once, to the input's half type
    (weight_ifwht) or to float16 (act_rotate: x scaled by a power of two so
    max |x| is in [0.5, 1), decoded terms exact or rounded once, 2^-11 <= u_h):
    <= (2 u_h + u_h^2) ||x_m|| ||w_n|| with u_h = 2^-9 (bf16), 2^-11 (f16); an
    x element that underflows float16 errs by <= 2^-24 max|x_m|, <= sqrt(K) u
    ||x_m|| ||w_n|| over a row, inside the K u term.
The tolerance is 1.25 x the sum (the 25% absorbs second-order terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import itq3s_jax
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import registry
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import driver as _driver
from itq3s_jax.pallas_kernels import terms
from itq3s_jax.pallas_kernels import weight_ifwht

KERNELS = {"weight_ifwht": weight_ifwht.weight_ifwht, "act_rotate": act_rotate.act_rotate}
KERNEL_FORMATS = sorted(kernel_codec.formats())
_U32 = 2.0**-24
_U_HALF = {jnp.dtype(jnp.bfloat16): 2.0**-9, jnp.dtype(jnp.float16): 2.0**-11}


def _weights(n, k, seed=0):
  return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _check(name, x, qt, config=None, interpret=True):
  """Runs kernel ``name`` on a NaN-poisoned output and compares with float64."""
  x = jnp.asarray(x)
  n, k = qt.shape
  x2 = x.reshape(-1, k)
  config = config or _driver.heuristic(x2.shape[0], n, k, rotate=name == "act_rotate")
  poison = jnp.full(_driver.out_shape(x2.shape[0], n, config), jnp.nan, jnp.float32)
  y = np.asarray(KERNELS[name](x, qt, config=config, interpret=interpret, out_init=poison))
  assert y.shape == (*x.shape[:-1], n)
  x64 = np.asarray(x2.astype(jnp.float32), np.float64)
  w64 = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  want = x64 @ w64.T
  norms = np.outer(np.linalg.norm(x64, axis=-1), np.linalg.norm(w64, axis=-1))
  u_h = _U_HALF.get(x.dtype, 0.0)
  tol = 1.25 * ((k + 256) * _U32 + 2 * u_h + u_h * u_h) * norms
  got = y.reshape(-1, n)
  assert np.isfinite(got).all(), "an output element was never written (still NaN)"
  err = np.abs(got - want)
  assert (err <= tol).all(), f"max err {err.max():.3g}, at tol {tol.flat[err.argmax()]:.3g}"
  return got, want


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("m", [1, 3, 64, 256])
def test_rows_sweep(name, m):
  """M from GEMV to several row blocks; N=40 is not a multiple of the tiles; K=576 has a 64 tail."""
  qt = itq3s_jax.quantize(_weights(40, 576), "itq3_t", seed=3)
  x = np.random.default_rng(m).standard_normal((m, 576)).astype(np.float32)
  _check(name, x, qt)


# uniform3 and uniform3_rot run one act_rotate program (the rotation is in XLA); their
# weight_ifwht programs differ by the butterfly, which uniform3_rot has.
@pytest.mark.parametrize("name,fmt", [(n, f) for n in sorted(KERNELS) for f in KERNEL_FORMATS
                                      if f != "itq3_t" and (n, f) not in (
                                          ("act_rotate", "uniform3_rot"),
                                          ("weight_ifwht", "uniform3"))])
def test_other_formats(name, fmt):
  """K=800: a 32 tail (pow2 formats) or a zero-padded last block (pad256: iq3_s, itq3_s)."""
  qt = itq3s_jax.quantize(_weights(24, 800, seed=1), fmt, seed=5)
  x = np.random.default_rng(2).standard_normal((3, 800)).astype(np.float32)
  _check(name, x, qt)


@pytest.mark.parametrize("name,fmt,dtype", [
    ("weight_ifwht", "itq3_t", jnp.bfloat16), ("act_rotate", "itq3_t", jnp.bfloat16),
    ("act_rotate", "itq3_t", jnp.float16), ("act_rotate", "itq3_s", jnp.bfloat16),
    ("weight_ifwht", "itq3_s", jnp.bfloat16), ("act_rotate", "uniform3", jnp.float16)])
def test_half_precision_inputs(name, fmt, dtype):
  qt = itq3s_jax.quantize(_weights(48, 512, seed=2), fmt)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 512)), dtype)
  _check(name, x, qt)


def test_half_inputs_of_any_magnitude():
  """float16 operands after a per-row power-of-two scale: rows at 2^-30 and 2^40 (outside
  float16's range unscaled) and an all-zero row stay within the bf16 error model."""
  qt = itq3s_jax.quantize(_weights(32, 256, seed=8), "itq3_t")
  x = np.random.default_rng(9).standard_normal((3, 256)) * np.array([[2.0**-30], [2.0**40], [0]])
  _check("act_rotate", jnp.asarray(x, jnp.bfloat16), qt)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_explicit_tiling_many_programs(name):
  """A 4 x 3 grid with partial last blocks in both directions, and split-K over 2 programs."""
  qt = itq3s_jax.quantize(_weights(40, 256 + 128 + 32, seed=6), "itq3_t")
  x = np.random.default_rng(7).standard_normal((50, 416)).astype(np.float32)
  _check(name, x, qt, config=_driver.Config(block_m=16, block_n=16))
  qt = itq3s_jax.quantize(_weights(40, 5 * 256, seed=6), "iq3_s")
  x = np.random.default_rng(7).standard_normal((5, 5 * 256)).astype(np.float32)
  _check(name, x, qt, config=_driver.Config(block_m=16, block_n=32, split_k=2))


def test_platform_decides_interpret_mode():
  """interpret=None on a CPU host runs the interpreter (the lowering test checks that a
  CUDA lowering of the same call holds the Triton kernel)."""
  qt = itq3s_jax.quantize(_weights(40, 576), "itq3_t", seed=3)
  x = np.random.default_rng(5).standard_normal((2, 576)).astype(np.float32)
  _check("act_rotate", x, qt, interpret=None)


def test_poison_detects_unwritten_output(monkeypatch):
  """The poisoning can fail: a kernel that writes nothing leaves the NaN in place."""

  def write_nothing(*refs, **kw):
    del refs, kw

  monkeypatch.setattr(_driver, "_kernel", write_nothing)
  _driver.fused.clear_cache()
  qt = itq3s_jax.quantize(_weights(40, 256), "itq3_t")
  try:
    with pytest.raises(AssertionError, match="never written"):
      _check("act_rotate", np.ones((1, 256), np.float32), qt)
  finally:
    monkeypatch.undo()
    _driver.fused.clear_cache()


def _blocks(fmt, n, seed):
  """Coded blocks of random data and random bytes (fp16 scales kept finite)."""
  codec = registry.get_format(fmt)
  rng = np.random.default_rng(seed)
  coded = codec.encode(jnp.asarray(rng.standard_normal((7, n)), jnp.float32), None)
  noise = jnp.asarray(rng.integers(0, 256, coded.shape), jnp.uint8)
  if fmt.startswith("uniform3") or fmt in ("iq3_s", "itq3_s"):  # fp16 exponent not all ones
    noise = noise.at[:, 1].set(noise[:, 1] & 0x7B)
  return coded, noise


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@pytest.mark.parametrize("n", [256, 128, 64, 32])
def test_decoder_matches_codec(fmt, n):
  """The natural-order kernel decoder equals Format.decode bit for bit (coded and random bytes)."""
  if registry.get_format(fmt).tail == "pad256" and n != 256:
    pytest.skip("pad256 formats have 256-blocks only")
  codec = registry.get_format(fmt)
  for b in _blocks(fmt, n, n):
    np.testing.assert_array_equal(kernel_codec.decode_blocks(b, fmt, n), codec.decode(b, n))


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_terms_match_codec(fmt):
  """act_rotate's term decoder: float32 terms reassemble Format.decode bit for bit; float16
  terms are the float32 ones rounded once (exact where the format's values fit 11 bits)."""
  t = terms.get(fmt)
  assert t.slots >= 16 and t.slots & (t.slots - 1) == 0
  codec = registry.get_format(fmt)
  for b in _blocks(fmt, 256, 1):
    np.testing.assert_array_equal(kernel_codec.decode_terms(b, t), codec.decode(b, 256))
    src = kernel_codec.ArraySource(b, kernel_codec.Codec({}, t.luts, None))
    for i in range(t.terms):
      v32 = np.asarray(t.decode(src, np.array([i]), jnp.dtype(jnp.float32)), np.float64)
      v16 = np.asarray(t.decode(src, np.array([i]), jnp.dtype(jnp.float16)), np.float64)
      np.testing.assert_array_equal(v16, v32.astype(np.float16))
      if fmt != "itq3_t":
        np.testing.assert_array_equal(v16, v32)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_expand_matches_decoded_dot(fmt):
  """x . z_hat == scale * sum_t xe_t . V_t: the slot order of expand() is the decoder's."""
  t = terms.get(fmt)
  b, _ = _blocks(fmt, 256, 2)
  x = np.random.default_rng(3).standard_normal((2, 256))
  z = np.asarray(registry.get_format(fmt).decode(b, 256), np.float64)
  xe = np.asarray(kernel_codec.expand(jnp.asarray(x, jnp.float32), t), np.float64)
  src = kernel_codec.ArraySource(b, kernel_codec.Codec({}, t.luts, None))
  v = np.concatenate([np.asarray(t.decode(src, np.array([i]), jnp.dtype(jnp.float32)))[:, 0]
                      for i in range(t.terms)], axis=-1).astype(np.float64)
  got = (xe @ v.T) * np.asarray(t.scale(src), np.float64)[:, 0]
  x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  # expand() rounds x * coef to float32 (coef 3 for split trit weights): <= u |x_i| |z_i|.
  tol = 2 * _U32 * (np.abs(x32) @ np.abs(z).T)
  assert (np.abs(got - x32 @ z.T) <= tol).all()


@pytest.mark.parametrize("n", [2, 16, 256])
def test_constant_geometry_hadamard_is_sylvester(n):
  """Exact on small integers (sums < 2^24 in float32): equals scipy's Sylvester matrix."""
  x = np.random.default_rng(n).integers(-50, 50, (5, n)).astype(np.float32)
  got = np.asarray(kernel_codec.hadamard(jnp.asarray(x)))
  np.testing.assert_array_equal(got, x @ scipy.linalg.hadamard(n).T)


def test_unsupported_format_raises_not_implemented(monkeypatch):
  monkeypatch.setitem(registry._REGISTRY, "uniform3", dataclasses.replace(
      registry.get_format("uniform3"), kernel_codec=None))
  qt = itq3s_jax.quantize(_weights(4, 256), "uniform3")
  assert not act_rotate.supports(jax.ShapeDtypeStruct((1, 256), jnp.float32), qt)
  with pytest.raises(NotImplementedError, match="no kernel decoder"):
    weight_ifwht.weight_ifwht(np.ones((1, 256), np.float32), qt, interpret=True)


def test_supports_shapes_and_dtypes():
  qt = itq3s_jax.quantize(_weights(4, 288), "itq3_t")
  assert weight_ifwht.supports(jax.ShapeDtypeStruct((2, 5, 288), jnp.bfloat16), qt)
  assert not weight_ifwht.supports(jax.ShapeDtypeStruct((2, 256), jnp.float32), qt)
  assert not weight_ifwht.supports(jax.ShapeDtypeStruct((2, 288), jnp.int32), qt)
  small = itq3s_jax.quantize(_weights(4, 96), "itq3_t")  # no 256-block for the kernel
  assert not act_rotate.supports(jax.ShapeDtypeStruct((2, 96), jnp.float32), small)


@pytest.mark.parametrize("kw", [dict(block_m=8, block_n=32), dict(block_m=16, block_n=48),
                                dict(block_m=16, block_n=16, num_stages=0),
                                dict(block_m=16, block_n=16, split_k=0)])
def test_config_validation(kw):
  with pytest.raises(ValueError, match="Config"):
    _driver.Config(**kw)


def test_poison_buffer_shape_checked():
  qt = itq3s_jax.quantize(_weights(4, 256), "itq3_t")
  with pytest.raises(ValueError, match="out_init has shape"):
    act_rotate.act_rotate(np.ones((1, 256), np.float32), qt, interpret=True,
                          out_init=jnp.zeros((3, 3)))
