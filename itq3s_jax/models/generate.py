"""Greedy generation with a KV cache for the LLaMA decoder (``models.llama.Llama``).

``Llama.__call__`` re-runs the whole sequence per token (no cache). This module
drives the same pieces — ``embed``, each layer's ``input_norm``, ``attn.qkv``,
``attn.out``, ``feed_forward``, then ``Llama.logits`` — one new token at a time
against a cache of the keys and values already computed, under ``jax.jit``: a
prefill program for the prompt and one decode program for every following
token. The projections may be ``nnx.Linear`` or ``itq3s_jax.flax.QuantizedLinear``
(after ``quantize_model``); either way every matmul of a decode step has one
activation row (M = 1). On a CPU those run the native kernel
(``matmul(..., method="cpu_native")``: itq3_t, itq3_s, iq3_s) where it could be built, which
reads the codes as stored; where such a product runs ``"xla_act_rotate"``
instead, :class:`Generator` rearranges each quantized weight's codes into the
decode tiles once (``matmul.xla.decode_tiles``) instead of in every step.

The cache holds ``max_len`` positions; the queries of a call at positions
start .. start + T - 1 attend to cached positions p <= their own (the causal
mask of ``Llama``), so the logits equal the uncached forward's up to float
summation order (tests/generate_test.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from itq3s_jax._src.matmul import xla
from itq3s_jax.flax import _core
from itq3s_jax.flax import nnx as qnnx
from itq3s_jax.flax import state as state_lib
from itq3s_jax.models import llama


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer: float32 (layers, B, max_len, n_kv_heads, head_dim) each."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: llama.LlamaConfig, batch: int, max_len: int) -> "KVCache":
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.hd)
    return cls(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def forward(model: llama.Llama, tokens: jax.Array, cache: KVCache,
            start: jax.Array) -> tuple[jax.Array, KVCache]:
  """Logits of ``tokens`` at positions start.. given the cache, and the updated cache.

  Args:
    model: a :class:`llama.Llama` (float or quantized projections).
    tokens: int (B, T) token ids at positions start .. start + T - 1.
    cache: the keys and values of positions < start (later slots are ignored).
    start: int32 scalar, the position of ``tokens[:, 0]`` (traced: one program
      serves every step).

  Returns:
    (float32 logits (B, T, vocab), the cache with positions start.. written).
  """
  t = tokens.shape[1]
  pos = start + jnp.arange(t, dtype=jnp.int32)
  visible = jnp.arange(cache.k.shape[2])[None, :] <= pos[:, None]  # (T, max_len)
  x = model.embed(tokens).astype(jnp.float32)
  ks, vs = [], []
  for i, layer in enumerate(model.layers):
    q, k, v = layer.attn.qkv(layer.input_norm(x), pos)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k[i], k.astype(jnp.float32), start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v[i], v.astype(jnp.float32), start, axis=1)
    ks.append(k_all)
    vs.append(v_all)
    o = jax.nn.dot_product_attention(q, k_all, v_all, mask=visible[None, None],
                                     implementation="xla")
    x = layer.feed_forward(x + layer.attn.out(o))
  return model.logits(x).astype(jnp.float32), KVCache(jnp.stack(ks), jnp.stack(vs))


@dataclasses.dataclass(frozen=True)
class Generation:
  """Result of :func:`greedy`: new token ids and the wall time of each phase.

  ``prefill_s`` covers the prompt and the first new token; ``decode_s`` the
  other ``len(tokens) - 1`` tokens (each one decode step). Both include
  compilation on the first call of a shape.
  """
  tokens: list[int]
  prefill_s: float
  decode_s: float

  @property
  def decode_tokens_per_s(self) -> float:
    n = len(self.tokens) - 1
    return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


class _Prepared(nnx.Module):
  """A QuantizedLinear whose one-row products read its codes already in decode tiles."""

  def __init__(self, layer: qnnx.QuantizedLinear, tiles: tuple[jax.Array, ...]):
    self.layer = layer
    self.tiles = nnx.data(tiles)

  def __call__(self, x: jax.Array) -> jax.Array:
    layer = self.layer
    bias = layer.bias[...] if layer.bias is not None else None
    return _core.dense(x, layer.qt, bias, dtype=layer.dtype, param_dtype=layer.param_dtype,
                       method=layer.method, tiles=self.tiles)


class Generator:
  """Jitted prefill and decode programs for one model and cache length.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from itq3s_jax.models import llama, generate
  >>> cfg = llama.LlamaConfig(vocab_size=50, d_model=64, n_layers=1, n_heads=4,
  ...                         n_kv_heads=2, ffn_dim=96)
  >>> gen = generate.Generator(llama.Llama(cfg, rngs=nnx.Rngs(0)), max_len=16)
  >>> len(gen.greedy([1, 2, 3], 4).tokens)
  4
  """

  def __init__(self, model: llama.Llama, max_len: int):
    self.config = model.config
    self.max_len = int(max_len)
    graphdef, state = nnx.split(model)
    # Flat leaves, not the nnx State: flattening its Variables on every call showed in a
    # profile of SmolLM2's decode loop (float 30.2 -> 31.0, itq3_t 15.7 -> 16.3 tokens/s).
    self._state, treedef = jax.tree.flatten(state)
    one_row = lambda layer: jax.ShapeDtypeStruct((1, layer.in_features), jnp.float32)  # noqa: E731
    paths = [p for p, layer in nnx.iter_modules(model)
             if isinstance(layer, qnnx.QuantizedLinear)
             and _core.takes_decode_tiles(one_row(layer), layer.qt, layer.method)]
    self._tiles = jax.jit(lambda qts: [xla.decode_tiles(qt, 1) for qt in qts])(
        [state_lib.get_submodule(model, p).qt for p in paths])

    def step(leaves, tiles, cache, tokens, start):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      for path, t in zip(paths, tiles):
        state_lib.set_submodule(model, path, _Prepared(state_lib.get_submodule(model, path), t))
      logits, cache = forward(model, tokens, cache, start)
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    self._step = jax.jit(step, donate_argnums=2)

  def greedy(self, prompt: list[int], n_new: int, *, eos: int | None = None,
             clock: Callable[[], float] = time.perf_counter) -> Generation:
    """Greedy continuation of ``prompt`` (token ids) by up to ``n_new`` tokens.

    Raises:
      ValueError: an empty prompt, n_new < 1, or prompt + n_new beyond max_len.
    """
    if not prompt or n_new < 1:
      raise ValueError(f"need a non-empty prompt and n_new >= 1, got {len(prompt)=}, {n_new=}.")
    if len(prompt) + n_new > self.max_len:
      raise ValueError(f"prompt ({len(prompt)}) + n_new ({n_new}) exceeds max_len="
                       f"{self.max_len}; build the Generator with a larger max_len.")
    cache = KVCache.zeros(self.config, 1, self.max_len)
    t0 = clock()
    tok, cache = self._step(self._state, self._tiles, cache, jnp.asarray([prompt], jnp.int32),
                            jnp.int32(0))
    out = [int(tok[0])]
    t1 = clock()
    pos = len(prompt)
    while len(out) < n_new and (eos is None or out[-1] != eos):
      tok, cache = self._step(self._state, self._tiles, cache, tok[:, None], jnp.int32(pos))
      out.append(int(tok[0]))
      pos += 1
    return Generation(out, t1 - t0, clock() - t1)
