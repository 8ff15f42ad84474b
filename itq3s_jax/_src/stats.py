"""Calibration statistics on disk (.npz), and the default calibration tokens.

Statistics are {layer key: Sigma (K, K)}; layers fed the same activation share
one array object, written once. A file may also carry *tuned* parameters
({model state path: 1-D float32}, the norm gains ``itq3s calibrate --tune``
fitted to a quantized model) and a description of the codes they were fitted
to (format, seed, GPTQ options), which ``itq3s convert`` must reproduce to use
them; and those *codes* ({layer key: :class:`Codes`}), so that convert writes
them instead of running GPTQ a second time on the same statistics. Codes are
used only for the rows whose float weights they were computed from: each row
carries a digest of its float32 values, so a file calibrated on another model
(or other weights) falls back to GPTQ, row order (RoPE permutations between
GGUF and Hugging Face sources) does not matter, and rows are coded
independently, so a row's codes do not depend on the others. Nothing here
needs Flax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

CALIBRATION_SLICE = (16384, 24576)  # tokens of the protocol stream; eval uses [0, 8192)
# Norm tuning's tokens: the statistics' and the 16,384 after them, each seen once by the
# default 48 steps of one 512-token window. Chosen on the validation tokens (SmolLM2,
# benchmarks/calibration.py --slice val): 32 steps on 8,192 tokens (twice over) +0.92 ppl,
# on 16,384 +0.87; 48 on 24,576 +0.83; 64 on 32,768 +0.84 and 50 s more (over the
# two commands' 5 minutes). More statistics tokens made GPTQ worse: those stay 8,192.
TUNING_SLICE = (16384, 40960)
_FORMAT_KEY = "__itq3s_calibration__"
_TUNED_KEY = "__itq3s_tuned__"
_TUNED_FOR_KEY = "__itq3s_tuned_for__"
_CODES_KEY = "__itq3s_codes__"
DIGEST_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Codes:
  """The coded rows of one weight and the float rows they code.

  Attributes:
    format, seed: the format and sign-vector seed of the codes.
    gptq: the resolved GPTQ options that chose them (``GptqConfig.to_json()``).
    data: uint8 (N, row_nbytes), the codes of the rows of the (N, K) weight.
    digests: uint8 (N, DIGEST_BYTES), :func:`row_digests` of the float rows.
  """

  format: str
  seed: int
  gptq: dict
  data: np.ndarray
  digests: np.ndarray

  def rows_for(self, w: np.ndarray) -> np.ndarray | None:
    """int64 (N',): the row of ``data`` coding each row of float (N', K) ``w``.

    None when a row of ``w`` has no digest here.
    """
    where = {bytes(d): i for i, d in enumerate(self.digests)}
    idx = [where.get(bytes(d)) for d in row_digests(w)]
    return None if any(i is None for i in idx) else np.asarray(idx, np.int64)


def row_digests(w: np.ndarray) -> np.ndarray:
  """uint8 (N, DIGEST_BYTES): a BLAKE2b digest of each row of (N, K) weights as float32.

  float32 is what the encoder codes (every float16/bfloat16 value converts
  exactly), so a row digests the same whatever dtype it was stored in.
  """
  w = np.ascontiguousarray(np.asarray(w, np.float32).reshape(w.shape[0], -1))
  out = np.empty((w.shape[0], DIGEST_BYTES), np.uint8)
  for i, row in enumerate(w):
    out[i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=DIGEST_BYTES).digest(),
                           np.uint8)
  return out


def nbytes(stats: Mapping[str, np.ndarray]) -> int:
  """Bytes held by the distinct arrays of ``stats`` (shared arrays counted once)."""
  return sum(a.nbytes for a in {id(a): a for a in stats.values()}.values())


def save(path: str | os.PathLike[str], stats: Mapping[str, np.ndarray], *,
         dtype=np.float32, tuned: Mapping[str, np.ndarray] | None = None,
         tuned_for: Mapping[str, Any] | None = None,
         codes: Mapping[str, Codes] | None = None) -> None:
  """Writes ``stats`` to an .npz, each distinct array once, in ``dtype``.

  Args:
    path: the .npz to write.
    stats: {layer key: Sigma (K, K)}.
    dtype: storage dtype of the statistics.
    tuned: optional {model state path: float32 (n,)} parameters fitted with
      the codes described by ``tuned_for`` (required with ``tuned``: a JSON
      object such as ``{"format": "itq3_t", "seed": 0, "gptq": {...}}``).
    codes: optional {layer key: :class:`Codes`} computed from these statistics.

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
  if codes:
    rows = []
    for i, (p, c) in enumerate(codes.items()):
      data, dig = np.asarray(c.data, np.uint8), np.asarray(c.digests, np.uint8)
      if data.ndim != 2 or dig.shape != (data.shape[0], DIGEST_BYTES):
        raise ValueError(f"codes of {p!r}: data {data.shape} and digests {dig.shape} do not "
                         f"describe the same (N, row_nbytes) rows.")
      arrays[f"c{i}"], arrays[f"d{i}"] = data, dig
      about = json.dumps(dict(c.gptq), sort_keys=True)
      rows.append(f"{p}\t{c.format}\t{int(c.seed)}\t{about}\tc{i}\td{i}")
    arrays[_CODES_KEY] = np.array(rows)
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


def load_codes(path: str | os.PathLike[str]) -> dict[str, Codes]:
  """The coded weights of a statistics file ({} if none): {layer key: :class:`Codes`}.

  Raises:
    ValueError: unreadable file, or a codes index that is malformed or names
      arrays the file lacks.
  """
  name = os.fspath(path)
  index, table, arrays = _read(name, lambda f: _indexed(f, _CODES_KEY, columns=(4, 5)))
  if index is None:
    return {}
  out = {}
  for row in table:
    ok = (len(row) == 6 and row[2].isdigit() and row[4] in arrays and row[5] in arrays
          and arrays[row[4]].ndim == 2 and arrays[row[4]].dtype == np.uint8
          and arrays[row[5]].shape == (arrays[row[4]].shape[0], DIGEST_BYTES))
    try:
      gptq = json.loads(row[3]) if ok else None
    except ValueError:
      gptq = None
    if not isinstance(gptq, dict):
      raise ValueError(f"{name}: corrupt coded weights ({row[0]!r}).")
    out[row[0]] = Codes(row[1], int(row[2]), gptq, arrays[row[4]], arrays[row[5]])
  return out


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


def _indexed(f, key: str, columns: tuple[int, ...] = (-1,)):
  """(index or None, its rows split at tabs, the arrays the rows name that the file has).

  ``columns``: which fields of a row name arrays (the last one by default).
  """
  index = f[key] if key in f.files else None
  table = [] if index is None else [str(s).split("\t") for s in index]
  wanted = {row[c] for row in table for c in columns if -len(row) <= c < len(row)} & set(f.files)
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
