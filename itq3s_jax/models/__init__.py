"""Reference models loaded offline: SmolLM2-135M (LLaMA, GGUF) and all-MiniLM-L6-v2 (BERT).

Their dense projections are ``nnx.Linear`` layers, so
``itq3s_jax.flax.quantize_model`` quantizes the linear layers only; embeddings,
norms and the output head stay float.
"""

from itq3s_jax.models import bert
from itq3s_jax.models import llama
from itq3s_jax.models import tokenizer

__all__ = ["bert", "llama", "tokenizer"]
