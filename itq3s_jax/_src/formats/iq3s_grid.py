"""The IQ3_S grid (ggml ``iq3s_grid[512]``) and the encoder's candidate tables.

The grid is taken from the ``gguf`` package (a runtime dependency), which holds
the same 512 entries as ggml: each entry is four odd magnitudes 2l+1 in
{1, 3, ..., 15}, coordinate i being octal digit i of ggml's ``kgrid_512`` code.
The tests compare the decoder against ``gguf.quants.dequantize`` itself, so a
wrong grid here cannot go unnoticed.

Candidate tables. A 4-group of magnitudes rounded level by level gives a
lattice point ``code = L0 + 8 L1 + 64 L2 + 512 L3`` (L in 0..7) that is on the
grid for only 512 of the 4096 codes. For every code we list the ``NCAND`` grid
points nearest to it (squared distance in level units, ties by grid index);
an on-grid code lists itself first. The encoder scores these candidates
exactly and keeps the best. At a fixed scale this matches an exhaustive
512-point search on 98.6% of N(0,1) groups and costs 0.8% more squared error
overall (benchmarks/iq3s_encoder.py), at 1/64 of the search.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np

NCAND = 8  # candidates scored per 4-group


@functools.lru_cache(maxsize=None)
def grid() -> np.ndarray:
  """float32 (512, 4): the odd magnitudes of each grid entry (ggml order)."""
  q = gguf.quants.IQ3_S
  q.init_grid()
  g = np.asarray(q.grid, np.float32).reshape(512, 4)
  if not (g.shape == (512, 4) and np.all(g % 2 == 1) and g.max() == 15):
    raise ImportError("gguf's IQ3_S grid is not the 512x4 odd-magnitude table "
                      "this codec expects; check the gguf version (>= 0.19).")
  return g


def codes() -> np.ndarray:
  """int32 (512,): the 12-bit lattice code (L0 + 8 L1 + 64 L2 + 512 L3) of each entry."""
  lv = ((grid() - 1) // 2).astype(np.int32)
  return (lv << (3 * np.arange(4))).sum(-1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def index_of_code() -> np.ndarray:
  """int32 (4096,): grid index of an on-grid lattice code, -1 off the grid."""
  out = np.full(4096, -1, np.int32)
  out[codes()] = np.arange(512, dtype=np.int32)
  return out


@functools.lru_cache(maxsize=None)
def candidates() -> np.ndarray:
  """Per lattice code, the lattice codes of its NCAND nearest grid points.

  Returns:
    int32 (NCAND // 2, 4096): word w of a code packs its candidates 2w (bits
    0..11) and 2w+1 (bits 12..23); candidate 0 is the code itself when it is
    on the grid. Packed because XLA's CPU gather costs per element.
  """
  g = grid()
  levels = (np.arange(4096)[:, None] >> (3 * np.arange(4))) & 7  # (4096, 4)
  point = 2.0 * levels + 1.0
  dist = ((point[:, None, :] - g[None, :, :]) ** 2).sum(-1)  # (4096, 512)
  # stable sort: ties keep ascending grid index
  near = np.argsort(dist, axis=1, kind="stable")[:, :NCAND]
  near = codes()[near].astype(np.int32)
  return (near[:, 0::2] | (near[:, 1::2] << 12)).T.copy()
