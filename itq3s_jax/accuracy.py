"""The accuracy protocol of ``itq3s accuracy``: rel-MSE, bpw and bound checks per format.

Every format quantizes each test tensor of :mod:`itq3s_jax.testing` (no
importance weights); :func:`measure` returns one :class:`Result` per format x
tensor and one :class:`FormatSummary` per format, :func:`render` prints the
command's table and :func:`to_json` its ``--json`` form. :func:`add_arguments`
and :func:`parse_common` are the command's options, for scripts that extend it
(benchmarks/accuracy.py). Importing this module does not import Flax.

>>> from itq3s_jax import accuracy
>>> accuracy.row_bpw("itq3_t", 256) > 3
True
"""

from __future__ import annotations

import numpy as np

from itq3s_jax._src.commands import accuracy as _accuracy
from itq3s_jax._src.commands.accuracy import FormatSummary
from itq3s_jax._src.commands.accuracy import Result
from itq3s_jax._src.commands.accuracy import add_arguments
from itq3s_jax._src.commands.accuracy import measure
from itq3s_jax._src.commands.accuracy import missing_note
from itq3s_jax._src.commands.accuracy import parse_common
from itq3s_jax._src.commands.accuracy import render
from itq3s_jax._src.commands.accuracy import row_bpw
from itq3s_jax._src.commands.accuracy import to_json

__all__ = [
    "FormatSummary",
    "Result",
    "add_arguments",
    "code_blocks",
    "measure",
    "missing_note",
    "parse_common",
    "render",
    "row_bpw",
    "to_json",
]


def code_blocks(blocks: np.ndarray, format: str, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Quantizes and dequantizes 256-blocks as :func:`measure` does, with their error bounds.

  Args:
    blocks: float (..., K) weights, K a multiple of 256; each 256 consecutive
      values of a row are one block.
    format: a registered format name.
    seed: sign-vector seed.

  Returns:
    (w_hat float32 (B, 256), eps_q float32 (B,), eps_q plus float32 slack
    float32 (B,)) for the B blocks in row-major order; the bounds are None for
    a format without a certified bound (``itq3s_jax.has_bound``).

  Raises:
    ValueError: K is not a multiple of 256.
  """
  b = _accuracy._as_blocks(blocks)  # pylint: disable=protected-access
  chunk = _accuracy._chunk_blocks([b.shape[0]])  # pylint: disable=protected-access
  return tuple(_accuracy._code_blocks(b, format, seed, chunk))  # pylint: disable=protected-access
