"""From the checkpoint a user has to a running quantized model: ``models.load`` end to end.

A tiny LLaMA is written as a Hugging Face directory (config.json, safetensors
with HF names, tokenizer.json) and as a llama GGUF (q/k rows permuted as
llama.cpp does), then goes ``itq3s calibrate`` -> ``itq3s convert
--calibration`` -> ``models.load`` -> ``jax.jit`` forward, and must equal
quantizing the float model in memory bit for bit (same statistics file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors import numpy as st_numpy
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

import itq3s_jax
from itq3s_jax import calibration
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax import flax as qflax
from itq3s_jax import models
from itq3s_jax._src import gguf_io
from itq3s_jax.models import llama
from itq3s_jax.models import loaders
from tests import helpers

# Every linear weight is 64 x 64 (one GPTQ compilation for the converter); grouped-query
# attention and other widths are covered by the float loads of test_hf_model_types_load_exactly.
CFG = llama.LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                        ffn_dim=64, head_dim=16, rope_base=1e4, rms_eps=1e-5,
                        tie_embeddings=False)
LINEARS = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
           "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
           "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
           "mlp.down_proj": "mlp.down_proj"}
WORDS = [f"w{i}" for i in range(1, CFG.vocab_size)]
_apply = nnx.jit(lambda m, t: m(t))


def _hf_tensors(model: llama.Llama) -> dict[str, np.ndarray]:
  """The model's weights under Hugging Face names (written out here, independently of the
  loader's table): linear weights (out, in), the head (vocab, d)."""
  a = lambda v: np.asarray(v[...])  # noqa: E731
  t = {"model.embed_tokens.weight": a(model.embed.embedding),
       "model.norm.weight": a(model.norm.weight)}
  if model.lm_head is not None:
    t["lm_head.weight"] = a(model.lm_head).T
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = a(layer.input_norm.weight)
    t[p + "post_attention_layernorm.weight"] = a(layer.post_attn_norm.weight)
    for hf, ours in LINEARS.items():
      lin = helpers.submodule(layer, ours)
      t[p + hf + ".weight"] = a(lin.kernel).T
      if lin.bias is not None:
        t[p + hf + ".bias"] = a(lin.bias)
  return {k: np.ascontiguousarray(v) for k, v in t.items()}


def _hf_config(cfg: llama.LlamaConfig, model_type: str = "llama") -> dict:
  return {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
          "head_dim": cfg.hd, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.rms_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu"}


def _tokenizer() -> tokenizers.Tokenizer:
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def write_hf(directory, model: llama.Llama, model_type: str = "llama", shards: int = 1) -> str:
  """A Hugging Face checkpoint directory of ``model`` (one file, or shards + index)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(_hf_config(model.config, model_type), f)
  _tokenizer().save(os.path.join(directory, "tokenizer.json"))
  tensors = _hf_tensors(model)
  if shards == 1:
    st_numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    st_numpy.save_file({n: tensors[n] for n in part}, os.path.join(directory, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(directory)


def _text(path, n_words: int = 160, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write(" ".join(rng.choice(WORDS, n_words)))
  return str(path)


def _tokens(shape=(2, 12), seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def _assert_same_quantized(loaded, in_memory):
  """Every linear of both models is a QuantizedLinear with the same bytes and rounding."""
  for i in range(CFG.n_layers):
    for ours in LINEARS.values():
      a, b = helpers.submodule(loaded.layers[i], ours), helpers.submodule(in_memory.layers[i], ours)
      assert isinstance(a, qflax.QuantizedLinear), (i, ours, type(a))
      assert (a.format, a.seed, a.rounding) == (b.format, b.seed, b.rounding), (i, ours)
      np.testing.assert_array_equal(np.asarray(a.weight[...]), np.asarray(b.weight[...]))


@pytest.fixture(scope="module")
def float_model():
  return llama.Llama(CFG, rngs=nnx.Rngs(0))


def test_hf_checkpoint_calibrate_convert_load_equals_in_memory(float_model, tmp_path, capsys):
  hf = write_hf(tmp_path / "hf", float_model)
  stats, ckpt = str(tmp_path / "stats.npz"), str(tmp_path / "q")
  assert cli.main(["calibrate", hf, stats, "--text", _text(tmp_path / "t.txt"),
                   "--window", "32", "--tune", "0", "--quiet"]) == 0
  assert "14 layers, 8 distinct inputs" in capsys.readouterr().out  # q/k/v and gate/up share
  assert cli.main(["convert", hf, ckpt, "--calibration", stats, "--min-size", "0",
                   "--quiet"]) == 0
  loaded, tok = models.load(ckpt)
  assert tok.encode("w1 w5").ids == [1, 5]

  fmodel, _ = models.load(hf)
  toks = _tokens()
  np.testing.assert_array_equal(_apply(fmodel, toks), _apply(float_model, toks))
  in_memory, report = qflax.quantize_model(fmodel, hessians=calibration.load(stats))
  assert len(report.quantized) == 14
  assert {s.path: s.reason for s in report.skipped} == {
      "embed.embedding": "kept: embedding/output head", "lm_head": "kept: embedding/output head"}
  _assert_same_quantized(loaded, in_memory)
  assert loaded.layers[0].attn.q_proj.rounding == "two_neighbour"
  y = jax.jit(lambda s, t: nnx.merge(nnx.graphdef(loaded), s)(t))(nnx.state(loaded), toks)
  np.testing.assert_array_equal(y, _apply(in_memory, toks))


def test_tuned_norms_go_from_calibrate_through_convert_into_the_model(float_model, tmp_path,
                                                                        capsys):
  """``itq3s calibrate`` (default --tune) fits the norm gains to the codes convert writes; the
  converted checkpoint holds those gains and those codes, so it is the tuned in-memory model;
  other codes than the tuned ones are refused."""
  hf = write_hf(tmp_path / "hf", float_model)
  stats, ckpt = str(tmp_path / "stats.npz"), str(tmp_path / "q")
  text = _text(tmp_path / "t.txt", n_words=400)
  assert cli.main(["calibrate", hf, stats, "--text", text, "--window", "32", "--tune", "12",
                   "--tune-lr", "1e-2", "--quiet"]) == 0
  out = capsys.readouterr().out
  kl = re.search(r"KL ([0-9.]+) -> ([0-9.]+)", out)
  assert kl and float(kl.group(2)) < float(kl.group(1)), out
  tuned, tuned_for = calibration.load_tuned(stats)
  norms = {f"layers.{i}.{n}.weight" for i in range(CFG.n_layers)
           for n in ("input_norm", "post_attn_norm")} | {"norm.weight"}
  assert set(tuned) == norms and (tuned_for["format"], tuned_for["seed"]) == ("itq3_t", 0)
  fmodel, _ = models.load(hf)
  assert any(not np.array_equal(tuned[p], np.asarray(helpers.submodule(fmodel, p)[...]))
             for p in norms)
  assert cli.main(["convert", hf, ckpt, "--calibration", stats]) == 0
  # calibrate's GPTQ codes are written, not computed again (and are the in-memory ones below)
  assert "14 tensors written with the calibration file's GPTQ codes" in capsys.readouterr().out
  loaded, _ = models.load(ckpt)
  for p in norms:
    np.testing.assert_array_equal(np.asarray(helpers.submodule(loaded, p)[...]), tuned[p])
  in_memory, _ = qflax.quantize_model(fmodel, hessians=calibration.load(stats))
  _assert_same_quantized(loaded, in_memory)
  for p in norms:  # the in-memory model with the tuned gains is the converted one
    helpers.submodule(in_memory, p)[...] = jnp.asarray(tuned[p])
  toks = _tokens()
  np.testing.assert_array_equal(_apply(loaded, toks), _apply(in_memory, toks))
  assert cli.main(["convert", hf, str(tmp_path / "q5"), "--calibration", stats, "--seed", "5",
                   "--quiet"]) == 2
  assert "tuned to itq3_t seed 0 codes" in capsys.readouterr().err


def test_norms_are_tuned_on_the_tune_tokens_range(float_model, tmp_path, capsys):
  """--tune-tokens picks the tuning text apart from the statistics' (--tokens); by default
  with --text both are the --tokens range; a range past the text is refused by name."""
  hf = write_hf(tmp_path / "hf", float_model)
  text, stats = _text(tmp_path / "t.txt", n_words=400), str(tmp_path / "s.npz")
  assert cli.main(["calibrate", hf, stats, "--text", text, "--window", "32", "--tune", "2",
                   "--tokens", "0:128", "--quiet"]) == 0
  assert "2 steps on 128 tokens" in capsys.readouterr().out
  assert cli.main(["calibrate", hf, stats, "--text", text, "--window", "32", "--tune", "2",
                   "--tokens", "0:128", "--tune-tokens", "64:320", "--quiet"]) == 0
  assert "2 steps on 256 tokens" in capsys.readouterr().out
  assert cli.main(["calibrate", hf, stats, "--text", text, "--window", "32", "--tune", "2",
                   "--tune-tokens", "0:100000", "--quiet"]) == 2
  assert "fewer than --tune-tokens STOP=100000" in capsys.readouterr().err


def test_stored_codes_are_written_only_for_the_rows_they_code(float_model, tmp_path):
  """convert writes a calibration file's codes as they are (a flipped byte shows up in the
  checkpoint) for the weights whose rows they code; a weight changed in one value, or codes of
  other GPTQ options, are coded again (equal to GPTQ without stored codes)."""
  hf = write_hf(tmp_path / "hf", float_model)
  stats_path = str(tmp_path / "stats.npz")
  assert cli.main(["calibrate", hf, stats_path, "--text", _text(tmp_path / "t.txt"),
                   "--window", "32", "--tune", "1", "--quiet"]) == 0
  stats, codes = calibration.load(stats_path), calibration.load_codes(stats_path)
  assert len(codes) == 14
  codes = dict(codes)
  flipped = codes["layers.1.mlp.up_proj"]
  data = flipped.data.copy()
  data[2, 5] ^= 1
  codes["layers.1.mlp.up_proj"] = dataclasses.replace(flipped, data=data)
  other = nnx.clone(float_model)
  w = other.layers[0].attn.k_proj.kernel
  w[...] = w[...].at[3, 1].add(1e-3)
  hf2 = write_hf(tmp_path / "hf2", other)
  plain = checkpoint.convert(hf2, str(tmp_path / "plain"), calibration=stats)
  summary = checkpoint.convert(hf2, str(tmp_path / "q"), calibration=stats, codes=codes)
  assert (plain.codes_reused, summary.codes_reused) == (0, 13)
  a, b = models.load(tmp_path / "q")[0], models.load(tmp_path / "plain")[0]
  np.testing.assert_array_equal(np.asarray(a.layers[1].mlp.up_proj.weight[...]), data)
  assert not np.array_equal(data, np.asarray(b.layers[1].mlp.up_proj.weight[...]))
  for ours in ("attn.k_proj", "attn.q_proj"):  # k_proj changed: coded here, like q_proj's codes
    np.testing.assert_array_equal(np.asarray(helpers.submodule(a.layers[0], ours).weight[...]),
                                  np.asarray(helpers.submodule(b.layers[0], ours).weight[...]))
  other_gptq = checkpoint.convert(hf, str(tmp_path / "r"), calibration=stats, codes=codes,
                                  gptq=itq3s_jax.GptqConfig(act_order=False))
  assert other_gptq.codes_reused == 0


def test_tuned_values_of_another_shape_are_refused_before_writing(float_model, tmp_path):
  hf = write_hf(tmp_path / "hf", float_model)
  fits = {"format": "itq3_t", "seed": 0,
          "gptq": itq3s_jax.GptqConfig().resolve("itq3_t").to_json()}
  with pytest.raises(checkpoint.CheckpointError, match="belong to another model"):
    checkpoint.convert(hf, str(tmp_path / "q"), tuned={"layers.0.input_norm.weight": np.ones(3)},
                       tuned_for=fits)
  assert not (tmp_path / "q").exists()


def test_gguf_destination_takes_norms_tuned_to_its_fallback_codes(float_model, tmp_path, capsys):
  """K = 64 rows become IQ4_NL in a GGUF (llama.cpp's fallback), not iq3_s: norms tuned to
  iq3_s codes are refused (before anything is written); ``--for-gguf`` tunes them to the
  fallback codes, which the written GGUF then holds with those norms, and which an orbax
  destination (no fallback) refuses."""
  src = str(tmp_path / "m.gguf")
  gguf_io.write_gguf(src, _gguf_tensors(float_model), _gguf_metadata(CFG))
  text = _text(tmp_path / "t.txt")
  plain, for_gguf, dst = str(tmp_path / "s.npz"), str(tmp_path / "g.npz"), tmp_path / "q.gguf"
  for stats, extra in ((plain, []), (for_gguf, ["--for-gguf"])):
    assert cli.main(["calibrate", src, stats, "--text", text, "--window", "32", "--format",
                     "iq3_s", "--tune", "4", "--tune-lr", "1e-2", "--quiet", *extra]) == 0
  assert cli.main(["convert", src, str(dst), "--format", "iq3_s", "--calibration", plain,
                   "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "becomes iq4_nl" in err and "calibrate with --for-gguf" in err and not dst.exists()
  assert cli.main(["convert", src, str(dst), "--format", "iq3_s", "--calibration", for_gguf]) == 0
  # calibrate's codes found by row digest: the GGUF's q/k rows are in llama.cpp's RoPE order
  assert "14 tensors written with the calibration file's GPTQ codes" in capsys.readouterr().out
  tuned, tuned_for = calibration.load_tuned(for_gguf)
  assert tuned_for["gguf"] is True and tuned
  loaded, _ = models.load(dst)
  for p, v in tuned.items():
    np.testing.assert_array_equal(np.asarray(helpers.submodule(loaded, p)[...]), v)
  in_memory, _ = qflax.quantize_model(models.load(src)[0], itq3s_jax.QuantRule("iq4_nl"),
                                      hessians=calibration.load(for_gguf))
  for i in range(CFG.n_layers):  # a GGUF keeps no rounding label: compare formats and bytes
    for ours in LINEARS.values():
      a, b = helpers.submodule(loaded.layers[i], ours), helpers.submodule(in_memory.layers[i], ours)
      assert a.format == b.format == "iq4_nl", (i, ours)
      np.testing.assert_array_equal(np.asarray(a.weight[...]), np.asarray(b.weight[...]))
  assert cli.main(["convert", src, str(tmp_path / "q"), "--format", "iq3_s", "--calibration",
                   for_gguf, "--quiet"]) == 2
  assert "convert to a .gguf" in capsys.readouterr().err


def test_calibration_that_matches_nothing_is_an_error_and_partial_is_listed(
    float_model, tmp_path, capsys):
  hf = write_hf(tmp_path / "hf", float_model)
  other = {"encoder.layer.0.dense": np.eye(64, dtype=np.float32)}
  calibration.save(tmp_path / "other.npz", other)
  assert cli.main(["convert", hf, str(tmp_path / "q"), "--calibration",
                   str(tmp_path / "other.npz"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "match none of the" in err and "encoder.layer.0.dense" in err
  assert not (tmp_path / "q").exists()
  sigma = np.eye(64, dtype=np.float32)
  partial = {"layers.0.attn.q_proj": sigma, "layers.0.attn.k_proj": sigma}
  summary = checkpoint.convert(hf, str(tmp_path / "p"), calibration=partial,
                               rule=itq3s_jax.QuantRule(min_size=0))
  rows = {e["name"]: e for e in summary.entries}
  q = rows["model.layers.0.self_attn.q_proj.weight"]
  assert q["rounding"] == "two_neighbour" and "no calibration" not in q["reason"]
  v = rows["model.layers.0.self_attn.v_proj.weight"]
  assert v["rounding"] == "nearest"
  assert v["reason"].endswith("no calibration statistics: nearest")


def _gguf_tensors(model: llama.Llama) -> dict[str, np.ndarray]:
  """llama.cpp's layout of the model: GGUF names, q/k rows permuted per head."""
  def permute(w, heads):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  out = {}
  for name, w in _hf_tensors(model).items():
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      part = rest.rsplit(".", 1)[0]
      g = names[part]
      if g in ("attn_q", "attn_k"):
        w = permute(w, CFG.n_heads if g == "attn_q" else CFG.n_kv_heads)
      out[f"blk.{i}.{g}.weight"] = np.ascontiguousarray(w)
    else:
      out[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}[name]] = w
  return out


def _gguf_metadata(cfg):
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = alphabet[:cfg.vocab_size - 1] + [alphabet[0] + alphabet[1]]
  return {"general.architecture": "llama", "llama.embedding_length": cfg.d_model,
          "llama.attention.head_count": cfg.n_heads, "llama.block_count": cfg.n_layers,
          "llama.attention.head_count_kv": cfg.n_kv_heads,
          "llama.feed_forward_length": cfg.ffn_dim, "llama.rope.dimension_count": cfg.hd,
          "llama.rope.freq_base": cfg.rope_base,
          "llama.attention.layer_norm_rms_epsilon": cfg.rms_eps,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": [f"{alphabet[0]} {alphabet[1]}"]}


def test_gguf_loads_float_and_converted_gguf_loads_quantized(float_model, tmp_path):
  src = str(tmp_path / "m.gguf")
  gguf_io.write_gguf(src, _gguf_tensors(float_model), _gguf_metadata(CFG))
  fmodel, tok = models.load(src)
  toks = _tokens()
  assert not fmodel.config.tie_embeddings and tok is not None
  # Same float32 weights in another layout: RoPE pairs un-permuted exactly.
  np.testing.assert_array_equal(_apply(fmodel, toks), _apply(float_model, toks))

  ckpt = str(tmp_path / "q")
  checkpoint.convert(src, ckpt, rule=itq3s_jax.QuantRule("itq3_s", min_size=0))
  loaded, _ = models.load(ckpt)  # config and tokenizer from the recorded source GGUF
  in_memory, _ = qflax.quantize_model(fmodel, itq3s_jax.QuantRule("itq3_s"))
  _assert_same_quantized(loaded, in_memory)
  np.testing.assert_array_equal(_apply(loaded, toks), _apply(in_memory, toks))
  # A GGUF destination loads quantized too. Every K here is 64, which no 256-block type
  # codes, so the writer falls back to IQ4_NL as llama-quantize does: the codes are those of
  # an in-memory iq4_nl model.
  checkpoint.convert(src, str(tmp_path / "q.gguf"), rule=itq3s_jax.QuantRule("iq3_s", min_size=0))
  as_iq4, _ = qflax.quantize_model(models.load(src)[0], itq3s_jax.QuantRule("iq4_nl"))
  _assert_same_quantized(models.load(tmp_path / "q.gguf")[0], as_iq4)


@pytest.mark.parametrize("model_type,tie,shards", [("qwen2", True, 2), ("mistral", False, 1)])
def test_hf_model_types_load_exactly(model_type, tie, shards, tmp_path):
  cfg = dataclasses.replace(CFG, n_layers=1, n_kv_heads=2, ffn_dim=96, tie_embeddings=tie,
                            qkv_bias=model_type == "qwen2")
  model = llama.Llama(cfg, rngs=nnx.Rngs(3))
  if cfg.qkv_bias:  # non-zero biases, so a bias dropped or misplaced changes the output
    model.layers[0].attn.k_proj.bias[...] = jnp.linspace(-1, 1, cfg.n_kv_heads * cfg.hd)
  loaded, _ = models.load(write_hf(tmp_path / "hf", model, model_type, shards))
  assert loaded.config == cfg
  toks = _tokens()
  np.testing.assert_array_equal(_apply(loaded, toks), _apply(model, toks))


@pytest.mark.parametrize("change,err,match", [
    ({"model_type": "gpt2"}, NotImplementedError, "model_type='gpt2'"),
    ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, NotImplementedError,
     "only plain RoPE"),
    ({"use_sliding_window": True}, NotImplementedError, "whole context"),
    ({"hidden_size": None}, ValueError, "no 'hidden_size'"),
])
def test_hf_config_errors(change, err, match):
  c = {**_hf_config(CFG), **change}
  c = {k: v for k, v in c.items() if v is not None}
  with pytest.raises(err, match=match):
    loaders.config_from_hf(c)


def test_hf_config_variants():
  base = _hf_config(CFG)
  assert loaders.config_from_hf({**base, "model_type": "qwen2"}).qkv_bias
  llama_bias = loaders.config_from_hf({**base, "attention_bias": True})
  assert llama_bias.qkv_bias and llama_bias.o_bias
  assert loaders.config_from_hf({**base, "model_type": "mistral", "sliding_window": 4096}) == CFG


def test_load_errors(tmp_path, float_model):
  with pytest.raises(checkpoint.CheckpointError, match="not a GGUF file, a Hugging Face"):
    models.load(tmp_path)
  hf = write_hf(tmp_path / "hf", float_model)
  ckpt = str(tmp_path / "q")
  checkpoint.convert(hf, ckpt, rule=itq3s_jax.QuantRule(min_size=0))
  os.rename(hf, tmp_path / "moved")  # the recorded source is gone
  with pytest.raises(checkpoint.CheckpointError, match="pass source="):
    models.load(ckpt)
  loaded, _ = models.load(ckpt, source=tmp_path / "moved")
  assert isinstance(loaded.layers[1].mlp.down_proj, qflax.QuantizedLinear)
  st_numpy.save_file({"model.layers.0.extra.weight": np.zeros((2, 2), np.float32)},
                     str(tmp_path / "moved" / "model.safetensors"))
  with pytest.raises(checkpoint.CheckpointError, match="'model.layers.0.extra.weight' is not"):
    models.load(tmp_path / "moved")


@pytest.mark.slow
def test_smollm2_gguf_calibrate_convert_load_equals_in_memory(tmp_path, capsys):
  """The same chain on SmolLM2-135M's GGUF (about 10 minutes on 2 CPU cores; -m slow)."""
  gguf = llama.smollm2_gguf_path()
  stats, ckpt = str(tmp_path / "s.npz"), str(tmp_path / "q")
  assert cli.main(["calibrate", gguf, stats, "--tokens", "16384:17408", "--tune", "0",
                   "--quiet"]) == 0
  assert "210 layers, 120 distinct inputs" in capsys.readouterr().out
  assert cli.main(["convert", gguf, ckpt, "--calibration", stats, "--quiet"]) == 0
  loaded, tok = models.load(ckpt)
  in_memory, report = qflax.quantize_model(models.load(gguf)[0],
                                           hessians=calibration.load(stats))
  assert len(report.quantized) == 210
  pairs = zip(nnx.iter_modules(loaded), nnx.iter_modules(in_memory))
  n = 0
  for (path, a), (_, b) in pairs:
    if isinstance(a, qflax.QuantizedLinear):
      assert a.rounding == b.rounding == "two_neighbour", path
      np.testing.assert_array_equal(np.asarray(a.weight[...]), np.asarray(b.weight[...]))
      n += 1
  assert n == 210
  ids = jnp.asarray([tok.encode("The capital of France is Paris.").ids], jnp.int32)
  np.testing.assert_array_equal(_apply(loaded, ids), _apply(in_memory, ids))
