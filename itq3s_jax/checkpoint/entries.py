"""The JSON metadata of the itq3s checkpoint layout: its schema, checksums and item names.

One place parses and checks what ``writers.py`` writes and ``reader.py`` (and
a resumed ``convert``) reads back:

* :func:`digest`: SHA-256 of one stored array, over its dtype name, shape and
  bytes (so a stored dtype or shape that changed is caught as well as a
  flipped bit), recorded as the entry's ``sha256``;
* :func:`seal` / :func:`check_seal`: the metadata's own SHA-256 (field
  ``sha256``, over the canonical JSON of everything else), so an edited
  format, seed, rounding, shape, name, or a dropped or duplicated entry is
  refused instead of loading other weights;
* :func:`check_metadata` / :func:`check_entry`: every field type-checked
  (integers are integers, names are strings, shapes are bounded), so nothing
  downstream indexes, allocates or loops by an unverified value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Iterator

import ml_dtypes
import numpy as np

from itq3s_jax._src import safe_json
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from itq3s_jax.checkpoint import errors

META_ITEM = "itq3s"
# 2: per-tensor sha256 and a sealed metadata (version 1 had neither; re-convert those).
FORMAT_VERSION = 2
MAX_TENSORS = 1 << 20
MAX_META_BYTES = 256 << 20
# Orbax's save holds about two extra copies of an array while it writes; kept arrays
# larger than this are saved in row blocks of at most this size, one item each, so the
# extra memory stays a constant instead of twice the largest tensor.
PART_BYTES = 16 << 20
_ITEM = re.compile(r"t\d{5,}")
_HEX = re.compile(r"[0-9a-f]{64}")
KINDS = ("quantized", "array")


def item_name(index: int) -> str:
  return f"t{index:05d}"


def leaf_key(quantized: bool) -> str:
  return "data" if quantized else "value"


def part_rows(shape: tuple[int, ...], itemsize: int, quantized: bool,
              part_bytes: int) -> int:
  """Rows per item of a stored array of ``shape``: all of them unless it is a large kept
  array, then as many as fit ``part_bytes``."""
  n = math.prod(shape) * itemsize
  if not shape or not n:
    return max(1, shape[0] if shape else 1)
  if quantized or n <= part_bytes:
    return shape[0]
  return max(1, part_bytes // (n // shape[0]))


def part_count(shape: tuple[int, ...], itemsize: int, quantized: bool,
               part_bytes: int | None = None) -> int:
  """Items (row blocks) a stored array of ``shape`` takes; 0 when it is empty (orbax
  cannot save an empty array; the reader makes it from the entry)."""
  if math.prod(shape) * itemsize == 0:
    return 0
  if not shape:
    return 1
  return -(-shape[0] // part_rows(shape, itemsize, quantized, part_bytes or PART_BYTES))


def dtype_of(name: str) -> np.dtype:
  """The numpy dtype a kept array's entry names (numeric numpy types and ml_dtypes')."""
  extra = getattr(ml_dtypes, name, None) if name.isidentifier() else None
  try:
    dt = np.dtype(extra) if extra is not None else np.dtype(name)
  except TypeError:
    dt = None
  if dt is None or dt.name != name or dt.kind not in "biufcV" or (
      dt.kind == "V" and extra is None):
    raise safe_json.Malformed(f"dtype {name!r} is not a numeric array type.")
  return dt


def part_items(entry: dict) -> Iterator[str]:
  """Items of one tensor: ``t00007`` or, for a large kept array saved in row blocks,
  ``t00007``, ``t00007_0001``, ... (concatenate along axis 0); none for an empty array.
  Lazy, so a reader stops at the first missing item whatever ``parts`` says."""
  for j in range(entry.get("parts", 1)):
    yield entry["item"] if j == 0 else f"{entry['item']}_{j:04d}"


def digest(array: np.ndarray) -> str:
  """SHA-256 over the dtype name, the shape and the C-order bytes of ``array``."""
  a = np.ascontiguousarray(array)
  h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
  h.update(memoryview(a.reshape(-1).view(np.uint8)))
  return h.hexdigest()


def _canonical(meta: dict) -> bytes:
  body = {k: v for k, v in meta.items() if k != "sha256"}
  return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode()


def seal(meta: dict) -> dict:
  """``meta`` with its ``sha256`` set (over the canonical JSON of the rest)."""
  return dict(meta, sha256=hashlib.sha256(_canonical(meta)).hexdigest())


def check_seal(meta: dict, where: str) -> None:
  got = meta.get("sha256")
  if not isinstance(got, str) or got != hashlib.sha256(_canonical(meta)).hexdigest():
    raise errors.CheckpointError(
        f"{where}: the metadata does not match its sha256 (it was edited or damaged); "
        "re-convert the checkpoint.")


def parse_metadata(raw: bytes, where: str) -> dict:
  """The checked metadata of a checkpoint from the bytes of its metadata file."""
  try:
    meta = safe_json.as_dict(safe_json.loads(raw, what=where, max_bytes=MAX_META_BYTES), where)
  except safe_json.Malformed as exc:
    raise errors.CheckpointError(f"corrupt metadata: {exc}") from None
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    old = " (written before per-tensor checksums; re-convert it)" if version == 1 else ""
    raise errors.CheckpointError(
        f"{where}: unsupported itq3s checkpoint version {version!r}{old}; this library "
        f"reads version {FORMAT_VERSION}.")
  check_seal(meta, where)
  check_metadata(meta, where)
  return meta


def check_metadata(meta: dict, where: str) -> None:
  """Type-checks the tensor list: entries valid, items in order, names unique."""
  try:
    tensors = safe_json.as_list(meta.get("tensors"), f"{where}: tensors", MAX_TENSORS)
    names = set()
    for i, entry in enumerate(tensors):
      check_entry(entry, f"{where}: tensors[{i}]", item_name(i))
      if entry["name"] in names:
        raise safe_json.Malformed(f"{where}: tensor name {entry['name']!r} appears twice.")
      names.add(entry["name"])
  except safe_json.Malformed as exc:
    raise errors.CheckpointError(str(exc)) from None


def check_entry(entry, what: str, item: str | None = None) -> dict:
  """Raises safe_json.Malformed unless ``entry`` is a well-typed tensor entry."""
  e = safe_json.as_dict(entry, what)
  safe_json.as_str(e.get("name"), f"{what}.name")
  name = safe_json.as_str(e.get("item"), f"{what}.item")
  if not _ITEM.fullmatch(name) or (item is not None and name != item):
    raise safe_json.Malformed(f"{what}.item is {name!r}; expected {item or 't<5 digits>'!r}.")
  kind = safe_json.as_str(e.get("kind"), f"{what}.kind", KINDS)
  shape = safe_json.as_shape(e.get("shape"), f"{what}.shape")
  dtype = safe_json.as_str(e.get("dtype"), f"{what}.dtype")
  if not _HEX.fullmatch(safe_json.as_str(e.get("sha256"), f"{what}.sha256")):
    raise safe_json.Malformed(f"{what}.sha256 is not 64 lowercase hex digits.")
  safe_json.as_int(e.get("nbytes"), f"{what}.nbytes")
  parts = safe_json.as_int(e.get("parts", 1), f"{what}.parts")
  if kind == "quantized":
    fmt = safe_json.as_str(e.get("format"), f"{what}.format", registry.format_names())
    safe_json.as_int(e.get("seed"), f"{what}.seed")
    safe_json.as_str(e.get("rounding"), f"{what}.rounding", qtensor.ROUNDINGS)
    safe_json.as_bool(e.get("transposed", False), f"{what}.transposed")
    if not shape or shape[-1] % 32:
      raise safe_json.Malformed(f"{what}.shape {list(shape)} is not (..., K) with K a "
                                "multiple of 32.")
    nbytes = math.prod(shape[:-1]) * qtensor.row_nbytes(fmt, shape[-1])
  else:
    safe_json.as_bool(e.get("tuned", False), f"{what}.tuned")
    try:
      nbytes = math.prod(shape) * dtype_of(dtype).itemsize
    except safe_json.Malformed as exc:
      raise safe_json.Malformed(f"{what}.{exc}") from None
  if e.get("nbytes") != nbytes:
    raise safe_json.Malformed(f"{what}.nbytes is {e.get('nbytes')}, its shape and format "
                              f"need {nbytes}.")
  # Any row-block split is at most one item per row; none at all when there are no bytes.
  if (parts == 0) != (nbytes == 0) or parts > max(1, shape[0] if shape else 1) or (
      kind == "quantized" and parts > 1):
    raise safe_json.Malformed(f"{what}.parts is {parts}, impossible for shape {list(shape)}.")
  return e
