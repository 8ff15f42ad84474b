"""Safetensors read without ``safetensors``' mmap: the header parsed and checked
here, then one tensor at a time read with ``readinto`` into its own buffer.

Why not ``safe_open``: its mmap keeps every touched page of the file resident
(RSS grows with the file, not with the tensor), and its errors are Rust panics
with messages that do not say how to fix the file. The format is tiny: an
8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data (offsets relative to the end of the header).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import ml_dtypes
import numpy as np

from itq3s_jax._src import safe_files
from itq3s_jax._src import safe_json
from itq3s_jax.checkpoint import errors

# Safetensors dtype codes we can read; anything else is refused by name.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  begin: int  # absolute byte offset in the file
  end: int


def looks_like(head: bytes, size: int) -> bool:
  """Whether the first bytes of a file of ``size`` bytes start a safetensors file: a
  header length that fits the file, then ``{``. (Any first byte is possible: a header
  length whose low byte is 0x80 is valid, so a pickle sniff must not look at it.)"""
  return (len(head) >= 9 and struct.unpack("<Q", head[:8])[0] <= size - 8
          and head[8:9] == b"{")


def read_header(path: str) -> tuple[list[Entry], dict[str, str]]:
  """Parses and checks a safetensors header.

  Returns:
    (entries sorted by offset, ``__metadata__``).

  Raises:
    CheckpointError: missing, non-regular or truncated file, corrupt header
      (not JSON, too deep, a field of the wrong type), unsupported dtype, or a
      tensor whose bytes lie outside the file or overlap another.
  """
  try:
    size = safe_files.regular_size(path, "safetensors file")
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise errors.CheckpointError(f"{path}: truncated safetensors file ({size} bytes).")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise errors.CheckpointError(
            f"{path}: corrupt safetensors header (declares {n} header bytes, file has "
            f"{size}); the file is truncated or not safetensors.")
      raw = f.read(n)
  except safe_files.Unreadable as exc:
    raise errors.CheckpointError(str(exc)) from None
  except OSError as exc:
    raise errors.CheckpointError(f"cannot read {path}: {exc.strerror or exc}.") from None
  try:
    header = safe_json.as_dict(
        safe_json.loads(raw, what=f"{path}: safetensors header", max_bytes=_MAX_HEADER),
        f"{path}: safetensors header")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else safe_json.as_dict(meta, f"{path}: __metadata__")
    for key, value in meta.items():
      safe_json.as_str(value, f"{path}: __metadata__[{key!r}]")
    data_start, data_size = 8 + n, size - 8 - n
    entries = [_entry(path, name, spec, data_start, data_size)
               for name, spec in header.items()]
  except safe_json.Malformed as exc:
    raise errors.CheckpointError(f"corrupt safetensors header: {exc}") from None
  entries.sort(key=lambda e: e.begin)
  for a, b in zip(entries, entries[1:]):
    if b.begin < a.end:
      raise errors.CheckpointError(f"{path}: tensors {a.name!r} and {b.name!r} overlap.")
  return entries, meta


def _entry(path: str, name: str, spec, data_start: int, data_size: int) -> Entry:
  what = f"{path}: tensor {name!r}"
  spec = safe_json.as_dict(spec, what)
  dtype_code = safe_json.as_str(spec.get("dtype"), f"{what} dtype")
  shape = safe_json.as_shape(spec.get("shape"), f"{what} shape")
  offsets = safe_json.as_list(spec.get("data_offsets"), f"{what} data_offsets")
  if len(offsets) != 2:
    raise safe_json.Malformed(f"{what} data_offsets must be [begin, end].")
  begin, end = (safe_json.as_int(o, f"{what} data_offsets[{i}]") for i, o in enumerate(offsets))
  if dtype_code not in DTYPES:
    raise errors.CheckpointError(
        f"{path}: tensor {name!r} has unsupported dtype {dtype_code}; supported: "
        f"{', '.join(DTYPES)}. Convert it to one of these first.")
  dtype = DTYPES[dtype_code]
  if not begin <= end:
    raise errors.CheckpointError(f"{path}: corrupt offsets [{begin}, {end}] for tensor "
                                 f"{name!r}.")
  if end - begin != math.prod(shape) * dtype.itemsize:
    raise errors.CheckpointError(
        f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} of "
        f"{dtype_code} needs {math.prod(shape) * dtype.itemsize}; the header is corrupt.")
  if end > data_size:
    raise errors.CheckpointError(
        f"{path}: truncated file: tensor {name!r} needs bytes up to {data_start + end}, "
        f"the file has {data_start + data_size}.")
  return Entry(name, shape, dtype, data_start + begin, data_start + end)


def read_tensor(path: str, entry: Entry) -> np.ndarray:
  """Reads one tensor into a fresh array (entry.shape, entry.dtype); no mmap, no pickle."""
  out = np.empty(entry.shape, entry.dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  try:
    with open(path, "rb") as f:
      f.seek(entry.begin)
      got = f.readinto(buf) if len(buf) else 0
  except OSError as exc:
    raise errors.CheckpointError(f"cannot read {path}: {exc.strerror or exc}.") from None
  if got != len(buf):
    raise errors.CheckpointError(
        f"{path}: truncated file while reading tensor {entry.name!r}.")
  return out


def write(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          produce, metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file streaming, one tensor in memory at a time.

  Args:
    path: output file.
    specs: {name: (shape, numpy dtype)} in file order (dtypes from ``DTYPES``).
    produce: name -> array of that shape and dtype, called once per tensor.
    metadata: optional ``__metadata__`` strings.
  """
  codes = {v: k for k, v in DTYPES.items()}
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = metadata
  for name, (shape, dtype) in specs.items():
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": codes[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name, (shape, dtype) in specs.items():
      arr = np.ascontiguousarray(produce(name), dtype=dtype)
      if arr.shape != tuple(shape):
        raise ValueError(f"produce({name!r}) gave shape {arr.shape}, expected {shape}.")
      f.write(arr.reshape(-1).view(np.uint8).data)
