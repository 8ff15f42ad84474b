"""Calibration statistics on disk (.npz), and the default calibration tokens.

Statistics are {layer key: Sigma (K, K)}; layers fed the same activation share
one array object, written once. Nothing here needs Flax.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

CALIBRATION_SLICE = (16384, 24576)  # tokens of the protocol stream; eval uses [0, 8192)
_FORMAT_KEY = "__itq3s_calibration__"


def nbytes(stats: Mapping[str, np.ndarray]) -> int:
  """Bytes held by the distinct arrays of ``stats`` (shared arrays counted once)."""
  return sum(a.nbytes for a in {id(a): a for a in stats.values()}.values())


def save(path: str | os.PathLike[str], stats: Mapping[str, np.ndarray], *,
         dtype=np.float32) -> None:
  """Writes ``stats`` to an .npz, each distinct array once, in ``dtype``.

  Written to ``path + ".tmp"`` then renamed, so a crash leaves no partial file.
  """
  arrays, names, index = {}, [], {}
  for p, a in stats.items():
    key = index.setdefault(id(a), f"s{len(index)}")
    if key not in arrays:
      arrays[key] = np.asarray(a, dtype)
    names.append((p, key))
  arrays[_FORMAT_KEY] = np.array([f"{p}\t{k}" for p, k in names])
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads statistics written by :func:`save`; shared arrays stay shared.

  Raises:
    ValueError: the file is not a calibration .npz.
  """
  with np.load(path, allow_pickle=False) as f:
    if _FORMAT_KEY not in f.files:
      raise ValueError(f"{os.fspath(path)} is not an itq3s calibration file (no index); "
                       "write it with itq3s_jax.calibration.save().")
    table = [str(s).split("\t") for s in f[_FORMAT_KEY]]
    arrays = {k: f[k] for k in {k for _, k in table}}
  return {p: arrays[k] for p, k in table}


def protocol_tokens(tokenizer, start: int = CALIBRATION_SLICE[0],
                    stop: int = CALIBRATION_SLICE[1]) -> np.ndarray:
  """Token ids [start, stop) of the perplexity protocol's text (default: disjoint from eval).

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (e.g. from ``llama.load_gguf``), no BOS added.
    start, stop: token range; the protocol scores [0, 8192).

  Returns:
    int32 (stop - start,).
  """
  from itq3s_jax import evaluation  # pylint: disable=g-import-not-at-top (imports flax)
  ids = np.asarray(tokenizer.encode(evaluation.protocol_text(), add_special_tokens=False).ids,
                   np.int32)
  if len(ids) < stop:
    raise ValueError(f"the protocol text has {len(ids)} tokens, fewer than {stop=}.")
  return ids[start:stop]
