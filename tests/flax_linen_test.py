"""Linen QuantizedDense / quantize_params, and bitwise agreement with NNX.

Both layer types call one functional op, so for the same weights their
outputs must be identical bit for bit (the flax NNX-vs-linen consistency
test pattern), for every registered format and several dtypes.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import itq3s_jax
from itq3s_jax import flax as qflax

FORMATS = itq3s_jax.formats()
D_IN, D_HID, D_OUT = 64, 96, 16
# Jitted core reference: eager decode compiles op by op (minutes on 2 cores).
quantize = jax.jit(itq3s_jax.quantize, static_argnames=("format", "seed"))
dequantize = jax.jit(itq3s_jax.dequantize)


class MLP(nn.Module):
  """Explicit layer names so float and quantized trees line up."""
  dense: type = nn.Dense
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(D_HID, dtype=self.dtype, name="fc1")(x))
    x = nn.relu(self.dense(D_OUT, dtype=self.dtype, name="fc2")(x))
    return nn.Dense(8, dtype=self.dtype, name="head")(x)  # K=16: stays float


@pytest.fixture(scope="module")
def trees():
  """{format: (float params, quantized params, report)}, computed once."""
  x = jnp.ones((1, D_IN))
  params = MLP().init(jax.random.key(0), x)["params"]
  # Non-zero biases so that a dropped bias shows.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if p[-1].key == "bias" else v, params)
  cache = {}

  def get(fmt):
    if fmt not in cache:
      cache[fmt] = (params, *qflax.quantize_params(params, itq3s_jax.QuantRule(fmt, seed=2)))
    return cache[fmt]

  return get


def _x(m=4, seed=1):
  return jax.random.normal(jax.random.key(seed), (m, D_IN), jnp.float32)


def _qmlp(dtype=None):
  return MLP(dense=functools.partial(qflax.QuantizedDense, format="itq3_t"), dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_params_replaces_dense_kernels(fmt, trees):
  params, qparams, report = trees(fmt)
  for name in ("fc1", "fc2"):
    qt = qparams[name]["kernel"]
    assert isinstance(qt, itq3s_jax.QuantizedTensor)
    assert (qt.format, qt.seed, qt.shape) == (fmt, 2, params[name]["kernel"].shape[::-1])
    want = quantize(params[name]["kernel"].T, format=fmt, seed=2)
    np.testing.assert_array_equal(qt.data, want.data)
    np.testing.assert_array_equal(qparams[name]["bias"], params[name]["bias"])
  assert not isinstance(qparams["head"]["kernel"], itq3s_jax.QuantizedTensor)
  assert [q.path for q in report.quantized] == ["fc1", "fc2"]
  assert [s.path for s in report.skipped] == ["head"]
  # The input tree is untouched.
  assert not isinstance(params["fc1"]["kernel"], itq3s_jax.QuantizedTensor)


# Every format with the default dtype; the dtypes (which do not interact with the
# format: the cast follows the float32 product) on one format.
@pytest.mark.parametrize("fmt,dtype", [(f, None) for f in FORMATS]
                         + [("itq3_t", jnp.float32), ("itq3_t", jnp.bfloat16)])
def test_linen_and_nnx_are_bit_identical(fmt, dtype, trees):
  params, qparams, _ = trees(fmt)
  x = _x()
  y_linen = jax.jit(_qmlp(dtype).apply)({"params": qparams}, x)

  # The same float weights in an NNX model, quantized by surgery.
  class NnxMLP(nnx.Module):

    def __init__(self):
      rngs = nnx.Rngs(0)
      self.fc1 = nnx.Linear(D_IN, D_HID, dtype=dtype, rngs=rngs)
      self.fc2 = nnx.Linear(D_HID, D_OUT, dtype=dtype, rngs=rngs)
      self.head = nnx.Linear(D_OUT, 8, dtype=dtype, rngs=rngs)

    def __call__(self, x):
      x = jax.nn.relu(self.fc1(x))
      return self.head(jax.nn.relu(self.fc2(x)))

  model = NnxMLP()
  for name in ("fc1", "fc2", "head"):
    getattr(model, name).kernel[...] = params[name]["kernel"]
    getattr(model, name).bias[...] = params[name]["bias"]
  model, _ = qflax.quantize_model(model, itq3s_jax.QuantRule(fmt, seed=2))
  y_nnx = nnx.jit(lambda m, x: m(x))(model, x)
  assert y_linen.dtype == y_nnx.dtype == (dtype or jnp.float32)
  np.testing.assert_array_equal(y_linen, y_nnx)


def test_quantized_dense_equals_dequantized_product(trees):
  _, qparams, _ = trees("itq3_t")
  layer = qflax.QuantizedDense(D_HID)
  x = _x()
  y = layer.apply({"params": qparams["fc1"]}, x)
  w = np.asarray(dequantize(qparams["fc1"]["kernel"]), np.float64)
  b = np.asarray(qparams["fc1"]["bias"], np.float64)
  ref = np.asarray(x, np.float64) @ w.T + b
  # float32 dot of length K: |err| <= gamma_K sum|x w| (+ one rounding for the bias);
  # doubled for margin.
  tol = 2 * (D_IN + 2) * 2.0**-24 * (np.abs(np.asarray(x, np.float64)) @ np.abs(w).T + np.abs(b))
  assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol)
  np.testing.assert_array_equal(jax.jit(layer.apply)({"params": qparams["fc1"]}, x), y)


def test_init_builds_quantized_params():
  variables = _qmlp().init(jax.random.key(0), _x())
  qt = variables["params"]["fc1"]["kernel"]
  assert isinstance(qt, itq3s_jax.QuantizedTensor)
  assert qt.shape == (D_HID, D_IN) and qt.format == "itq3_t"
  assert qt.data.dtype == jnp.uint8
  # init = quantize(the float Dense init): same keys, same kernel_init.
  float_vars = MLP().init(jax.random.key(0), _x())
  want = quantize(float_vars["params"]["fc1"]["kernel"].T, format="itq3_t")
  np.testing.assert_array_equal(qt.data, want.data)


def test_quantize_params_selection_and_errors(trees):
  params, _, _ = trees("uniform3")
  _, report = qflax.quantize_params({"params": params},
                                    itq3s_jax.QuantRule("uniform3", exclude=r"fc2"))
  assert [q.path for q in report.quantized] == ["params.fc1"]
  assert {s.path: s.reason for s in report.skipped}["params.fc2"] == (
      "kept: matches exclude='fc2'")
  _, report = qflax.quantize_params(params, itq3s_jax.QuantRule("uniform3", min_size=D_IN * D_HID))
  assert [q.path for q in report.quantized] == ["fc1"]  # fc2 has D_HID * D_OUT < D_IN * D_HID
  with pytest.raises(TypeError, match="needs a nested dict"):
    qflax.quantize_params([params])
  with pytest.raises(ValueError, match="unknown format"):
    qflax.quantize_params(params, itq3s_jax.QuantRule("nope"))
  with pytest.raises(TypeError, match="must be a QuantizedTensor"):
    qflax.QuantizedDense(D_HID).apply({"params": params["fc1"]}, _x())
  _, qparams, _ = trees("uniform3")
  with pytest.raises(ValueError, match="expected \\(features, in_features\\)"):
    qflax.QuantizedDense(D_OUT).apply({"params": qparams["fc1"]}, _x())


def test_orbax_round_trip_of_a_linen_tree(trees, tmp_path):
  _, qparams, _ = trees("itq3_t")
  path = os.fspath(tmp_path / "linen")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, qparams)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, qparams)
    ckptr.wait_until_finished()
    restored = ckptr.restore(path, abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(qparams)
  x = _x()
  apply = jax.jit(_qmlp().apply)
  np.testing.assert_array_equal(apply({"params": restored}, x), apply({"params": qparams}, x))
