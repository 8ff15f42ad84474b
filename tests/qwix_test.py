"""itq3s formats as qwix weight types (``itq3s_jax.qwix``), against the pinned qwix 0.1.8.

The provider must agree with the library's own layers bit for bit (one matmul
path), survive offline quantization, an orbax round trip and GPTQ through
qwix's calibration provider (keeping the rounding), and leave qwix's own
types alone. Its private qwix hooks are checked so a qwix release that moves
one fails here first.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

qwix = pytest.importorskip("qwix")
import orbax.checkpoint as ocp  # noqa: E402

import itq3s_jax  # noqa: E402
from itq3s_jax import flax as qflax  # noqa: E402
from itq3s_jax import qwix as iqwix  # noqa: E402
from itq3s_jax.qwix import _hooks  # noqa: E402
from qwix.contrib import gptq as qwix_gptq  # noqa: E402

# qwix 0.1.8 itself calls APIs flax 0.12 deprecates (Module.iter_modules(), Variable.value,
# VariableState), which pyproject's filterwarnings=error would turn into failures here.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:qwix\..*"),
    # its calibration sets Variable.value; flax reports that one from its own frame
    pytest.mark.filterwarnings(r"ignore:'\.value' setter is now deprecated:DeprecationWarning"),
]

D, F = 64, 96
X = jax.random.normal(jax.random.key(1), (2, 3, D))
RULES = [qwix.QuantizationRule(module_path=".*", weight_qtype="itq3_t")]
_fwd = nnx.jit(lambda m, x: m(x))


class Net(nnx.Module):
  """A Linear, an Einsum whose weight has two output axes, and optionally a raw einsum."""

  def __init__(self, rngs, raw: bool = False):
    self.lin = nnx.Linear(D, F, rngs=rngs)
    self.ein = nnx.Einsum("btd,dnh->btnh", (F, 2, 16), (2, 16), rngs=rngs)
    self.w_raw = nnx.Param(jax.random.normal(rngs.params(), (32, D)) / 8) if raw else None

  def __call__(self, x):
    h = self.ein(jax.nn.relu(self.lin(x)))
    if self.w_raw is None:
      return h
    return jnp.einsum("btk,km->btm", h.reshape(*h.shape[:2], 32), self.w_raw[...])


def _ptq(rules=RULES, seed=0, raw=False):
  return qwix.quantize_model(Net(nnx.Rngs(seed), raw), iqwix.PtqProvider(rules), X)


def _abstract(rules=RULES, raw=False):
  return nnx.eval_shape(lambda: _ptq(rules, seed=9, raw=raw))


@pytest.fixture(scope="module")
def ptq():
  return _ptq()


def test_ptq_equals_surgery_bit_for_bit(ptq):
  surgery, report = qflax.quantize_model(Net(nnx.Rngs(0)))
  assert len(report.quantized) == 2
  np.testing.assert_array_equal(_fwd(ptq, X), _fwd(surgery, X))
  arr = ptq.lin.kernel.array
  assert isinstance(arr, iqwix.ItqArray) and arr.rounding == "nearest"
  np.testing.assert_array_equal(arr.data[...], surgery.lin.weight[...])
  assert ptq.ein.kernel.array.shape == (F, 2, 16) and ptq.ein.kernel.array.k_axes == (0,)


def test_raw_einsum_on_a_param_is_quantized():
  """The weight surgery cannot reach (its report says so) is coded by the provider."""
  _, report = qflax.quantize_model(Net(nnx.Rngs(0), raw=True))
  assert [s.path for s in report.skipped] == ["w_raw"]
  q = _ptq(raw=True)
  w = q.w_raw.array
  assert isinstance(w, iqwix.ItqArray) and (w.shape, w.k_axes) == ((32, D), (0,))
  # The dense reference: the same einsum on the decoded weight (float32 sums of <= 96 terms).
  ref = Net(nnx.Rngs(0), raw=True)
  ref.lin.kernel[...] = q.lin.kernel.array.dequantize()
  ref.ein.kernel[...] = q.ein.kernel.array.dequantize()
  ref.w_raw[...] = w.dequantize()
  want = np.asarray(nnx.jit(lambda m, x: m(x))(ref, X), np.float64)
  np.testing.assert_allclose(_fwd(q, X), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_offline_quantize_params_and_orbax_round_trip(ptq, tmp_path):
  y = _fwd(ptq, X)
  abstract = _abstract()
  nnx.update(abstract, iqwix.quantize_params(nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)))),
                                             abstract))
  np.testing.assert_array_equal(_fwd(abstract, X), y)
  path = str(tmp_path / "ckpt")
  with ocp.StandardCheckpointer() as c:
    c.save(path, nnx.state(ptq))
    c.wait_until_finished()
  restored = _abstract()
  with ocp.StandardCheckpointer() as c:
    nnx.update(restored, c.restore(path, nnx.state(restored)))
  np.testing.assert_array_equal(_fwd(restored, X), y)


def test_gptq_through_qwix_calibration_keeps_the_rounding(tmp_path):
  cal = qwix.quantize_model(Net(nnx.Rngs(0)), qwix_gptq.GptqCalibrationProvider(
      [qwix_gptq.GptqRule(module_path=".*", weight_qtype="itq3_t")]), X)
  for i in range(2):
    cal(jax.random.normal(jax.random.key(10 + i), (2, 3, D)))
  stats = nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))
  float_model = Net(nnx.Rngs(0))
  abstract = _abstract()
  nnx.update(abstract, iqwix.gptq_quantize_params(
      nnx.to_pure_dict(nnx.state(float_model, nnx.Param)), abstract, stats))
  s = stats["lin"]["kernel_gptq"]
  want = itq3s_jax.quantize(float_model.lin.kernel[...].T, "itq3_t",
                            hessian=s["sum_of_hessian"] / s["count"])
  arr = abstract.lin.kernel.array
  assert arr.rounding == want.rounding == "two_neighbour"
  np.testing.assert_array_equal(arr.data[...], want.data)
  assert abstract.ein.kernel.array.rounding == "two_neighbour"
  # The rounding is a leaf: it survives a pure-dict round trip into a fresh abstract model.
  again = _abstract()
  nnx.update(again, nnx.to_pure_dict(nnx.state(abstract)))
  assert again.lin.kernel.array.rounding == "two_neighbour"


def test_other_qtypes_stay_qwix_and_seed_qtypes():
  rules = [qwix.QuantizationRule(module_path="ein", weight_qtype=jnp.int8),
           qwix.QuantizationRule(module_path="lin", weight_qtype=iqwix.qtype("uniform3", 7))]
  q = _ptq(rules)
  assert type(q.ein.kernel.array).__name__ == "QArray"
  assert (q.lin.kernel.array.format, q.lin.kernel.array.seed) == ("uniform3", 7)
  assert iqwix.parse_qtype("itq3_t@3") == ("itq3_t", 3) and iqwix.parse_qtype(jnp.int4) is None


@pytest.mark.parametrize("rule,match", [
    (dict(tile_size=128), "tile_size"),
    (dict(act_qtype=jnp.int8), "weight-only"),
])
def test_unsupported_options_raise(rule, match):
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="itq3_t", **rule)]
  with pytest.raises(ValueError, match=match):
    _ptq(rules)


def test_private_hooks_are_where_we_expect(monkeypatch):
  """Every private qwix name itq3s_jax.qwix uses exists in the installed qwix; a qwix that
  drops one is reported by name at import instead of failing inside a model."""
  _hooks.check()
  for k in _hooks.PROVIDER_KEYWORDS:
    assert k in inspect.signature(qwix.PtqProvider.__init__).parameters
  fake = lambda params, abstract, quant_stats=None: None  # noqa: E731
  monkeypatch.setattr(qwix, "quantize_params", fake)
  with pytest.raises(ImportError, match=r"quantize_params\(_qarray_module=\)"):
    _hooks.check()
