"""Tests of calibration statistics on a tiny NNX model against float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import itq3s_jax
from itq3s_jax import calibration as calibrate
from itq3s_jax import flax as qflax
from itq3s_jax._src import stats as stats_lib
from itq3s_jax.flax import nnx as qnnx
from tests import helpers

D, F, V = 64, 96, 50  # model width, hidden width, vocabulary


class Tiny(nnx.Module):
  """Embedding -> (a, b) on the same input (like q/k/v) -> c on their product; a list too."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.a = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.b = nnx.Linear(D, F, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(F, D, rngs=rngs)])

  def __call__(self, tokens):
    x = self.embed(tokens)
    h = jax.nn.silu(self.a(x)) * self.b(x)
    return self.blocks[0](h)


def _inputs64(model: Tiny, tokens: np.ndarray) -> dict[str, np.ndarray]:
  """Each layer's input (n, K) in float64, recomputed with numpy."""
  x = np.asarray(model.embed.embedding[...], np.float64)[tokens].reshape(-1, D)
  a = x @ np.asarray(model.a.kernel[...], np.float64)
  b = x @ np.asarray(model.b.kernel[...], np.float64) + np.asarray(model.b.bias[...], np.float64)
  h = a / (1 + np.exp(-a)) * b
  return {"a": x, "b": x, "blocks.0": h}


def _tokens(n_windows: int = 5, t: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (n_windows, t)).astype(np.int32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_moments_match_float64_reference(dtype):
  model = Tiny(nnx.Rngs(0))
  toks = _tokens()
  stats = calibrate.calibrate(model, toks, batch_size=2, dtype=dtype)  # 2 + 2 + 1 windows
  assert set(stats) == {"a", "b", "blocks.0"}
  for name, x in _inputs64(model, toks).items():
    ref = x.T @ x / len(x)
    # Each batch sum is a float32 dot product of <= 2*16 terms (Higham gamma_32 |x|^T|x|), the
    # layer inputs themselves carry ~10 u relative error (silu, products), and a float32
    # accumulator adds one rounding per batch: 64 u |x|^T|x| / n covers all of it.
    tol = 64 * 2.0**-24 * (np.abs(x).T @ np.abs(x)) / len(x)
    assert stats[name].dtype == dtype
    assert np.all(np.abs(stats[name] - ref) <= tol), name


def test_shared_inputs_share_one_array_and_nbytes_counts_it_once():
  stats = calibrate.calibrate(Tiny(nnx.Rngs(0)), _tokens(2))
  assert stats["a"] is stats["b"]
  assert calibrate.nbytes(stats) == (D * D + F * F) * 8


def test_one_dimensional_tokens_are_cut_into_windows():
  model = Tiny(nnx.Rngs(0))
  toks = _tokens(3)
  flat = np.concatenate([toks.reshape(-1), [1, 2, 3]])  # a partial window, dropped
  a = calibrate.calibrate(model, flat, window=16)
  b = calibrate.calibrate(model, toks)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6)  # same windows, batches may differ


def test_model_is_not_modified_and_include_selects():
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2), include=lambda p: p.startswith("blocks"))
  assert set(stats) == {"blocks.0"}
  assert isinstance(model.a, nnx.Linear) and isinstance(model.blocks[0], nnx.Linear)


def test_save_load_round_trip(tmp_path):
  stats = calibrate.calibrate(Tiny(nnx.Rngs(0)), _tokens(2))
  path = tmp_path / "stats.npz"
  calibrate.save(path, stats)
  back = calibrate.load(path)
  assert set(back) == set(stats) and back["a"] is back["b"]
  for k in stats:
    np.testing.assert_array_equal(back[k], stats[k].astype(np.float32))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not an itq3s calibration file"):
    calibrate.load(tmp_path / "other.npz")


def test_tuned_parameters_round_trip_beside_the_statistics(tmp_path):
  """tuned_values names the 1-D float params (b's bias here); save/load_tuned keep them and
  the codes they fit; load() still returns the statistics alone; bad tuned input raises."""
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2))
  tuned = calibrate.tuned_values(model)
  assert set(tuned) == {"b.bias", "blocks.0.bias"} and tuned["b.bias"].dtype == np.float32
  path = tmp_path / "stats.npz"
  assert calibrate.load_tuned(_saved(path, stats)) == ({}, None)  # a file without tuning
  fits = {"format": "itq3_t", "seed": 3, "gptq": {"rounding": "two_neighbour"}}
  calibrate.save(path, stats, tuned=tuned, tuned_for=fits)
  back, back_for = calibrate.load_tuned(path)
  assert back_for == fits and set(back) == set(tuned)
  for k in tuned:
    np.testing.assert_array_equal(back[k], tuned[k])
  assert set(calibrate.load(path)) == set(stats)
  with pytest.raises(ValueError, match="tuned_for"):
    calibrate.save(path, stats, tuned=tuned)
  with pytest.raises(ValueError, match="only 1-D"):
    calibrate.save(path, stats, tuned={"x": np.zeros((2, 2))}, tuned_for=fits)
  with pytest.raises(ValueError, match="no such calibration file"):
    calibrate.load_tuned(tmp_path / "missing.npz")
  with np.load(path) as f:  # drop one tuned array the index names
    kept = {k: f[k] for k in f.files if k != "t0"}
  np.savez(tmp_path / "cut.npz", **kept)
  with pytest.raises(ValueError, match="cut.npz: corrupt tuned parameters"):
    calibrate.load_tuned(tmp_path / "cut.npz")


def test_codes_round_trip_beside_the_statistics_and_match_their_rows_only(tmp_path):
  """coded_weights keeps each GPTQ-coded layer's bytes with its float rows' digests; save/
  load_codes keep them; rows_for finds the codes of permuted rows, whatever dtype the rows are
  stored in, and nothing for a weight with one row changed; a damaged index raises."""
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2))
  gptq = itq3s_jax.GptqConfig()
  qmodel, _ = qflax.quantize_model(nnx.clone(model), hessians=stats, gptq=gptq)
  codes = calibrate.coded_weights(model, qmodel, gptq)
  assert set(codes) == {"a", "b", "blocks.0"}
  path = tmp_path / "stats.npz"
  assert calibrate.load_codes(_saved(path, stats)) == {}  # a file without codes
  calibrate.save(path, stats, codes=codes)
  back = calibrate.load_codes(path)
  assert set(back) == set(codes) and set(calibrate.load(path)) == set(stats)
  for k, c in codes.items():
    b = back[k]
    assert (b.format, b.seed, b.gptq) == (c.format, c.seed, gptq.resolve(c.format).to_json())
    np.testing.assert_array_equal(b.data, np.asarray(helpers.submodule(qmodel, k).weight[...]))
    np.testing.assert_array_equal(b.digests, c.digests)
  w = np.asarray(model.b.kernel[...], np.float32).T  # (F, D)
  perm = np.random.default_rng(0).permutation(F)
  np.testing.assert_array_equal(back["b"].rows_for(w[perm]), perm)
  wb = np.asarray(jnp.asarray(w, jnp.bfloat16))  # a bfloat16 checkpoint's rows
  np.testing.assert_array_equal(stats_lib.row_digests(wb),
                                stats_lib.row_digests(wb.astype(np.float32)))
  assert not np.array_equal(stats_lib.row_digests(wb), stats_lib.row_digests(w))
  changed = w.copy()
  changed[3, 0] = np.nextafter(changed[3, 0], np.float32(np.inf))
  assert back["b"].rows_for(changed) is None
  with np.load(path) as f:  # drop one code array the index names
    kept = {k: f[k] for k in f.files if k != "c0"}
  np.savez(tmp_path / "cut.npz", **kept)
  with pytest.raises(ValueError, match="cut.npz: corrupt coded weights"):
    calibrate.load_codes(tmp_path / "cut.npz")


def test_tuning_runs_on_weights_decoded_once_and_updates_the_quantized_model():
  """The tuning copy computes the quantized model's function (decoded weights, same biases at
  the same paths), and what it fits lands in the quantized model, codes untouched."""
  from itq3s_jax.flax import calibrate as flax_calibrate  # pylint: disable=g-import-not-at-top
  model = Tiny(nnx.Rngs(0))
  q, _ = qflax.quantize_model(nnx.clone(model))
  copy = flax_calibrate._decoded_copy(q)
  assert not any(isinstance(m, qnnx.QuantizedLinear) for _, m in nnx.iter_modules(copy))
  toks = jnp.asarray(_tokens(2))
  want, got = np.asarray(q(toks), np.float64), np.asarray(copy(toks), np.float64)
  # Two float32 products of K <= 96 terms in a row, each within ~ (K + 9) u |x||w| (T6):
  # 1e-4 of the output scale bounds both with margin.
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  codes = np.asarray(q.a.qt.data)
  bias = np.asarray(q.b.bias[...])
  history = calibrate.tune_unquantized(model, q, _tokens(4), steps=3, learning_rate=1e-2,
                                       window=16)
  assert len(history) == 3
  assert not np.array_equal(np.asarray(q.b.bias[...]), bias)
  np.testing.assert_array_equal(np.asarray(q.a.qt.data), codes)


def _saved(path, stats):
  calibrate.save(path, stats)
  return path


def test_bad_inputs_raise():
  model = Tiny(nnx.Rngs(0))
  with pytest.raises(ValueError, match="no complete window"):
    calibrate.calibrate(model, np.arange(5), window=16)
  with pytest.raises(ValueError, match="float32 or float64"):
    calibrate.calibrate(model, _tokens(1), dtype=np.int32)
  with pytest.raises(ValueError, match="no nnx.Linear"):
    calibrate.calibrate(model, _tokens(1), include=lambda p: False)


def test_quantize_model_uses_gptq_weights_and_runs_under_jit():
  model = Tiny(nnx.Rngs(0))
  toks = _tokens(4)
  stats = calibrate.calibrate(model, toks)
  weights = calibrate.quantize_weights(model, stats, format="itq3_t")
  q, _ = qflax.quantize_model(nnx.clone(model), hessians=stats)
  for name, layer in (("a", q.a), ("b", q.b), ("blocks.0", q.blocks[0])):
    assert isinstance(layer, qnnx.QuantizedLinear)
    np.testing.assert_array_equal(np.asarray(layer.qt.data), np.asarray(weights[name].data))
  # Rows stacked with a shared Sigma quantize as they would alone (rows are independent).
  alone = itq3s_jax.quantize(model.b.kernel[...].T, "itq3_t", hessian=stats["b"])
  np.testing.assert_array_equal(np.asarray(alone.data), np.asarray(weights["b"].data))
  out = nnx.jit(lambda m, t: m(t))(q, jnp.asarray(toks))
  assert out.shape == (*toks.shape, D) and bool(jnp.all(jnp.isfinite(out)))
  assert {layer.qt.rounding for layer in (q.a, q.b, q.blocks[0])} == {"two_neighbour"}


def test_gptq_model_checkpoint_keeps_its_rounding(tmp_path):
  """Restored into an abstract model built by round-to-nearest, a GPTQ-coded layer gets its
  rounding back, so error_bound certifies the two-neighbour bound, not eps_q."""
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2))
  q, _ = qflax.quantize_model(nnx.clone(model), hessians=stats)
  qflax.save(tmp_path / "ckpt", q)
  abstract = nnx.eval_shape(lambda: qflax.quantize_model(Tiny(nnx.Rngs(0)))[0])
  back = qflax.restore(tmp_path / "ckpt", abstract)
  assert back.a.rounding == "two_neighbour"
  np.testing.assert_array_equal(np.asarray(itq3s_jax.error_bound(back.a.qt)),
                                np.asarray(itq3s_jax.two_neighbour_bound(q.a.qt)))


def test_surgery_with_hessians_mixes_gptq_and_nearest_and_reports_all():
  """quantize_model(hessians=...) GPTQ-codes the layers with statistics and rounds the rest
  to nearest; the report lists every quantized layer either way."""
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2))
  partial = {k: v for k, v in stats.items() if k != "blocks.0"}
  gptq = itq3s_jax.GptqConfig(act_order=True)
  q, report = qflax.quantize_model(nnx.clone(model), itq3s_jax.QuantRule("uniform3_rot"),
                                   hessians=partial, gptq=gptq)
  assert [x.path for x in report.quantized] == ["a", "b", "blocks.0"]
  assert (q.a.rounding, q.b.rounding, q.blocks[0].rounding) == (
      "two_neighbour", "two_neighbour", "nearest")
  alone = itq3s_jax.quantize(model.a.kernel[...].T, "uniform3_rot", hessian=stats["a"],
                             gptq=gptq)
  np.testing.assert_array_equal(np.asarray(q.a.qt.data), np.asarray(alone.data))
  with pytest.raises(TypeError, match="need hessians"):
    qflax.quantize_model(nnx.clone(model), gptq=gptq)


def test_eval_calibrated_rows_use_the_statistics():
  """``itq3s eval --calibrated`` labels FORMAT+gptq rows and quantizes them with hessians."""
  from itq3s_jax._src.commands import eval as eval_cmd  # pylint: disable=g-import-not-at-top
  model = Tiny(nnx.Rngs(0))
  stats = calibrate.calibrate(model, _tokens(2))
  assert eval_cmd._with_calibrated(["ref", "iq3_s"], True) == ["ref", "iq3_s", "iq3_s+gptq"]
  seen = {}
  for fmt in ("iq3_s", "iq3_s+gptq"):
    row = eval_cmd._row(fmt, model, eval_cmd._rules_for(fmt, {}, stats, None),
                        lambda m, f=fmt: seen.setdefault(f, m.a.qt) and {})
    assert row["status"] == "ok", row
  assert seen["iq3_s"].rounding == "nearest" and seen["iq3_s+gptq"].rounding == "unrestricted"
  # With tuning (as itq3s calibrate's default) the codes are the same and the biases move.
  tuned = {}
  row = eval_cmd._row("iq3_s+gptq", model,
                      eval_cmd._rules_for("iq3_s+gptq", {}, stats, None, (_tokens(2), 4)),
                      lambda m: tuned.setdefault("m", m) and {})
  assert row["status"] == "ok", row
  np.testing.assert_array_equal(np.asarray(tuned["m"].a.qt.data),
                                np.asarray(seen["iq3_s+gptq"].data))
  assert not np.array_equal(np.asarray(tuned["m"].b.bias[...]), np.asarray(model.b.bias[...]))


def test_load_names_the_file_for_broken_or_incomplete_statistics(tmp_path):
  good = tmp_path / "s.npz"
  calibrate.save(good, {"a": np.eye(4), "b": np.eye(8)})
  blob = good.read_bytes()
  (tmp_path / "cut.npz").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(ValueError, match=r"cut\.npz: not a readable calibration \.npz"):
    calibrate.load(tmp_path / "cut.npz")
  with pytest.raises(ValueError, match=r"nope\.npz: no such calibration file"):
    calibrate.load(tmp_path / "nope.npz")
  with np.load(good) as f:  # the index still names s1, the array is gone
    kept = {k: f[k] for k in f.files if k != "s1"}
  np.savez(tmp_path / "lacks.npz", **kept)
  with pytest.raises(ValueError, match=r"lacks\.npz: the index names arrays the file lacks"):
    calibrate.load(tmp_path / "lacks.npz")
  with np.load(good) as f:
    kept = {k: f[k] for k in f.files}
  kept["s0"] = np.zeros((4, 3), np.float32)
  np.savez(tmp_path / "bad.npz", **kept)
  with pytest.raises(ValueError, match=r"bad\.npz: statistics \['s0'\] are not square"):
    calibrate.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("name,key", [
    ("model.layers.1.self_attn.q_proj.weight", "layers.1.attn.q_proj"),  # Hugging Face
    ("blk.1.attn_q.weight", "layers.1.attn.q_proj"),  # GGUF
    ("params/layers/0/mlp/up/kernel", "layers.0.mlp.up"),  # orbax Flax params
    ("fc.weight", "fc"),
    ("model.layers.1.self_attn.q_proj.bias", None),
    ("other.weight", None),
])
def test_converter_finds_statistics_under_every_naming(name, key):
  from itq3s_jax.checkpoint import converter  # pylint: disable=g-import-not-at-top
  stats = {"layers.0.mlp.up": 0, "layers.1.attn.q_proj": 1, "fc": 2}
  assert converter.hessian_key(name, stats) == key


class _SeqBlock(nnx.Module):
  """x + c(silu(a(x)) * b(x)): a and b share an input, c reads their product."""

  def __init__(self, rngs: nnx.Rngs):
    self.a = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.b = nnx.Linear(D, F, rngs=rngs)
    self.c = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.c(jax.nn.silu(self.a(x)) * self.b(x))


class _Seq(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([_SeqBlock(rngs), _SeqBlock(rngs)])

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return x


def test_sequential_statistics_see_the_quantized_prefix():
  """Every moment is X^T X / n of the layer's input recomputed in float64 with numpy on the
  model whose earlier layers hold the returned codes (dequantized), and the codes are what
  quantize_weights makes from those statistics (so convert --calibration reproduces them)."""
  model = _Seq(nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model))
  toks = _tokens(4)
  stats, codes = calibrate.calibrate_sequential(model, toks, batch_size=2)
  names = [f"layers.{i}.{n}" for i in range(2) for n in "abc"]
  assert sorted(stats) == sorted(codes) == names
  assert stats["layers.0.a"] is stats["layers.0.b"] and stats["layers.1.a"] is stats["layers.1.b"]
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  deq = {n: f64(itq3s_jax.dequantize(qt)).T for n, qt in codes.items()}
  x = f64(model.embed.embedding[...])[toks].reshape(-1, D)
  for i, blk in enumerate(model.layers):
    p = f"layers.{i}."
    a, b = x @ deq[p + "a"], x @ deq[p + "b"] + f64(blk.b.bias[...])
    h = a / (1 + np.exp(-a)) * b
    for name, inp in (("a", x), ("c", h)):
      ref = inp.T @ inp / len(inp)
      # float32 forward of <= 2 blocks (~ 64 u relative per entry of the inputs, K <= 96
      # terms per dot product) and float32 X^T X sums: 1e-4 |x|^T|x| / n bounds both.
      tol = 1e-4 * (np.abs(inp).T @ np.abs(inp)) / len(inp)
      assert np.all(np.abs(stats[p + name] - ref) <= tol), p + name
    x = x + h @ deq[p + "c"]
  again = calibrate.quantize_weights(model, stats)
  for n in names:
    np.testing.assert_array_equal(np.asarray(again[n].data), np.asarray(codes[n].data))
    assert codes[n].rounding == "two_neighbour"
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))
  with pytest.raises(ValueError, match="outside model.blocks"):
    calibrate.calibrate_sequential(Tiny(nnx.Rngs(0)), toks, blocks="blocks")


def test_framed_windows_wrap_text_ids_as_the_encoder_sees_a_sentence():
  from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top

  class Tok:
    def token_to_id(self, t):
      return {"[CLS]": 101, "[SEP]": 102}.get(t)

  w = bert.framed_windows(Tok(), np.arange(11), 5)  # 3 text ids a row; 2 left over
  np.testing.assert_array_equal(w, [[101, 0, 1, 2, 102], [101, 3, 4, 5, 102],
                                    [101, 6, 7, 8, 102]])
  assert w.dtype == np.int32
  with pytest.raises(ValueError, match="window >= 3"):
    bert.framed_windows(Tok(), np.arange(11), 2)
  Tok.token_to_id = lambda self, t: None  # no special tokens (not a BERT vocabulary)
  with pytest.raises(ValueError, match=r"\[CLS\]/\[SEP\]"):
    bert.framed_windows(Tok(), np.arange(11), 5)
