"""itq3s convert with GGUF: GGUF destination (iq3_s/itq3_s bytes as stored) and GGUF source."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax._src import gguf_io
from itq3s_jax.checkpoint import converter
from itq3s_jax.checkpoint import writers
from itq3s_jax.checkpoint import safetensors_file

RNG = np.random.default_rng(2)
TENSORS = {
    "token_embd.weight": (RNG.standard_normal((40, 64)) * 0.02).astype(ml_dtypes.bfloat16),
    "blk.0.attn_q.weight": (RNG.standard_normal((64, 256)) * 0.02).astype(np.float32),
    "blk.0.attn_norm.weight": np.ones(64, np.float32),
}
RULE = dict(min_size=1024)
GGUF_FORMATS = [f for f in ("itq3_s", "iq3_s") if f in itq3s_jax.formats()]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gg") / "m.safetensors")
  safetensors_file.write(path, {k: (v.shape, v.dtype) for k, v in TENSORS.items()},
                         TENSORS.__getitem__)
  return path


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_gguf_destination_holds_the_in_memory_codes(src, tmp_path, fmt):
  dst = str(tmp_path / "out.gguf")
  checkpoint.convert(src, dst, rule=itq3s_jax.QuantRule(format=fmt, **RULE))
  got = gguf_io.read_quantized(dst)
  qt = got["blk.0.attn_q.weight"]
  want = itq3s_jax.quantize(TENSORS["blk.0.attn_q.weight"], fmt)
  assert (qt.format, qt.shape) == (fmt, (64, 256))
  np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(want.data))
  # bfloat16 has no GGUF writer type here: kept as its exact float32 value.
  np.testing.assert_array_equal(got["token_embd.weight"],
                                TENSORS["token_embd.weight"].astype(np.float32))
  np.testing.assert_array_equal(got["blk.0.attn_norm.weight"], np.ones(64, np.float32))
  md = gguf_io.read_metadata(dst)
  assert len(md["itq3s_jax.source_sha256"]) == 64
  assert not (tmp_path / writers.staging_path(dst)).exists()
  report = checkpoint.inspect(dst)
  assert {r.name: r.kind for r in report.rows}["blk.0.attn_q.weight"] == "quantized"


def test_gguf_destination_needs_a_ggml_format(src, tmp_path, capsys):
  assert cli.main(["convert", src, str(tmp_path / "o.gguf"), "--quiet"]) == 2
  assert "GGUF has no tensor type for format 'itq3_t'" in capsys.readouterr().err
  assert not (tmp_path / "o.gguf").exists()


def test_gguf_source(tmp_path):
  path = str(tmp_path / "f.gguf")
  floats = {k: np.asarray(v, np.float32) for k, v in TENSORS.items()}
  gguf_io.write_gguf(path, floats, {"general.architecture": "llama"})
  checkpoint.convert(path, str(tmp_path / "out"), rule=itq3s_jax.QuantRule(**RULE))
  loaded = checkpoint.load(str(tmp_path / "out"))
  want = itq3s_jax.quantize(floats["blk.0.attn_q.weight"])
  np.testing.assert_array_equal(np.asarray(loaded["blk.0.attn_q.weight"].data),
                                np.asarray(want.data))
  np.testing.assert_array_equal(loaded["token_embd.weight"], floats["token_embd.weight"])
  assert checkpoint.read_metadata(str(tmp_path / "out"))["source"]["kind"] == "gguf"


def test_truncated_gguf_source_is_one_clear_line(tmp_path, capsys):
  path = tmp_path / "f.gguf"
  gguf_io.write_gguf(str(path), {"w": np.ones((64, 256), np.float32)}, {})
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  assert cli.main(["convert", str(path), str(tmp_path / "out"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("itq3s convert: error: ") and "truncated" in err, err
  assert err.count("\n") == 1 and not (tmp_path / "out").exists()
