"""Quantized Flax layers (NNX and linen), model surgery and checkpoints.

>>> from itq3s_jax import flax as qflax
>>> sorted(qflax.__all__)[:3]
['QuantizationReport', 'QuantizedDense', 'QuantizedEinsum']
"""

from itq3s_jax.flax._core import QuantizationReport
from itq3s_jax.flax.checkpoint import restore
from itq3s_jax.flax.checkpoint import restore_tensors
from itq3s_jax.flax.checkpoint import save
from itq3s_jax.flax.linen import QuantizedDense
from itq3s_jax.flax.linen import quantize_params
from itq3s_jax.flax.linen_general import apply as apply_quantized
from itq3s_jax.flax.nnx_general import QuantizedEinsum
from itq3s_jax.flax.nnx import QuantizedLinear
from itq3s_jax.flax.nnx import QuantizedWeight
from itq3s_jax.flax.surgery import quantize_model

__all__ = [
    "apply_quantized",
    "QuantizationReport",
    "QuantizedDense",
    "QuantizedEinsum",
    "QuantizedLinear",
    "QuantizedWeight",
    "quantize_model",
    "quantize_params",
    "restore",
    "restore_tensors",
    "save",
]
