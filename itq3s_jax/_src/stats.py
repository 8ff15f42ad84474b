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

  Returns:
    {layer key: float32 Sigma (K, K)}.

  Raises:
    ValueError: the file is missing, not a zip/npz, damaged, not a calibration
      file, or its index names an array it lacks (the message names the file).
  """
  name = os.fspath(path)
  try:
    # Our own handle: np.load leaks the one it opens when the zip is damaged.
    with open(name, "rb") as fh, np.load(fh, allow_pickle=False) as f:
      files = set(f.files)
      index = f[_FORMAT_KEY] if _FORMAT_KEY in files else None
      table = [] if index is None else [str(s).split("\t") for s in index]
      wanted = {row[-1] for row in table} & files
      arrays = {k: f[k] for k in wanted}
  except FileNotFoundError:
    raise ValueError(f"{name}: no such calibration file.") from None
  except Exception as exc:  # zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError
    raise ValueError(f"{name}: not a readable calibration .npz ({type(exc).__name__}: "
                     f"{exc}).") from None
  if index is None:
    raise ValueError(f"{name} is not an itq3s calibration file (no index); "
                     "write it with itq3s_jax.calibration.save().")
  if not all(len(row) == 2 for row in table):
    raise ValueError(f"{name}: corrupt calibration index.")
  missing = sorted({k for _, k in table} - set(arrays))
  if missing:
    raise ValueError(f"{name}: the index names arrays the file lacks ({missing[:3]}); "
                     "the file is truncated or was edited.")
  bad = [k for k, a in arrays.items() if a.ndim != 2 or a.shape[0] != a.shape[1]]
  if bad:
    raise ValueError(f"{name}: statistics {bad[:3]} are not square (K, K) matrices.")
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
