"""``load(path) -> (model, tokenizer)``: the checkpoint a user has, as a runnable NNX model.

Accepted paths (one call, the kind is detected):

* a Hugging Face directory: ``config.json`` + ``model.safetensors`` or shards
  (with or without ``model.safetensors.index.json``); ``model_type`` llama,
  mistral or qwen2 (GQA, ``rope_theta``, tied or untied head, q/k/v bias).
  Loaded in float32; tokenizer from ``tokenizer.json``.
* a GGUF file (``general.architecture`` llama, or gemma3 for
  :class:`itq3s_jax.models.gemma.Gemma`): float tensors are decoded to
  float32; IQ3_S / ITQ3_S tensors (e.g. ``itq3s convert SRC DST.gguf``) stay
  quantized. Tokenizer from the GGUF metadata.
* a checkpoint written by ``itq3s convert`` from either: quantized weights
  become ``QuantizedLinear`` layers (format, seed and GPTQ rounding as
  stored), the rest float. Configuration and tokenizer come from the
  conversion's source (its path is in the checkpoint metadata), or from
  ``config.json``/``tokenizer.json`` copied into the checkpoint directory, or
  from ``source=``.

The network is :class:`itq3s_jax.models.llama.Llama` (a Gemma 3 GGUF, or a
checkpoint converted from one, gives :class:`itq3s_jax.models.gemma.Gemma`):
full causal attention (a Mistral sliding window is exact for sequences up to
its length) and plain RoPE (``rope_scaling`` is not supported).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import tqdm
from flax import nnx

from itq3s_jax._src import gemma_names
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import reader
from itq3s_jax.checkpoint import sources
from itq3s_jax.checkpoint import writers
from itq3s_jax.flax import checkpoint as flax_checkpoint
from itq3s_jax.models import llama
from itq3s_jax.models import tokenizer as tokenizer_lib

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(c: Mapping[str, Any]) -> llama.LlamaConfig:
  """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict.

  Raises:
    NotImplementedError: a model type, activation, RoPE scaling or sliding
      window the NNX model does not implement.
    ValueError: a required key is missing.
  """
  kind = c.get("model_type")
  if kind not in HF_MODEL_TYPES:
    raise NotImplementedError(f"model_type={kind!r}: only {HF_MODEL_TYPES} configs load "
                              "into the NNX Llama.")
  if c.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"hidden_act={c['hidden_act']!r}: the NNX Llama uses SwiGLU (silu).")
  scaling = c.get("rope_scaling")
  if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
    raise NotImplementedError(f"rope_scaling={scaling}: only plain RoPE is implemented.")
  if c.get("use_sliding_window"):
    raise NotImplementedError("use_sliding_window=true: the NNX Llama attends to the whole "
                              "context.")
  try:
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    attn_bias = bool(c.get("attention_bias", False))
    return llama.LlamaConfig(
        vocab_size=int(c["vocab_size"]), d_model=d, n_layers=int(c["num_hidden_layers"]),
        n_heads=heads, n_kv_heads=int(c.get("num_key_value_heads") or heads),
        ffn_dim=int(c["intermediate_size"]), head_dim=c.get("head_dim") or d // heads,
        rope_base=float(c.get("rope_theta", 10000.0)),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or attn_bias, o_bias=kind == "llama" and attn_bias,
        mlp_bias=bool(c.get("mlp_bias", False)))
  except KeyError as exc:
    raise ValueError(f"config.json has no {exc.args[0]!r}; is it a LLaMA-family config?") from None


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as exc:
    raise ValueError(f"{path}: cannot read JSON ({exc}).") from None


def _is_gguf(path: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def _describe_hf(directory: str):
  """(config, tokenizer or None) of a Hugging Face directory."""
  cfg = config_from_hf(_read_json(os.path.join(directory, "config.json")))
  tok_path = os.path.join(directory, "tokenizer.json")
  tok = tokenizer_lib.from_json_file(tok_path) if os.path.isfile(tok_path) else None
  return cfg, tok


def _describe_gguf(path: str, has_head: bool):
  """(config, tokenizer) of a GGUF: a GemmaConfig for ``gemma3``, else a LlamaConfig."""
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  md = gguf_io.read_metadata(path)
  if md.get("general.architecture") == gemma_names.ARCH:
    from itq3s_jax.models import gemma  # pylint: disable=g-import-not-at-top
    return gemma.config_from_gguf_metadata(md), gemma.spm_from_gguf_metadata(md)
  cfg = llama.config_from_gguf_metadata(md)
  cfg = dataclasses.replace(cfg, tie_embeddings=not has_head)
  return cfg, tokenizer_lib.bpe_from_gguf_metadata(md)


def _describe(where: list[str], has_head: bool):
  """Config and tokenizer from the first of ``where`` that has them (HF dir or GGUF)."""
  for w in where:
    if w and os.path.isfile(os.path.join(w, "config.json")):
      return _describe_hf(w)
    if w and _is_gguf(w):
      return _describe_gguf(w, has_head)
  raise ValueError(f"no config.json or GGUF to describe the model among {where}; pass "
                   "source= (the Hugging Face directory or GGUF it was converted from) or "
                   "copy config.json (and tokenizer.json) into the checkpoint directory.")


def _bar(items, progress: bool, desc: str):
  return tqdm.tqdm(items, desc=desc, unit="tensor", disable=not progress, leave=False)


def load(path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None,
         progress: bool = False):
  """Loads a LLaMA-family checkpoint as an NNX model, quantized where it is stored quantized.

  Args:
    path: a Hugging Face directory, a GGUF file, or an ``itq3s convert``
      checkpoint directory (module docstring).
    source: for a converted checkpoint, the Hugging Face directory or GGUF
      it came from (config and tokenizer); default: the path recorded in the
      checkpoint, or files copied into it.
    progress: show a tqdm bar (stderr) while tensors are read.

  Returns:
    ``(model, tokenizer)``: a :class:`itq3s_jax.models.llama.Llama` (a
    ``models.gemma.Gemma`` for a Gemma 3 source; config in ``model.config``)
    whose linear layers are ``nnx.Linear`` or, when
    stored quantized, ``itq3s_jax.flax.QuantizedLinear``; and a
    ``tokenizers.Tokenizer``, or None when the checkpoint has no tokenizer.

  Raises:
    CheckpointError: a missing, damaged or unrecognised checkpoint, or
      tensors that do not fit the configuration.
    NotImplementedError: an architecture or tokenizer the model lacks.
  """
  path = os.fspath(path)
  try:
    if _is_gguf(path):
      from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
      f = gguf_io.TensorFile(path)
      tensors = {n: f.read_quantized(n) for n in _bar(f.names, progress, "load")}
      cfg, tok = _describe_gguf(path, "output.weight" in tensors)
    elif os.path.isfile(os.path.join(path, writers.META_ITEM, "metadata")):
      meta = reader.read_metadata(path)
      tensors = {e["name"]: t for e, t in _bar(reader.iter_tensors(path), progress, "load")}
      has_head = "lm_head.weight" in tensors or "output.weight" in tensors
      recorded = (meta.get("source") or {}).get("path")
      where = [os.fspath(source)] if source is not None else [path, recorded]
      cfg, tok = _describe(where, has_head)
    elif os.path.isfile(os.path.join(path, "config.json")):
      cfg, tok = _describe_hf(path)
      src = sources.open_source(path)
      tensors = {t.name: src.read(t.name) for t in _bar(src.tensors, progress, "load")}
    else:
      raise errors.CheckpointError(
          f"{path}: not a GGUF file, a Hugging Face directory (config.json + safetensors) "
          "or an itq3s checkpoint.")
    named, build = _family(cfg, tensors)
  except errors.CheckpointError:
    raise
  except ValueError as exc:
    raise errors.CheckpointError(f"{path}: {exc}") from None
  abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  return flax_checkpoint.restore_tensors(abstract, named, origin=path), tok


def _family(cfg, tensors: Mapping[str, Any]):
  """({model path: tensor}, model class) for a LlamaConfig or a GemmaConfig."""
  if isinstance(cfg, llama.LlamaConfig):
    return llama.model_tensors(cfg, tensors), llama.Llama
  from itq3s_jax.models import gemma  # pylint: disable=g-import-not-at-top
  return gemma.model_tensors(tensors), gemma.Gemma
