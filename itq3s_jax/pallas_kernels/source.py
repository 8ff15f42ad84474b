"""The kernels' ``kernel_codec.Source``: bytes of one block of ``bn`` coded rows, from the ref.

Rows past N are masked loads (a compiled Triton kernel does not bound-check),
so decoders never read past the array. ``load`` is a contiguous slice at a constant offset: one vector load per
thread, addresses a constant apart. ``gather`` computes each element's address:
use it for fields whose offsets are not one contiguous run.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


class RefSource:
  """kernel_codec.Source over the coded-rows ref, block at byte ``base`` of rows r0..r0+bn."""

  def __init__(self, data_ref, r0, bn, n_rows, base, tables, lut_refs):
    self._data, self._r0, self._bn, self._n, self._base = data_ref, r0, bn, n_rows, base
    self._tables, self._luts = tables, lut_refs

  def _rows(self, ndim):
    rows = self._r0 + lax.broadcasted_iota(jnp.int32, (self._bn,) + (1,) * (ndim - 1), 0)
    return rows, rows < self._n

  def load(self, start, width):
    _, valid = self._rows(2)
    ref = self._data.at[pl.ds(self._r0, self._bn), pl.ds(self._base + start, width)]
    v = plt.load(ref, mask=jnp.broadcast_to(valid, (self._bn, width)), other=0)
    return v.astype(jnp.int32)

  def gather(self, cols):
    shape = (self._bn,) + cols.shape[1:]
    rows, valid = self._rows(len(shape))
    idx = (jnp.broadcast_to(rows, shape), jnp.broadcast_to(cols + self._base, shape))
    return plt.load(self._data.at[idx], mask=jnp.broadcast_to(valid, shape),
                    other=0).astype(jnp.int32)

  def byte(self, cols):  # legacy natural-order decoders: (1, c) column tables
    return self.gather(cols)

  def table(self, name):
    return self._tables[name]

  def lut(self, name, idx):
    return self._luts[name][idx]
