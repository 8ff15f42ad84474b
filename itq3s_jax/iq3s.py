"""The IQ3_S block codec (llama.cpp's 3.4375-bit type) and its encoder's grid search.

``iq3_s`` and ``itq3_s`` code each 256-block with this codec: ``iq3_s`` the
weights themselves, ``itq3_s`` their Walsh-Hadamard rotation (the coding
domain). :func:`encode` / :func:`decode` work on coding-domain blocks, without
the rotation; byte layout: docs/FORMAT.md.

The encoder picks, for each 4-group of magnitudes, the best of ``NCAND``
candidate points of the 512-entry grid (:func:`grid`) near the group's rounded
lattice point, instead of searching all 512; :func:`assign` is that search at
a given scale (benchmarks/iq3s_encoder.py compares it with the exhaustive one).

>>> from itq3s_jax import iq3s
>>> iq3s.grid().shape, iq3s.NBYTES
((512, 4), 110)
"""

from __future__ import annotations

import jax

from itq3s_jax._src.formats import iq3s as _iq3s
from itq3s_jax._src.formats.iq3s import NBYTES
from itq3s_jax._src.formats.iq3s import QK
from itq3s_jax._src.formats.iq3s import decode
from itq3s_jax._src.formats.iq3s import encode
from itq3s_jax._src.formats.iq3s_grid import NCAND
from itq3s_jax._src.formats.iq3s_grid import codes
from itq3s_jax._src.formats.iq3s_grid import grid
from itq3s_jax._src.formats.iq3s_grid import index_of_code

__all__ = [
    "NBYTES",
    "NCAND",
    "QK",
    "assign",
    "codes",
    "decode",
    "encode",
    "grid",
    "index_of_code",
]


def assign(xa: list[jax.Array], a: list[jax.Array], scale: jax.Array
           ) -> tuple[jax.Array, list[jax.Array]]:
  """The encoder's candidate search: best of NCAND grid points per 4-group at a fixed scale.

  Args:
    xa: magnitudes, 4 float32 (8, 8, N) arrays, one per coordinate of the group
      (sub-block, group within it, block).
    a: importance weights, same form as ``xa``.
    scale: float32 (8, N) effective sub-block scales (> 0).

  Returns:
    (lattice code int32 (8, 8, N) of the chosen grid points, whose grid index
    is ``index_of_code()[code]``; their magnitudes as 4 float32 (8, 8, N) arrays).
  """
  return _iq3s._assign(xa, a, scale)  # pylint: disable=protected-access
