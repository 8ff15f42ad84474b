"""itq3s convert with GGUF: a destination llama.cpp loads, and GGUF sources.

The structural checks read the written file with the ``gguf`` package alone
(what llama.cpp's loader checks: names, shapes in elements, types, whole
blocks per row), against a small LLaMA GGUF source built here; the same model
as a Hugging Face directory must give the same file.
"""

from __future__ import annotations

import json
import os

import gguf
import ml_dtypes
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax import calibration
from itq3s_jax._src import gguf_io
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import writers
from itq3s_jax.models import llama
from itq3s_jax.models import tokenizer as tokenizer_lib

T = gguf.GGUFValueType
RNG = np.random.default_rng(2)
TENSORS = {
    "token_embd.weight": (RNG.standard_normal((40, 64)) * 0.02).astype(ml_dtypes.bfloat16),
    "blk.0.attn_q.weight": (RNG.standard_normal((64, 256)) * 0.02).astype(np.float32),
    "blk.0.attn_norm.weight": np.ones(64, np.float32),
}
RULE = dict(min_size=1024)

# A one-block LLaMA: d = 64 (K = 64 rows fall back to IQ4_NL), ffn 256 (ffn_down is IQ3_S).
D, FF, HEADS, KV, HD, VOCAB = 64, 256, 2, 1, 32, 48
TOKENS = [chr(c) for c in range(ord("a"), ord("a") + 26)] + [str(i) for i in range(10)] + \
    list(".,;:!?-+*/") + ["ab", "<|im_start|>"]
LINEAR = {"attn_q": (D, D), "attn_k": (KV * HD, D), "attn_v": (KV * HD, D),
          "attn_output": (D, D), "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}


def _gguf_metadata() -> dict:
  return {
      "general.architecture": ("llama", T.STRING), "general.file_type": (0, T.UINT32),
      "llama.context_length": (512, T.UINT32), "llama.embedding_length": (D, T.UINT32),
      "llama.feed_forward_length": (FF, T.UINT32), "llama.block_count": (1, T.UINT32),
      "llama.attention.head_count": (HEADS, T.UINT32),
      "llama.attention.head_count_kv": (KV, T.UINT32),
      "llama.rope.freq_base": (10000.0, T.FLOAT32),
      "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
      "llama.vocab_size": (VOCAB, T.UINT32), "llama.rope.dimension_count": (HD, T.UINT32),
      "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("smollm", T.STRING),
      "tokenizer.ggml.tokens": (TOKENS, T.ARRAY, T.STRING),
      "tokenizer.ggml.token_type": ([1] * (VOCAB - 1) + [3], T.ARRAY, T.INT32),
      "tokenizer.ggml.merges": (["a b"], T.ARRAY, T.STRING),
      "tokenizer.ggml.bos_token_id": (VOCAB - 1, T.UINT32),
      "tokenizer.ggml.eos_token_id": (VOCAB - 1, T.UINT32),
  }


def _llama_tensors(rng) -> dict:
  embd = rng.standard_normal((VOCAB, D)).astype(np.float32) * 0.1
  out = {"token_embd.weight": gguf_io.RawTensor(
      8, (VOCAB, D), gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0).reshape(-1)),
         "output_norm.weight": rng.uniform(0.5, 1.5, D).astype(np.float32)}
  for part, shape in LINEAR.items():
    out[f"blk.0.{part}.weight"] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  out["blk.0.attn_norm.weight"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
  out["blk.0.ffn_norm.weight"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
  """(GGUF path, HF directory) of the same one-block LLaMA."""
  root = tmp_path_factory.mktemp("llama")
  tensors = _llama_tensors(np.random.default_rng(7))
  path = str(root / "m.gguf")
  gguf_io.write_gguf(path, tensors, _gguf_metadata())
  floats = dict(gguf_io.read_tensors(path))
  hf = root / "hf"
  hf.mkdir()
  names = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
           "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight"}
  hf_parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  names.update({f"blk.0.{g}.weight": f"model.layers.0.{h}.weight" for g, h in hf_parts.items()})
  hf_tensors = {}
  for g, h in names.items():  # HF stores q/k rows in its own RoPE order
    w = floats[g]
    if g == "blk.0.attn_q.weight":
      w = llama.unpermute_rope_rows(w, HEADS)
    elif g == "blk.0.attn_k.weight":
      w = llama.unpermute_rope_rows(w, KV)
    hf_tensors[h] = np.ascontiguousarray(w)
  hf_tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(HD // 2, np.float32)
  safetensors_file.write(str(hf / "model.safetensors"),
                         {k: (v.shape, v.dtype) for k, v in hf_tensors.items()},
                         hf_tensors.__getitem__)
  (hf / "config.json").write_text(json.dumps({
      "model_type": "llama", "hidden_size": D, "intermediate_size": FF,
      "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
      "max_position_embeddings": 512, "tie_word_embeddings": True,
      "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1}))
  md = {k: v[0] for k, v in _gguf_metadata().items()}
  tokenizer_lib.bpe_from_gguf_metadata(md).save(str(hf / "tokenizer.json"))
  return path, str(hf)


def _types(path: str) -> dict[str, tuple[str, list[int]]]:
  return {t.name: (t.tensor_type.name, [int(d) for d in t.shape])
          for t in gguf.GGUFReader(path).tensors}


def test_gguf_output_has_llama_cpp_names_shapes_and_types(llama_src, tmp_path, capsys):
  src, _ = llama_src
  dst = str(tmp_path / "out.gguf")
  assert cli.main(["convert", src, dst, "--format", "iq3_s", "--min-size", "0"]) == 0
  table = capsys.readouterr().out
  assert "quantized: iq4_nl (fallback: K=64 is not a multiple of 256" in table
  before, after = _types(src), _types(dst)
  assert list(after) == list(before)  # llama.cpp looks tensors up by these names
  for name, (kind, dims) in after.items():
    assert dims == before[name][1], name  # element shapes, never padded
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    assert dims[0] % block == 0, name  # whole blocks per row
    if name.startswith("blk.0.attn_") and "norm" not in name or name.endswith(
        ("ffn_gate.weight", "ffn_up.weight")):
      assert kind == "IQ4_NL", name  # K = 64
    elif name.endswith("ffn_down.weight"):
      assert kind == "IQ3_S", name  # K = 256
    else:
      assert kind == before[name][0], name  # kept in the source's type (Q8_0, F32)
  reader = gguf.GGUFReader(dst)
  assert reader.get_field("general.file_type").contents() == 26  # LLAMA_FTYPE_MOSTLY_IQ3_S
  assert reader.get_field("general.quantization_version").contents() == 2
  assert reader.get_field("tokenizer.ggml.tokens").contents() == TOKENS
  raw_src = {t.name: t for t in gguf.GGUFReader(src).tensors}
  raw_dst = {t.name: t for t in reader.tensors}
  np.testing.assert_array_equal(raw_dst["token_embd.weight"].data,
                                raw_src["token_embd.weight"].data)  # bytes copied
  # Round trip: read back by itq3s_jax, the bytes are those of an in-memory quantize,
  # and gguf (llama.cpp's decoder) decodes them to our values bit for bit.
  back = gguf_io.read_quantized(dst)
  for name, (kind, _) in after.items():
    if kind in ("IQ3_S", "IQ4_NL"):
      qt = back[name]
      want = itq3s_jax.quantize(gguf_io.TensorFile(src).read(name), qt.format)
      np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(want.data))
      np.testing.assert_array_equal(
          gguf.quants.dequantize(raw_dst[name].data, raw_dst[name].tensor_type).view(np.uint32),
          np.asarray(itq3s_jax.dequantize(qt)).view(np.uint32))


def test_hugging_face_source_gives_the_gguf_sources_file(llama_src, tmp_path):
  """HF names -> llama.cpp names, q/k rows -> llama.cpp's RoPE order, tokenizer.json ->
  tokenizer.ggml.*: the same codes and vocabulary as converting the GGUF itself."""
  src, hf = llama_src
  rule = itq3s_jax.QuantRule("iq3_s", min_size=0)
  checkpoint.convert(src, str(tmp_path / "a.gguf"), rule=rule)
  checkpoint.convert(hf, str(tmp_path / "b.gguf"), rule=rule)
  a, b = _types(str(tmp_path / "a.gguf")), _types(str(tmp_path / "b.gguf"))
  assert sorted(a) == sorted(b)  # inv_freq dropped, every name mapped
  qa, qb = (gguf_io.read_quantized(tmp_path / n) for n in ("a.gguf", "b.gguf"))
  for name, (kind, dims) in a.items():
    if kind in ("IQ3_S", "IQ4_NL"):
      assert b[name] == (kind, dims), name
      np.testing.assert_array_equal(np.asarray(qb[name].data), np.asarray(qa[name].data))
  assert b["token_embd.weight"][0] == "F32"  # the HF source's type
  ma, mb = (gguf_io.read_metadata(tmp_path / n) for n in ("a.gguf", "b.gguf"))
  for key in ("general.architecture", "llama.embedding_length", "llama.block_count",
              "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.feed_forward_length", "llama.vocab_size", "llama.rope.dimension_count",
              "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
              "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
              "tokenizer.ggml.bos_token_id", "general.file_type"):
    assert mb[key] == ma[key], key
  typed = gguf_io.read_metadata(tmp_path / "b.gguf", typed=True)
  assert typed["llama.block_count"][1] == T.UINT32  # llama.cpp checks value types
  assert typed["llama.attention.layer_norm_rms_epsilon"][1] == T.FLOAT32


def test_calibration_rounds_iq3s_and_iq4nl_tensors_with_gptq(llama_src, tmp_path):
  # Two tensors (one per format) keep the GPTQ compilations to two shapes.
  src, _ = llama_src
  rng = np.random.default_rng(3)
  stats = {}
  for layer, k in (("layers.0.attn.q_proj", D), ("layers.0.mlp.down_proj", FF)):
    x = rng.standard_normal((4 * k, k)).astype(np.float32) * rng.uniform(0.2, 3, k)
    stats[layer] = (x.T @ x / len(x)).astype(np.float32)
  npz = str(tmp_path / "s.npz")
  calibration.save(npz, stats)
  dst = str(tmp_path / "g.gguf")
  assert cli.main(["convert", src, dst, "--format", "iq3_s", "--min-size", "0",
                   "--include", "attn_q|ffn_down", "--calibration", npz, "--quiet"]) == 0
  f = gguf_io.TensorFile(src)
  back = gguf_io.read_quantized(dst)
  for part, layer, fmt in (("attn_q", "attn.q_proj", "iq4_nl"),
                           ("ffn_down", "mlp.down_proj", "iq3_s")):
    name = f"blk.0.{part}.weight"
    qt = back[name]
    want = itq3s_jax.quantize(f.read(name), fmt, hessian=stats[f"layers.0.{layer}"])
    assert want.rounding == "unrestricted" and qt.format == fmt
    np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(want.data))
    rtn = itq3s_jax.quantize(f.read(name), fmt)  # GPTQ changed the codes
    assert not np.array_equal(np.asarray(qt.data), np.asarray(rtn.data))


def test_type_41_needs_consent_and_is_marked(llama_src, tmp_path, capsys):
  src, _ = llama_src
  dst = str(tmp_path / "t.gguf")
  assert cli.main(["convert", src, dst, "--format", "itq3_s", "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "Q1_0" in err and "--allow-type-41" in err and not os.path.exists(dst)
  with pytest.warns(UserWarning, match="no CPU matmul|Q1_0"):
    assert cli.main(["convert", src, dst, "--format", "itq3_s", "--min-size", "0",
                     "--allow-type-41", "--quiet"]) == 0
  types = _types(dst)
  assert types["blk.0.ffn_down.weight"][0] == "Q1_0"  # id 41, as gguf names it
  assert types["blk.0.attn_q.weight"][0] == "IQ4_NL"  # K = 64 falls back as for IQ3_S
  assert gguf_io.read_metadata(dst)[gguf_io.TYPE41_KEY] == "itq3_s"
  assert gguf_io.read_quantized(dst)["blk.0.ffn_down.weight"].format == "itq3_s"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gg") / "m.safetensors")
  safetensors_file.write(path, {k: (v.shape, v.dtype) for k, v in TENSORS.items()},
                         TENSORS.__getitem__)
  return path


def test_gguf_destination_holds_the_in_memory_codes(src, tmp_path):
  dst = str(tmp_path / "out.gguf")
  checkpoint.convert(src, dst, rule=itq3s_jax.QuantRule(format="iq3_s", **RULE))
  got = gguf_io.read_quantized(dst)
  qt = got["blk.0.attn_q.weight"]
  want = itq3s_jax.quantize(TENSORS["blk.0.attn_q.weight"], "iq3_s")
  assert (qt.format, qt.shape) == ("iq3_s", (64, 256))
  np.testing.assert_array_equal(np.asarray(qt.data), np.asarray(want.data))
  # a kept 2-D bfloat16 tensor stays BF16 (its source type), 1-D ones are F32
  assert _types(dst)["token_embd.weight"][0] == "BF16"
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
