"""itq3s inspect: the report matches the checkpoint, bounds hold, malformed input is refused."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import writers

RNG = np.random.default_rng(1)
TENSORS = {
    "layers.0.q_proj.weight": (RNG.standard_normal((64, 256)) * 0.02).astype(np.float32),
    "layers.0.norm.weight": np.ones(64, np.float32),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("insp")
  src = str(d / "m.safetensors")
  safetensors_file.write(src, {k: (v.shape, v.dtype) for k, v in TENSORS.items()},
                         TENSORS.__getitem__)
  checkpoint.convert(src, str(d / "out"), rule=itq3s_jax.QuantRule(min_size=1024))
  return str(d / "out")


def test_report_rows_and_certified_bound(ckpt):
  report = checkpoint.inspect(ckpt)
  rows = {r.name: r for r in report.rows}
  q = rows["layers.0.q_proj.weight"]
  assert (q.kind, q.format, q.shape, q.bits_per_weight) == ("quantized", "itq3_t", (64, 256),
                                                            3.4375)
  assert rows["layers.0.norm.weight"].kind == "array"
  assert report.total_weights == 64 * 256 + 64
  # The report's Frobenius bound must cover the true error, measured in float64 against the
  # float weights the checkpoint came from (blocks are disjoint: squared errors add).
  qt = checkpoint.load(ckpt)["layers.0.q_proj.weight"]
  w_hat = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  err = np.linalg.norm(TENSORS["layers.0.q_proj.weight"].astype(np.float64) - w_hat)
  assert 0 < err <= q.rel_frob_bound * np.linalg.norm(w_hat)
  assert q.max_block_bound == pytest.approx(float(np.max(itq3s_jax.error_bound(qt))))


def test_cli_prints_table_and_totals(ckpt, capsys):
  assert cli.main(["inspect", ckpt]) == 0
  out = capsys.readouterr().out
  assert "layers.0.q_proj.weight" in out and "itq3_t" in out and "3.4375" in out
  assert "2 tensors, 16448 weights" in out and "1 quantized (3.4375 bpw)" in out


def test_format_without_bound_says_so(tmp_path):
  unbounded = [f for f in itq3s_jax.formats() if not itq3s_jax.has_bound(f)]
  if not unbounded:
    pytest.skip("no registered format without a certified bound")
  src = str(tmp_path / "m.safetensors")
  safetensors_file.write(src, {k: (v.shape, v.dtype) for k, v in TENSORS.items()},
                         TENSORS.__getitem__)
  checkpoint.convert(src, str(tmp_path / "out"),
                     rule=itq3s_jax.QuantRule(format=unbounded[0], min_size=1024))
  q = checkpoint.inspect(str(tmp_path / "out")).quantized[0]
  assert q.rel_frob_bound is None and "no certified bound" in q.note


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _quantized(meta):
  return next(e for e in meta["tensors"] if e["kind"] == "quantized")


# Edits of the metadata, each applied and then (``sealed``) the checksum recomputed, as a
# tool that rewrites the JSON consistently would: the schema checks must still refuse them.
EDITS = {
    "shape": lambda m: _quantized(m).update(shape=[64, 512]),
    "format": lambda m: _quantized(m).update(format="nope"),
    "seed": lambda m: _quantized(m).update(seed=-1),
    "seed_float": lambda m: _quantized(m).update(seed=4.0),
    "rounding": lambda m: _quantized(m).update(rounding="stochastic"),
    "dtype_list": lambda m: m["tensors"][1].update(dtype=["float32"]),
    "parts": lambda m: m["tensors"][1].update(parts=10**9),
    "duplicate": lambda m: m["tensors"][1].update(name=m["tensors"][0]["name"]),
    "item": lambda m: _quantized(m).update(item="../t00000"),
    "tensors": lambda m: m.update(tensors={"a": 1}),
    "tuned": lambda m: next(e for e in m["tensors"] if e["kind"] == "array").update(tuned="yes"),
}


def _damage(path, kind):
  meta_path = os.path.join(path, "itq3s", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  if kind == "no_meta":
    os.remove(meta_path)
  elif kind == "bad_json":
    _write(meta_path, "{not json")
  elif kind == "nested":
    _write(meta_path, "[" * 100000 + "]" * 100000)
  elif kind == "version":
    meta["format_version"] = 99
    _write(meta_path, json.dumps(meta))
  elif kind == "missing_item":
    shutil.rmtree(os.path.join(path, meta["tensors"][0]["item"]))
  elif kind == "unsealed":  # an edit without a new checksum: a format change, say
    _quantized(meta)["format"] = "uniform3"
    _write(meta_path, json.dumps(meta))
  elif kind == "empty":
    meta["tensors"] = []
    _write(meta_path, json.dumps(meta))
  elif kind in EDITS:
    EDITS[kind](meta)
    _write(meta_path, json.dumps(entries.seal(meta)))
  elif kind == "bitflip":  # one bit of the codes, found by the value written
    _flip_data_bit(os.path.join(path, _quantized(meta)["item"]))


def _flip_data_bit(item_dir):
  """Flips one bit in the largest file of an orbax item (its data chunk)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "rb") as f:
    raw = bytearray(f.read())
  raw[len(raw) // 2] ^= 0x10
  with open(target, "wb") as f:
    f.write(bytes(raw))


@pytest.mark.parametrize("kind,message", [
    ("no_meta", "not an itq3s checkpoint"),
    ("bad_json", "not valid JSON"),
    ("nested", "nested 100000 deep"),
    ("version", "unsupported itq3s checkpoint version 99"),
    ("missing_item", "is missing: no item directory t00000/"),
    ("unsealed", "does not match its sha256"),
    ("empty", "does not match its sha256"),
    ("bitflip", "is damaged"),
    ("shape", "nbytes is 7040, its shape and format need 14080"),
    ("format", "format is 'nope'; expected one of"),
    ("seed", "seed is -1, outside"),
    ("seed_float", "seed must be an integer, got float 4.0"),
    ("rounding", "rounding is 'stochastic'"),
    ("dtype_list", "dtype must be a string, got list"),
    ("parts", "parts is 1000000000, impossible"),
    ("duplicate", "appears twice"),
    ("item", "item is '../t00000'; expected 't00000'"),
    ("tensors", "tensors must be a JSON list"),
    ("tuned", "tuned must be"),
])
def test_malformed_checkpoint_is_one_clear_line(ckpt, tmp_path, capsys, kind, message):
  path = str(tmp_path / "copy")
  shutil.copytree(ckpt, path)
  _damage(path, kind)
  assert cli.main(["inspect", path]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("itq3s inspect: error: ") and message in captured.err, \
      captured.err
  assert captured.err.count("\n") == 1
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
    checkpoint.load(path)


def test_codes_that_decode_to_non_finite_values_are_refused(tmp_path):
  """A checkpoint written (and sealed) by the library around codes whose scales are Inf:
  the checksums hold, so only the decode check can refuse it."""
  qt = itq3s_jax.quantize(TENSORS["layers.0.q_proj.weight"], "uniform3")
  data = np.asarray(qt.data).copy()
  data[:, :2] = 0xFF  # the first block's fp16 scale: NaN
  bad = qt.replace(data=data)
  entry = {"name": "w", "kind": "quantized", "format": "uniform3", "seed": 0,
           "rounding": "nearest", "shape": [64, 256], "transposed": False,
           "nbytes": bad.nbytes, "bits_per_weight": bad.bits_per_weight, "dtype": "float32"}
  writers.save_tensors(str(tmp_path / "c"), [(entry, data, True)], {"created_by": "test"})
  with pytest.raises(checkpoint.CheckpointError, match="decode to non-finite values"):
    checkpoint.load(str(tmp_path / "c"))
  assert cli.main(["inspect", str(tmp_path / "c")]) == 2


@pytest.mark.parametrize("what,message", [("missing", "no such file or directory"),
                                          ("file", "not a directory")])
def test_not_a_checkpoint(tmp_path, capsys, what, message):
  path = tmp_path / "x"
  if what == "file":
    path.write_bytes(b"hello")
  assert cli.main(["inspect", str(path)]) == 2
  assert message in capsys.readouterr().err


def test_one_layout_for_convert_and_flax_save_from_relative_paths(tmp_path, monkeypatch, capsys):
  """`itq3s convert` output restores into an NNX model; `flax.save` output opens with
  `itq3s inspect`; every path relative to the working directory."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  monkeypatch.chdir(tmp_path)
  model = Net(nnx.Rngs(0))
  with ocp.StandardCheckpointer() as c:  # a Flax checkpoint: kernel (in, out) = (256, 64)
    c.save(os.path.abspath("float"), nnx.to_pure_dict(nnx.state(model)))
  assert cli.main(["convert", "float", "q", "--min-size", "0", "--quiet"]) == 0
  rule = itq3s_jax.QuantRule(min_size=0)
  restored = qflax.restore("q", nnx.eval_shape(lambda: qflax.quantize_model(
      Net(nnx.Rngs(1)), rule)[0]))
  in_memory, _ = qflax.quantize_model(Net(nnx.Rngs(0)), rule)
  assert isinstance(restored.lin, qflax.QuantizedLinear)
  x = jnp.asarray(RNG.standard_normal((2, 256)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(in_memory(x)))

  qflax.save("saved", in_memory)
  capsys.readouterr()
  assert cli.main(["inspect", "saved"]) == 0
  out = capsys.readouterr().out
  assert "lin" in out and "itq3_t" in out, out
