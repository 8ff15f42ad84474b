"""A quantized NNX model on an 8-device CPU mesh: weights sharded along outputs.

The 8 virtual CPU devices come from conftest.py (XLA_FLAGS set before jax loads).

Layout: mesh ("data", "model") = (2, 4). Each ``nnx.Linear`` kernel is
annotated (None, "model") and its bias ("model",); surgery turns that into
("model", None) on the coded rows (one row per output feature, so row shards
decode independently). Activations are sharded along "data". Outputs must
equal the single-device run up to float32 accumulation order.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import itq3s_jax
from itq3s_jax import flax as qflax

MESH = (2, 4)


# One case per format: each compiles its own sharded programs, and separate cases let
# pytest-xdist spread them over its workers instead of one worker running all six.
@pytest.mark.parametrize("fmt", itq3s_jax.formats())
def test_quantized_model_on_an_8_device_mesh(fmt, tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip(f"needs 8 devices (conftest.py sets them on CPU), got {len(jax.devices())}")
  mesh = jax.make_mesh(MESH, ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  d_in, d_hid, d_out = 64, 96, 32  # outputs divisible by the 4-way "model" axis

  class MLP(nnx.Module):

    def __init__(self, rngs):
      kw = dict(kernel_metadata={"out_sharding": (None, "model")},
                bias_metadata={"out_sharding": ("model",)}, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(d_in, d_hid, **kw), nnx.Linear(d_hid, d_out, **kw)])

    def __call__(self, x):
      return self.layers[1](jax.nn.relu(self.layers[0](x)))

  fwd = nnx.jit(lambda m, x: m(x))
  x = jax.random.normal(jax.random.key(1), (8, d_in), jnp.float32)
  u = 2.0**-24
  with jax.set_mesh(mesh):
    model, _ = qflax.quantize_model(MLP(nnx.Rngs(0)), itq3s_jax.QuantRule(fmt))
  for layer in model.layers:
    data = layer.weight[...]
    assert isinstance(layer, qflax.QuantizedLinear)
    assert data.sharding.spec == P("model", None), (fmt, data.sharding)
    rows = layer.out_features // MESH[1]
    assert {s.data.shape for s in data.addressable_shards} == {(rows, data.shape[1])}
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data", None)))
  with jax.set_mesh(mesh):
    y = fwd(model, xs)
  assert y.sharding.spec == P("data", "model"), (fmt, y.sharding)

  graphdef, state = nnx.split(model)
  single = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
  y1 = fwd(single, x)
  assert len(y1.devices()) == 1
  # Same products, possibly a different summation order per shard: each output
  # is a length-K float32 dot (|err| <= K u sum|x w|) feeding a second one;
  # bound both layers crudely by 4 (K1 + K2) u (|y| + 1).
  tol = 4 * (d_in + d_hid) * u * (np.abs(np.asarray(y1)) + 1)
  err = np.abs(np.asarray(y) - np.asarray(y1))
  assert np.all(err <= tol), (fmt, float(err.max()))

  # Sharded orbax restore: abstract leaves with concrete shardings restore sharded.
  path = os.path.join(tmp_path, f"ckpt_{fmt}")
  qflax.save(path, single)
  graphdef, abs_state = nnx.get_abstract_model(
      lambda: qflax.quantize_model(MLP(nnx.Rngs(5)), itq3s_jax.QuantRule(fmt))[0], mesh)
  restored = qflax.restore(path, nnx.merge(graphdef, abs_state))
  with jax.set_mesh(mesh):
    assert restored.layers[0].weight[...].sharding.spec == P("model", None)
    np.testing.assert_array_equal(fwd(restored, xs), y)


def test_row_parallel_kernel_stays_sharded_along_k():
  """A kernel sharded along K (o_proj/down_proj under tensor parallelism) keeps that sharding:
  each device holds whole 256-weight blocks of every row (a slice of the row's bytes)."""
  if len(jax.devices()) < 8:
    pytest.skip(f"needs 8 devices (conftest.py sets them on CPU), got {len(jax.devices())}")
  shards = 2  # the smallest K this allows is 2 x 256
  mesh = jax.make_mesh((8 // shards, shards), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  d_in, d_out = 256 * shards, 32

  def build(k=d_in):
    return nnx.Linear(k, d_out, kernel_metadata={"out_sharding": ("model", None)},
                      rngs=nnx.Rngs(0))

  fwd = nnx.jit(lambda m, x: m(x))
  x = jax.random.normal(jax.random.key(1), (8, d_in), jnp.float32)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data", "model")))
  with jax.set_mesh(mesh):
    layer = qflax.QuantizedLinear.from_linear(build())  # itq3_t; the byte slicing is generic
    y = fwd(layer, xs)
  data = layer.weight[...]
  assert data.sharding.spec == P(None, "model"), data.sharding
  assert {s.data.shape for s in data.addressable_shards} == {(d_out, data.shape[1] // shards)}
  graphdef, state = nnx.split(layer)
  y1 = fwd(nnx.merge(graphdef, jax.device_put(state, jax.devices()[0])), x)
  # The K-sum is split into partial sums added across devices: same products, another float32
  # order; |err| <= K u sum|x w| per output, bounded crudely by 4 K u (|y| + 1) as above.
  tol = 4 * d_in * 2.0**-24 * (np.abs(np.asarray(y1)) + 1)
  assert np.all(np.abs(np.asarray(y) - np.asarray(y1)) <= tol)
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="not a whole number of 256-weight blocks"):
      qflax.QuantizedLinear.from_linear(build(k=96 * shards))
