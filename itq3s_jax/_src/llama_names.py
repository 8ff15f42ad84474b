"""Names of a LLaMA-family model's linear layers in GGUF, Hugging Face and our NNX model.

One table, so the loaders, the converter's calibration lookup and the GGUF
writer agree on which tensor is which layer.
"""

from __future__ import annotations

import re

# GGUF tensor (blk.I.<name>.weight) -> (module, attribute) under layers[I] of models.llama.
GGUF_LINEARS = {
    "attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"), "attn_v": ("attn", "v_proj"),
    "attn_output": ("attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj"),
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def gguf_to_layer(name: str) -> str | None:
  """``blk.3.attn_q.weight`` -> ``layers.3.attn.q_proj`` (the NNX layer path), else None."""
  m = _GGUF_BLOCK.match(name)
  if m and m.group(2) in GGUF_LINEARS:
    return ".".join(("layers", m.group(1), *GGUF_LINEARS[m.group(2)]))
  return None
