"""GGUF destination: a file llama.cpp loads, assembled by ``gguf_io.write_gguf``.

What is written (``itq3s convert SRC out.gguf --format iq3_s``):

* Types. Each quantized tensor takes the requested format where its row length
  K is a whole number of the format's GGML blocks; otherwise llama.cpp's own
  fallback (``tensor_type_fallback`` in llama-quant.cpp): IQ3_S / ITQ3_S rows
  with K % 256 != 0 become IQ4_NL (32-blocks); a K that even 32 does not
  divide is kept (``QuantRule`` keeps it). The reason is in the convert table.
  Nothing is ever padded: shapes are the model's (:func:`plan_formats`).
* Kept tensors keep their source type: a GGUF source's bytes are copied
  unchanged (a Q8_0 embedding stays Q8_0; checked to decode to the values the
  conversion read), a safetensors source's F32/F16/BF16 are written as such
  (1-D tensors as F32, as llama.cpp's converter does).
* Names and layout. A GGUF source keeps its names and metadata (minus keys of
  an earlier itq3s conversion). A Hugging Face LLaMA directory (config.json
  ``model_type`` llama or mistral) gets llama.cpp's names
  (``llama_names.hf_to_gguf``), its q/k rows in llama.cpp's RoPE order
  (:func:`permute_rope_rows`, the inverse of ``models.llama.unpermute_rope_rows``;
  codes are per row, so permuting coded rows equals coding permuted rows) and
  the hyperparameter/tokenizer keys of ``gguf_meta``. Other sources keep their
  names, with no model metadata.
* ``general.file_type`` is llama.cpp's ftype of the requested format
  (MOSTLY_IQ3_S 26, MOSTLY_IQ4_NL 25; 40 for ITQ3_S, the fork's number), and
  ``general.quantization_version`` 2, as llama-quantize writes them.
* ``itq3s_jax.source_sha256``, ``itq3s_jax.format_version`` and a checksum key
  per tensor (``gguf_io.write_gguf(checksums=True)``), verified when read.

Staging: each finished tensor is saved as ``<item>.npy`` (written to a
temporary name, then renamed, so a resumed run never sees half a file);
``finish`` memory-maps the staged files and streams them into one GGUF file in
the staging directory, which ``convert`` renames to DST.
"""

from __future__ import annotations

import dataclasses
import os

import gguf
import ml_dtypes
import numpy as np

from itq3s_jax._src import config
from itq3s_jax._src import gguf_io
from itq3s_jax._src import llama_names
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import gguf_meta

_CASTS = {"bool": np.int8, "uint8": np.int16}
FALLBACK = {"iq3_s": "iq4_nl", "itq3_s": "iq4_nl"}  # llama-quant.cpp: 256-blocks -> IQ4_NL
FILE_TYPES = {"iq3_s": int(gguf.LlamaFileType.MOSTLY_IQ3_S),
              "iq4_nl": int(gguf.LlamaFileType.MOSTLY_IQ4_NL),
              "itq3_s": gguf_io.FORK_ITQ3_S_FILE_TYPE}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, which llama-quantize records


def check_format(format: str, allow_type41: bool = False) -> None:
  """CheckpointError unless ``format`` has a GGML type this destination may write."""
  gtype = registry.get_format(format).gguf_type
  if gtype is None:
    usable = [f for f in registry.format_names() if registry.get_format(f).gguf_type
              not in (None, gguf_io.ITQ3_S_TYPE)]
    raise errors.CheckpointError(
        f"GGUF has no tensor type for format {format!r}; use --format {' or '.join(usable)}, "
        "or write an orbax checkpoint (a DST not ending in .gguf).")
  if gtype == gguf_io.ITQ3_S_TYPE and not allow_type41:
    raise errors.CheckpointError(
        f"--format {format} writes GGML type 41: {gguf_io.TYPE41_WARNING} Pass "
        "--allow-type-41 to write it anyway.")


def fallback_format(format: str, k: int) -> str | None:
  """The format a row of K weights is coded in for ``format`` (None: keep it in float)."""
  if k % gguf_io.block_size(format) == 0:
    return format
  fmt = FALLBACK.get(format)
  return fmt if fmt is not None and k % gguf_io.block_size(fmt) == 0 else None


def plan_formats(plan, rule):
  """The converter's plan with llama.cpp's per-tensor fallback applied.

  Args:
    plan: [(index, TensorInfo, Decision)].
    rule: the requested QuantRule.

  Returns:
    (plan with fallback decisions and their reasons, {tensor name: QuantRule}
    for the tensors coded in another format than ``rule.format``).
  """
  out, rules = [], {}
  for i, info, d in plan:
    if d.quantize:
      k = info.shape[info.k_axis]
      fmt = fallback_format(rule.format, k)
      block = gguf_io.block_size(rule.format)
      if fmt is None:
        d = config.Decision(False, f"kept: K={k} is not a multiple of {block} or of 32 "
                            "(llama.cpp keeps it in float)")
      elif fmt != rule.format:
        d = config.Decision(True, f"quantized: {fmt} (fallback: K={k} is not a multiple of "
                            f"{block}, as llama.cpp does)")
        rules[info.name] = dataclasses.replace(rule, format=fmt)
    out.append((i, info, d))
  return out, rules


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF q/k rows -> llama.cpp's RoPE order (per head, row s * hd/2 + j to row 2j + s).

  The inverse of ``models.llama.unpermute_rope_rows``. Args: w (n_heads * hd,
  ...) (a weight, its coded rows, or a bias); returns the same shape.
  """
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
      .reshape(w.shape)


class GgufWriter:
  """Stages tensors as .npy and writes the GGUF file at ``finish``."""

  kind = "gguf"

  def __init__(self, stage: str, source, rule, allow_type41: bool = False):
    self.stage = stage
    self._source = source
    self._rule = rule
    self._allow41 = allow_type41
    self._hf = gguf_meta.hf_directory(source.path) if source.kind == "safetensors" else None

  def _path(self, item: str) -> str:
    return os.path.join(self.stage, item + ".npy")

  def has(self, item: str) -> bool:
    return os.path.isfile(self._path(item))

  def put(self, item: str, array: np.ndarray, quantized: bool) -> dict:
    """Stages one tensor; returns the entry fields it decides (``parts``, ``sha256``)."""
    if not quantized and array.dtype.name in _CASTS:
      array = array.astype(_CASTS[array.dtype.name])
    if not quantized and array.dtype.name == "bfloat16":  # npy has no bfloat16: its bits
      array = array.astype(np.float32) if array.ndim < 2 else array.view(np.uint16)
    tmp = self._path(item) + ".tmp"
    with open(tmp, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, self._path(item))
    return {"parts": 1 if array.size else 0, "sha256": entries.digest(array)}

  def _load(self, entry: dict) -> np.ndarray:
    return np.load(self._path(entry["item"]), mmap_mode="r", allow_pickle=False)

  def verify(self, entry: dict) -> bool:
    """Whether the staged .npy of ``entry`` holds the array its ``sha256`` names."""
    try:
      return entries.digest(self._load(entry)) == entry["sha256"]
    except (OSError, ValueError):
      return False

  def _kept(self, e: dict, arr: np.ndarray, src):
    """A kept tensor as written: the source's own bytes (GGUF), else the staged array
    (a tuned norm is never the source's)."""
    if e["dtype"] == "bfloat16" and arr.dtype == np.uint16:
      arr = np.asarray(arr).view(ml_dtypes.bfloat16)
    if src is None or e.get("tuned"):
      return arr
    try:
      raw = src.read_raw(e["name"])
      decoded = src.read(e["name"])
    except (ValueError, NotImplementedError) as exc:
      raise errors.CheckpointError(f"{src.path}: tensor {e['name']!r}: {exc}") from None
    if decoded.shape != arr.shape or not np.array_equal(decoded, arr, equal_nan=True):
      raise errors.CheckpointError(f"{src.path}: tensor {e['name']!r} changed since it was "
                                   "read for this conversion.")
    return raw

  def _name(self, name: str, t, cfg: dict):
    """(GGUF name, tensor) of a staged tensor; the HF q/k rows permuted."""
    if self._hf is None:
      return name, t
    gname = llama_names.hf_to_gguf(name)
    if gname is None:
      raise errors.CheckpointError(f"tensor {name!r} of {self._hf} has no llama.cpp GGUF "
                                   "name; exclude it (--exclude) or convert with llama.cpp.")
    m = llama_names.ROPE_PERMUTED.match(gname)
    if m:
      heads = int(cfg["num_attention_heads"])
      if m.group(1) == "k":
        heads = int(cfg.get("num_key_value_heads") or heads)
      if isinstance(t, qtensor.QuantizedTensor):
        t = t.replace(data=permute_rope_rows(np.asarray(t.data), heads))
      else:
        t = permute_rope_rows(np.asarray(t), heads)
    return gname, t

  def _metadata(self, quantized: bool) -> dict:
    if self._source.kind == "gguf":
      md = {k: v for k, v in self._source.gguf_metadata().items()
            if not k.startswith("itq3s_jax.")}
    elif self._hf is not None:
      try:
        md = gguf_meta.metadata(self._hf)
      except (ValueError, NotImplementedError) as exc:
        raise errors.CheckpointError(f"{self._hf}: {exc}") from None
    else:
      md = {}
    if quantized:
      md[gguf.Keys.General.FILE_TYPE] = (FILE_TYPES[self._rule.format], gguf.GGUFValueType.UINT32)
      md[gguf.Keys.General.QUANTIZATION_VERSION] = (QUANTIZATION_VERSION,
                                                     gguf.GGUFValueType.UINT32)
    return md

  def finish(self, meta: dict) -> str:
    src = None
    if self._source.kind == "gguf":
      try:
        src = gguf_io.TensorFile(self._source.path)
      except ValueError as exc:
        raise errors.CheckpointError(str(exc)) from None
    cfg = gguf_meta.config(self._hf) if self._hf is not None else {}
    tensors, quantized = {}, False
    for e in meta["tensors"]:
      arr = self._load(e)
      if entries.digest(arr) != e["sha256"]:
        raise errors.CheckpointError(f"{self._path(e['item'])}: staged tensor {e['name']!r} "
                                     "changed on disk since it was written.")
      if llama_names.HF_IGNORED.search(e["name"]) and self._hf is not None:
        continue  # rotary buffers llama.cpp recomputes
      if e["kind"] == "quantized":
        t = qtensor.QuantizedTensor(data=arr, format=e["format"], k=e["shape"][-1],
                                    seed=e["seed"])
        quantized = True
      else:
        t = self._kept(e, arr, src)
      name, t = self._name(e["name"], t, cfg)
      tensors[name] = t
    md = self._metadata(quantized)
    md["itq3s_jax.source_sha256"] = meta["source"]["sha256"]
    md["itq3s_jax.format_version"] = meta["format_version"]
    out = os.path.join(self.stage, "out.gguf")
    try:
      gguf_io.write_gguf(out, tensors, md, checksums=True, allow_type41=self._allow41)
    except (ValueError, TypeError) as exc:
      raise errors.CheckpointError(f"cannot write GGUF: {exc}") from None
    return out

  def close(self) -> None:
    pass
