"""The readers under fuzz: their valid base inputs, where mutations go, and the check of
every exit-0 result against an independent decode (``oracle.py``).

A target copies its base input into a fresh case directory, mutates one file of
it with the case's family, runs the reader in-process (the ``itq3s`` command line
or the Python API), and returns (status, detail): status is "ok" (accepted, and
equal to the oracle), "error" (a clean, one-line refusal), or a failure the
runner counts: "traceback", "partial" (a destination or staging directory left
behind, or one that does not load), "wrong" (accepted, but not what the oracle
reads, or what the oracle refuses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import struct
from typing import Callable

import numpy as np

import itq3s_jax
from itq3s_jax import calibration
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax._src import gguf_io
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import writers

from . import mutations
from . import oracle

RULE = itq3s_jax.QuantRule(min_size=1024)
ARGS = ["--quiet", "--min-size", "1024"]
_RNG = np.random.default_rng(18)
W = (_RNG.standard_normal((16, 256)) * 0.02).astype(np.float32)
TENSORS = {
    "blk.0.q.weight": W,
    "blk.0.o.weight": (W[::-1] * 0.5).astype(np.float32).astype(__import__("ml_dtypes").bfloat16),
    "blk.0.norm.weight": np.linspace(0.5, 1.5, 64).astype(np.float16),
    "pos": np.arange(16, dtype=np.int64),
    "empty.weight": np.zeros((0, 256), np.float32),
}
RESUME = {f"layers.{i}.weight": (W * (i + 1)).astype(np.float32) for i in range(4)}
SIGMA_KEY = "blk.0.q"


def _write_st(path, tensors):
  safetensors_file.write(path, {k: (v.shape, v.dtype) for k, v in tensors.items()},
                         tensors.__getitem__)


class _Stop(Exception):
  pass


def _stop_after_two(n):
  if n == 2:
    raise _Stop


def build(root: str) -> dict:
  """Writes every base input under ``root``; returns {target name: base path} and refs."""
  os.makedirs(root, exist_ok=True)
  b = {}
  b["st"] = os.path.join(root, "m.safetensors")
  _write_st(b["st"], TENSORS)
  b["st_dir"] = os.path.join(root, "shards")
  os.makedirs(b["st_dir"])
  names = list(TENSORS)
  _write_st(os.path.join(b["st_dir"], "a.safetensors"), {n: TENSORS[n] for n in names[:2]})
  _write_st(os.path.join(b["st_dir"], "b.safetensors"), {n: TENSORS[n] for n in names[2:]})
  with open(os.path.join(b["st_dir"], "m.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 1}, "weight_map": {
        n: "a.safetensors" if i < 2 else "b.safetensors" for i, n in enumerate(names)}}, f)
  b["gguf_src"] = os.path.join(root, "f.gguf")
  gguf_io.write_gguf(b["gguf_src"], {"blk.0.q.weight": W, "blk.0.norm.weight":
                                      TENSORS["blk.0.norm.weight"]}, {"general.name": "x"})
  b["orbax_src"] = os.path.join(root, "orbax_src")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as c:
    c.save(b["orbax_src"], {"params": {"dense": {"kernel": np.ascontiguousarray(W.T),
                                                 "bias": np.ones(16, np.float32)}}})
  b["ckpt"] = os.path.join(root, "ckpt")
  checkpoint.convert(b["st"], b["ckpt"], rule=RULE)
  b["ckpt_ref"] = checkpoint.load(b["ckpt"])
  b["gguf_out"] = os.path.join(root, "out.gguf")
  checkpoint.convert(b["st"], b["gguf_out"], rule=itq3s_jax.QuantRule("iq3_s", min_size=1024))
  b["gguf_ref"] = gguf_io.read_quantized(b["gguf_out"])
  b["qt"] = {fmt: itq3s_jax.quantize(W[:4], fmt, seed=3).to_bytes()
             for fmt in itq3s_jax.formats()}
  x = _RNG.standard_normal((512, 256)).astype(np.float32)
  b["calib"] = os.path.join(root, "stats.npz")
  calibration.save(b["calib"], {SIGMA_KEY: x.T @ x / 512})
  b["resume_src"] = os.path.join(root, "r.safetensors")
  _write_st(b["resume_src"], RESUME)
  b["stage_dst"] = os.path.join(root, "rdst", "out")
  os.makedirs(os.path.dirname(b["stage_dst"]))
  try:
    checkpoint.convert(b["resume_src"], b["stage_dst"], rule=RULE, on_tensor=_stop_after_two)
  except _Stop:
    pass
  b["stage"] = writers.staging_path(b["stage_dst"])
  return b


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  families: tuple[str, ...]
  run: Callable[[random.Random, str, str, dict], tuple[str, str]]  # (rng, family, dir, base)


# ---- applying a family to one file ----

def _json_family(rng, family, doc):
  return mutations.dumps(mutations.JSON_FAMILIES[family](rng, doc))


def mutate_bytes(rng, family, raw: bytes, header: tuple[int, int] | None = None) -> bytes:
  """truncate / bitflip anywhere; size: a length field at ``header`` = (offset, width)."""
  if family == "truncate":
    return mutations.truncate(rng, raw)
  if family == "size" and header is not None:
    off, width = header
    value = rng.choice([0, 1, 2**31, 2**(8 * width) - 1, len(raw), len(raw) - off - width + 1,
                        rng.randrange(2**(8 * width))])
    return raw[:off] + (value % 2**(8 * width)).to_bytes(width, "little") + raw[off + width:]
  return mutations.bitflip(rng, raw)


def _prefixed_json(rng, family, raw, length_fmt, start):
  """A file of [prefix][length][JSON][body]: JSON families edit the JSON and fix the length."""
  width = struct.calcsize(length_fmt)
  (n,) = struct.unpack(length_fmt, raw[start - width:start])
  if family in mutations.JSON_FAMILIES:
    try:
      doc = json.loads(raw[start:start + n])
    except ValueError:
      doc = {}
    text = _json_family(rng, family, doc)
    if length_fmt == "<Q" and rng.random() < 0.5:
      text += b" " * (-len(text) % 8)
    return raw[:start - width] + struct.pack(length_fmt, len(text)) + text + raw[start + n:]
  return mutate_bytes(rng, family, raw, (start - width, width))


def _edit_file(path, fn):
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(fn(raw))


def _files(root):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def mutate_tree(rng, family, root):
  """A byte family on one file of a directory (or the file removed, for truncation)."""
  files = _files(root) if os.path.isdir(root) else [root]
  path = rng.choice(files)
  if family == "truncate" and rng.random() < 0.25:
    os.remove(path)
    return
  if family in mutations.JSON_FAMILIES:
    try:
      with open(path, "rb") as f:
        doc = json.loads(f.read())
      _edit_file(path, lambda raw: _json_family(rng, family, doc))
      return
    except (ValueError, UnicodeDecodeError):
      family = "bitflip"
  _edit_file(path, lambda raw: mutate_bytes(rng, family, raw))


# ---- running the command line ----

def run_cli(argv) -> tuple[int, str]:
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main(argv)
  return rc, err.getvalue()


def _cli_status(rc, err, cmd) -> tuple[str, str] | None:
  """None for exit 0; the status of a refusal otherwise."""
  if rc == 0:
    return None
  lines = err.strip().splitlines()
  if rc == 2 and len(lines) == 1 and lines[0].startswith(f"itq3s {cmd}: error: ") \
      and "Traceback" not in err:
    return "error", lines[0][:300]
  return "traceback", f"exit {rc}: {err[-500:]}"


def _convert_case(argv, dst, want: Callable[[], dict], floats=None, stage_ok=False):
  """Runs ``itq3s convert``; checks no partial output and, on exit 0, the result."""
  rc, err = run_cli(["convert", *argv, dst, *ARGS])
  out_dir = os.path.dirname(dst)
  left = sorted(os.listdir(out_dir))
  status = _cli_status(rc, err, "convert")
  stage = os.path.basename(writers.staging_path(dst))
  if status is not None:
    extra = [f for f in left if not (stage_ok and f == stage)]
    return ("partial", f"left {extra} after: {status[1]}") if extra else status
  if left != [os.path.basename(dst)]:
    return "partial", f"exit 0 but {left} in the destination's directory"
  try:
    expected = want()
  except oracle.Invalid as exc:
    return "wrong", f"exit 0 but the oracle refuses the input ({exc})"
  try:
    got = checkpoint.load(dst)
  except checkpoint.CheckpointError as exc:
    return "partial", f"exit 0 but the output does not load: {exc}"
  mismatch = oracle.same_tensors(got, expected, floats)
  return ("wrong", mismatch) if mismatch else ("ok", "")


def _out(case):
  os.makedirs(os.path.join(case, "out"), exist_ok=True)
  return os.path.join(case, "out", "dst")


# ---- the targets ----

def st_file(rng, family, case, base):
  src = os.path.join(case, "m.safetensors")
  shutil.copy(base["st"], src)
  _edit_file(src, lambda raw: _prefixed_json(rng, family, raw, "<Q", 8))

  def want():
    t = oracle.safetensors(src)
    return oracle.expected_conversion(t, RULE)

  return _convert_case([src], _out(case), want, floats=_floats(oracle.safetensors, src))


def _floats(read, path):
  try:
    return {k: v.astype(np.float64) if v.dtype.kind == "f" or v.dtype.name == "bfloat16"
            else v for k, v in read(path).items()}
  except oracle.Invalid:
    return None


def st_read(rng, family, case, base):
  """The source reader alone (no conversion): every tensor read, compared with the oracle."""
  src = os.path.join(case, "m.safetensors")
  shutil.copy(base["st"], src)
  _edit_file(src, lambda raw: _prefixed_json(rng, family, raw, "<Q", 8))
  try:
    s = checkpoint.sources.open_source(src)
    got = {t.name: s.read(t.name) for t in s.tensors}
  except checkpoint.CheckpointError as exc:
    return "error", str(exc)[:300]
  try:
    want = oracle.safetensors(src)
  except oracle.Invalid as exc:
    return "wrong", f"read, but the oracle refuses it ({exc})"
  return ("wrong", "values differ") if oracle.same_tensors(got, want) else ("ok", "")


def st_dir(rng, family, case, base):
  src = os.path.join(case, "shards")
  shutil.copytree(base["st_dir"], src)
  path = rng.choice(_files(src))
  if path.endswith(".json"):
    with open(path, "rb") as f:
      doc = json.loads(f.read())
    _edit_file(path, lambda raw: _json_family(rng, family, doc)
               if family in mutations.JSON_FAMILIES else mutate_bytes(rng, family, raw))
  else:
    _edit_file(path, lambda raw: _prefixed_json(rng, family, raw, "<Q", 8))
  return _convert_case([src], _out(case),
                       lambda: oracle.expected_conversion(oracle.safetensors_dir(src), RULE),
                       floats=_floats(oracle.safetensors_dir, src))


def gguf_src(rng, family, case, base):
  src = os.path.join(case, "f.gguf")
  shutil.copy(base["gguf_src"], src)
  header = rng.choice([(8, 8), (16, 8), (4, 4)])  # tensor count, kv count, version
  _edit_file(src, lambda raw: mutate_bytes(rng, family if family != "size" else "size", raw,
                                           header))
  return _convert_case([src], _out(case),
                       lambda: oracle.expected_conversion(oracle.gguf_floats(src), RULE),
                       floats=_floats(oracle.gguf_floats, src))


def orbax_src(rng, family, case, base):
  src = os.path.join(case, "src")
  shutil.copytree(base["orbax_src"], src)
  mutate_tree(rng, family, src)
  return _convert_case([src], _out(case), lambda: oracle.expected_conversion(
      oracle.orbax_tree(src), RULE, kernels=True))


def _mutate_ckpt(rng, family, path):
  meta_path = os.path.join(path, entries.META_ITEM, "metadata")
  if family in mutations.JSON_FAMILIES and rng.random() < 0.7:
    with open(meta_path) as f:
      meta = json.load(f)
    doc = mutations.JSON_FAMILIES[family](rng, meta)
    if isinstance(doc, dict) and rng.random() < 0.5:  # a consistent rewrite: new checksum
      try:
        doc = entries.seal(doc)
      except ValueError:  # a NaN/inf placeholder cannot be sealed
        pass
    with open(meta_path, "wb") as f:
      f.write(mutations.dumps(doc))
  else:
    mutate_tree(rng, family, path)


def ckpt_load(rng, family, case, base):
  path = os.path.join(case, "ckpt")
  shutil.copytree(base["ckpt"], path)
  _mutate_ckpt(rng, family, path)
  try:
    got = checkpoint.load(path)
  except checkpoint.CheckpointError as exc:
    return "error", str(exc)[:300]
  mismatch = oracle.same_tensors(got, base["ckpt_ref"])
  return ("wrong", mismatch) if mismatch else ("ok", "")


def ckpt_inspect(rng, family, case, base):
  path = os.path.join(case, "ckpt")
  shutil.copytree(base["ckpt"], path)
  _mutate_ckpt(rng, family, path)
  rc, err = run_cli(["inspect", path])
  status = _cli_status(rc, err, "inspect")
  if status is not None:
    return status
  mismatch = oracle.same_tensors(checkpoint.load(path), base["ckpt_ref"])
  return ("wrong", mismatch) if mismatch else ("ok", "")


def gguf_out(rng, family, case, base):
  path = os.path.join(case, "out.gguf")
  shutil.copy(base["gguf_out"], path)
  _edit_file(path, lambda raw: mutate_bytes(rng, family, raw, rng.choice([(8, 8), (16, 8)])))
  rc, err = run_cli(["inspect", path])
  status = _cli_status(rc, err, "inspect")
  if status is not None:
    return status
  try:
    got = gguf_io.read_quantized(path)
  except ValueError as exc:
    return "wrong", f"inspect exit 0 but read_quantized refuses: {exc}"
  mismatch = oracle.same_tensors(got, base["gguf_ref"])
  return ("wrong", mismatch) if mismatch else ("ok", "")


def qt_bytes(rng, family, case, base):
  fmt = rng.choice(sorted(base["qt"]))
  raw = base["qt"][fmt]
  if family == "bitflip" and rng.random() < 0.5:  # random code bytes: non-finite scales
    (n,) = struct.unpack("<I", raw[8:12])
    body = np.frombuffer(raw[12 + n:], np.uint8).copy()
    body[:] = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, body.size)
    buf = raw[:12 + n] + body.tobytes()
  else:
    buf = _prefixed_json(rng, family, raw, "<I", 12)
  try:
    qt = itq3s_jax.QuantizedTensor.from_bytes(buf)
  except ValueError as exc:
    return "error", str(exc)[:300]
  # Independent decode: the header by stdlib json, the body as it is.
  (n,) = struct.unpack("<I", buf[8:12])
  try:
    header = json.loads(buf[12:12 + n])
  except (ValueError, RecursionError):
    return "wrong", "accepted a header stdlib json cannot parse"
  ok = (isinstance(header, dict) and header.get("format") == qt.format
        and header.get("shape") == list(qt.shape) and header.get("seed") == qt.seed
        and header.get("rounding", "nearest") == qt.rounding
        and bytes(np.asarray(qt.data).tobytes()) == buf[12 + n:])
  if not ok:
    return "wrong", f"fields or data differ from the bytes: {header!r:.200}"
  if not np.all(np.isfinite(np.asarray(itq3s_jax.dequantize(qt)))):
    return "wrong", "accepted codes that decode to Inf/NaN"
  return "ok", ""


def calib(rng, family, case, base):
  path = os.path.join(case, "stats.npz")
  if family in ("truncate", "bitflip"):
    shutil.copy(base["calib"], path)
    _edit_file(path, lambda raw: mutate_bytes(rng, family, raw))
  else:
    with np.load(base["calib"]) as f:
      arrays = {k: f[k] for k in f.files}
    key = rng.choice(sorted(arrays))
    choices = [np.zeros((3, 3), np.float32), np.full((256, 256), np.nan, np.float32),
               np.zeros((256,), np.float32), np.array(["a\tb"]), np.zeros((256, 256), np.int8),
               np.array([f"{SIGMA_KEY}\ts9"]), np.zeros((0, 256), np.float32),
               np.full((256, 256), 3e38, np.float32), -np.eye(256, dtype=np.float32)]
    if rng.random() < 0.2:
      del arrays[key]
    else:
      arrays[key] = choices[rng.randrange(len(choices))]
    np.savez(path, **arrays)

  def want():
    try:
      stats = calibration.load(path)
    except Exception:  # pylint: disable=broad-except (any failure: the oracle refuses)
      raise oracle.Invalid("calibration") from None
    h = stats.get(SIGMA_KEY)
    if h is not None and (np.shape(h) != (256, 256)):
      raise oracle.Invalid("hessian shape")
    src = oracle.safetensors(base["st"])
    return oracle.expected_conversion(src, RULE, hessians=None if h is None else {
        "blk.0.q.weight": np.asarray(h, np.float32)})

  return _convert_case([base["st"], "--calibration", path], _out(case), want,
                       floats=_floats(oracle.safetensors, base["st"]))


STAGING_OPS = ("journal_field", "journal_line", "job", "item_bits", "item_removed",
               "stray_file")


def resume(rng, family, case, base):
  dst = _out(case)
  stage = writers.staging_path(dst)
  shutil.copytree(base["stage"], stage)
  journal = os.path.join(stage, "done.jsonl")
  op = rng.choice(STAGING_OPS) if family == "staging" else None
  if family in mutations.JSON_FAMILIES or op == "journal_field":
    with open(journal) as f:
      lines = f.read().splitlines()
    i = rng.randrange(len(lines))
    fam = family if family in mutations.JSON_FAMILIES else "field_edit"
    lines[i] = _json_family(rng, fam, json.loads(lines[i])).decode()
    with open(journal, "w") as f:
      f.write("\n".join(lines) + "\n")
  elif op == "journal_line":
    with open(journal) as f:
      lines = f.read().splitlines()
    kind = rng.randrange(4)
    if kind == 0:
      lines.append(lines[0])
    elif kind == 1:
      lines.insert(0, "garbage")
    elif kind == 2:
      lines = lines[::-1]
    else:
      lines = lines[:1]
    with open(journal, "w") as f:
      f.write("\n".join(lines) + "\n")
  elif op == "job":
    _edit_file(os.path.join(stage, "job.json"), lambda raw: mutations.dumps(
        mutations.field_edit(rng, json.loads(raw))))
  elif op == "item_removed":
    shutil.rmtree(os.path.join(stage, rng.choice(["t00000", "t00001"])))
  elif op == "stray_file":
    with open(os.path.join(stage, rng.choice(["t00002", "t00000_0001", "x"])), "w") as f:
      f.write("stray")
  else:  # truncate / bitflip / item_bits: damage one staged file
    mutate_tree(rng, "truncate" if family == "truncate" else "bitflip",
                os.path.join(stage, rng.choice(["t00000", "t00001", "done.jsonl"])
                             if family != "staging" else rng.choice(["t00000", "t00001"])))
  return _convert_case([base["resume_src"], "--resume"], dst,
                       lambda: oracle.expected_conversion(RESUME, RULE), stage_ok=True,
                       floats={k: v.astype(np.float64) for k, v in RESUME.items()})


BYTES = ("truncate", "bitflip")
JSON = tuple(mutations.JSON_FAMILIES)
TARGETS = (
    Target("safetensors_read", BYTES + JSON, st_read),
    Target("safetensors_convert", BYTES + JSON, st_file),
    Target("safetensors_dir_index", BYTES + JSON, st_dir),
    Target("gguf_source", BYTES + ("size",), gguf_src),
    Target("orbax_source", BYTES + JSON, orbax_src),
    Target("checkpoint_load", BYTES + JSON, ckpt_load),
    Target("checkpoint_inspect", BYTES + JSON, ckpt_inspect),
    Target("gguf_output_inspect", BYTES + ("size",), gguf_out),
    Target("qtensor_from_bytes", BYTES + JSON, qt_bytes),
    Target("calibration_npz", BYTES + ("field_edit",), calib),
    Target("resume_staging", BYTES + JSON + ("staging",), resume),
)
