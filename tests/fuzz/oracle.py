"""Independent decoders: what a mutated input *should* read as, computed without the
library's readers (stdlib json + numpy for safetensors, ``gguf.GGUFReader`` for GGUF,
orbax's whole-tree restore for orbax), and the checks of an exit-0 output against them.

An oracle returns the tensors it reads, or raises ``Invalid`` when the input is not
a valid file of its format; a reader that accepts what the oracle calls invalid, or
returns other values, is a silent wrong result.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

import itq3s_jax

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
             "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class Invalid(Exception):
  """The oracle finds the input invalid (a reader must refuse it)."""


def _is_int(v) -> bool:
  return type(v) is int and v >= 0  # pylint: disable=unidiomatic-typecheck


def safetensors(path: str) -> dict[str, np.ndarray]:
  """The safetensors spec, read literally."""
  if not os.path.isfile(path):
    raise Invalid("not a regular file")
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise Invalid("short")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > len(raw) - 8:
    raise Invalid("header length")
  try:
    header = json.loads(raw[8:8 + n].decode("utf-8"))
  except (ValueError, RecursionError) as exc:
    raise Invalid(f"json {type(exc).__name__}") from None
  if not isinstance(header, dict):
    raise Invalid("header not an object")
  meta = header.pop("__metadata__", {})
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise Invalid("metadata")
  data = raw[8 + n:]
  out, spans = {}, []
  for name, spec in header.items():
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) \
        or spec["dtype"] not in ST_DTYPES:
      raise Invalid(f"{name}: dtype")
    shape, offs = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape) or len(shape) > 32:
      raise Invalid(f"{name}: shape")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
      raise Invalid(f"{name}: offsets")
    dt = np.dtype(ST_DTYPES[spec["dtype"]])
    b, e = offs
    if not b <= e <= len(data) or e - b != math.prod(shape) * dt.itemsize:
      raise Invalid(f"{name}: span")
    spans.append((b, e))
    out[name] = np.frombuffer(data[b:e], dt).reshape(shape).copy()
  spans.sort()
  if any(s2[0] < s1[1] for s1, s2 in zip(spans, spans[1:])):
    raise Invalid("overlap")
  return out


def safetensors_dir(path: str) -> dict[str, np.ndarray]:
  index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(index) > 1:
    raise Invalid("two indexes")
  if not index:
    out = {}
    for s in shards:
      part = safetensors(os.path.join(path, s))
      if set(part) & set(out):
        raise Invalid("duplicate")
      out.update(part)
    return out
  try:
    with open(os.path.join(path, index[0]), "rb") as f:
      wm = json.loads(f.read().decode("utf-8"))["weight_map"]
  except (ValueError, RecursionError, KeyError, TypeError, OSError):
    raise Invalid("index") from None
  if not isinstance(wm, dict) or not all(
      isinstance(v, str) and os.path.basename(v) == v and v.endswith(".safetensors")
      for v in wm.values()):
    raise Invalid("weight_map")
  out = {}
  for s in sorted(set(wm.values())):
    part = safetensors(os.path.join(path, s))
    for name, arr in part.items():
      if wm.get(name) == s:
        out[name] = arr
  if set(out) != set(wm):
    raise Invalid("index lists missing tensors")
  return out


def gguf_floats(path: str) -> dict[str, np.ndarray]:
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    r = gguf.GGUFReader(path, "r")
    out = {}
    for t in r.tensors:
      if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raise Invalid("type")
      if t.data.nbytes != t.n_bytes or t.data_offset + t.n_bytes > len(r.data):
        raise Invalid("truncated")
      shape = tuple(int(d) for d in reversed(t.shape.tolist()))
      out[t.name] = np.asarray(t.data, np.float32).reshape(shape)
    if len(out) != len(r.tensors):
      raise Invalid("duplicate names")
    return out
  except Invalid:
    raise
  except Exception as exc:  # gguf raises anything on damaged files
    raise Invalid(f"gguf {type(exc).__name__}") from None


def orbax_tree(path: str) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as c:
      tree = c.restore(os.path.abspath(path))
  except Exception as exc:  # orbax raises anything on damaged checkpoints
    raise Invalid(f"orbax {type(exc).__name__}") from None
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v) for kp, v in flat}


def bitwise_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
      a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def expected_conversion(tensors: dict[str, np.ndarray], rule: itq3s_jax.QuantRule,
                        kernels: bool = False, hessians: dict | None = None) -> dict:
  """{name: array | QuantizedTensor} that converting ``tensors`` must give; Invalid when
  one of them cannot be quantized (the conversion must fail)."""
  out = {}
  for name, w in tensors.items():
    k_axis = 0 if kernels and name.endswith("kernel") and w.ndim == 2 else -1
    decision = rule.decide(name, w.shape, w.dtype, k_axis)
    if not decision.quantize:
      out[name] = w
      continue
    w2 = w.T if k_axis == 0 else w
    try:
      h = None if hessians is None else hessians.get(name)
      out[name] = itq3s_jax.quantize(np.asarray(w2), rule.format, seed=rule.seed, hessian=h)
    except ValueError:
      raise Invalid(f"{name}: not quantizable") from None
  return out


def same_tensors(got: dict, want: dict, floats: dict | None = None) -> str | None:
  """None if ``got`` equals ``want`` (codes, format, seed, shape, rounding; arrays bitwise)
  and, where ``floats`` are given, every certified bound holds; else the first mismatch."""
  if list(got) != list(want) and set(got) != set(want):
    return f"names {sorted(got)[:4]} != {sorted(want)[:4]}"
  for name, w in want.items():
    g = got[name]
    if isinstance(w, itq3s_jax.QuantizedTensor):
      if not isinstance(g, itq3s_jax.QuantizedTensor):
        return f"{name}: not quantized"
      if (g.format, g.seed, g.shape) != (w.format, w.seed, w.shape) or not bitwise_equal(
          g.data, w.data):
        return f"{name}: codes differ"
      if floats is not None and itq3s_jax.has_bound(g.format) and g.rounding != "unrestricted":
        msg = certificate_violation(g, floats[name])
        if msg:
          return f"{name}: {msg}"
    elif isinstance(g, itq3s_jax.QuantizedTensor) or not bitwise_equal(g, w):
      return f"{name}: array differs"
  return None


def certificate_violation(qt, w) -> str | None:
  """None if every block's float64 error is within its certified bound."""
  w = np.asarray(w, np.float64)
  if w.shape != qt.shape:
    w = w.T
  d = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  bound = np.asarray(itq3s_jax.error_bound(qt), np.float64)
  from itq3s_jax._src import codec  # pylint: disable=g-import-not-at-top
  for b, (lo, hi) in enumerate(codec.block_columns(qt.format, qt.k)):
    err = np.sqrt(np.sum((w[..., lo:hi] - d[..., lo:hi]) ** 2, axis=-1))
    if not np.all(err <= bound[..., b]):
      return f"block {b}: error {np.max(err):.3g} > bound {np.min(bound[..., b]):.3g}"
  return None
