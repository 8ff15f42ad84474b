"""KV-cache generation (models/generate.py) on a tiny random LLaMA: equals the uncached model.

Tolerance: the cached forward computes the same float32 operations as
``Llama.__call__`` except that each softmax also sums the masked cache slots
(exact zeros) and XLA may order the reductions of a longer row differently;
each logit is a sum of d_model products of O(1) terms, so reordering moves it
by <= d_model u |logit|-scale terms: 64 * 2^-24 * (sum of |terms| <= 8 here)
< 1e-4, far below the random model's logit gaps (checked: greedy tokens equal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import itq3s_jax
from itq3s_jax import flax as qflax
from itq3s_jax._src import codec
from itq3s_jax._src.matmul import native
from itq3s_jax.models import generate
from itq3s_jax.models import llama

# Two projection shapes (64 x 64 and k/v 32 x 64): few compilations; grouped-query heads.
CFG = llama.LlamaConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=64)
PROMPT = [5, 7, 11, 13, 17]


def _model():
  return llama.Llama(CFG, rngs=nnx.Rngs(0))


def test_cached_logits_equal_the_uncached_forward():
  model = _model()
  toks = jnp.asarray([PROMPT + [3, 1, 4]], jnp.int32)
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, toks))
  forward = nnx.jit(generate.forward)
  cache = generate.KVCache.zeros(CFG, 1, 16)
  # Prefill 5 tokens, then one token at a time: every position's logits match.
  got, cache = forward(model, toks[:, :5], cache, jnp.int32(0))
  parts = [np.asarray(got)]
  for p in range(5, 8):
    got, cache = forward(model, toks[:, p:p + 1], cache, jnp.int32(p))
    parts.append(np.asarray(got))
  np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4, rtol=0)


def test_greedy_matches_llama_greedy_generate_float_and_quantized():
  model = _model()
  ref = llama.greedy_generate(model, PROMPT, 6)
  assert generate.Generator(model, 16).greedy(PROMPT, 6).tokens == ref
  qmodel, report = qflax.quantize_model(_model(), itq3s_jax.QuantRule(format="itq3_t"))
  assert len(report.quantized) == 7 * CFG.n_layers
  qref = llama.greedy_generate(qmodel, PROMPT, 6)
  out = generate.Generator(qmodel, 16).greedy(PROMPT, 6)
  assert out.tokens == qref
  assert out.prefill_s > 0 and out.decode_s > 0 and out.decode_tokens_per_s > 0


def test_decode_steps_read_codes_prepared_once(monkeypatch):
  """Where the one-row products run xla_act_rotate (here: the native CPU kernel switched
  off) the Generator rearranges the codes into decode tiles at construction; its one-row
  steps then never transpose codes (a prompt of one token makes every step one row), and
  the logits stay those of the model (the tokens above)."""
  monkeypatch.setattr(native, "available", lambda: False)
  qmodel, _ = qflax.quantize_model(_model(), itq3s_jax.QuantRule(format="itq3_t"))
  gen = generate.Generator(qmodel, 16)
  assert len(gen._tiles) == 7 * CFG.n_layers
  calls = []
  original = codec.column_tiles
  monkeypatch.setattr(codec, "column_tiles", lambda *a: calls.append(1) or original(*a))
  out = gen.greedy([5], 4)
  assert not calls
  assert out.tokens == llama.greedy_generate(qmodel, [5], 4)


def test_native_decode_steps_prepare_no_tiles(monkeypatch):
  """Where the native CPU kernel runs the one-row products (one device: conftest.py's 8
  virtual ones are hidden from the dispatch) it reads the codes as stored: the Generator
  prepares nothing, and gives the model's greedy tokens."""
  if not native.available():
    pytest.skip(f"native CPU kernel unavailable: {native.unavailable_reason()}")
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  qmodel, _ = qflax.quantize_model(_model(), itq3s_jax.QuantRule(format="itq3_t"))
  gen = generate.Generator(qmodel, 16)
  assert gen._tiles == []
  assert gen.greedy([5], 4).tokens == llama.greedy_generate(qmodel, [5], 4)


def test_greedy_stops_at_eos_and_checks_lengths():
  gen = generate.Generator(_model(), 12)
  first = gen.greedy(PROMPT, 4).tokens
  eos = first[-1]
  assert gen.greedy(PROMPT, 4, eos=eos).tokens == first[:first.index(eos) + 1]
  with pytest.raises(ValueError, match="exceeds max_len=12"):
    gen.greedy(PROMPT, 8)
  with pytest.raises(ValueError, match="non-empty prompt"):
    gen.greedy([], 2)
