"""itq3s-jax: ITQ3_S 3-bit weight formats for JAX (public API; code lives in _src).

Importing this package loads the format core only: the Flax layers
(``itq3s_jax.flax``), calibration (``itq3s_jax.calibration``), checkpoint
conversion (``itq3s_jax.checkpoint``) and the models are separate imports.
"""

from itq3s_jax._src import formats as _formats  # noqa: F401  (registers the formats)
from itq3s_jax._src.api import quantize
from itq3s_jax._src.bounds import error_bound
from itq3s_jax._src.bounds import has_bound
from itq3s_jax._src.bounds import rounding_slack
from itq3s_jax._src.bounds import two_neighbour_bound
from itq3s_jax._src.bounds import underflow_slack
from itq3s_jax._src.codec import block_columns
from itq3s_jax._src.codec import decode_rotated
from itq3s_jax._src.codec import dequantize
from itq3s_jax._src.codec import rotate_activations
from itq3s_jax._src.config import GptqConfig
from itq3s_jax._src.config import QuantRule
from itq3s_jax._src.config import ROUNDINGS
from itq3s_jax._src.config import default_rounding
from itq3s_jax._src.core.fwht import fwht
from itq3s_jax._src.core.fwht import ifwht
from itq3s_jax._src.core.fwht import sign_vector
from itq3s_jax._src.core.qtensor import QuantizedTensor
from itq3s_jax._src.core.qtensor import row_nbytes
from itq3s_jax._src.core.registry import format_names as formats
from itq3s_jax._src.core.registry import get_format
from itq3s_jax._src.matmul.api import choose as choose_method
from itq3s_jax._src.matmul.api import matmul

__all__ = [
    "GptqConfig",
    "QuantRule",
    "QuantizedTensor",
    "ROUNDINGS",
    "block_columns",
    "choose_method",
    "decode_rotated",
    "default_rounding",
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
    "row_nbytes",
    "sign_vector",
    "two_neighbour_bound",
    "underflow_slack",
]
