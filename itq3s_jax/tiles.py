"""Column-major decode tiles: the coded weight in the form the XLA matmul decodes it.

A quantized weight (N, row_nbytes) is cut into tiles of :func:`tile_rows` rows
(:func:`column_tiles`, one uint8 (tiles, nbytes, count, rows) array per segment
of the row's block plan, :func:`segments`); :func:`decode_tile` decodes one
tile of one segment to float32 (n, count, rows), in the coding domain or as
weights; :func:`map_tiles` runs a per-tile consumer over all tiles without a
weight-sized buffer. ``matmul(..., method="xla_act_rotate")`` is such a
consumer (a dot per tile); benchmarks/speed.py times the decode with a trivial
one.

>>> from itq3s_jax import tiles
>>> [(s.n, s.count) for s in tiles.segments("itq3_t", 512)]
[(256, 2)]
"""

from itq3s_jax._src.codec import column_tiles
from itq3s_jax._src.codec import decode_tile
from itq3s_jax._src.codec import map_tiles
from itq3s_jax._src.codec import tile_rows
from itq3s_jax._src.core.qtensor import segments

__all__ = ["column_tiles", "decode_tile", "map_tiles", "segments", "tile_rows"]
