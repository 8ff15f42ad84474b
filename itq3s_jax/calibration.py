"""Calibration: input statistics of a model's linear layers and Hessian-aware rounding.

>>> import itq3s_jax
>>> from itq3s_jax import calibration
>>> # stats = calibration.calibrate(model, tokens)        # {layer path: Sigma (K, K)}
>>> # calibration.save("stats.npz", stats)
>>> # model, report = itq3s_jax.flax.quantize_model(model, hessians=stats)

``gptq_quantize`` is ``itq3s_jax.quantize(w, fmt, hessian=Sigma, ...)`` with its
options spelled out; ``output_error`` is the activation-weighted error it
minimises. Theory and the certified two-neighbour bound: proofs/README.md T10.
"""

from itq3s_jax._src.calibrate import CALIBRATION_SLICE
from itq3s_jax._src.calibrate import calibrate
from itq3s_jax._src.calibrate import load
from itq3s_jax._src.calibrate import nbytes
from itq3s_jax._src.calibrate import protocol_tokens
from itq3s_jax._src.calibrate import quantize_weights
from itq3s_jax._src.calibrate import save
from itq3s_jax._src.gptq import ROUNDINGS
from itq3s_jax._src.gptq import default_rounding
from itq3s_jax._src.gptq import output_error
from itq3s_jax._src.gptq import quantize as gptq_quantize

__all__ = [
    "CALIBRATION_SLICE",
    "ROUNDINGS",
    "calibrate",
    "default_rounding",
    "gptq_quantize",
    "load",
    "nbytes",
    "output_error",
    "protocol_tokens",
    "quantize_weights",
    "save",
]
