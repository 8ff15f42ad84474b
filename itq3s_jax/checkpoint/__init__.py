"""Checkpoint conversion: float checkpoints -> itq3s orbax checkpoints or GGUF, and back.

``convert`` streams one tensor at a time and writes atomically (see
``convert.py``); ``load`` restores a converted checkpoint without a target tree;
``inspect`` summarises one (formats, bits per weight, certified bounds).
"""

from itq3s_jax.checkpoint.converter import convert
from itq3s_jax.checkpoint.converter import quantize_tensor
from itq3s_jax.checkpoint.converter import Summary
from itq3s_jax.checkpoint.errors import CheckpointError
from itq3s_jax.checkpoint.inspection import inspect
from itq3s_jax.checkpoint.inspection import Report
from itq3s_jax.checkpoint.reader import iter_tensors
from itq3s_jax.checkpoint.reader import load
from itq3s_jax.checkpoint.reader import load_tree
from itq3s_jax.checkpoint.reader import read_metadata

__all__ = [
    "CheckpointError",
    "Report",
    "Summary",
    "convert",
    "inspect",
    "iter_tensors",
    "load",
    "load_tree",
    "quantize_tensor",
    "read_metadata",
]
