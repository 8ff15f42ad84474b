"""Every dense contraction a Flax model uses: NNX Linear/LinearGeneral/Einsum, linen
Dense/DenseGeneral/Einsum; what surgery cannot quantize is listed with its reason."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import itq3s_jax
from itq3s_jax import flax as qflax
from itq3s_jax.flax import contraction
from itq3s_jax.flax import linen_general

X = jax.random.normal(jax.random.key(1), (2, 3, 64))
U = 2.0**-24
# The quantized model and the float model on the decoded kernels compute the same products
# in another float32 order (matmul on the (N, K) view vs einsum/dot_general on the kernel).
# Each layer adds at most K u sum|x w| per output; with the chain below (sum of K = 416)
# and O(1) activations, 4 * 416 * u * max|y| bounds it with margin.
TOL = 4 * 416 * U


class Mixed(nnx.Module):
  """Linear, 2-D and 3-D LinearGeneral, Einsum, a raw einsum on a bare Param, an Embed."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(64, 96, rngs=rngs)
    self.lg2 = nnx.LinearGeneral(96, 64, rngs=rngs)
    self.ein = nnx.Einsum("btd,dnh->btnh", (64, 2, 16), (2, 16), rngs=rngs)
    self.lg3 = nnx.LinearGeneral((4, 16), (2, 32), axis=(-2, -1), rngs=rngs)
    self.w_raw = nnx.Param(jax.random.normal(rngs.params(), (32, 64)) / 8)
    self.embed = nnx.Embed(10, 64, rngs=rngs)

  def __call__(self, x):
    h = self.lg2(jax.nn.relu(self.lin(x)))
    h = self.ein(h).reshape(*x.shape[:2], 4, 8)
    h = self.lg3(jnp.concatenate([h, h], -1)).reshape(*x.shape[:2], 64)
    return jnp.einsum("btk,nk->btn", h, self.w_raw[...])


_fwd = nnx.jit(lambda m, x: m(x))


def test_nnx_model_of_every_dense_kind_quantizes_runs_and_reports(tmp_path):
  model = Mixed(nnx.Rngs(0))
  q, report = qflax.quantize_model(nnx.clone(model))
  assert {p.path: p.shape for p in report.quantized} == {
      "lin": (96, 64), "lg2": (64, 96), "ein": (32, 64), "lg3": (64, 64)}
  assert isinstance(q.lin, qflax.QuantizedLinear)
  assert all(isinstance(getattr(q, n), qflax.QuantizedEinsum) for n in ("lg2", "ein", "lg3"))
  skipped = {s.path: s.reason for s in report.skipped}
  assert skipped["embed.embedding"] == "kept: embedding/output head"
  assert skipped["w_raw"].startswith("not quantizable by surgery: a bare nnx.Param")
  assert "itq3s_jax.qwix" in skipped["w_raw"] and len(skipped) == 2
  y = _fwd(q, X)
  # Reference: the float model with every quantized kernel replaced by its decoded value.
  ref = nnx.clone(model)
  ref.lin.kernel[...] = itq3s_jax.dequantize(q.lin.qt).T
  for name in ("lg2", "ein", "lg3"):
    getattr(ref, name).kernel[...] = getattr(q, name).plan.from_nk(
        itq3s_jax.dequantize(getattr(q, name).qt))
  want = np.asarray(_fwd(ref, X))
  np.testing.assert_allclose(y, want, rtol=0, atol=TOL * np.abs(want).max())
  # The one checkpoint layout restores the general layers into the float architecture.
  qflax.save(tmp_path / "ckpt", q)
  back = qflax.restore(tmp_path / "ckpt", nnx.eval_shape(lambda: Mixed(nnx.Rngs(5))))
  assert isinstance(back.lg3, qflax.QuantizedEinsum)
  np.testing.assert_array_equal(_fwd(back, X), y)


def test_einsum_with_batch_weight_axes_is_listed_not_quantized():
  class PerHead(nnx.Module):
    def __init__(self, rngs):
      self.heads = nnx.Einsum("bnd,ndh->bnh", (4, 64, 32), rngs=rngs)

  _, report = qflax.quantize_model(PerHead(nnx.Rngs(0)))
  (s,) = report.skipped
  assert s.path == "heads" and "batch axes" in s.reason and not report.quantized
  _, excluded = qflax.quantize_model(PerHead(nnx.Rngs(0)), itq3s_jax.QuantRule(exclude="heads"))
  assert excluded.skipped[0].reason.startswith("kept: matches exclude")


@pytest.mark.parametrize("es,shape,k_axes,n_axes", [
    ("btd,dnh->btnh", (64, 2, 16), (0,), (1, 2)),
    ("btnh,nhd->btd", (2, 16, 64), (0, 1), (2,)),
    ("...k,nk->...n", (32, 64), (1,), (0,)),
])
def test_plan_of_einsums(es, shape, k_axes, n_axes):
  plan = contraction.plan_einsum(es, shape)
  assert (plan.k_axes, plan.n_axes) == (k_axes, n_axes)
  w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  np.testing.assert_array_equal(plan.from_nk(plan.to_nk(w)), w)
  assert plan.to_nk(w).shape == (plan.n, plan.k)


@pytest.mark.parametrize("es,match", [
    ("bd,dd->bd", "repeated weight letter"),
    ("bd,de->b", "summed alone"),
    ("bd,bd->b", "batch axes"),
    ("bd->b", "two operands"),
])
def test_plan_rejects_other_einsums(es, match):
  with pytest.raises(NotImplementedError, match=match):
    contraction.plan_einsum(es, (8, 8))


class LinenMixed(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(96)(x))
    h = nn.DenseGeneral((2, 32), axis=-1)(h)
    h = nn.DenseGeneral(64, axis=(-2, -1))(h)
    return nn.Einsum((64, 4, 16), "btd,dnh->btnh")(h)


def test_linen_dense_general_and_einsum():
  m = LinenMixed()
  params = m.init(jax.random.key(0), X)["params"]
  blind, report = qflax.quantize_params(params)
  assert [q.path for q in report.quantized] == ["Dense_0"]
  assert all("pass module= and args=" in s.reason for s in report.skipped)
  assert len(report.skipped) == 3
  q, report = qflax.quantize_params(params, module=m, args=(X,))
  assert {p.path: p.shape for p in report.quantized} == {
      "Dense_0": (96, 64), "DenseGeneral_0": (64, 96), "DenseGeneral_1": (64, 64),
      "Einsum_0": (64, 64)}
  np.testing.assert_array_equal(q["Dense_0"]["kernel"].data, blind["Dense_0"]["kernel"].data)
  y = jax.jit(lambda v, x: qflax.apply_quantized(m, v, x))({"params": q}, X)
  layers = linen_general.contractions(m, X)
  ref = dict(params)
  for name, layer in layers.items():
    ref[name] = {**params[name], "kernel": layer.plan.from_nk(
        itq3s_jax.dequantize(q[name]["kernel"]))}
  want = np.asarray(m.apply({"params": ref}, X))
  np.testing.assert_allclose(y, want, rtol=0, atol=TOL * np.abs(want).max())
  # A Dense through apply_quantized is the QuantizedDense op: bit for bit.
  dense = {"params": {"kernel": q["Dense_0"]["kernel"], "bias": q["Dense_0"]["bias"]}}
  np.testing.assert_array_equal(qflax.apply_quantized(nn.Dense(96), dense, X),
                                qflax.QuantizedDense(96).apply(dense, X))
