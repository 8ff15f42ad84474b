"""Fused dequant-matmul Pallas kernels for the itq3s-jax formats (one kernel per module).

``weight_ifwht``: decode + inverse FWHT of each weight tile + dot.
``act_rotate``: rotate activations once, dequant-matmul in the coding domain.
Both are reached through ``itq3s_jax.matmul(x, qt, method=...)``. They import
the core and the XLA reference, never the dispatch (which registers them).
"""

from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import weight_ifwht

__all__ = ["act_rotate", "weight_ifwht"]
