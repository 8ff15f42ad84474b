"""Float checkpoints to convert, read one tensor at a time.

A source lists its tensors up front (name, shape, dtype: cheap, from headers or
metadata) and reads one on demand, so conversion holds at most one float
tensor in memory. Kinds:
  * ``safetensors``: a file, or a directory of shards with or without a
    ``*.safetensors.index.json`` (HF layout).
  * ``gguf``: a GGUF file (any tensor type the ``gguf`` package decodes).
  * ``orbax``: an orbax checkpoint of (Flax) params, leaves restored one by one
    with orbax's partial restore.
Nothing here unpickles or executes code from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from itq3s_jax._src import safe_files
from itq3s_jax._src import safe_json
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import orbax_source
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import source_types


_MAX_INDEX = 64 << 20
TensorInfo = source_types.TensorInfo
Source = source_types.Source


def open_source(path: str) -> Source:
  """Opens a float checkpoint; CheckpointError if it is missing or malformed."""
  path = os.fspath(path)
  if not path or not os.path.exists(path):
    raise errors.CheckpointError(f"{path!r}: no such file or directory." if not path else
                                 f"{path}: no such file or directory.")
  if os.path.isdir(path):
    if _is_orbax(path):
      return _orbax(path)
    names = os.listdir(path)
    shards = sorted(f for f in names if f.endswith(".safetensors"))
    if shards or any(f.endswith(".safetensors.index.json") for f in names):
      return _safetensors_dir(path, shards)
    raise errors.CheckpointError(
        f"{path}: a directory with neither *.safetensors shards nor an orbax checkpoint.")
  try:
    size = safe_files.regular_size(path, "checkpoint file")
    with open(path, "rb") as f:
      head = f.read(9)
  except safe_files.Unreadable as exc:
    raise errors.CheckpointError(str(exc)) from None
  except OSError as exc:
    raise errors.CheckpointError(f"cannot read {path}: {exc.strerror or exc}.") from None
  if head[:4] == b"GGUF":
    return _gguf(path)
  if safetensors_file.looks_like(head, size) or not head.startswith((b"\x80", b"PK\x03\x04")):
    return _safetensors([path], path)
  raise errors.CheckpointError(
      f"{path}: looks like a pickle (torch .bin/.pt); pickles can execute code and "
      "are never loaded. Convert it to safetensors first.")


def sha256(files: tuple[str, ...], root: str) -> str:
  """SHA-256 of a single-file checkpoint's bytes (as ``sha256sum`` prints it), or over
  (relative path, NUL, content) of each file of a directory; read in 8 MiB pieces."""
  h = hashlib.sha256()
  for fname in sorted(files):
    try:
      safe_files.regular_size(fname, "checkpoint file")
    except safe_files.Unreadable as exc:
      raise errors.CheckpointError(str(exc)) from None
    if os.path.abspath(fname) != os.path.abspath(root):
      h.update(os.path.relpath(fname, root).encode() + b"\0")
    with open(fname, "rb") as f:
      while piece := f.read(8 << 20):
        h.update(piece)
  return h.hexdigest()


def _safetensors(files: list[str], root: str, only: dict[str, str] | None = None) -> Source:
  where: dict[str, tuple[str, safetensors_file.Entry]] = {}
  meta: dict = {}
  for fname in files:
    entries, m = safetensors_file.read_header(fname)
    meta.update(m)
    for e in entries:
      if only is not None and only.get(e.name) != os.path.basename(fname):
        continue
      if e.name in where:
        raise errors.CheckpointError(
            f"{root}: tensor {e.name!r} appears in both {where[e.name][0]} and {fname}.")
      where[e.name] = (fname, e)
  if only is not None:
    missing = sorted(set(only) - set(where))
    if missing:
      raise errors.CheckpointError(
          f"{root}: the index lists {len(missing)} tensors not found in their shards "
          f"(first: {missing[0]!r}); a shard is missing or truncated.")

  def read(name: str) -> np.ndarray:
    fname, entry = where[name]
    return safetensors_file.read_tensor(fname, entry)

  infos = tuple(TensorInfo(n, e.shape, e.dtype) for n, (_, e) in where.items())
  return Source("safetensors", root, tuple(files), infos, read, meta)


def _safetensors_dir(path: str, shards: list[str]) -> Source:
  index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
  if len(index) > 1:
    raise errors.CheckpointError(f"{path}: several index files {sorted(index)}; keep one.")
  if not index:
    return _safetensors([os.path.join(path, s) for s in shards], path)
  ipath = os.path.join(path, index[0])
  try:
    raw = safe_files.read_bounded(ipath, _MAX_INDEX, "index file")
    index_doc = safe_json.as_dict(safe_json.loads(raw, what=ipath, max_bytes=_MAX_INDEX), ipath)
    weight_map = safe_json.as_dict(index_doc.get("weight_map"), f"{ipath}: weight_map")
    for name, shard in weight_map.items():
      what = f"{ipath}: weight_map[{name!r}]"
      if safe_json.as_str(shard, what) in ("", ".", "..") or os.path.basename(shard) != shard \
          or not shard.endswith(".safetensors"):
        raise safe_json.Malformed(f"{what} is {shard!r}, not a *.safetensors file name in "
                                  "the index's directory.")
  except ValueError as exc:  # Unreadable or Malformed
    raise errors.CheckpointError(f"corrupt index: {exc}") from None
  used = sorted(set(weight_map.values()))
  for s in used:
    if not os.path.lexists(os.path.join(path, s)):
      raise errors.CheckpointError(f"{path}: shard {s!r} named in {index[0]} is missing.")
  src = _safetensors([os.path.join(path, s) for s in used], path, only=weight_map)
  return dataclasses.replace(src, files=src.files + (ipath,))


def _gguf(path: str) -> Source:
  from itq3s_jax._src import gguf_io  # pylint: disable=g-import-not-at-top
  try:
    f = gguf_io.TensorFile(path)
    infos = tuple(TensorInfo(n, f.shape(n), np.dtype(np.float32)) for n in f.names)
  except ValueError as exc:
    raise errors.CheckpointError(str(exc)) from None

  def read(name: str) -> np.ndarray:
    try:
      return f.read(name)
    except (NotImplementedError, ValueError) as exc:
      raise errors.CheckpointError(f"{path}: tensor {name!r}: {exc}") from None

  return Source("gguf", path, (path,), infos, read,
                gguf_metadata=lambda: gguf_io.read_metadata(path, typed=True))


def _is_orbax(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(
      os.path.join(path, "_CHECKPOINT_METADATA"))


def _orbax(path: str) -> Source:
  return orbax_source.open_orbax(path)
