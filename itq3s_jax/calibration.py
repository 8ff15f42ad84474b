"""Calibration: input statistics of a model's linear layers and Hessian-aware rounding.

>>> import itq3s_jax
>>> from itq3s_jax import calibration
>>> # stats = calibration.calibrate(model, tokens)        # {layer path: Sigma (K, K)}
>>> # calibration.save("stats.npz", stats)
>>> # model, report = itq3s_jax.flax.quantize_model(model, hessians=stats)

``gptq_quantize`` is ``itq3s_jax.quantize(w, fmt, hessian=Sigma, gptq=...)``;
``output_error`` is the activation-weighted error it minimises. Theory and the
certified two-neighbour bound: proofs/README.md T10. Importing this module
imports Flax (the statistics are collected with taps on an NNX model).
"""

from itq3s_jax._src.config import GPTQ_ROUNDINGS as ROUNDINGS
from itq3s_jax._src.config import GptqConfig
from itq3s_jax._src.config import default_rounding
from itq3s_jax._src.gptq import output_error
from itq3s_jax._src.gptq import quantize as gptq_quantize
from itq3s_jax._src.gptq import rotate_hessian
from itq3s_jax._src.stats import CALIBRATION_SLICE
from itq3s_jax._src.stats import TUNING_SLICE
from itq3s_jax._src.stats import Codes
from itq3s_jax._src.stats import load
from itq3s_jax._src.stats import load_codes
from itq3s_jax._src.stats import load_tuned
from itq3s_jax._src.stats import nbytes
from itq3s_jax._src.stats import protocol_tokens
from itq3s_jax._src.stats import save
from itq3s_jax.flax.calibrate import calibrate
from itq3s_jax.flax.calibrate import calibrate_sequential
from itq3s_jax.flax.calibrate import coded_weights
from itq3s_jax.flax.calibrate import kl_divergence
from itq3s_jax.flax.calibrate import tune_unquantized
from itq3s_jax.flax.calibrate import tuned_values
from itq3s_jax.flax.calibrate import quantize_weights

__all__ = [
    "CALIBRATION_SLICE",
    "TUNING_SLICE",
    "Codes",
    "GptqConfig",
    "ROUNDINGS",
    "calibrate",
    "calibrate_sequential",
    "coded_weights",
    "default_rounding",
    "gptq_quantize",
    "kl_divergence",
    "load",
    "load_codes",
    "load_tuned",
    "nbytes",
    "output_error",
    "protocol_tokens",
    "quantize_weights",
    "rotate_hessian",
    "save",
    "tune_unquantized",
    "tuned_values",
]
