"""itq3s convert: round trip, policy, streaming chunks, atomicity, resume, bad input.

Shapes are few and small (one eager compile each); every comparison of codes
is exact: conversion must reproduce in-memory quantization bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax.checkpoint import converter
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import writers

RNG = np.random.default_rng(0)
# name -> array: two quantizable weights (float32 and bfloat16, K=288 has a 32-tail), an
# embedding, a norm, a bias, an int buffer and a weight whose K is not a multiple of 32.
TENSORS = {
    "model.embed_tokens.weight": (RNG.standard_normal((40, 64)) * 0.02).astype(np.float32),
    "model.layers.0.q_proj.weight": (RNG.standard_normal((64, 256)) * 0.02).astype(np.float32),
    "model.layers.0.o_proj.weight":
        (RNG.standard_normal((32, 288)) * 0.02).astype(ml_dtypes.bfloat16),
    "model.layers.0.q_proj.bias": np.linspace(-1, 1, 64).astype(np.float32),
    "model.layers.0.norm.weight": np.ones(64, np.float16),
    "model.layers.0.odd.weight": (RNG.standard_normal((16, 100)) * 0.02).astype(np.float32),
    "model.position_ids": np.arange(64, dtype=np.int64),
}
QUANTIZED = ("model.layers.0.q_proj.weight", "model.layers.0.o_proj.weight")
RULE = itq3s_jax.QuantRule(min_size=1024)


def write_st(path, tensors=TENSORS):
  safetensors_file.write(str(path), {k: (v.shape, v.dtype) for k, v in tensors.items()},
                         tensors.__getitem__)
  return str(path)


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def run_cli(*argv):
  return cli.main(["convert", *map(str, argv), "--quiet"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  d = tmp_path_factory.mktemp("conv")
  src = write_st(d / "model.safetensors")
  summary = checkpoint.convert(src, str(d / "out"), rule=RULE)
  return src, str(d / "out"), summary


def test_round_trip_is_bit_identical_to_in_memory_quantization(converted):
  _, out, _ = converted
  loaded = checkpoint.load(out)
  assert set(loaded) == set(TENSORS)
  for name, w in TENSORS.items():
    got = loaded[name]
    if name in QUANTIZED:
      want = itq3s_jax.quantize(w, "itq3_t", seed=0)
      assert isinstance(got, itq3s_jax.QuantizedTensor)
      assert (got.shape, got.format, got.seed) == (want.shape, want.format, want.seed)
      np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
      np.testing.assert_array_equal(np.asarray(itq3s_jax.dequantize(got)),
                                    np.asarray(itq3s_jax.dequantize(want)))
    else:
      assert np.asarray(got).dtype == w.dtype, name
      np.testing.assert_array_equal(np.asarray(got), w)


def test_metadata_records_format_shape_seed_bpw_and_source_hash(converted):
  src, out, _ = converted
  meta = checkpoint.read_metadata(out)
  assert meta["format_version"] == 2
  content = _read(src)
  want = hashlib.sha256(content).hexdigest()  # what sha256sum prints
  assert meta["source"]["sha256"] == want
  by_name = {e["name"]: e for e in meta["tensors"]}
  e = by_name["model.layers.0.o_proj.weight"]
  qt = itq3s_jax.quantize(TENSORS["model.layers.0.o_proj.weight"])
  assert (e["format"], e["shape"], e["seed"]) == ("itq3_t", [32, 288], 0)
  assert e["bits_per_weight"] == qt.bits_per_weight
  assert by_name["model.layers.0.odd.weight"]["reason"].startswith("kept: K=100")


def test_composite_orbax_layout_restores_items_without_a_target(converted):
  _, out, _ = converted
  entry = checkpoint.read_metadata(out)["tensors"][1]
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(out, entry["item"]))
  assert set(tree) == {"data" if entry["kind"] == "quantized" else "value"}


def test_chunked_quantization_equals_one_call(monkeypatch):
  w = TENSORS["model.layers.0.q_proj.weight"]
  monkeypatch.setattr(converter, "CHUNK_WEIGHTS", 32 * 256)  # two calls of 32 rows
  got = checkpoint.quantize_tensor(w, itq3s_jax.QuantRule(seed=5))
  want = itq3s_jax.quantize(w, seed=5)
  np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))


def test_orbax_flax_params_source_transposes_kernels(tmp_path):
  kernel = TENSORS["model.layers.0.q_proj.weight"].T.copy()  # Flax (in, out) = (256, 64)
  params = {"params": {"Dense_0": {"kernel": kernel, "bias": np.zeros(64, np.float32)}}}
  with ocp.StandardCheckpointer() as c:
    c.save(str(tmp_path / "src"), params)
  checkpoint.convert(str(tmp_path / "src"), str(tmp_path / "out"), rule=RULE)
  loaded = checkpoint.load(str(tmp_path / "out"))
  qt = loaded["params/Dense_0/kernel"]
  want = itq3s_jax.quantize(kernel.T)
  assert qt.shape == (64, 256)
  np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(want.data))
  np.testing.assert_array_equal(np.asarray(loaded["params/Dense_0/bias"]), np.zeros(64))


def test_sharded_directory_with_and_without_index(tmp_path):
  names = list(TENSORS)
  write_st(tmp_path / "model-00001-of-00002.safetensors", {n: TENSORS[n] for n in names[:3]})
  write_st(tmp_path / "model-00002-of-00002.safetensors", {n: TENSORS[n] for n in names[3:]})
  checkpoint.convert(str(tmp_path), str(tmp_path.parent / "noindex"), rule=RULE)
  assert set(checkpoint.load(str(tmp_path.parent / "noindex"))) == set(TENSORS)
  index = {"weight_map": {n: f"model-0000{1 + (i >= 3)}-of-00002.safetensors"
                          for i, n in enumerate(names) if n != "model.position_ids"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  checkpoint.convert(str(tmp_path), str(tmp_path.parent / "index"), rule=RULE)
  assert set(checkpoint.load(str(tmp_path.parent / "index"))) == set(TENSORS) - {
      "model.position_ids"}
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(checkpoint.CheckpointError, match="shard .* is missing"):
    checkpoint.convert(str(tmp_path), str(tmp_path.parent / "broken"), rule=RULE)


class _Boom(Exception):
  pass


def test_failure_midway_leaves_no_dst_and_resume_finishes(tmp_path, converted):
  src, reference, _ = converted
  dst = str(tmp_path / "out")

  def fail_after_three(n):
    if n == 3:
      raise _Boom

  with pytest.raises(_Boom):
    checkpoint.convert(src, dst, rule=RULE, on_tensor=fail_after_three)
  assert not os.path.exists(dst)
  assert os.path.isdir(writers.staging_path(dst))
  summary = checkpoint.convert(src, dst, rule=RULE, resume=True)
  done_before = sum(int(np.prod(TENSORS[e["name"]].shape)) for e in summary.entries[:3])
  assert summary.weights_converted == sum(v.size for v in TENSORS.values()) - done_before
  assert not os.path.exists(writers.staging_path(dst))
  _assert_same_checkpoint(dst, reference)


def test_resume_refuses_other_options(tmp_path, converted):
  src, _, _ = converted
  dst = str(tmp_path / "out")
  with pytest.raises(_Boom):
    checkpoint.convert(src, dst, rule=RULE, on_tensor=_raise)
  with pytest.raises(checkpoint.CheckpointError, match="other options"):
    checkpoint.convert(src, dst, rule=itq3s_jax.QuantRule(min_size=1024, seed=1), resume=True)
  assert not os.path.exists(dst)


def _raise(n):
  raise _Boom


def _assert_same_checkpoint(a, b):
  la, lb = checkpoint.load(a), checkpoint.load(b)
  assert list(la) == list(lb)
  for name in la:
    x, y = la[name], lb[name]
    if isinstance(x, itq3s_jax.QuantizedTensor):
      assert (x.shape, x.format, x.seed) == (y.shape, y.format, y.seed)
      x, y = x.data, y.data
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_subprocess_then_resume(tmp_path, sig):
  # 24 identical-shape weights: the child needs several seconds, so the signal lands midway.
  # SIGKILL is a crash; SIGINT is Ctrl-C (the command exits 130 and says how to resume).
  many = {f"layers.{i}.mlp.weight": (RNG.standard_normal((64, 256)) * 0.02).astype(np.float32)
          for i in range(24)}
  src, dst = write_st(tmp_path / "m.safetensors", many), str(tmp_path / "out")
  journal = os.path.join(writers.staging_path(dst), "done.jsonl")
  proc = subprocess.Popen([sys.executable, "-m", "itq3s_jax.cli", "convert", src, dst,
                           "--quiet", "--min-size", "1024"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      if os.path.exists(journal) and _read(journal).count(b"\n") >= 2:
        break
      time.sleep(0.02)
    assert proc.poll() is None, "the child finished or died before it could be killed"
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].decode()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  if sig == signal.SIGINT:
    assert proc.returncode == 130 and "rerun with --resume" in err, err
  finished = _read(journal).count(b"\n")
  assert 2 <= finished < len(many)
  assert not os.path.exists(dst)
  summary = checkpoint.convert(src, dst, rule=RULE, resume=True)
  assert summary.weights_converted <= (len(many) - finished) * 64 * 256
  loaded = checkpoint.load(dst)
  for name, w in many.items():
    np.testing.assert_array_equal(np.asarray(loaded[name].data),
                                  np.asarray(itq3s_jax.quantize(w).data))


# ---- bad input: one line on stderr, exit 2, no DST, no staging directory left ----

def _corrupt(tmp_path, kind):
  good = write_st(tmp_path / "good.safetensors")
  raw = _read(good)
  (n,) = struct.unpack("<Q", raw[:8])
  p = tmp_path / f"{kind}.safetensors"
  if kind == "truncated":
    p.write_bytes(raw[:-100])
  elif kind == "tiny":
    p.write_bytes(raw[:5])
  elif kind == "header_length":
    p.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
  elif kind == "header_json":
    p.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
  elif kind == "dtype":
    p.write_bytes(raw[:8] + raw[8:8 + n].replace(b'"BF16"', b'"C64" ') + raw[8 + n:])
  elif kind == "pickle":
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x80\x04\x95" + b"\0" * 32)
  return str(p)


@pytest.mark.parametrize("kind,message", [
    ("truncated", "truncated file: tensor"),
    ("tiny", "truncated safetensors file"),
    ("header_length", "corrupt safetensors header"),
    ("header_json", "corrupt safetensors header"),
    ("dtype", "unsupported dtype C64"),
    ("pickle", "pickle"),
    ("missing", "no such file"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, kind, message):
  src = str(tmp_path / "nope.safetensors") if kind == "missing" else _corrupt(tmp_path, kind)
  dst = tmp_path / "out"
  assert run_cli(src, dst) == 2
  err = capsys.readouterr().err
  assert err.startswith("itq3s convert: error: ") and message in err, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert not dst.exists() and not os.path.exists(writers.staging_path(str(dst)))


def test_nan_tensor_is_named(tmp_path, capsys):
  bad = dict(TENSORS)
  w = TENSORS["model.layers.0.q_proj.weight"].copy()
  w[3, 7] = np.nan
  bad["model.layers.0.q_proj.weight"] = w
  src = write_st(tmp_path / "nan.safetensors", bad)
  assert run_cli(src, tmp_path / "out", "--min-size", 1024) == 2
  err = capsys.readouterr().err
  assert "tensor 'model.layers.0.q_proj.weight': weight has NaN/Inf" in err
  assert "first at indices [[3, 7]]" in err
  assert not (tmp_path / "out").exists()
  assert not os.path.exists(writers.staging_path(str(tmp_path / "out")))


def test_existing_dst_needs_overwrite(tmp_path, capsys, converted):
  src, _, _ = converted
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep").write_text("x")
  assert run_cli(src, dst) == 2
  assert "already exists; pass --overwrite" in capsys.readouterr().err
  assert (dst / "keep").exists()
  assert run_cli(src, dst, "--overwrite", "--min-size", 1024) == 0
  assert not (dst / "keep").exists()
  assert set(checkpoint.load(str(dst))) == set(TENSORS)


def test_bad_regex_is_a_clear_error(tmp_path, capsys, converted):
  assert run_cli(converted[0], tmp_path / "out", "--include", "(") == 2
  assert "is not a valid regex" in capsys.readouterr().err


def test_cli_prints_table_unless_quiet(tmp_path, capsys, converted):
  src, _, _ = converted
  assert cli.main(["convert", src, str(tmp_path / "a"), "--min-size", "1024"]) == 0
  out = capsys.readouterr().out
  assert "kept: K=100 is not a multiple of 32" in out and "2 of 7 tensors quantized" in out
  assert run_cli(src, tmp_path / "b", "--min-size", 1024) == 0
  assert capsys.readouterr().out == ""


def test_format_and_include_exclude_flags(tmp_path, capsys, converted):
  src, _, _ = converted
  assert run_cli(src, tmp_path / "u", "--format", "uniform3", "--min-size", 1024,
                 "--exclude", "o_proj") == 0
  loaded = checkpoint.load(str(tmp_path / "u"))
  assert loaded["model.layers.0.q_proj.weight"].format == "uniform3"
  assert not isinstance(loaded["model.layers.0.o_proj.weight"], itq3s_jax.QuantizedTensor)
  assert loaded["model.layers.0.o_proj.weight"].dtype == jnp.bfloat16


def test_flax_round_trip_outputs_bit_identical_to_in_memory_quantization(tmp_path):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top

  class Mlp(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
      return self.dense(32, name="out")(nn.relu(self.dense(64, name="hidden")(x)))

  x = jnp.asarray(RNG.standard_normal((3, 256)), jnp.float32)
  params = Mlp().init(jax.random.key(0), x)["params"]
  params = jax.tree.map(np.asarray, params)
  with ocp.StandardCheckpointer() as c:
    c.save(str(tmp_path / "float"), {"params": params})
  checkpoint.convert(str(tmp_path / "float"), str(tmp_path / "q"), rule=RULE)
  restored = checkpoint.load_tree(str(tmp_path / "q"))["params"]
  in_memory, report = qflax.quantize_params(params)
  assert len(report.quantized) == 2
  model = Mlp(dense=qflax.QuantizedDense)
  y_restored = np.asarray(model.apply({"params": restored}, x))
  y_memory = np.asarray(model.apply({"params": in_memory}, x))
  np.testing.assert_array_equal(y_restored, y_memory)
  # And the layer is really quantized: outputs differ from the float model's.
  assert not np.array_equal(y_restored, np.asarray(Mlp().apply({"params": params}, x)))


def test_dst_equal_to_src_is_refused_even_with_overwrite(tmp_path, capsys):
  src = write_st(tmp_path / "m.safetensors")
  before = _read(src)
  assert run_cli(src, src, "--overwrite") == 2
  assert "is the source" in capsys.readouterr().err
  assert _read(src) == before


def test_large_kept_arrays_are_saved_in_row_blocks(tmp_path, monkeypatch, converted):
  from itq3s_jax.checkpoint import writers  # pylint: disable=g-import-not-at-top
  src, reference, _ = converted
  monkeypatch.setattr(writers, "PART_BYTES", 3000)  # embedding 40x64 f32: 11 rows per block
  checkpoint.convert(src, str(tmp_path / "out"), rule=RULE)
  entry = {e["name"]: e for e in checkpoint.read_metadata(str(tmp_path / "out"))["tensors"]}
  assert entry["model.embed_tokens.weight"]["parts"] == 4  # ceil(40 / 11)
  _assert_same_checkpoint(str(tmp_path / "out"), reference)


def _sigma(k: int, seed: int = 3) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * k, k)) + 0.5 * rng.standard_normal((2 * k, 1))
  x[:, 1] *= 20  # one loud input channel, so GPTQ differs from nearest rounding
  return (x.T @ x / len(x)).astype(np.float32)


def test_calibrated_conversion_is_gptq_where_statistics_exist(tmp_path, capsys):
  """--calibration: tensors with statistics (found by exact name or without .weight) are
  GPTQ-coded exactly as in memory, chunked or not; the others round to nearest; the
  rounding is recorded and survives loading."""
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  src = write_st(tmp_path / "model.safetensors")
  stats = {"model.layers.0.q_proj": _sigma(256)}
  calibration.save(tmp_path / "stats.npz", stats)
  out = tmp_path / "out"
  assert run_cli(src, out, "--min-size", "1024", "--calibration", tmp_path / "stats.npz") == 0
  loaded = checkpoint.load(str(out))
  q = loaded["model.layers.0.q_proj.weight"]
  want = itq3s_jax.quantize(TENSORS["model.layers.0.q_proj.weight"], hessian=stats[
      "model.layers.0.q_proj"])
  assert q.rounding == "two_neighbour"
  np.testing.assert_array_equal(np.asarray(q.data), np.asarray(want.data))
  assert not np.array_equal(np.asarray(q.data), np.asarray(itq3s_jax.quantize(
      TENSORS["model.layers.0.q_proj.weight"]).data))
  assert loaded["model.layers.0.o_proj.weight"].rounding == "nearest"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(converter, "CHUNK_WEIGHTS", 32 * 256)
    chunked = checkpoint.quantize_tensor(TENSORS["model.layers.0.q_proj.weight"], RULE,
                                         hessian=stats["model.layers.0.q_proj"])
  np.testing.assert_array_equal(np.asarray(chunked.data), np.asarray(want.data))
  # statistics of the wrong size are one clear line, and --rounding needs statistics
  calibration.save(tmp_path / "bad.npz", {"model.layers.0.q_proj": _sigma(64)})
  assert run_cli(src, tmp_path / "o2", "--min-size", "1024",
                 "--calibration", tmp_path / "bad.npz") == 2
  assert "belong to another model" in capsys.readouterr().err
  assert run_cli(src, tmp_path / "o3", "--rounding", "unrestricted") == 2
  assert "--rounding needs --calibration" in capsys.readouterr().err


def test_hessian_key_maps_gguf_names_to_model_paths():
  stats = {"layers.3.attn.q_proj": 0, "layers.3.mlp.down_proj": 0, "lm_head": 0}
  assert converter.hessian_key("blk.3.attn_q.weight", stats) == "layers.3.attn.q_proj"
  assert converter.hessian_key("blk.3.ffn_down.weight", stats) == "layers.3.mlp.down_proj"
  assert converter.hessian_key("lm_head.weight", stats) == "lm_head"
  assert converter.hessian_key("blk.3.attn_k.weight", stats) is None


def test_resume_reverifies_staged_tensors_and_checks_the_journal(tmp_path, converted):
  """A staged tensor whose bytes changed is converted again (the result is exact); a
  journal entry that another job would write (an edited seed) is refused."""
  src, reference, _ = converted
  dst = str(tmp_path / "out")
  with pytest.raises(_Boom):
    checkpoint.convert(src, dst, rule=RULE, on_tensor=lambda n: n == 3 and _raise(n))
  stage = writers.staging_path(dst)
  item = os.path.join(stage, "t00001")  # q_proj, quantized
  files = [os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs]
  target = max(files, key=os.path.getsize)
  raw = bytearray(_read(target))
  raw[len(raw) // 2] ^= 0x04
  with open(target, "wb") as f:
    f.write(bytes(raw))
  summary = checkpoint.convert(src, dst, rule=RULE, resume=True)
  kept = TENSORS["model.embed_tokens.weight"].size + TENSORS["model.layers.0.o_proj.weight"].size
  assert summary.weights_converted == sum(v.size for v in TENSORS.values()) - kept
  _assert_same_checkpoint(dst, reference)
  # An edited journal: refused, nothing written.
  dst2 = str(tmp_path / "out2")
  with pytest.raises(_Boom):
    checkpoint.convert(src, dst2, rule=RULE, on_tensor=lambda n: n == 3 and _raise(n))
  journal = os.path.join(writers.staging_path(dst2), "done.jsonl")
  lines = [json.loads(line) for line in _read(journal).decode().splitlines()]
  next(e for e in lines if e["kind"] == "quantized")["seed"] = 7
  with open(journal, "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in lines)
  with pytest.raises(checkpoint.CheckpointError, match="does not match this job"):
    checkpoint.convert(src, dst2, rule=RULE, resume=True)
  assert not os.path.exists(dst2)


def test_zero_size_tensors_and_a_0x80_header_length_convert(tmp_path):
  """Found by fuzzing: (0, 256) tensors made orbax fail ("Cannot save arrays with zero
  size"), and a header length whose low byte is 0x80 was refused as a pickle."""
  w = TENSORS["model.layers.0.q_proj.weight"]
  t = {"w": w, "e": np.zeros((0, 256), np.float32), "s": np.zeros((0,), np.int8)}
  src = write_st(tmp_path / "m.safetensors", t)
  raw = _read(src)
  (n,) = struct.unpack("<Q", raw[:8])
  pad = (0x80 - n) % 0x100
  with open(src, "wb") as f:  # same header, padded to a length with low byte 0x80
    f.write(struct.pack("<Q", n + pad) + raw[8:8 + n] + b" " * pad + raw[8 + n:])
  assert (n + pad) & 0xFF == 0x80
  assert run_cli(src, tmp_path / "out", "--min-size", "1024") == 0
  loaded = checkpoint.load(str(tmp_path / "out"))
  assert loaded["e"].shape == (0, 256) and loaded["s"].dtype == np.int8
  np.testing.assert_array_equal(np.asarray(loaded["w"].data),
                                np.asarray(itq3s_jax.quantize(w).data))


@pytest.mark.parametrize("dst", ["", "."])
def test_empty_or_working_directory_dst_is_refused(tmp_path, capsys, monkeypatch, dst):
  src = write_st(tmp_path / "m.safetensors")
  monkeypatch.chdir(tmp_path)
  assert run_cli(src, dst, "--overwrite") == 2
  err = capsys.readouterr().err
  assert ("DST is empty" if not dst else "or holds it; choose another destination") in err, err
  assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
