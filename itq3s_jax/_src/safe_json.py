"""The one JSON parser for untrusted files: bounded size and depth, typed field access.

``json.loads`` recurses once per nesting level, so ``[[[[...`` raises
RecursionError (or worse, exhausts the C stack); it accepts ``NaN`` and
``Infinity``, silently keeps the last of duplicate keys, and ``1e400`` becomes
``inf``. Every header, index, metadata and journal this library reads from
disk goes through :func:`loads` instead, and its fields through the ``as_*``
checkers, so a malformed file is one :class:`Malformed` (a ValueError) that
names the file and the field, never a traceback or a value of the wrong type.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64  # our own documents nest 4 levels deep; safetensors/HF indexes 3
MAX_RANK = 32
MAX_DIM = 1 << 48  # larger than any real axis, small enough for exact float64/int64 products
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


class Malformed(ValueError):
  """A JSON document or field that is not what the format says; the message names both."""


def nesting_depth(raw: bytes) -> int:
  """Deepest ``[``/``{`` nesting of a JSON text, brackets inside strings ignored; O(len)."""
  b = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
  step = np.isin(b, _OPEN).astype(np.int64) - np.isin(b, _CLOSE).astype(np.int64)
  return int(np.cumsum(step).max(initial=0))


def _pairs(what: str):

  def hook(pairs):
    out = {}
    for key, value in pairs:
      if key in out:
        raise Malformed(f"{what}: duplicate key {key!r}.")
      out[key] = value
    return out

  return hook


def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON")


def loads(raw: bytes | str, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
  """Parses untrusted JSON text.

  Args:
    raw: UTF-8 bytes (or str) of one JSON document.
    what: the file (and part) it came from, for messages.
    max_bytes: refuse longer documents before parsing.
    max_depth: refuse deeper nesting before parsing.

  Returns:
    The document (dicts, lists, str, int, float, bool, None; no NaN/Infinity).

  Raises:
    Malformed: too long, too deep, not UTF-8, not JSON, duplicate keys, or
      a non-finite number.
  """
  if isinstance(raw, str):
    raw = raw.encode("utf-8", "surrogatepass")
  if len(raw) > max_bytes:
    raise Malformed(f"{what}: {len(raw)} bytes of JSON, more than the {max_bytes} allowed.")
  depth = nesting_depth(raw)
  if depth > max_depth:
    raise Malformed(f"{what}: JSON nested {depth} deep, more than the {max_depth} allowed.")
  try:
    out = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs(what),
                     parse_constant=_no_constant)
  except Malformed:
    raise
  except (UnicodeDecodeError, ValueError, RecursionError) as exc:
    raise Malformed(f"{what}: not valid JSON ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).") from None
  _check_finite(out, what)
  return out


def _check_finite(value, what: str) -> None:
  stack = [value]  # iterative: depth is bounded, but recursion is not needed
  while stack:
    v = stack.pop()
    if isinstance(v, float) and not np.isfinite(v):
      raise Malformed(f"{what}: a number overflows float64 ({v}).")
    if isinstance(v, dict):
      stack.extend(v.values())
    elif isinstance(v, list):
      stack.extend(v)


def as_dict(value, what: str) -> dict:
  if not isinstance(value, dict):
    raise Malformed(f"{what} must be a JSON object, got {_kind(value)}.")
  return value


def as_list(value, what: str, max_len: int | None = None) -> list:
  if not isinstance(value, list):
    raise Malformed(f"{what} must be a JSON list, got {_kind(value)}.")
  if max_len is not None and len(value) > max_len:
    raise Malformed(f"{what} has {len(value)} items, more than {max_len}.")
  return value


def as_str(value, what: str, choices: tuple[str, ...] | None = None) -> str:
  if not isinstance(value, str):
    raise Malformed(f"{what} must be a string, got {_kind(value)}.")
  if choices is not None and value not in choices:
    raise Malformed(f"{what} is {value!r}; expected one of {list(choices)}.")
  return value


def as_bool(value, what: str) -> bool:
  if not isinstance(value, bool):
    raise Malformed(f"{what} must be true or false, got {_kind(value)}.")
  return value


def as_int(value, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
  """``value`` if it is a JSON integer (not a bool, not 4.0) in [lo, hi]."""
  if type(value) is not int:  # pylint: disable=unidiomatic-typecheck (bool is an int)
    raise Malformed(f"{what} must be an integer, got {_kind(value)}.")
  if not lo <= value <= hi:
    raise Malformed(f"{what} is {value}, outside [{lo}, {hi}].")
  return value


def as_shape(value, what: str) -> tuple[int, ...]:
  """A list of at most ``MAX_RANK`` integers in [0, ``MAX_DIM``]."""
  dims = as_list(value, what, MAX_RANK)
  return tuple(as_int(d, f"{what}[{i}]", 0, MAX_DIM) for i, d in enumerate(dims))


def _kind(value) -> str:
  if value is None:
    return "null"
  text = repr(value)
  return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
