"""Reference models: a LLaMA-family decoder (Hugging Face, GGUF, converted checkpoints), Gemma 3 (GGUF) and BERT.

``load(path) -> (model, tokenizer)`` opens a Hugging Face directory, a GGUF
file or an ``itq3s convert`` checkpoint (quantized layers come back as
``itq3s_jax.flax.QuantizedLinear``). The decoder's dense projections are
``nnx.Linear`` layers, so ``itq3s_jax.flax.quantize_model`` quantizes exactly
those; embeddings, norms and the output head stay float.
"""

from itq3s_jax.models import bert
from itq3s_jax.models import gemma
from itq3s_jax.models import llama
from itq3s_jax.models import loaders
from itq3s_jax.models import tokenizer
from itq3s_jax.models.loaders import load

__all__ = ["bert", "gemma", "llama", "load", "loaders", "tokenizer"]
