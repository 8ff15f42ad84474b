"""Gemma 3 in NNX: a tiny random model against an independent float64 numpy forward, the
GGUF renaming, and the SentencePiece tokenizer rebuilt from GGUF-style metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from itq3s_jax import flax as qflax
from itq3s_jax._src import gemma_names
from itq3s_jax.models import gemma
from tests import helpers

CFG = gemma.GemmaConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                        head_dim=32, ffn_dim=96, sliding_window=3, global_every=2,
                        query_pre_attn_scalar=24.0)


def _model() -> gemma.Gemma:
  model = gemma.Gemma(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # non-trivial norm gains
    if var.get_value().ndim == 1:
      var.set_value(rng.standard_normal(var.get_value().shape).astype(np.float32) * 0.3)
  return model


def _rms(x, w, eps=CFG.rms_eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _rope(x, base):
  t, half = x.shape[0], x.shape[-1] // 2
  ang = np.arange(t)[:, None] * base ** (-np.arange(half) / half)
  c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
  return np.concatenate([x[..., :half] * c - x[..., half:] * s,
                         x[..., half:] * c + x[..., :half] * s], -1)


def _reference(model: gemma.Gemma, tokens: np.ndarray) -> np.ndarray:
  """Gemma 3 written out in float64 numpy from the architecture description (one sequence)."""
  p = {".".join(map(str, k)): np.asarray(v.get_value(), np.float64)
       for k, v in nnx.to_flat_state(nnx.state(model))}
  emb = p["embed.embedding"]
  x = emb[tokens] * math.sqrt(CFG.d_model)
  t, hd = len(tokens), CFG.head_dim
  for i in range(CFG.n_layers):
    g = lambda n: p[f"layers.{i}.{n}"]  # noqa: E731
    glob = (i + 1) % CFG.global_every == 0
    h = _rms(x, g("input_norm.weight"))
    q = _rms((h @ g("attn.q_proj.kernel")).reshape(t, CFG.n_heads, hd), g("attn.q_norm.weight"))
    k = _rms((h @ g("attn.k_proj.kernel")).reshape(t, 1, hd), g("attn.k_norm.weight"))
    v = (h @ g("attn.v_proj.kernel")).reshape(t, 1, hd)
    base = CFG.rope_base if glob else CFG.rope_local_base
    q, k = _rope(q, base), _rope(k, base)
    s = np.einsum("qhd,khd->hqk", q, np.broadcast_to(k, q.shape)) / math.sqrt(24.0)
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (ki <= qi) & (glob | (qi - ki < CFG.sliding_window))
    s = np.where(ok, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", a, np.broadcast_to(v, q.shape)).reshape(t, -1)
    x = x + _rms(o @ g("attn.o_proj.kernel"), g("post_attn_norm.weight"))
    h = _rms(x, g("pre_mlp_norm.weight"))
    u = h @ g("mlp.gate_proj.kernel")
    gelu = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    x = x + _rms((gelu * (h @ g("mlp.up_proj.kernel"))) @ g("mlp.down_proj.kernel"),
                 g("post_mlp_norm.weight"))
  return _rms(x, p["norm.weight"]) @ emb.T


def test_forward_matches_a_float64_reference_with_sliding_windows():
  model = _model()
  tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
  out = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)
  for b in range(2):
    ref = _reference(model, tokens[b])
    # float32 forward through 2 blocks of <= 96-term dot products, norms and softmax:
    # ~1e3 u relative to the logits' scale is ample (errors are ~30 u when measured).
    np.testing.assert_allclose(out[b], ref, atol=1e3 * 2.0**-24 * np.abs(ref).max())
  # The window matters here: a global-only model gives other logits.
  wide = nnx.merge(*nnx.split(model))
  for blk in wide.layers:
    blk.attn.window = None
  assert not np.allclose(np.asarray(wide(tokens)), out, atol=1e-3)


def test_gguf_names_map_to_the_model_with_norms_shifted():
  tensors = {"token_embd.weight": np.ones((40, 64)), "output_norm.weight": np.full(64, 3.0),
             "blk.1.attn_q_norm.weight": np.full(32, 0.5),
             "blk.0.ffn_down.weight": np.arange(64 * 96.0).reshape(64, 96)}
  out = gemma.model_tensors(tensors)
  assert set(out) == {"embed.embedding", "norm.weight", "layers.1.attn.q_norm.weight",
                      "layers.0.mlp.down_proj.kernel"}
  np.testing.assert_array_equal(out["norm.weight"], np.full(64, 2.0))
  np.testing.assert_array_equal(out["layers.1.attn.q_norm.weight"], np.full(32, -0.5))
  np.testing.assert_array_equal(out["layers.0.mlp.down_proj.kernel"],
                                tensors["blk.0.ffn_down.weight"].T)
  with pytest.raises(ValueError, match="not a Gemma 3"):
    gemma.model_tensors({"blk.0.attn_qkv.weight": np.ones((2, 2))})
  md = {"general.architecture": "gemma3", "gemma3.embedding_length": 640,
        "gemma3.block_count": 18, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
        "gemma3.feed_forward_length": 2048, "tokenizer.ggml.tokens": ["a"] * 7}
  cfg = gemma.config_from_gguf_metadata(md)
  assert (cfg.vocab_size, cfg.head_dim, [cfg.is_global(i) for i in range(6)]) == (
      7, 256, [False] * 5 + [True])
  with pytest.raises(NotImplementedError, match="gemma3"):
    gemma.config_from_gguf_metadata({"general.architecture": "llama"})


def test_sentencepiece_tokenizer_merges_by_score_and_falls_back_to_bytes():
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + [
      "\u2581", "a", "b", "ab", "\u2581ab", "\u2581a", "<start_of_turn>"]
  n = len(tokens)
  types = [3, 3, 3, 2] + [6] * 256 + [1] * 6 + [3]
  md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 3}
  tok = gemma.spm_from_gguf_metadata(md)
  enc = tok.encode("ab ab<start_of_turn>é", add_special_tokens=False)
  # "▁ab" (score -5) wins over "▁a" (-6); é has no piece: its two UTF-8 bytes.
  assert enc.tokens == ["ab", "\u2581ab", "<start_of_turn>", "<0xC3>", "<0xA9>"]
  assert tok.decode(enc.ids, skip_special_tokens=False) == "ab ab<start_of_turn>é"
  assert n == tok.get_vocab_size()


def test_every_projection_is_calibrated_and_quantized():
  """The seven projections of every block are nnx.Linear: calibration taps all of them and
  surgery codes all of them (the embedding, shared with the head, stays float)."""
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  model = _model()
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
  stats = calibration.calibrate(model, tokens, window=8)
  assert len(stats) == 7 * CFG.n_layers and stats["layers.1.attn.q_proj"].shape == (64, 64)
  q, report = qflax.quantize_model(nnx.clone(model))
  assert len(report.quantized) == 7 * CFG.n_layers
  assert [s.path for s in report.skipped] == ["embed.embedding"]
  out = np.asarray(nnx.jit(lambda m, t: m(t))(q, tokens))
  assert out.shape == (2, 8, CFG.vocab_size) and np.all(np.isfinite(out))


def _spm_metadata() -> dict:
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + [
      "\u2581", "a", "b", "ab"]
  return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0],
          "tokenizer.ggml.token_type": [3, 3, 3, 2] + [6] * 256 + [1] * 4,
          "tokenizer.ggml.unknown_token_id": 3}


def _tiny_gguf(path) -> gemma.GemmaConfig:
  """A random tiny Gemma 3 written as llama.cpp lays it out (norms + 1, kernels (out, in))."""
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  md = _spm_metadata()
  cfg = gemma.GemmaConfig(vocab_size=len(md["tokenizer.ggml.tokens"]), d_model=64, n_layers=2,
                          n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=96, sliding_window=3)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in
          nnx.to_flat_state(nnx.state(gemma.Gemma(cfg, rngs=nnx.Rngs(0)), nnx.Param))}
  back = {v: k for k, v in gemma_names.BLOCK_NAMES.items()}
  tensors = {"token_embd.weight": flat["embed.embedding"],
             "output_norm.weight": flat["norm.weight"] + 1.0}
  for p, v in flat.items():
    if p.startswith("layers."):
      i, rest = p[len("layers."):].split(".", 1)
      module, attr = rest.rsplit(".", 1)
      tensors[f"blk.{i}.{back[module]}.weight"] = np.ascontiguousarray(
          v + 1.0 if attr == "weight" else v.T)
  gguf_io.write_gguf(str(path), tensors, {
      **md, "general.architecture": "gemma3", "gemma3.embedding_length": cfg.d_model,
      "gemma3.block_count": cfg.n_layers, "gemma3.attention.head_count": cfg.n_heads,
      "gemma3.attention.head_count_kv": cfg.n_kv_heads,
      "gemma3.attention.key_length": cfg.head_dim, "gemma3.feed_forward_length": cfg.ffn_dim,
      "gemma3.attention.sliding_window": cfg.sliding_window})
  return cfg


@pytest.mark.integration  # checkpoint and command-line chains (conftest.py)
def test_converted_gemma_gguf_loads_as_the_quantized_model(tmp_path):
  """A Gemma 3 GGUF loads through models.load as gemma.load_gguf reads it, and an ``itq3s
  convert`` checkpoint of it loads as a Gemma whose projections are QuantizedLinear, equal to
  quantizing the float model in memory (same codes, same logits)."""
  import itq3s_jax  # pylint: disable=g-import-not-at-top
  from itq3s_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / "g.gguf")
  cfg = _tiny_gguf(src)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 7)).astype(np.int32)
  fmodel, tok = models.load(src)
  direct = gemma.load_gguf(src)[0]
  assert isinstance(fmodel, gemma.Gemma) and tok.get_vocab_size() == cfg.vocab_size
  np.testing.assert_array_equal(np.asarray(fmodel(tokens)), np.asarray(direct(tokens)))
  ckpt = str(tmp_path / "q")
  checkpoint.convert(src, ckpt, rule=itq3s_jax.QuantRule(min_size=0))
  loaded, _ = models.load(ckpt)  # config and tokenizer from the recorded source GGUF
  in_memory, report = qflax.quantize_model(nnx.clone(fmodel))
  assert len(report.quantized) == 7 * cfg.n_layers
  for i in range(cfg.n_layers):
    a, b = loaded.layers[i].attn.q_proj, in_memory.layers[i].attn.q_proj
    assert isinstance(a, qflax.QuantizedLinear) and a.format == b.format == "itq3_t"
    np.testing.assert_array_equal(np.asarray(a.weight[...]), np.asarray(b.weight[...]))
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(in_memory(tokens)))


@pytest.mark.integration  # checkpoint and command-line chains (conftest.py)
def test_gemma_norms_tuned_by_calibrate_go_through_convert(tmp_path, capsys):
  """``itq3s calibrate`` tunes a Gemma's norm gains (q/k norms included) to its GPTQ codes;
  ``itq3s convert`` writes them back as llama.cpp stores them (1 + w) beside the stored codes,
  so the loaded checkpoint is the tuned in-memory model."""
  from itq3s_jax import QuantRule, calibration, cli, models  # pylint: disable=g-import-not-at-top
  src, stats, ckpt = str(tmp_path / "g.gguf"), str(tmp_path / "s.npz"), str(tmp_path / "q")
  cfg = _tiny_gguf(src)
  text = tmp_path / "t.txt"
  text.write_text(" ".join(np.random.default_rng(1).choice(["a", "b", "ab", "ba"], 300)))
  assert cli.main(["calibrate", src, stats, "--text", str(text), "--window", "16",
                   "--tune", "6", "--tune-lr", "1e-2", "--quiet"]) == 0
  tuned, tuned_for = calibration.load_tuned(stats)
  assert "layers.1.attn.q_norm.weight" in tuned and tuned_for["format"] == "itq3_t"
  assert len(tuned) == 6 * cfg.n_layers + 1  # four block norms, q/k norms, the final norm
  assert cli.main(["convert", src, ckpt, "--calibration", stats]) == 0
  # convert's default --min-size (calibrate codes as convert will): k/v (32 x 64) stay float
  assert "10 tensors written with the calibration file's GPTQ codes" in capsys.readouterr().out
  loaded, _ = models.load(ckpt)
  fmodel, _ = models.load(src)
  in_memory, report = qflax.quantize_model(nnx.clone(fmodel), QuantRule(min_size=4096),
                                           hessians=calibration.load(stats))
  assert len(report.quantized) == 10
  changed = 0
  for p, v in tuned.items():
    got = np.asarray(helpers.submodule(loaded, p)[...])
    # stored as float32(1 + v) and read back minus 1: two roundings, each <= 2^-24 (1 + |v|)
    assert np.all(np.abs(got - v) <= 2.0**-23 * (1 + np.abs(v))), p
    changed += not np.array_equal(v, np.asarray(helpers.submodule(fmodel, p)[...]))
    helpers.submodule(in_memory, p)[...] = got
  assert changed
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 7)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(in_memory(tokens)))
