"""Tests of Hessian-aware (GPTQ) rounding: hooks, exact reductions, options, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import calibration
from itq3s_jax._src.core import registry

HOOKED = tuple(f for f in itq3s_jax.formats() if registry.get_format(f).levels is not None)
BOUNDED = tuple(f for f in HOOKED if itq3s_jax.has_bound(f))
K = 288  # 256 + a 32 tail block (pad256 formats: a zero-padded second block)


def _roundings(fmt: str) -> tuple[str, ...]:
  """The rounding modes a format accepts (codebook formats have no two-neighbour mode)."""
  return calibration.ROUNDINGS if registry.get_format(fmt).snap is None else ("unrestricted",)


def gq(w, fmt, h, *, seed=0, **options):
  """GPTQ through the public entry point, options as a GptqConfig."""
  return itq3s_jax.quantize(w, fmt, seed=seed, hessian=h, gptq=itq3s_jax.GptqConfig(**options))


ROUNDED = [(f, r) for f in HOOKED for r in _roundings(f)]


def _weights(rows: int = 6, k: int = K, seed: int = 0) -> np.ndarray:
  return (np.random.default_rng(seed).standard_normal((rows, k)) * 0.02).astype(np.float32)


def _hessian(k: int = K, seed: int = 1, outlier: float = 30.0) -> np.ndarray:
  """Correlated inputs with one large channel, like an LLM's (float64 X^T X / n)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4 * k, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
  x[:, 3] *= outlier
  return (x.T @ x / len(x)).astype(np.float32)


@pytest.mark.parametrize("fmt", HOOKED)
def test_levels_and_repack_reproduce_the_encoder(fmt):
  """decode == step * q exactly with lo <= q <= hi, and repack(b, q) == b byte for byte."""
  f = registry.get_format(fmt)
  z = jnp.asarray(_weights(4, 256) * 50)

  @jax.jit
  def hooks(z):  # one compiled program per block length instead of many eager ops
    n = z.shape[-1]
    b = f.encode(z, None)
    step, lo, hi = f.levels(b, n)
    zh = f.decode(b, n)
    q = jnp.round(zh / jnp.where(step == 0, 1, step)).astype(jnp.int32)
    return b, step, lo, hi, zh, q, f.repack(b, q, n)

  for n in (256, 32) if f.tail == "pow2" else (256,):
    b, step, lo, hi, zh, q, repacked = hooks(z[..., :n])
    np.testing.assert_array_equal(np.asarray(q * step), np.asarray(zh))
    assert bool(jnp.all((lo <= q) & (q <= hi)))
    np.testing.assert_array_equal(np.asarray(repacked), np.asarray(b))


@pytest.mark.parametrize("fmt,rounding", ROUNDED)
def test_identity_hessian_is_round_to_nearest(fmt, rounding):
  """With Sigma = I the inverse factor is diagonal, no error is fed forward, and GPTQ with
  the encoder's own scales must give the round-to-nearest bytes exactly. (K = 512: a
  zero-padded block would make the rotated Sigma non-diagonal for the Hadamard formats.)"""
  w = _weights(k=512)
  qt = gq(w, fmt, np.eye(512, dtype=np.float32), scales="rtn", rounding=rounding)
  np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(itq3s_jax.quantize(w, fmt).data))
  assert qt.rounding == rounding


@pytest.mark.parametrize("fmt,rounding", ROUNDED)
def test_gptq_lowers_the_output_error(fmt, rounding):
  """On correlated inputs GPTQ must beat round-to-nearest in tr(dW Sigma dW^T)."""
  w, h = _weights(), _hessian()
  rtn = float(calibration.output_error(w, itq3s_jax.quantize(w, fmt), h))
  ours = float(calibration.output_error(w, gq(w, fmt, h, rounding=rounding), h))
  assert ours < rtn, (ours, rtn)


@pytest.mark.parametrize("fmt,refit", [(f, 0) for f in BOUNDED] + [("itq3_t", 2)])
def test_two_neighbour_codes_and_bound(fmt, refit):
  """Every coefficient is floor or ceil of its own z / step: the T10 bound then holds. With
  refit the steps are re-chosen after rounding (smaller ones too, down to max|z| / 5), and the
  codes re-rounded: the same property must hold for the stored steps."""
  w, h = _weights(), _hessian()
  qt = gq(w, fmt, h, act_order=True, refit=refit)
  z = np.asarray(itq3s_jax.rotate_activations(w, fmt), np.float64)
  zh = np.asarray(itq3s_jax.decode_rotated(qt), np.float64)
  eps = np.asarray(itq3s_jax.two_neighbour_bound(qt, include_rounding=False), np.float64)
  # |z - z_hat| < step per coefficient; the block sum of step^2 is eps^2. float32 coefficients
  # and quotients add relative error ~10 u (proofs/README.md, T10), covered by the 1e-5 factor.
  col = 0
  for b, (lo, hi) in enumerate(itq3s_jax.block_columns(fmt, K)):
    n = hi - lo
    err = np.linalg.norm(z[:, col:col + n] - zh[:, col:col + n], axis=-1)
    assert np.all(err <= eps[:, b] * (1 + 1e-5)), (b, err, eps[:, b])
    col += n
  d = np.asarray(itq3s_jax.dequantize(qt), np.float64) - w
  cols = itq3s_jax.block_columns(fmt, K)
  err = np.stack([np.linalg.norm(d[:, a:c], axis=-1) for a, c in cols], -1)
  assert np.all(err <= np.asarray(itq3s_jax.two_neighbour_bound(qt)))
  # the tensor says how it was rounded, so the public error_bound certifies the same bound
  np.testing.assert_array_equal(np.asarray(itq3s_jax.error_bound(qt)),
                                np.asarray(itq3s_jax.two_neighbour_bound(qt)))


@pytest.mark.parametrize("fmt", BOUNDED)
def test_unrestricted_rounding_certifies_no_bound(fmt):
  qt = gq(_weights(), fmt, _hessian(), rounding="unrestricted")
  assert qt.rounding == "unrestricted"
  for bound in (itq3s_jax.error_bound, itq3s_jax.two_neighbour_bound):
    with pytest.raises(ValueError, match="unrestricted"):
      bound(qt)


def test_codebook_formats_refuse_two_neighbour_and_default_to_unrestricted():
  with pytest.raises(ValueError, match="rounding='unrestricted'"):
    gq(_weights(), "iq3_s", _hessian(), rounding="two_neighbour")
  assert gq(_weights(), "iq3_s", _hessian()).rounding == "unrestricted"
  assert gq(_weights(), "itq3_t", _hessian()).rounding == "two_neighbour"


@pytest.mark.parametrize("fmt", [f for f in HOOKED if registry.get_format(f).snap is not None])
def test_snapped_codes_lie_on_the_codebook(fmt):
  """Every decoded value of a GPTQ-coded codebook tensor is step * q with q from snap: the
  bytes hold the grid points the rounding chose (repack loses nothing)."""
  f = registry.get_format(fmt)
  w, h = _weights(k=512), _hessian(512)
  qt = gq(w, fmt, h, act_order=True)
  b = qt.data.reshape(-1, 2, f.block_nbytes(256))
  step, _, _ = f.levels(b, 256)
  zh = f.decode(b, 256)
  q = jnp.round(zh / step).astype(jnp.int32)
  np.testing.assert_array_equal(np.asarray(q * step), np.asarray(zh))
  resnapped = f.snap((q * step).reshape(-1, f.group), step.reshape(-1, f.group))
  np.testing.assert_array_equal(np.asarray(resnapped).reshape(q.shape), np.asarray(q))


def test_quantize_dispatch_and_options_agree():
  w, h = _weights(), _hessian()
  a = itq3s_jax.quantize(w, "itq3_t", hessian=h, seed=3)
  b = gq(w, "itq3_t", h, seed=3)
  np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
  assert (a.format, a.seed, a.shape) == ("itq3_t", 3, w.shape)


def test_leading_axes_are_rows_and_jit_matches_eager():
  w, h = _weights(6), _hessian()
  flat = gq(w, "itq3_t", h)
  nested = gq(w.reshape(2, 3, K), "itq3_t", h)
  np.testing.assert_array_equal(np.asarray(nested.data).reshape(6, -1), np.asarray(flat.data))
  jitted = jax.jit(lambda w, h: gq(w, "itq3_t", h).data)(w, h)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(flat.data))


def test_scaling_the_hessian_changes_nothing():
  """GPTQ depends on Sigma only up to a positive factor (damping is relative)."""
  w, h = _weights(), _hessian()
  a = gq(w, "itq3_t", h)
  b = gq(w, "itq3_t", h * 64.0)  # a power of two: exact in float32
  np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_rotate_hessian_matches_float64_reference():
  """R Sigma R^T against dense float64 rotations; float32 FWHT error ~ log2(n) u ||Sigma||."""
  h = _hessian().astype(np.float64)
  fmt = "itq3_t"
  r = np.zeros((K, K))
  for lo, hi in itq3s_jax.block_columns(fmt, K):
    r[lo:hi, lo:hi] = np.asarray(itq3s_jax.rotate_activations(np.eye(hi - lo, dtype=np.float32),
                                                              fmt)[:, :hi - lo]).T
  ref = r @ h @ r.T
  got = np.asarray(calibration.rotate_hessian(h, fmt), np.float64)
  assert np.max(np.abs(got - ref)) <= 2 * 2 * 8 * 2.0**-24 * np.max(np.abs(h)) * K


def test_zero_rows_and_dead_inputs():
  """All-zero weights code to zero; a never-active input column does not break the factorization."""
  h = _hessian()
  h[5, :] = 0
  h[:, 5] = 0
  w = np.zeros((6, K), np.float32)  # the shape of _weights(): shares its compilations
  for fmt in HOOKED:
    qt = gq(w, fmt, h)
    assert not np.any(np.asarray(itq3s_jax.dequantize(qt))), fmt
    qt = gq(_weights(), fmt, np.zeros((K, K), np.float32))
    assert np.all(np.isfinite(np.asarray(itq3s_jax.dequantize(qt)))), fmt


@pytest.mark.parametrize("kwargs,match", [
    (dict(hessian=np.eye(64, dtype=np.float32)), "hessian has shape"),
    (dict(rounding="stochastic"), "unknown rounding"),
    (dict(scales="joint"), "unknown scales"),
    (dict(damp=0.0), "damp=0.0 must be"),
    (dict(refit=-1), "refit=-1 must be"),
])
def test_bad_options_raise(kwargs, match):
  args = dict(hessian=np.eye(K, dtype=np.float32)) | kwargs
  h = args.pop("hessian")
  with pytest.raises(ValueError, match=match):
    gq(_weights(), "itq3_t", h, **args)


def test_nan_hessian_and_importance_conflict_raise():
  h = np.eye(K, dtype=np.float32)
  h[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN/Inf"):
    gq(_weights(), "itq3_t", h)
  with pytest.raises(ValueError, match="not both"):
    itq3s_jax.quantize(_weights(), "itq3_t", hessian=np.eye(K), importance=np.ones(K))


def test_format_without_hooks_is_not_implemented(monkeypatch):
  fmt = registry.Format(name="_nohooks", transform="none", tail="pow2",
                        block_nbytes=lambda n: n, encode=None, decode=None, bound=None,
                        max_abs=1.0)
  monkeypatch.setitem(registry._REGISTRY, fmt.name, fmt)
  with pytest.raises(NotImplementedError, match="no levels/repack hooks"):
    gq(_weights(), "_nohooks", np.eye(K, dtype=np.float32))


def test_huge_statistics_round_like_normal_ones_and_keep_the_certificate():
  """Statistics near float32 max used to overflow the rotation and break eps_2; a power-of-two
  multiple of Sigma must give the same codes (exact rescaling), and any huge Sigma a
  certificate that holds (measured in float64)."""
  w, h = _weights(), _hessian()  # max |h| ~ 1e3: 2^110 h stays below float32 max
  base = gq(w, "itq3_t", h)
  huge = gq(w, "itq3_t", h * np.float32(2.0**110))
  np.testing.assert_array_equal(np.asarray(huge.data), np.asarray(base.data))
  qt = gq(w, "itq3_t", (h / np.abs(h).max() * np.float32(3.0e38)).astype(np.float32))
  diff = w.astype(np.float64) - np.asarray(itq3s_jax.dequantize(qt), np.float64)
  err = np.stack([np.linalg.norm(diff[:, lo:hi], axis=-1)
                  for lo, hi in itq3s_jax.block_columns("itq3_t", K)], axis=-1)
  assert np.all(err <= np.asarray(itq3s_jax.error_bound(qt), np.float64))


def test_refit_lowers_the_output_error_and_needs_itq3_t():
  """Re-fitting the steps to the codes (coordinate descent, never increasing the loss for
  fixed codes) then re-rounding must not lose to plain GPTQ on correlated inputs; it only
  applies to itq3_t's step codes."""
  w, h = _weights(), _hessian()
  plain = calibration.output_error(w, gq(w, "itq3_t", h), h)
  refit = calibration.output_error(w, gq(w, "itq3_t", h, refit=2), h)
  assert float(refit) <= float(plain)
  with pytest.raises(NotImplementedError, match="refit"):
    gq(w, "uniform3_rot", h, refit=1)
