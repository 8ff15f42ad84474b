"""What a conversion source is: its tensors' names, shapes and dtypes, and a reader."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a source.

  Attributes:
    name: flat name (safetensors/GGUF name; orbax keys joined with ``/``).
    shape: float shape as stored.
    dtype: numpy dtype as stored (GGUF block types report float32, their
      decoded dtype).
    k_axis: the contraction axis of a 2-D weight: -1 (PyTorch/HF ``(out,
      in)``, the library's convention) or 0 (Flax ``kernel`` ``(in, out)``,
      transposed before quantizing so the stored weight is ``(out, in)``).
  """

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  k_axis: int = -1


@dataclasses.dataclass(frozen=True)
class Source:
  """A readable checkpoint: ``tensors`` in read order, ``read(name)`` -> np.ndarray."""

  kind: str
  path: str
  files: tuple[str, ...]  # every file whose bytes define the checkpoint (hashed)
  tensors: tuple[TensorInfo, ...]
  read: Callable[[str], np.ndarray]
  metadata: dict = dataclasses.field(default_factory=dict)  # small, JSON-able
  gguf_metadata: Callable[[], dict] | None = None  # typed GGUF key/values of a GGUF source
