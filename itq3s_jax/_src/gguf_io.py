"""GGUF files in and out, through the ``gguf`` package (no hand-written parser).

Reading streams one tensor at a time from a memory map: ``read_tensors`` yields
float32 arrays in each tensor's logical numpy shape (GGUF stores dimensions
innermost first; numpy order is the reverse), for every type ``gguf`` can
dequantize. ``read_quantized`` returns ``iq3_s`` / ``itq3_s`` tensors as
:class:`QuantizedTensor` without decoding, ``write_gguf`` writes them.

GGML type 41. The published ITQ3_S (``edwardyoon/llama.cpp``) uses id 41 for
110-byte IQ3_S blocks of rotated weights; upstream ggml (and ``gguf`` 0.19)
later gave 41 to ``Q1_0`` (18 bytes per 128 weights), so upstream llama.cpp
rejects such a file and the fork's CPU backend has no ITQ3_S matmul. Writing
type 41 therefore needs ``allow_type41=True`` (a warning says why), and the
file then carries ``itq3s_jax.type41 = "itq3_s"``. Reading (``type41="auto"``)
takes a type-41 tensor as ITQ3_S only when the file's metadata says where it
came from: this library (``itq3s_jax.*`` keys) or the ITQ3_S fork
(``general.file_type`` 40, the fork's ``MOSTLY_ITQ3_S``), and the file holds
room for 110/256 bytes per weight (the two sizes differ by 3x, far beyond
alignment padding). Any other type-41 tensor is upstream's Q1_0, which reading
refuses with a clear error; ``type41="itq3_s" | "q1_0"`` forces one reading.
ITQ3_S tensors are written with id 41 and their shape in elements, which is
what the fork's llama.cpp reads; we bypass gguf's byte-shape conversion, whose
table maps 41 to Q1_0.

Types. Quantized tensors of a registered format with a GGML type (``iq3_s`` 21,
``iq4_nl`` 20, ``itq3_s`` 41) are written and read as :class:`QuantizedTensor`;
:class:`RawTensor` carries the stored bytes of any other GGML type (e.g. a
source's Q8_0 embedding copied unchanged, or BF16).

Checksums. ``write_gguf(..., checksums=True)`` (what ``itq3s convert`` writes)
stores ``itq3s_jax.sha256.<tensor name>``: SHA-256 over the tensor's kind
(format name, or numpy dtype of the stored array: ``uint8`` for block types),
logical shape and stored bytes (:func:`tensor_digest`). The readers verify
every tensor that has one, and a file that says it was written with them
(``itq3s_jax.format_version`` >= 2) must have one for every tensor; other GGUF
files (llama.cpp's) have none.

Shapes. A tensor is written in its logical shape, which llama.cpp requires:
a row length K that is not a multiple of the type's block (256 for IQ3_S) is
refused, never padded. Files of earlier versions of this library stored
zero-padded rows with the true K in ``itq3s_jax.k.<tensor name>``; the readers
still crop those back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import warnings
from typing import Any, Iterator, Literal, Mapping

import gguf
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src import codec
from itq3s_jax._src import safe_files
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry

GGMLType = gguf.GGMLQuantizationType
ITQ3_S_TYPE = 41
FORK_ITQ3_S_FILE_TYPE = 40  # LLAMA_FTYPE_MOSTLY_ITQ3_S in the fork (upstream: MOSTLY_Q1_0)
TYPE41_KEY = "itq3s_jax.type41"
TYPE41_WARNING = (
    "writing GGML type 41 (ITQ3_S): upstream llama.cpp reads type 41 as Q1_0 and refuses "
    "the file, and the ITQ3_S fork has no CPU matmul for it (only its CUDA build runs "
    "it); write --format iq3_s for a file every llama.cpp runs.")
_K_KEY = "itq3s_jax.k."
_IQ3S_BLOCK = (256, 110)  # weights, bytes
_SHA_KEY = "itq3s_jax.sha256."
_OUR_PREFIX = "itq3s_jax."
_VERSION_KEY = "itq3s_jax.format_version"
CHECKSUM_VERSION = 2  # itq3s_jax.format_version from which every tensor has a checksum
_INTERNAL_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
# What gguf's parser raises on malformed bytes (it indexes, unpacks and decodes blindly).
_PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
                 RecursionError, AttributeError)
Type41 = Literal["auto", "itq3_s", "q1_0"]
_RAW_TYPES = (GGMLType.F16, GGMLType.F32, GGMLType.F64, GGMLType.I8, GGMLType.I16,
              GGMLType.I32, GGMLType.I64)


@dataclasses.dataclass(frozen=True)
class RawTensor:
  """The stored bytes of a GGML tensor of any type, in its logical numpy shape.

  Attributes:
    ggml_type: GGML type id (e.g. 8 for Q8_0, 30 for BF16).
    shape: logical numpy shape (..., K); K a multiple of the type's block size.
    data: uint8 bytes, ``prod(shape) / block * type_size`` of them.
  """

  ggml_type: int
  shape: tuple[int, ...]
  data: np.ndarray

  def __post_init__(self):
    block, size = gguf.GGML_QUANT_SIZES[GGMLType(self.ggml_type)]
    n = math.prod(self.shape)
    if (self.shape and self.shape[-1] % block) or self.data.size * block != n * size:
      raise ValueError(f"{GGMLType(self.ggml_type).name} {list(self.shape)}: needs rows of "
                       f"whole {block}-blocks and {n * size // block} bytes, got "
                       f"{self.data.size}.")

  @property
  def type_name(self) -> str:
    return GGMLType(self.ggml_type).name


def _format_by_type() -> dict[int, str]:
  """GGML type -> registered format name (type 41 is decided per file)."""
  out = {}
  for name in registry.format_names():
    t = registry.get_format(name).gguf_type
    if t is not None and t != ITQ3_S_TYPE:
      out[t] = name
  return out


def block_size(format_or_type: str | int) -> int:
  """Weights per GGML block of a registered format or a GGML type id."""
  t = format_or_type
  if isinstance(t, str):
    t = registry.get_format(t).gguf_type
    if t == ITQ3_S_TYPE:
      return _IQ3S_BLOCK[0]
  return gguf.GGML_QUANT_SIZES[GGMLType(t)][0]


class _Reader(gguf.GGUFReader):
  """GGUFReader that reads type 41 as ITQ3_S where the file says so (module docstring)."""

  def __init__(self, path: str, type41: Type41):
    self._type41 = type41
    self.path = path
    self.itq3s_names: set[str] = set()
    self.q1_0_names: set[str] = set()
    super().__init__(path, mode="r")

  def _says_itq3s(self) -> bool:
    if any(k.startswith(_OUR_PREFIX) for k in self.fields):
      return True
    ftype = self.fields.get("general.file_type")
    try:
      return ftype is not None and int(ftype.contents()) == FORK_ITQ3_S_FILE_TYPE
    except (TypeError, ValueError):
      return False

  def _is_itq3s(self, field, start_offs: int, ends: list[int]) -> bool:
    if self._type41 != "auto":
      return self._type41 == "itq3_s"
    dims = field.parts[3]
    need = math.prod(int(d) for d in dims) * _IQ3S_BLOCK[1] // _IQ3S_BLOCK[0]
    off = start_offs + int(field.parts[5][0])
    room = min([e for e in ends if e > off], default=len(self.data)) - off
    return int(dims[0]) % _IQ3S_BLOCK[0] == 0 and room >= need and self._says_itq3s()

  def _build_tensors(self, start_offs: int, fields: list) -> None:
    ends = sorted({start_offs + int(f.parts[5][0]) for f in fields} | {len(self.data)})
    patched = []
    for field in fields:
      if int(field.parts[4][0]) == ITQ3_S_TYPE:
        name = str(bytes(field.parts[1]), encoding="utf-8")
        if self._is_itq3s(field, start_offs, ends):
          parts = list(field.parts)
          parts[4] = np.array([int(GGMLType.IQ3_S)], np.uint32)
          field = field._replace(parts=parts)
          self.itq3s_names.add(name)
        else:
          self.q1_0_names.add(name)
      patched.append(field)
    super()._build_tensors(start_offs, patched)


def _open(path: str | os.PathLike, type41: Type41 = "auto") -> _Reader:
  """Opens a GGUF file; ValueError (with the path) on anything unreadable."""
  if type41 not in ("auto", "itq3_s", "q1_0"):
    raise ValueError(f"type41 must be 'auto', 'itq3_s' or 'q1_0', got {type41!r}.")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such GGUF file.")
  size = safe_files.regular_size(path, "GGUF file")
  if size < 24:  # magic, version, two counts
    raise ValueError(f"{path}: not a GGUF file (only {size} bytes).")
  try:
    reader = _Reader(path, type41)
  except _PARSE_ERRORS as exc:
    raise ValueError(f"{path}: not a valid GGUF file or truncated ({type(exc).__name__}: "
                     f"{str(exc)[:200]}).") from None
  size = len(reader.data)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes "
                       f"[{t.data_offset}, {t.data_offset + t.n_bytes}) but the file "
                       f"has {size}.")
  return reader


def _logical_shape(reader: _Reader, t) -> tuple[int, ...]:
  shape = tuple(int(d) for d in reversed(t.shape.tolist()))
  k = reader.get_field(_K_KEY + t.name)
  if k is None:
    return shape
  k = k.contents()
  if type(k) is not int or not shape or not 0 <= k <= shape[-1]:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f"{reader.path}: key {_K_KEY + t.name} is {k!r}, not a row length "
                     f"within the stored {shape[-1] if shape else 0}.")
  return (*shape[:-1], k)


def tensor_digest(kind: str, shape: tuple[int, ...], data: np.ndarray) -> str:
  """SHA-256 over a tensor's kind (format or dtype name), logical shape and stored bytes."""
  h = hashlib.sha256(f"{kind}{list(shape)}".encode())
  h.update(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
  return h.hexdigest()


def _kind(reader: _Reader, t) -> str:
  return _format_of(reader, t) or np.dtype(t.data.dtype).name


def _verify(reader: _Reader, t) -> None:
  """ValueError if the tensor's checksum key (or, where the file promises one, its
  absence) says the stored bytes are not those written."""
  field = reader.get_field(_SHA_KEY + t.name)
  version = reader.get_field(_VERSION_KEY)
  if field is None:
    promised = version is not None and isinstance(version.contents(), int) and \
        version.contents() >= CHECKSUM_VERSION
    if promised:
      raise ValueError(f"{reader.path}: tensor {t.name!r} has no checksum key "
                       f"{_SHA_KEY + t.name} although the file was written with them.")
    return
  if field.contents() != tensor_digest(_kind(reader, t), _logical_shape(reader, t), t.data):
    raise ValueError(f"{reader.path}: tensor {t.name!r} is damaged: its bytes, type or "
                     "shape do not match the sha256 recorded when it was written.")


def _format_of(reader: _Reader, t) -> str | None:
  if t.name in reader.itq3s_names:
    return "itq3_s"
  return _format_by_type().get(int(t.tensor_type))


def _refuse_q1_0(reader: _Reader, t) -> None:
  if t.name in reader.q1_0_names:
    raise NotImplementedError(
        f"{reader.path}: tensor {t.name!r} has GGML type 41, which upstream ggml calls Q1_0 "
        "(not decodable here); the file's metadata does not say it is ITQ3_S (written by "
        "itq3s_jax, or general.file_type 40 of the ITQ3_S fork, with 110 bytes per 256 "
        "weights). Pass type41='itq3_s' if you know it is.")


def _quantized(reader: _Reader, t, fmt: str) -> qtensor.QuantizedTensor:
  shape = _logical_shape(reader, t)
  want = qtensor.row_nbytes(fmt, shape[-1])
  if t.data.size != math.prod(shape[:-1]) * want:
    raise ValueError(f"{reader.path}: tensor {t.name!r} holds {t.data.size} bytes; {fmt} "
                     f"{list(shape)} needs {math.prod(shape[:-1]) * want}.")
  data = np.array(t.data, np.uint8).reshape(*shape[:-1], want)
  try:
    return qtensor.check_values(qtensor.QuantizedTensor(data=jnp.asarray(data), format=fmt,
                                                        k=shape[-1]))
  except ValueError as exc:
    raise ValueError(f"{reader.path}: tensor {t.name!r}: {exc}") from None


def _to_float32(reader: _Reader, t) -> np.ndarray:
  fmt = _format_of(reader, t)
  if fmt is not None:
    return np.asarray(codec.dequantize(_quantized(reader, t, fmt)))
  _refuse_q1_0(reader, t)
  shape = _logical_shape(reader, t)
  if t.tensor_type in (GGMLType.F64, GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64):
    return np.asarray(t.data, np.float32).reshape(shape)
  try:
    out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  except NotImplementedError:
    raise NotImplementedError(
        f"tensor {t.name!r} has GGML type {t.tensor_type.name}, which the installed "
        "gguf package cannot dequantize; upgrade gguf or convert the file with "
        "llama.cpp.") from None
  n = math.prod(int(d) for d in t.shape.tolist())
  full = tuple(int(d) for d in reversed(t.shape.tolist()))
  return np.asarray(out, np.float32).reshape(full)[..., :shape[-1]].reshape(shape) \
      if n else np.zeros(shape, np.float32)


class TensorFile:
  """An open GGUF file: names and shapes without decoding, tensors by name.

  The file is memory-mapped; nothing is decoded until :meth:`read` or
  :meth:`read_quantized` asks for one tensor.

  Raises (constructor):
    ValueError: missing, non-GGUF or truncated file, or a bad ``type41``.
  """

  def __init__(self, path: str | os.PathLike, *, type41: Type41 = "auto"):
    self.path = os.fspath(path)
    self._reader = _open(path, type41)
    self._by_name = {t.name: t for t in self._reader.tensors}
    if len(self._by_name) != len(self._reader.tensors):
      raise ValueError(f"{self.path}: two tensors have the same name.")
    summed = {k[len(_SHA_KEY):] for k in self._reader.fields if k.startswith(_SHA_KEY)}
    if summed - set(self._by_name):  # a tensor count or table that lost tensors
      raise ValueError(f"{self.path}: the file has checksums of {len(summed)} tensors but "
                       f"holds {len(self._by_name)} (first missing: "
                       f"{sorted(summed - set(self._by_name))[0]!r}); it is damaged.")

  @property
  def names(self) -> tuple[str, ...]:
    """Tensor names in file order."""
    return tuple(self._by_name)

  def _get(self, name: str):
    try:
      return self._by_name[name]
    except KeyError:
      raise ValueError(f"{self.path}: no tensor named {name!r}.") from None

  def shape(self, name: str) -> tuple[int, ...]:
    """Logical numpy shape of a tensor (GGUF dims reversed, padding cropped)."""
    return _logical_shape(self._reader, self._get(name))

  def format(self, name: str) -> str | None:
    """The registered format of a tensor (``iq3_s``, ``iq4_nl``, ``itq3_s``), else None."""
    return _format_of(self._reader, self._get(name))

  def ggml_type(self, name: str) -> int:
    """The GGML type id stored for a tensor (41 for ITQ3_S)."""
    t = self._get(name)
    return ITQ3_S_TYPE if t.name in self._reader.itq3s_names else int(t.tensor_type)

  def read(self, name: str) -> np.ndarray:
    """One tensor decoded to float32 in its logical shape (its checksum verified)."""
    t = self._get(name)
    _verify(self._reader, t)
    return _to_float32(self._reader, t)

  def read_quantized(self, name: str) -> qtensor.QuantizedTensor | np.ndarray:
    """One tensor as :func:`read_quantized` returns it (its checksum verified)."""
    t = self._get(name)
    _verify(self._reader, t)
    fmt = _format_of(self._reader, t)
    if fmt is not None:
      return _quantized(self._reader, t, fmt)
    if t.tensor_type in _RAW_TYPES:
      return np.array(t.data).reshape(_logical_shape(self._reader, t))
    return _to_float32(self._reader, t)

  def read_raw(self, name: str) -> qtensor.QuantizedTensor | np.ndarray | RawTensor:
    """One tensor exactly as stored (its checksum verified), for copying it unchanged.

    Returns a QuantizedTensor for registered formats, a numpy array of the
    stored dtype for F16/F32/F64/integer types, else a :class:`RawTensor`.
    """
    t = self._get(name)
    if _format_of(self._reader, t) is not None or t.tensor_type in _RAW_TYPES:
      return self.read_quantized(name)
    _verify(self._reader, t)
    _refuse_q1_0(self._reader, t)
    shape = _logical_shape(self._reader, t)
    if shape != tuple(int(d) for d in reversed(t.shape.tolist())):
      raise ValueError(f"{self.path}: tensor {t.name!r} is stored padded; it has no raw form.")
    return RawTensor(int(t.tensor_type), shape, np.array(t.data, np.uint8).reshape(-1))


def read_tensors(path: str | os.PathLike, *, type41: Type41 = "auto"
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Streams the tensors of a GGUF file as float32 arrays, one at a time.

  Args:
    path: a GGUF file.
    type41: how to read GGML type 41 (module docstring).

  Yields:
    (name, float32 array in the tensor's numpy shape (GGUF dims reversed)).

  Raises:
    ValueError: missing, non-GGUF or truncated file (raised at the first
      ``next``).
    NotImplementedError: a tensor type gguf cannot dequantize (or upstream Q1_0).
  """
  f = TensorFile(path, type41=type41)
  for name in f.names:
    yield name, f.read(name)


def read_metadata(path: str | os.PathLike, *, typed: bool = False) -> dict[str, Any]:
  """Key/value fields of a GGUF file as plain Python values.

  Args:
    path: a GGUF file.
    typed: return ``(value, GGUFValueType, sub_type or None)`` triples instead of
      values, so that :func:`write_gguf` can write the same types back.

  Returns:
    {key: value}: str, int, float, bool, or a list of those (e.g.
    ``tokenizer.ggml.tokens``). The reader's pseudo-keys ``GGUF.*`` are left out.

  Raises:
    ValueError: missing, non-GGUF or truncated file.
  """
  reader = _open(path)
  out = {}
  for key, field in reader.fields.items():
    if key in _INTERNAL_KEYS:
      continue
    value = field.contents()
    if typed:
      arr = field.types[0] == gguf.GGUFValueType.ARRAY
      value = (value, field.types[0], field.types[-1] if arr else None)
    out[key] = value
  return out


def read_quantized(path: str | os.PathLike, *, type41: Type41 = "auto"
                   ) -> dict[str, qtensor.QuantizedTensor | np.ndarray]:
  """Loads a GGUF file without decoding the tensors of registered formats.

  Returns:
    {name: tensor}: IQ3_S (21), IQ4_NL (20) and ITQ3_S (41) tensors as
    ``iq3_s`` / ``iq4_nl`` / ``itq3_s`` :class:`QuantizedTensor` (their bytes
    as stored); F16/F32/F64 and integer tensors as numpy arrays of the stored
    dtype; any other type dequantized to float32.

  Raises:
    ValueError: missing, non-GGUF or truncated file, or block data that does
      not fit the tensor's shape.
  """
  f = TensorFile(path, type41=type41)
  return {name: f.read_quantized(name) for name in f.names}


def _add_metadata(writer: gguf.GGUFWriter, metadata: Mapping[str, Any]) -> None:
  for key, value in metadata.items():
    if key == "general.architecture":
      continue  # the writer adds it from its ``arch`` argument
    if isinstance(value, tuple):
      value, vtype, sub = (*value, None)[:3]
    else:
      vtype, sub = gguf.GGUFValueType.get_type(value), None
    writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                         None if sub is None else gguf.GGUFValueType(sub))


def _add_quantized(writer: gguf.GGUFWriter, name: str, t: qtensor.QuantizedTensor,
                   allow_type41: bool) -> str:
  """Adds a QuantizedTensor in its logical shape; returns its checksum kind."""
  qtensor.validate(t)
  gtype = registry.get_format(t.format).gguf_type
  if gtype is None:
    raise ValueError(f"tensor {name!r}: format {t.format!r} has no GGML type; use "
                     f"{sorted(_format_by_type().values())} (or itq3_s with allow_type41), or "
                     "dequantize it and write floats.")
  if gtype == ITQ3_S_TYPE and not allow_type41:
    raise ValueError(f"tensor {name!r}: {TYPE41_WARNING} Pass allow_type41=True "
                     "(itq3s convert --allow-type-41) to write it anyway.")
  block = block_size(t.format)
  if t.shape[-1] % block:
    raise ValueError(f"tensor {name!r}: K={t.shape[-1]} is not a multiple of {block}, the "
                     f"{t.format} block; llama.cpp cannot load a padded row. Code it as "
                     "iq4_nl (32-blocks), as itq3s convert does, or keep it in float.")
  data = np.ascontiguousarray(np.asarray(t.data, np.uint8))
  # int8 view: gguf then takes raw_shape as elements instead of converting a byte shape
  # with its own size table (which maps 41 to Q1_0).
  writer.add_tensor(name, data.view(np.int8), raw_shape=t.shape, raw_dtype=gtype)
  return t.format


def write_gguf(path: str | os.PathLike,
               tensors: Mapping[str, qtensor.QuantizedTensor | np.ndarray | RawTensor],
               metadata: Mapping[str, Any] | None = None, *, checksums: bool = False,
               allow_type41: bool = False) -> None:
  """Writes a GGUF file: tensors in their logical shapes, as llama.cpp reads them.

  Args:
    path: output file (overwritten).
    tensors: {name: tensor}. QuantizedTensors of a format with a GGML type
      (``iq3_s`` 21, ``iq4_nl`` 20; ``itq3_s`` 41 with ``allow_type41``) are
      written with their bytes unchanged; :class:`RawTensor` bytes with their
      type; numpy/JAX arrays as F32, F16, F64, BF16 (``ml_dtypes.bfloat16``) or
      integer types by dtype.
    metadata: {key: value} with plain values (typed as gguf does: int -> INT32,
      float -> FLOAT32) or ``(value, GGUFValueType[, sub_type])`` to choose the
      type (:func:`read_metadata` with ``typed=True`` gives these).
      ``general.architecture`` (default "itq3s_jax") becomes the writer's arch.
    checksums: also write ``itq3s_jax.sha256.<name>`` for every tensor
      (:func:`tensor_digest`; module docstring), verified by the readers.
    allow_type41: write ``itq3_s`` tensors as type 41 (with a warning: no CPU
      llama.cpp runs them; upstream reads 41 as Q1_0) and mark the file
      ``itq3s_jax.type41 = "itq3_s"``.

  Raises:
    ValueError: a QuantizedTensor in a format GGML has no type for, a type-41
      tensor without ``allow_type41``, a row length that is not a whole
      number of the type's blocks, or an array of unsupported dtype.
    TypeError: a tensor that is neither a QuantizedTensor, a RawTensor nor an array.
  """
  metadata = dict(metadata or {})
  arch = metadata.get("general.architecture", "itq3s_jax")
  arch = arch[0] if isinstance(arch, tuple) else arch
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  wrote41 = False
  for name, t in tensors.items():
    if isinstance(t, qtensor.QuantizedTensor):
      kind, shape, data = (_add_quantized(writer, name, t, allow_type41), t.shape,
                           np.asarray(t.data, np.uint8))
      wrote41 |= t.format == "itq3_s"
    elif isinstance(t, RawTensor):
      kind, shape, data = "uint8", t.shape, np.ascontiguousarray(t.data, np.uint8)
      writer.add_tensor(name, data.view(np.int8), raw_shape=t.shape,
                        raw_dtype=GGMLType(t.ggml_type))
    elif hasattr(t, "shape") and hasattr(t, "dtype"):
      arr = np.ascontiguousarray(np.asarray(t))
      shape = arr.shape
      if arr.dtype.name == "bfloat16":  # stored as GGML BF16 bytes (checksum kind uint8)
        kind, data = "uint8", arr.view(np.uint8)
        writer.add_tensor(name, arr.view(np.int8), raw_shape=arr.shape,
                          raw_dtype=GGMLType.BF16)
      elif arr.dtype in (np.float32, np.float16, np.float64, np.int8, np.int16, np.int32,
                         np.int64):
        kind, data = arr.dtype.name, arr
        writer.add_tensor(name, arr)
      else:
        raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written; cast "
                         "to float32, float16 or bfloat16 first.")
    else:
      raise TypeError(f"tensor {name!r}: expected a QuantizedTensor, a RawTensor or an "
                      f"array, got {type(t).__name__}.")
    if checksums:
      metadata[_SHA_KEY + name] = tensor_digest(kind, shape, data)
  if wrote41:
    warnings.warn(TYPE41_WARNING, UserWarning, stacklevel=2)
    metadata[TYPE41_KEY] = "itq3_s"
  _add_metadata(writer, metadata)
  try:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()
