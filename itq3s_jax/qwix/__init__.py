"""An optional qwix provider: ``qwix.QuantizationRule(module_path=..., weight_qtype="itq3_t")``.

qwix (Google's JAX quantization library) quantizes a model by intercepting
``dot_general``/``einsum`` while it runs, so any Flax layer (NNX or linen,
``Linear``, ``Einsum``, a raw ``jnp.einsum`` on a parameter) is covered without
rewriting the model. This module adds the itq3s formats as weight types:

>>> # import qwix
>>> # from itq3s_jax import qwix as iqwix
>>> # rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="itq3_t")]
>>> # qmodel = qwix.quantize_model(model, iqwix.PtqProvider(rules), x)        # PTQ
>>> # qparams = iqwix.quantize_params(float_params, abstract_qmodel)          # offline
>>> # qparams = iqwix.gptq_quantize_params(float_params, abstract_qmodel, stats)  # GPTQ

``weight_qtype`` is a format name (``itq3s_jax.formats()``), or
:func:`qtype` (name + sign seed). Weights become :class:`ItqArray` (codes of
the (N, K) view, K = the contracted axes; ``tile_size`` must be unset:
blocks of 256 along K are the format's own). Contractions run through
``itq3s_jax.matmul`` in float32, so a qwix-quantized ``nnx.Linear`` equals
``itq3s_jax.flax.QuantizedLinear`` bit for bit. Other qtypes in the same rule
list (int8, int4, ...) go to qwix unchanged. ``act_qtype`` is not supported
with itq3s weights (weight-only formats).

Importing this package needs ``pip install qwix`` (tested: qwix 0.1.8). The
private qwix hooks it needs are all in ``_hooks.py``.
"""

from itq3s_jax.qwix.provider import ItqArray
from itq3s_jax.qwix.provider import PtqProvider
from itq3s_jax.qwix.provider import from_tensor
from itq3s_jax.qwix.provider import gptq_quantize_params
from itq3s_jax.qwix.provider import parse_qtype
from itq3s_jax.qwix.provider import qtype
from itq3s_jax.qwix.provider import quantize_params

__all__ = [
    "ItqArray",
    "PtqProvider",
    "from_tensor",
    "gptq_quantize_params",
    "parse_qtype",
    "qtype",
    "quantize_params",
]
