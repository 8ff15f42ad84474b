"""itq3s-jax: ITQ3_S 3-bit weight formats for JAX (public API; code lives in _src)."""

from itq3s_jax._src import formats as _formats  # noqa: F401  (registers the formats)
from itq3s_jax._src.calibrate import calibrate
from itq3s_jax._src.fwht import fwht
from itq3s_jax._src.gptq import error_bound as two_neighbour_bound
from itq3s_jax._src.matmul import matmul
from itq3s_jax._src.fwht import ifwht
from itq3s_jax._src.fwht import sign_vector
from itq3s_jax._src.qtensor import QuantizedTensor
from itq3s_jax._src.quantize import block_columns
from itq3s_jax._src.quantize import decode_rotated
from itq3s_jax._src.quantize import dequantize
from itq3s_jax._src.quantize import error_bound
from itq3s_jax._src.quantize import has_bound
from itq3s_jax._src.quantize import quantize
from itq3s_jax._src.quantize import rotate_activations
from itq3s_jax._src.quantize import rounding_slack
from itq3s_jax._src.quantize import underflow_slack
from itq3s_jax._src.registry import format_names as formats
from itq3s_jax._src.registry import get_format

__all__ = [
    "QuantizedTensor",
    "block_columns",
    "calibrate",
    "decode_rotated",
    "dequantize",
    "error_bound",
    "formats",
    "fwht",
    "get_format",
    "has_bound",
    "ifwht",
    "matmul",
    "quantize",
    "rotate_activations",
    "rounding_slack",
    "sign_vector",
    "two_neighbour_bound",
    "underflow_slack",
]
