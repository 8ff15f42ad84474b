"""Calibration statistics on disk (.npz), and the default calibration tokens.

Statistics are {layer key: Sigma (K, K)}; layers fed the same activation share
one array object, written once. A file may also carry *tuned* parameters
({model state path: 1-D float32}, the norm gains ``itq3s calibrate --tune``
fitted to a quantized model) and a description of the codes they were fitted
to (format, seed, GPTQ options), which ``itq3s convert`` must reproduce to use
them. Nothing here needs Flax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

CALIBRATION_SLICE = (16384, 24576)  # tokens of the protocol stream; eval uses [0, 8192)
_FORMAT_KEY = "__itq3s_calibration__"
_TUNED_KEY = "__itq3s_tuned__"
_TUNED_FOR_KEY = "__itq3s_tuned_for__"


def nbytes(stats: Mapping[str, np.ndarray]) -> int:
  """Bytes held by the distinct arrays of ``stats`` (shared arrays counted once)."""
  return sum(a.nbytes for a in {id(a): a for a in stats.values()}.values())


def save(path: str | os.PathLike[str], stats: Mapping[str, np.ndarray], *,
         dtype=np.float32, tuned: Mapping[str, np.ndarray] | None = None,
         tuned_for: Mapping[str, Any] | None = None) -> None:
  """Writes ``stats`` to an .npz, each distinct array once, in ``dtype``.

  Args:
    path: the .npz to write.
    stats: {layer key: Sigma (K, K)}.
    dtype: storage dtype of the statistics.
    tuned: optional {model state path: float32 (n,)} parameters fitted with
      the codes described by ``tuned_for`` (required with ``tuned``: a JSON
      object such as ``{"format": "itq3_t", "seed": 0, "gptq": {...}}``).

  Written to ``path + ".tmp"`` then renamed, so a crash leaves no partial file.
  """
  arrays, names, index = {}, [], {}
  for p, a in stats.items():
    key = index.setdefault(id(a), f"s{len(index)}")
    if key not in arrays:
      arrays[key] = np.asarray(a, dtype)
    names.append((p, key))
  arrays[_FORMAT_KEY] = np.array([f"{p}\t{k}" for p, k in names])
  if tuned:
    if tuned_for is None:
      raise ValueError("tuned parameters need tuned_for: the codes they were fitted to.")
    rows = []
    for i, (p, a) in enumerate(tuned.items()):
      a = np.asarray(a, np.float32)
      if a.ndim != 1:
        raise ValueError(f"tuned parameter {p!r} has shape {a.shape}; only 1-D ones are kept.")
      arrays[f"t{i}"] = a
      rows.append(f"{p}\tt{i}")
    arrays[_TUNED_KEY] = np.array(rows)
    arrays[_TUNED_FOR_KEY] = np.array(json.dumps(dict(tuned_for), sort_keys=True))
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
  index, table, arrays = _read(name, lambda f: _indexed(f, _FORMAT_KEY))
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


def load_tuned(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict | None]:
  """The tuned parameters of a statistics file and the codes they fit: ({}, None) if none.

  Returns:
    ({model state path: float32 (n,)}, {"format", "seed", "gptq"} or None).

  Raises:
    ValueError: unreadable file, or a tuned index naming arrays the file lacks.
  """
  name = os.fspath(path)
  index, table, arrays, about = _read(name, lambda f: (
      *_indexed(f, _TUNED_KEY), str(f[_TUNED_FOR_KEY]) if _TUNED_FOR_KEY in f.files else None))
  if index is None:
    return {}, None
  try:
    tuned_for = json.loads(about) if about is not None else None
  except ValueError:
    tuned_for = None
  if (not isinstance(tuned_for, dict) or not all(len(row) == 2 for row in table)
      or {k for _, k in table} - set(arrays) or any(a.ndim != 1 for a in arrays.values())):
    raise ValueError(f"{name}: corrupt tuned parameters.")
  return {p: np.asarray(arrays[k], np.float32) for p, k in table}, tuned_for


def _read(name: str, fn):
  """``fn(the opened .npz)``, every error of the file one ValueError that names it."""
  try:
    # Our own handle: np.load leaks the one it opens when the zip is damaged.
    with open(name, "rb") as fh, np.load(fh, allow_pickle=False) as f:
      return fn(f)
  except FileNotFoundError:
    raise ValueError(f"{name}: no such calibration file.") from None
  except Exception as exc:  # zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError
    raise ValueError(f"{name}: not a readable calibration .npz ({type(exc).__name__}: "
                     f"{exc}).") from None


def _indexed(f, key: str):
  """(index or None, its rows split at tabs, the arrays the rows name that the file has)."""
  index = f[key] if key in f.files else None
  table = [] if index is None else [str(s).split("\t") for s in index]
  wanted = {row[-1] for row in table} & set(f.files)
  return index, table, {k: f[k] for k in wanted}


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
