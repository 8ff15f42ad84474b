"""Deterministic mutations of bytes and JSON documents, one family each.

Every function takes a ``random.Random`` (seeded per case, so a case number
reproduces its input) and returns the mutated value; none of them knows the
format it damages: the targets (``targets.py``) pick where to apply them.
"""

from __future__ import annotations

import json
import random

# Values of the wrong type for any JSON field.
CONFUSION = [None, True, False, 0.5, 4.0, "x", "", [], {}, [1], {"a": 1}, "1", [None],
             ["float32"], {"dtype": "F32"}]
# Sizes: huge, zero, negative, non-integers, overflowing.
SIZES = [-1, 0, 1, 2**31, 2**32 + 7, 2**48 + 32, 2**53 + 1, 2**63, 2**64 + 1, 10**9, 10**30,
         -(2**63), 256.0, -256, 1e300]
DEPTHS = [65, 1000, 100_000]
_NEST = "__NEST__"
_RAW = "__RAW__"


def truncate(rng: random.Random, raw: bytes) -> bytes:
  """Cut at a random point (biased towards the start, where headers are)."""
  if not raw:
    return raw
  cut = rng.choice([rng.randrange(len(raw)), rng.randrange(min(len(raw), 64)),
                    len(raw) - 1 - rng.randrange(min(len(raw), 16))])
  return raw[:cut]


def bitflip(rng: random.Random, raw: bytes, lo: int = 0, hi: int | None = None) -> bytes:
  """Flip one to three bits in raw[lo:hi]."""
  hi = len(raw) if hi is None else hi
  if hi <= lo:
    return raw
  out = bytearray(raw)
  for _ in range(rng.choice([1, 1, 1, 2, 3])):
    i = rng.randrange(lo, hi)
    out[i] ^= 1 << rng.randrange(8)
  return bytes(out)


def _paths(doc, prefix=()):
  """Every (path, value) of a JSON document, the root included."""
  yield prefix, doc
  if isinstance(doc, dict):
    for k, v in doc.items():
      yield from _paths(v, prefix + (k,))
  elif isinstance(doc, list):
    for i, v in enumerate(doc):
      yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
  if not path:
    return value
  node = doc
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = value
  return doc


def _delete(doc, path):
  node = doc
  for p in path[:-1]:
    node = node[p]
  del node[path[-1]]
  return doc


def _copy(doc):
  return json.loads(json.dumps(doc))


def field_edit(rng: random.Random, doc):
  """A plausible edit of one field: a neighbouring value, a deleted key, a swapped name,
  a duplicated or dropped list element."""
  doc = _copy(doc)
  paths = [p for p, _ in _paths(doc) if p]
  if not paths:
    return doc
  path = rng.choice(paths)
  node = doc
  for p in path[:-1]:
    node = node[p]
  value = node[path[-1]]
  op = rng.randrange(5)
  if op == 0:
    return _delete(doc, path)
  if op == 1 and isinstance(node, list):
    node.insert(path[-1], _copy(value))
    return doc
  if isinstance(value, bool):
    return _set(doc, path, not value)
  if isinstance(value, int):
    return _set(doc, path, value + rng.choice([-1, 1, 32, -32, 256, value]))
  if isinstance(value, float):
    return _set(doc, path, value * rng.choice([0.5, 2.0, -1.0]))
  if isinstance(value, str):
    choices = ["itq3_t", "uniform3", "uniform3_rot", "iq3_s", "itq3_s", "nearest",
               "two_neighbour", "unrestricted", "F32", "BF16", "F16", "I64", "float32",
               "bfloat16", "quantized", "array", value + "x", value[:-1], "t00000", "t00001"]
    return _set(doc, path, rng.choice(choices))
  if isinstance(value, list) and value:
    if rng.random() < 0.5:
      value.pop(rng.randrange(len(value)))
    else:
      rng.shuffle(value)
    return doc
  if isinstance(value, dict) and value:
    key = rng.choice(list(value))
    value[key + "_copy"] = _copy(value[key])
    return doc
  return _set(doc, path, rng.choice(CONFUSION))


def type_confusion(rng: random.Random, doc):
  """One field (or the document) replaced by a value of another type."""
  doc = _copy(doc)
  path = rng.choice([p for p, _ in _paths(doc)])
  return _set(doc, path, _copy(rng.choice(CONFUSION)))


def size(rng: random.Random, doc):
  """One integer field (a dim, offset, count, seed ...) set to a huge/zero/negative size."""
  doc = _copy(doc)
  ints = [p for p, v in _paths(doc) if isinstance(v, int) and not isinstance(v, bool)]
  if not ints:
    return type_confusion(rng, doc)
  value = rng.choice(SIZES)
  if value == 1e300 and rng.random() < 0.5:
    value = _RAW + "1e400"  # overflows float64 when parsed
  return _set(doc, rng.choice(ints), value)


def nesting(rng: random.Random, doc):
  """One field (or the document) replaced by a list nested DEPTHS deep."""
  doc = _copy(doc)
  path = rng.choice([p for p, _ in _paths(doc)])
  return _set(doc, path, f"{_NEST}{rng.choice(DEPTHS)}")


def dumps(doc) -> bytes:
  """JSON text of a mutated document (placeholders expanded into raw text)."""
  text = json.dumps(doc)
  while f'"{_NEST}' in text:
    i = text.index(f'"{_NEST}')
    j = text.index('"', i + 1)
    depth = int(text[i + 1 + len(_NEST):j])
    text = text[:i] + "[" * depth + "]" * depth + text[j + 1:]
  while f'"{_RAW}' in text:
    i = text.index(f'"{_RAW}')
    j = text.index('"', i + 1)
    text = text[:i] + text[i + 1 + len(_RAW):j] + text[j + 1:]
  return text.encode()


JSON_FAMILIES = {"field_edit": field_edit, "type_confusion": type_confusion, "size": size,
                 "nesting": nesting}
