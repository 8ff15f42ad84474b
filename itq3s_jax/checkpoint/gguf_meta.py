"""GGUF metadata of a Hugging Face LLaMA directory, as llama.cpp's loader expects it.

``itq3s convert HF_DIR out.gguf`` writes what llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes for a ``LlamaForCausalLM``: the ``llama.*``
hyperparameters from ``config.json`` with the value types llama.cpp checks
(uint32 counts, float32 epsilons), and a GPT-2-style BPE tokenizer from
``tokenizer.json``: every id below ``vocab_size`` with its type (normal;
control for special added tokens; user-defined for other added tokens; unused
``[PAD<i>]`` for ids the vocabulary lacks), the merges, the special token ids
(``config.json``, else ``tokenizer_config.json``'s token strings), whether a
BOS is added, and the chat template.

``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer regex. llama.cpp's
converter finds it by hashing the tokenization of a probe string; here it is
read from the structure of ``tokenizer.json``'s pre-tokenizer, for the families
whose structure identifies them: byte-level alone (``gpt-2``), individual
digits then byte-level (``smollm``: SmolLM/StarCoder's split), and the
Llama-3 split regex then byte-level (``llama-bpe``). Anything else (and
SentencePiece ``tokenizer.model`` vocabularies) raises NotImplementedError
with what to do instead.
"""

from __future__ import annotations

import os
from typing import Any

import gguf

from itq3s_jax._src import safe_files
from itq3s_jax._src import safe_json

T = gguf.GGUFValueType
K = gguf.Keys
ARCH = "llama"
HF_MODEL_TYPES = ("llama", "mistral")  # llama.cpp writes both as general.architecture llama
_MAX_CONFIG = 1 << 20
_MAX_TOKENIZER = 256 << 20
# The Llama-3 pre-tokenizer split (tokenizer.json of Llama 3.x), which llama.cpp calls llama-bpe.
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                 "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _json(path: str, limit: int) -> dict:
  raw = safe_files.read_bounded(path, limit, os.path.basename(path))
  return safe_json.as_dict(safe_json.loads(raw, what=path, max_bytes=limit), path)


def hf_directory(path: str) -> str | None:
  """The Hugging Face LLaMA directory of a safetensors source (its config.json), else None."""
  where = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  cfg = os.path.join(where, "config.json")
  if not os.path.isfile(cfg):
    return None
  try:
    kind = _json(cfg, _MAX_CONFIG).get("model_type")
  except ValueError:
    return None
  return where if kind in HF_MODEL_TYPES else None


def config(directory: str) -> dict:
  return _json(os.path.join(directory, "config.json"), _MAX_CONFIG)


def _u32(v) -> tuple:
  return (int(v), T.UINT32)


def _f32(v) -> tuple:
  return (float(v), T.FLOAT32)


def hyperparameters(cfg: dict, name: str) -> dict[str, Any]:
  """``general.*`` and ``llama.*`` keys of a config.json (typed for ``write_gguf``).

  Raises:
    NotImplementedError: RoPE scaling or sliding windows (not written here).
    ValueError: a required key is missing.
  """
  scaling = cfg.get("rope_scaling")
  if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
    raise NotImplementedError(f"rope_scaling={scaling}: GGUF output writes plain RoPE only.")
  try:
    heads = int(cfg["num_attention_heads"])
    out = {
        K.General.ARCHITECTURE: (ARCH, T.STRING), K.General.NAME: (name, T.STRING),
        K.LLM.CONTEXT_LENGTH.format(arch=ARCH): _u32(cfg.get("max_position_embeddings", 2048)),
        K.LLM.EMBEDDING_LENGTH.format(arch=ARCH): _u32(cfg["hidden_size"]),
        K.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH): _u32(cfg["intermediate_size"]),
        K.LLM.BLOCK_COUNT.format(arch=ARCH): _u32(cfg["num_hidden_layers"]),
        K.Attention.HEAD_COUNT.format(arch=ARCH): _u32(heads),
        K.Attention.HEAD_COUNT_KV.format(arch=ARCH):
            _u32(cfg.get("num_key_value_heads") or heads),
        K.Rope.FREQ_BASE.format(arch=ARCH): _f32(cfg.get("rope_theta", 10000.0)),
        K.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH): _f32(cfg.get("rms_norm_eps", 1e-6)),
        K.LLM.VOCAB_SIZE.format(arch=ARCH): _u32(cfg["vocab_size"]),
        K.Rope.DIMENSION_COUNT.format(arch=ARCH):
            _u32(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
    }
  except (KeyError, TypeError, ValueError) as exc:
    raise ValueError(f"config.json: missing or bad {exc}; is it a LLaMA config?") from None
  if cfg.get("sliding_window") and cfg.get("model_type") == "mistral":
    raise NotImplementedError("a Mistral sliding window is not written to GGUF here.")
  return out


def _pre_tokenizer(pre: Any) -> str:
  """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` (module doc)."""
  steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and \
      pre.get("type") == "Sequence" else [pre]
  kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt-2"
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and \
      steps[1].get("use_regex", True):
    return "smollm"
  if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and \
      (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
    return "llama-bpe"
  raise NotImplementedError(
      f"tokenizer.json pre-tokenizer {kinds} is not one this writer recognises (byte-level "
      "GPT-2, SmolLM digits + byte-level, Llama-3 split); convert the model to GGUF with "
      "llama.cpp's convert_hf_to_gguf.py and give that GGUF to itq3s convert.")


def _merges(model: dict) -> list[str]:
  out = []
  for m in safe_json.as_list(model.get("merges", []), "tokenizer.json: model.merges"):
    out.append(" ".join(m) if isinstance(m, list) else safe_json.as_str(m, "merge"))
  return out


def tokenizer(directory: str, cfg: dict) -> dict[str, Any]:
  """``tokenizer.*`` keys from tokenizer.json (+ tokenizer_config.json), typed.

  Raises:
    NotImplementedError: no tokenizer.json, a non-BPE model, or an unknown
      pre-tokenizer (module docstring).
    ValueError: a malformed file.
  """
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise NotImplementedError(f"{directory}: no tokenizer.json (SentencePiece tokenizer.model "
                              "vocabularies are not written here); use llama.cpp's "
                              "convert_hf_to_gguf.py for this model.")
  doc = _json(path, _MAX_TOKENIZER)
  model = safe_json.as_dict(doc.get("model"), "tokenizer.json: model")
  if model.get("type") != "BPE" or model.get("byte_fallback"):
    raise NotImplementedError(f"tokenizer.json model {model.get('type')!r} (byte_fallback="
                              f"{model.get('byte_fallback')}): only byte-level BPE is written.")
  pre = _pre_tokenizer(doc.get("pre_tokenizer"))
  vocab = safe_json.as_dict(model.get("vocab"), "tokenizer.json: model.vocab")
  added = {safe_json.as_int(a.get("id"), "added token id"): a
           for a in safe_json.as_list(doc.get("added_tokens", []), "added_tokens")}
  n = int(cfg.get("vocab_size") or max([*vocab.values(), *added, -1]) + 1)
  tokens = [f"[PAD{i}]" for i in range(n)]
  types = [int(gguf.TokenType.UNUSED)] * n
  for tok, i in vocab.items():
    if 0 <= int(i) < n:
      tokens[int(i)], types[int(i)] = tok, int(gguf.TokenType.NORMAL)
  for i, a in added.items():
    if 0 <= i < n:
      tokens[i] = safe_json.as_str(a.get("content"), "added token content")
      types[i] = int(gguf.TokenType.CONTROL if a.get("special") else
                     gguf.TokenType.USER_DEFINED)
  out = {K.Tokenizer.MODEL: ("gpt2", T.STRING), K.Tokenizer.PRE: (pre, T.STRING),
         K.Tokenizer.LIST: (tokens, T.ARRAY, T.STRING),
         K.Tokenizer.TOKEN_TYPE: (types, T.ARRAY, T.INT32),
         K.Tokenizer.MERGES: (_merges(model), T.ARRAY, T.STRING)}
  tcfg_path = os.path.join(directory, "tokenizer_config.json")
  tcfg = _json(tcfg_path, _MAX_TOKENIZER) if os.path.isfile(tcfg_path) else {}
  ids = {t: i for i, t in enumerate(tokens)}
  for kind, key in (("bos", K.Tokenizer.BOS_ID), ("eos", K.Tokenizer.EOS_ID),
                    ("unk", K.Tokenizer.UNK_ID), ("pad", K.Tokenizer.PAD_ID)):
    tid = cfg.get(f"{kind}_token_id")
    text = tcfg.get(f"{kind}_token")
    text = text.get("content") if isinstance(text, dict) else text
    if not isinstance(tid, int) and isinstance(text, str):
      tid = ids.get(text)
    if isinstance(tid, int) and 0 <= tid < n:
      out[key] = _u32(tid)
  if isinstance(tcfg.get("add_bos_token"), bool):
    out[K.Tokenizer.ADD_BOS] = (tcfg["add_bos_token"], T.BOOL)
  if isinstance(tcfg.get("chat_template"), str):
    out[K.Tokenizer.CHAT_TEMPLATE] = (tcfg["chat_template"], T.STRING)
  return out


def metadata(directory: str) -> dict[str, Any]:
  """All GGUF keys of a Hugging Face LLaMA directory (hyperparameters and tokenizer)."""
  cfg = config(directory)
  name = os.path.basename(os.path.normpath(directory))
  return {**hyperparameters(cfg, name), **tokenizer(directory, cfg)}
