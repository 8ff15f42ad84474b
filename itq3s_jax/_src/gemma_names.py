"""Names of Gemma 3's tensors in GGUF and in ``itq3s_jax.models.gemma.Gemma``.

The loader (``models.gemma``) and the converter (tuned norm gains written back
into a converted Gemma checkpoint) share this table; it imports no Flax. The
projections are named as in the LLaMA decoder (``llama_names``); the norms are
Gemma's own, four per block plus q/k norms, stored by llama.cpp as 1 + w.
"""

from __future__ import annotations

import re

from itq3s_jax._src import llama_names

# GGUF blk.I.<name>.weight -> path under layers[I] (LLaMA's "ffn_norm" is its second of two
# norms; Gemma's is the third of four).
BLOCK_NAMES = {
    "attn_norm": "input_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_mlp_norm", "post_ffw_norm": "post_mlp_norm",
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    **{name: f"{module}.{attr}" for name, (module, attr) in llama_names.GGUF_LINEARS.items()},
}
ARCH = "gemma3"  # GGUF general.architecture
BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
NORM_OFFSET = 1.0  # llama.cpp stores a Gemma norm weight w as 1 + w (the gain it multiplies by)


def state_path(name: str) -> tuple[str, str] | None:
  """(Gemma state path, kind) of a GGUF tensor name; kind is "embedding", "norm" (stored
  as w + NORM_OFFSET) or "kernel" (stored (out, in)). None for another name."""
  if name == "token_embd.weight":
    return "embed.embedding", "embedding"
  if name == "output_norm.weight":
    return "norm.weight", "norm"
  m = BLOCK.match(name)
  if not m or m.group(2) not in BLOCK_NAMES:
    return None
  path = f"layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}"
  if m.group(2).endswith("norm"):
    return f"{path}.weight", "norm"
  return f"{path}.kernel", "kernel"
