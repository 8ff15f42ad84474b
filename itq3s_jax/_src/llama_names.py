"""Names of a LLaMA-family model's tensors in GGUF, Hugging Face and our NNX model.

One table per naming scheme, so the loaders, the converter's calibration
lookup and the GGUF writer agree on which tensor is which layer. Model names
are dotted NNX state paths of ``itq3s_jax.models.llama.Llama``
(``layers.3.attn.q_proj.kernel``); a *layer* is the path of an ``nnx.Linear``
(``layers.3.attn.q_proj``), the key of its calibration statistics.

Hugging Face and GGUF store a linear weight as (out, in); the NNX kernel is
(in, out). :func:`to_model` says which stored tensors are linear weights so a
loader transposes float ones (quantized ones are already (out, in) rows).
:func:`hf_to_gguf` names a Hugging Face tensor as llama.cpp does (the GGUF
writer); q/k rows also differ in order between the two (``ROPE_PERMUTED``).
"""

from __future__ import annotations

import re

# GGUF tensor (blk.I.<name>.weight) -> (module, attribute) under layers[I] of models.llama.
GGUF_LINEARS = {
    "attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"), "attn_v": ("attn", "v_proj"),
    "attn_output": ("attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj"),
}
GGUF_NORMS = {"attn_norm": "input_norm", "ffn_norm": "post_attn_norm"}
GGUF_GLOBALS = {"token_embd.weight": "embed.embedding", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head"}

# Hugging Face (model.layers.I.<name>.weight|bias) -> (module, attribute) under layers[I].
HF_LINEARS = {
    "self_attn.q_proj": ("attn", "q_proj"), "self_attn.k_proj": ("attn", "k_proj"),
    "self_attn.v_proj": ("attn", "v_proj"), "self_attn.o_proj": ("attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"), "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
HF_NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm"}
HF_GLOBALS = {"model.embed_tokens.weight": "embed.embedding", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head"}
# Buffers some HF checkpoints carry that are recomputed, not loaded.
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# GGUF q/k projections, whose rows llama.cpp stores in its RoPE order.
ROPE_PERMUTED = re.compile(r"^blk\.\d+\.attn_(q|k)\.(weight|bias)$")

_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.([a-z_.]+)\.(weight|bias)$")


def gguf_to_layer(name: str) -> str | None:
  """``blk.3.attn_q.weight`` -> ``layers.3.attn.q_proj`` (the NNX layer path), else None."""
  m = _GGUF_BLOCK.match(name)
  if m and m.group(2) in GGUF_LINEARS and m.group(3) == "weight":
    return ".".join(("layers", m.group(1), *GGUF_LINEARS[m.group(2)]))
  return None


def hf_to_layer(name: str) -> str | None:
  """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attn.q_proj``, else None."""
  m = _HF_BLOCK.match(name)
  if m and m.group(2) in HF_LINEARS and m.group(3) == "weight":
    return ".".join(("layers", m.group(1), *HF_LINEARS[m.group(2)]))
  return None


def to_layer(name: str) -> str | None:
  """The NNX layer path of a GGUF or HF linear weight name, else None."""
  return gguf_to_layer(name) or hf_to_layer(name)


def to_model(name: str) -> tuple[str, bool] | None:
  """(NNX state path, is a linear weight stored (out, in)) of a GGUF or HF tensor name.

  ``blk.0.attn_q.weight`` and ``model.layers.0.self_attn.q_proj.weight`` both
  give ``("layers.0.attn.q_proj.kernel", True)``; ``lm_head.weight`` /
  ``output.weight`` give ``("lm_head", True)`` (the model's head is (in, out)
  too); norms, biases and the embedding give ``(path, False)``. None for a
  name of neither scheme.
  """
  if name in GGUF_GLOBALS or name in HF_GLOBALS:
    path = GGUF_GLOBALS.get(name) or HF_GLOBALS[name]
    return path, path == "lm_head"
  for pattern, linears, norms in ((_GGUF_BLOCK, GGUF_LINEARS, GGUF_NORMS),
                                  (_HF_BLOCK, HF_LINEARS, HF_NORMS)):
    m = pattern.match(name)
    if not m:
      continue
    i, part, kind = m.groups()
    if part in linears:
      leaf = "kernel" if kind == "weight" else "bias"
      return ".".join(("layers", i, *linears[part], leaf)), kind == "weight"
    if part in norms and kind == "weight":
      return f"layers.{i}.{norms[part]}.weight", False
  return None


# HF block part -> GGUF block part, through the model path both tables name.
_HF_TO_GGUF_PART = {
    **{hf: g for hf, v in HF_LINEARS.items() for g, w in GGUF_LINEARS.items() if v == w},
    **{hf: g for hf, v in HF_NORMS.items() for g, w in GGUF_NORMS.items() if v == w},
}
_HF_TO_GGUF_GLOBAL = {hf: g for hf, v in HF_GLOBALS.items() for g, w in GGUF_GLOBALS.items()
                      if v == w}


def hf_to_gguf(name: str) -> str | None:
  """A Hugging Face LLaMA tensor name as llama.cpp's GGUF names it, else None.

  ``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``,
  ``model.layers.3.post_attention_layernorm.weight`` -> ``blk.3.ffn_norm.weight``,
  ``model.embed_tokens.weight`` -> ``token_embd.weight``, ``lm_head.weight`` ->
  ``output.weight``. None for ``rotary_emb.inv_freq`` buffers and unknown names.
  """
  if name in _HF_TO_GGUF_GLOBAL:
    return _HF_TO_GGUF_GLOBAL[name]
  m = _HF_BLOCK.match(name)
  if m and m.group(2) in _HF_TO_GGUF_PART:
    if m.group(2) in HF_NORMS and m.group(3) != "weight":
      return None
    return f"blk.{m.group(1)}.{_HF_TO_GGUF_PART[m.group(2)]}.{m.group(3)}"
  return None
