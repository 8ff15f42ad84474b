"""Counterexamples found by fuzzing (issue 18's harness and this one), pinned: each
builds its input and returns (status, detail) like a target. ``runner`` runs them
all before the generated cases, and ``tests/fuzz_test.py`` requires each outcome."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax.checkpoint import entries

from . import targets


def _st_with_header(path, header: dict, data: bytes = b"", pad_to: int | None = None):
  text = json.dumps(header).encode()
  if pad_to is not None:
    text += b" " * (pad_to - len(text))
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + data)


def header_low_byte_0x80(case, base):
  """A header of 0x80 + 256k bytes: the old pickle sniff refused the valid file."""
  w = targets.W
  src = os.path.join(case, "m.safetensors")
  _st_with_header(src, {"w": {"dtype": "F32", "shape": [16, 256],
                              "data_offsets": [0, w.nbytes]}}, w.tobytes(), pad_to=0x180)
  return targets._convert_case([src], targets._out(case), lambda: {  # pylint: disable=protected-access
      "w": itq3s_jax.quantize(w)})


def zero_size_tensor(case, base):
  src = os.path.join(case, "m.safetensors")
  t = {"w": targets.W, "e": np.zeros((0, 256), np.float32), "s": np.zeros((0,), np.int8)}
  targets._write_st(src, t)  # pylint: disable=protected-access
  return targets._convert_case([src], targets._out(case), lambda: {  # pylint: disable=protected-access
      "w": itq3s_jax.quantize(targets.W), "e": t["e"], "s": t["s"]})


def _special_src(case, make):
  src = os.path.join(case, "src")
  make(src)
  return targets._convert_case([src], targets._out(case), lambda: {})  # pylint: disable=protected-access


def fifo_source(case, base):
  return _special_src(case, os.mkfifo)


def device_source(case, base):
  return _special_src(case, lambda p: os.symlink("/dev/zero", p))


def fifo_shard(case, base):
  def make(p):
    shutil.copytree(base["st_dir"], p)
    os.remove(os.path.join(p, "b.safetensors"))
    os.mkfifo(os.path.join(p, "b.safetensors"))
  return _special_src(case, make)


def fifo_metadata(case, base):
  path = os.path.join(case, "ckpt")
  shutil.copytree(base["ckpt"], path)
  meta = os.path.join(path, "itq3s", "metadata")
  os.remove(meta)
  os.mkfifo(meta)
  rc, err = targets.run_cli(["inspect", path])
  return targets._cli_status(rc, err, "inspect") or ("ok", "")  # pylint: disable=protected-access


def fifo_calibration(case, base):
  path = os.path.join(case, "stats.npz")
  os.mkfifo(path)
  return targets._convert_case([base["st"], "--calibration", path], targets._out(case),  # pylint: disable=protected-access
                               lambda: {})


def empty_dst(case, base):
  cwd = os.getcwd()
  os.chdir(case)
  try:
    rc, err = targets.run_cli(["convert", base["st"], "", "--quiet"])
    left = os.listdir(case)
  finally:
    os.chdir(cwd)
  status = targets._cli_status(rc, err, "convert")  # pylint: disable=protected-access
  return ("partial", f"left {left}") if left else status or ("wrong", "exit 0")


def _st_field(case, base, edit):
  src = os.path.join(case, "m.safetensors")
  shutil.copy(base["st"], src)
  with open(src, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  text = edit(raw[8:8 + n].decode())
  with open(src, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n:])
  return targets._convert_case([src], targets._out(case), lambda: {})  # pylint: disable=protected-access


def dtype_list(case, base):
  return _st_field(case, base, lambda t: t.replace('"dtype":"F32"', '"dtype":["F32"]', 1))


def shape_1e400(case, base):
  return _st_field(case, base, lambda t: t.replace('"shape":[16,256]', '"shape":[1e400,256]', 1))


def deep_header(case, base):
  return _st_field(case, base, lambda t: t.rstrip()[:-1] + ',"x":' + "[" * 100000 + "]" * 100000 + "}")


def weight_map_not_str(case, base):
  src = os.path.join(case, "shards")
  shutil.copytree(base["st_dir"], src)
  index = os.path.join(src, "m.safetensors.index.json")
  with open(index) as f:
    doc = json.load(f)
  doc["weight_map"]["pos"] = ["b.safetensors"]
  with open(index, "w") as f:
    json.dump(doc, f)
  return targets._convert_case([src], targets._out(case), lambda: {})  # pylint: disable=protected-access


def broken_calibration_zip(case, base):
  path = os.path.join(case, "stats.npz")
  with open(base["calib"], "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  return targets._convert_case([base["st"], "--calibration", path], targets._out(case),  # pylint: disable=protected-access
                               lambda: {})


def calibration_missing_array(case, base):
  path = os.path.join(case, "stats.npz")
  with np.load(base["calib"]) as f:
    arrays = {k: f[k] for k in f.files if k != "s0"}
  np.savez(path, **arrays)
  return targets._convert_case([base["st"], "--calibration", path], targets._out(case),  # pylint: disable=protected-access
                               lambda: {})


def unrestricted_inspect(case, base):
  """`inspect` of a checkpoint the tool wrote with --calibration --rounding unrestricted."""
  dst = targets._out(case)  # pylint: disable=protected-access
  rc, err = targets.run_cli(["convert", base["st"], dst, *targets.ARGS, "--calibration",
                             base["calib"], "--rounding", "unrestricted"])
  if rc:
    return "traceback", err
  rc, err = targets.run_cli(["inspect", dst])
  return targets._cli_status(rc, err, "inspect") or ("ok", "")  # pylint: disable=protected-access


def sealed_edit(field, value):
  def case_fn(case, base):
    path = os.path.join(case, "ckpt")
    shutil.copytree(base["ckpt"], path)
    meta_path = os.path.join(path, "itq3s", "metadata")
    with open(meta_path) as f:
      meta = json.load(f)
    e = next(e for e in meta["tensors"] if e["kind"] == ("array" if field == "parts"
                                                         else "quantized"))
    e[field] = value
    with open(meta_path, "w") as f:
      json.dump(entries.seal(meta), f)
    try:
      checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
      return "error", str(exc)
    return "wrong", "loaded"
  case_fn.__name__ = f"sealed_{field}"
  return case_fn


def resume_seed_edit(case, base):
  """An edited seed in the journal used to resume to wrong codes with exit 0."""
  dst = targets._out(case)  # pylint: disable=protected-access
  stage = checkpoint.writers.staging_path(dst)
  shutil.copytree(base["stage"], stage)
  journal = os.path.join(stage, "done.jsonl")
  with open(journal) as f:
    lines = [json.loads(line) for line in f]
  lines[0]["seed"] = 7
  with open(journal, "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in lines)
  return targets._convert_case([base["resume_src"], "--resume"], dst, lambda: {},  # pylint: disable=protected-access
                               stage_ok=True)


def poisoned_plan_cache(case, base):
  """A float shape in from_bytes used to poison blocks.plan's cache for the process."""
  hdr = b'{"shape": [4.0, 256.0], "format": "uniform3", "seed": 0}'
  try:
    itq3s_jax.QuantizedTensor.from_bytes(b"ITQ3" + struct.pack("<II", 1, len(hdr)) + hdr
                                         + bytes(392))
    return "wrong", "accepted float dims"
  except ValueError:
    pass
  itq3s_jax.quantize(targets.W, "uniform3")  # must still work
  return "error", "refused; later quantize of K=256 still works"


def gguf_tensor_count_zero(case, base):
  """A converted GGUF whose tensor count reads 0 used to inspect as an empty file."""
  path = os.path.join(case, "out.gguf")
  with open(base["gguf_out"], "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:8] + bytes(8) + raw[16:])
  rc, err = targets.run_cli(["inspect", path])
  return targets._cli_status(rc, err, "inspect") or ("wrong", "exit 0")  # pylint: disable=protected-access


# (name, function, the outcome it must have)
PINNED = [
    (header_low_byte_0x80, "ok"),
    (zero_size_tensor, "ok"),
    (fifo_source, "error"),
    (device_source, "error"),
    (fifo_shard, "error"),
    (fifo_metadata, "error"),
    (fifo_calibration, "error"),
    (empty_dst, "error"),
    (dtype_list, "error"),
    (shape_1e400, "error"),
    (deep_header, "error"),
    (weight_map_not_str, "error"),
    (broken_calibration_zip, "error"),
    (calibration_missing_array, "error"),
    (unrestricted_inspect, "ok"),
    (sealed_edit("seed", -1), "error"),
    (sealed_edit("parts", 10**9), "error"),
    (sealed_edit("rounding", "sideways"), "error"),
    (resume_seed_edit, "error"),
    (poisoned_plan_cache, "error"),
    (gguf_tensor_count_zero, "error"),
]
