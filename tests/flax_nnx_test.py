"""NNX QuantizedLinear, quantize_model surgery and the orbax round trip.

Every registered format runs through the same tiny models (FORMATS below is
the registry, so new formats join automatically). Outputs are checked against
a float64 NumPy product with the weights the core's ``dequantize`` returns:
the layer must compute exactly that product up to float32 accumulation.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import itq3s_jax
from itq3s_jax import flax as qflax

FORMATS = itq3s_jax.formats()
U = 2.0**-24  # float32 unit roundoff
D_IN, D_HID, D_OUT = 64, 96, 16  # K=96 exercises a tail block (64 + 32) in pow2 formats
# The core's quantize/dequantize, jitted: eager mode compiles every decode op
# separately, which costs minutes per format on a 2-core CPU. Eager and jitted
# core results are the core tests' business; one eager check stays below.
quantize = jax.jit(itq3s_jax.quantize, static_argnames=("format", "seed"))
dequantize = jax.jit(itq3s_jax.dequantize)


class MLP(nnx.Module):
  """Two layers in an nnx.List, plus a head that surgery must skip (K=16)."""

  def __init__(self, rngs: nnx.Rngs, use_bias: bool = True):
    self.layers = nnx.List([nnx.Linear(D_IN, D_HID, use_bias=use_bias, rngs=rngs),
                            nnx.Linear(D_HID, D_OUT, use_bias=use_bias, rngs=rngs)])
    self.head = nnx.Linear(D_OUT, 8, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.layers[0](x))
    return self.head(jax.nn.relu(self.layers[1](x)))


def _build(seed: int = 0) -> MLP:
  model = MLP(nnx.Rngs(seed))
  # Non-zero biases, so a dropped or misplaced bias shows.
  for lin in (*model.layers, model.head):
    lin.bias[...] = jax.random.normal(jax.random.key(seed + 7), lin.bias.shape)
  return model


@pytest.fixture(scope="module")
def quantized():
  """{format: (float model, quantized model, report)}, built once per module."""
  cache = {}

  def get(fmt):
    if fmt not in cache:
      ref = _build()
      model, report = qflax.quantize_model(_build(), itq3s_jax.QuantRule(fmt, seed=3))
      cache[fmt] = ref, model, report
    return cache[fmt]

  return get


def _x(m: int = 5, k: int = D_IN, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32)


def _check_dense(y: jax.Array, x: jax.Array, qt: itq3s_jax.QuantizedTensor, bias) -> None:
  """y must equal x @ dequantize(qt).T + bias computed in float64, up to float32 rounding.

  Error model: a float32 dot of length K errs by at most gamma_K sum_i |x_i w_i|
  (gamma_K ~ K u), the bias add and the output cast add one rounding each
  (u |y|); the tolerance doubles that sum for margin.
  """
  w = np.asarray(dequantize(qt), np.float64)
  x64 = np.asarray(x, np.float64)
  b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
  ref = x64 @ w.T + b
  k = w.shape[1]
  tol = 2 * ((k + 2) * U * (np.abs(x64) @ np.abs(w).T + np.abs(b)) + U * np.abs(ref))
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= tol), f"max excess {np.max(err - tol):.3g}"


# --------------------------------------------------------------------------- layer


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_eager_and_jit_equal_the_dequantized_product(fmt, quantized):
  ref_model, model, _ = quantized(fmt)
  x = _x()
  y = nnx.jit(lambda m, x: m(x))(model, x)
  # Layer by layer, eagerly, each against the float64 product of its weight.
  h = x
  for layer in model.layers:
    out = layer(h)
    assert out.dtype == jnp.float32 and out.shape == (5, layer.out_features)
    _check_dense(out, h, layer.qt, layer.bias[...])
    h = jax.nn.relu(out)
  eager = ref_model.head(h)  # the head stays the float nnx.Linear
  first = model.layers[0]
  _check_dense(nnx.jit(lambda m, x: m(x))(first, x), x, first.qt, first.bias[...])
  assert type(model.head) is nnx.Linear
  # The jitted model against the eager layers: each of the two quantized layers may
  # differ by its float32 accumulation bound (see _check_dense), propagated through
  # the float head; 4 (K1 + K2) u (|y| + 1) covers both with margin.
  tol = 4 * (D_IN + D_HID) * U * (np.abs(np.asarray(eager)) + 1)
  assert np.all(np.abs(np.asarray(y) - np.asarray(eager)) <= tol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_linear_stores_the_cores_codes(fmt, quantized):
  ref_model, model, report = quantized(fmt)
  for lin, q in zip(ref_model.layers, model.layers):
    assert isinstance(q, qflax.QuantizedLinear)
    want = quantize(lin.kernel[...].T, format=fmt, seed=3)
    assert q.qt.shape == (lin.out_features, lin.in_features)
    assert (q.format, q.seed) == (fmt, 3)
    assert q.weight[...].dtype == jnp.uint8
    np.testing.assert_array_equal(q.weight[...], want.data)
    np.testing.assert_array_equal(q.bias[...], lin.bias[...])
  assert report.nbytes == sum(q.weight[...].size for q in model.layers)


def test_jitted_model_compiles_once(quantized):
  model = nnx.clone(quantized("uniform3")[1])  # mutated below
  traces = []

  @nnx.jit
  def fwd(m, x):
    traces.append(1)
    return m(x)

  fwd(model, _x(seed=1))
  fwd(model, _x(seed=2))
  model.layers[0].bias[...] = model.layers[0].bias[...] + 1  # new values, same structure
  fwd(model, _x(seed=3))
  assert len(traces) == 1


def test_constructor_initialises_like_linear():
  layer = qflax.QuantizedLinear(D_IN, 24, format="uniform3", rngs=nnx.Rngs(0))
  lin = nnx.Linear(D_IN, 24, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.qt.data,
                                itq3s_jax.quantize(lin.kernel[...].T, "uniform3").data)
  np.testing.assert_array_equal(layer.bias[...], lin.bias[...])
  nobias = qflax.QuantizedLinear(D_IN, 24, format="uniform3", use_bias=False, rngs=nnx.Rngs(0))
  assert nobias.bias is None
  _check_dense(nobias(_x()), _x(), nobias.qt, None)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_casts_the_output(dtype, quantized):
  _, model, _ = quantized("uniform3")
  src = model.layers[0]
  layer = qflax.QuantizedLinear(D_IN, D_HID, format="uniform3", seed=3, dtype=dtype,
                                weight=src.qt, bias=src.bias[...])
  x = _x()
  y = layer(x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(y, src(x).astype(dtype))
  # dtype=None promotes the input with param_dtype, as nnx.Linear does.
  assert src(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_constructor_errors(quantized):
  _, model, _ = quantized("uniform3")
  qt = model.layers[0].qt
  with pytest.raises(TypeError, match="needs rngs"):
    qflax.QuantizedLinear(D_IN, D_HID)
  with pytest.raises(TypeError, match="must be a QuantizedTensor"):
    qflax.QuantizedLinear(D_IN, D_HID, weight=np.zeros((D_HID, D_IN)))
  with pytest.raises(ValueError, match="expected \\(out_features, in_features\\)"):
    qflax.QuantizedLinear(D_HID, D_IN, format="uniform3", seed=3, weight=qt)
  with pytest.raises(ValueError, match="pass format='uniform3', seed=3"):
    qflax.QuantizedLinear(D_IN, D_HID, format="itq3_t", seed=3, weight=qt)
  with pytest.raises(ValueError, match="multiple of 32"):
    qflax.QuantizedLinear(40, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected \\(96,\\)"):
    qflax.QuantizedLinear(D_IN, D_HID, format="uniform3", seed=3, weight=qt, bias=np.zeros(3))
  with pytest.raises(TypeError, match="needs an nnx.Linear"):
    qflax.QuantizedLinear.from_linear(model.layers[0])


def test_unrepresentable_weights_raise():
  lin = nnx.Linear(D_IN, 8, rngs=nnx.Rngs(0))
  lin.kernel[...] = lin.kernel[...].at[3, 2].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN/Inf"):
    qflax.QuantizedLinear.from_linear(lin, format="uniform3")
  big = itq3s_jax.get_format("uniform3").max_abs * 4
  lin.kernel[...] = jnp.full((D_IN, 8), big)
  with pytest.raises(ValueError, match="too large for uniform3"):
    qflax.QuantizedLinear.from_linear(lin, format="uniform3")


# --------------------------------------------------------------- params / optimizers


def test_param_filter_and_optimizer_skip_codes(quantized):
  _, model, _ = quantized("itq3_t")
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
  # Biases of the 3 layers + the float head's kernel: no codes.
  assert len(leaves) == 4
  codes = jax.tree.leaves(nnx.state(model, qflax.QuantizedWeight))
  assert [c.shape for c in codes] == [q.weight[...].shape for q in model.layers]
  assert all(c.dtype == jnp.uint8 for c in codes)

  model = nnx.clone(model)
  before = [np.asarray(q.weight[...]) for q in model.layers]
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x = _x()

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
    return loss

  loss0 = step(model, opt)
  loss1 = step(model, opt)
  assert float(loss1) < float(loss0)  # biases/head trained
  for b, q in zip(before, model.layers):
    np.testing.assert_array_equal(q.weight[...], b)  # codes untouched


# ------------------------------------------------------------------------- surgery


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(D_IN, D_HID, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(D_HID, D_IN, use_bias=False, rngs=rngs)


class Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, D_IN, rngs=rngs)
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.extra = nnx.Dict({"proj": nnx.Linear(D_IN, D_IN, rngs=rngs)})
    self.norm = nnx.RMSNorm(D_IN, rngs=rngs)
    self.lm_head = nnx.Linear(D_IN, 10, use_bias=False, rngs=rngs)
    self.odd = nnx.Linear(D_OUT, D_IN, rngs=rngs)


def _kinds(net: Net) -> dict[str, str]:
  return {".".join(map(str, p)): type(m).__name__ for p, m in nnx.iter_modules(net)
          if isinstance(m, (nnx.Linear, qflax.QuantizedLinear))}


def test_surgery_default_quantizes_every_eligible_linear():
  net, report = qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule("uniform3"))
  assert _kinds(net) == {
      "blocks.0.up": "QuantizedLinear", "blocks.0.down": "QuantizedLinear",
      "blocks.1.up": "QuantizedLinear", "blocks.1.down": "QuantizedLinear",
      "extra.proj": "QuantizedLinear", "lm_head": "Linear", "odd": "Linear"}
  assert [(s.path, s.reason) for s in report.skipped] == [
      ("lm_head", "kept: embedding/output head"),
      ("odd", "kept: K=16 is not a multiple of 32"),
      ("embed.embedding", "kept: embedding/output head")]  # every float matrix is listed
  assert type(net.embed) is nnx.Embed and type(net.norm) is nnx.RMSNorm
  assert report.num_weights == 2 * 2 * D_IN * D_HID + D_IN * D_IN
  assert "5 layers quantized to uniform3" in str(report)
  net, report = qflax.quantize_model(
      Net(nnx.Rngs(0)), itq3s_jax.QuantRule("uniform3", quantize_embeddings=True))
  assert _kinds(net)["lm_head"] == "QuantizedLinear" and len(report.quantized) == 6


def test_surgery_include_exclude_min_size():
  net, report = qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule(
      "uniform3", include=r"^blocks\.", exclude=r"\.1\.down$", min_size=D_IN * D_IN))
  kinds = _kinds(net)
  assert [k for k, v in kinds.items() if v == "QuantizedLinear"] == sorted(
      ["blocks.0.up", "blocks.0.down", "blocks.1.up"], key=list(kinds).index)
  reasons = {s.path: s.reason for s in report.skipped}
  assert reasons["blocks.1.down"] == "kept: matches exclude='\\\\.1\\\\.down$'"
  assert reasons["lm_head"] == "kept: does not match include='^blocks\\\\.'"
  _, report = qflax.quantize_model(Net(nnx.Rngs(0)),
                                   itq3s_jax.QuantRule("uniform3", min_size=D_IN * D_HID + 1))
  reasons = {s.path: s.reason for s in report.skipped}
  assert reasons["blocks.0.up"] == f"kept: fewer than min_size={D_IN * D_HID + 1} weights"
  assert [q.path for q in report.quantized] == []


def test_surgery_model_still_runs_under_jit():
  net, _ = qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule("uniform3"))

  def fwd(net, ids):
    h = net.embed(ids)
    for blk in net.blocks:
      h = h + blk.down(jax.nn.relu(blk.up(h)))
    return net.lm_head(net.norm(net.extra["proj"](h)))

  ids = jnp.arange(6).reshape(2, 3)
  np.testing.assert_allclose(nnx.jit(fwd)(net, ids), fwd(net, ids), rtol=1e-5, atol=1e-5)


def test_surgery_keeps_shared_layers_tied():

  class Tied(nnx.Module):

    def __init__(self, rngs):
      self.a = nnx.Linear(D_IN, D_IN, rngs=rngs)
      self.blocks = nnx.List([self.a, nnx.Linear(D_IN, D_IN, rngs=rngs)])

  net, report = qflax.quantize_model(Tied(nnx.Rngs(0)), itq3s_jax.QuantRule("uniform3"))
  assert isinstance(net.a, qflax.QuantizedLinear)
  assert net.blocks[0] is net.a and isinstance(net.blocks[1], qflax.QuantizedLinear)
  assert [q.path for q in report.quantized] == ["a", "blocks.1"]


def test_surgery_argument_errors():
  with pytest.raises(ValueError, match="unknown format"):
    qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule("q9"))
  with pytest.raises(ValueError, match="not a valid regex"):
    qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule(include="("))
  with pytest.raises(TypeError, match="include must be a regex string"):
    qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule(include=3))
  with pytest.raises(ValueError, match="min_size=-1"):
    qflax.quantize_model(Net(nnx.Rngs(0)), itq3s_jax.QuantRule(min_size=-1))
  with pytest.raises(TypeError, match="rule must be an itq3s_jax.QuantRule"):
    qflax.quantize_model(Net(nnx.Rngs(0)), "uniform3")
  with pytest.raises(TypeError, match="needs an nnx.Module"):
    qflax.quantize_model({"kernel": np.zeros((32, 4))})


# -------------------------------------------------------------------------- orbax


@pytest.mark.parametrize("fmt", FORMATS)
def test_orbax_round_trip(fmt, quantized, tmp_path):
  _, model, _ = quantized(fmt)
  path = os.fspath(tmp_path / "ckpt")
  qflax.save(path, model)
  # A different random init: only the checkpoint can make the outputs agree.
  x = _x()
  fwd = nnx.jit(lambda m, x: m(x))
  # The quantized architecture, or only the float one: restore rebuilds the layers.
  for abstract in (
      nnx.eval_shape(lambda: qflax.quantize_model(_build(seed=5),
                                                  itq3s_jax.QuantRule(fmt, seed=3))[0]),
      nnx.eval_shape(lambda: _build(seed=5))):
    restored = qflax.restore(path, abstract)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fwd(restored, x), fwd(model, x))


def test_restore_rejects_a_different_format(quantized, tmp_path):
  _, model, _ = quantized("uniform3")
  path = os.fspath(tmp_path / "ckpt")
  qflax.save(path, model)
  # uniform3_rot has the same byte size: only the metadata check catches it.
  abstract = nnx.eval_shape(
      lambda: qflax.quantize_model(_build(), itq3s_jax.QuantRule("uniform3_rot", seed=3))[0])
  with pytest.raises(ValueError, match="is 'uniform3' with seed 3; the model's layer is "
                     "'uniform3_rot' with seed 3"):
    qflax.restore(path, abstract)
