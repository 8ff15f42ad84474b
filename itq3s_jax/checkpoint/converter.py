"""``convert``: float checkpoint -> quantized checkpoint, streaming, atomic, resumable.

One tensor is in memory at a time: read it, quantize it in
row chunks of about ``CHUNK_WEIGHTS`` weights (codes are per row, so chunks give
the same bytes as one call; the chunk bounds the encoder's temporaries), hand
the codes to the writer, forget it. Peak memory is about the largest tensor
plus its codes plus one chunk's temporaries.

Atomicity: everything is written into ``.<DST name>.itq3s-partial`` next to
DST, with ``job.json`` (source hash + options) and ``done.jsonl`` (one line per
finished tensor, fsynced). Only when all tensors are done is that directory
renamed to DST. A crash or Ctrl-C leaves no DST; ``resume=True`` reuses the
finished tensors of a partial directory made from the same source and options.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
import tqdm

import itq3s_jax
from itq3s_jax._src import gemma_names
from itq3s_jax._src import llama_names
from itq3s_jax._src import stats as stats_lib
from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import qtensor
from itq3s_jax.checkpoint import errors
from itq3s_jax.checkpoint import gguf_writer
from itq3s_jax.checkpoint import sources
from itq3s_jax.checkpoint import staging
from itq3s_jax.checkpoint import writers

CHUNK_WEIGHTS = 1 << 22  # 16 MiB of float32 per quantize call
DEFAULT_MIN_SIZE = 4096  # tensors smaller than this stay float unless a rule says otherwise


@dataclasses.dataclass(frozen=True)
class Summary:
  """What ``convert`` did: one entry per tensor (as in the metadata) and totals."""

  dst: str
  entries: tuple[dict, ...]
  seconds: float
  weights_converted: int  # weights quantized or copied in this run (resumed ones excluded)
  codes_reused: int = 0  # tensors written with the calibration file's codes (no GPTQ run here)

  @property
  def weights_per_second(self) -> float:
    return self.weights_converted / self.seconds if self.seconds else 0.0


def _is_gguf(dst: str) -> bool:
  return dst.lower().endswith(".gguf")


def _writer(dst: str, stage: str, source: sources.Source, rule, allow_type41: bool):
  if _is_gguf(dst):
    return gguf_writer.GgufWriter(stage, source, rule, allow_type41)
  return writers.OrbaxWriter(stage)


def hessian_key(name: str, stats: Mapping[str, Any]) -> str | None:
  """The key of ``stats`` holding the input statistics of checkpoint tensor ``name``.

  Tried in order: ``name`` itself; ``name`` without a ``.weight``/``.kernel``
  suffix; for a LLaMA-family tensor (GGUF ``blk.I.attn_q.weight`` or Hugging
  Face ``model.layers.I.self_attn.q_proj.weight``) the NNX layer path
  ``layers.I.attn.q_proj`` that ``itq3s calibrate`` records for
  ``itq3s_jax.models.llama``; the suffix-free name with ``/`` for ``.``
  (orbax sources join keys with ``/``), with and without a leading
  ``params``. None when nothing matches.
  """
  base = re.sub(r"[./](weight|kernel)$", "", name)
  dotted = base.replace("/", ".")
  cands = [name, base, llama_names.to_layer(name), dotted, dotted.removeprefix("params.")]
  return next((c for c in cands if c is not None and c in stats), None)


def quantize_tensor(w: np.ndarray, rule: itq3s_jax.QuantRule, k_axis: int = -1,
                    hessian: np.ndarray | None = None,
                    gptq: itq3s_jax.GptqConfig | None = None) -> itq3s_jax.QuantizedTensor:
  """Quantizes one weight exactly as ``itq3s_jax.quantize`` would, in row chunks.

  Rows are coded independently (given ``hessian`` too), so the chunks give the
  bytes of one call (tested); every chunk has the same row count (the last one
  zero-padded, its padding codes dropped), so one compilation serves them all.

  Args:
    w: float array (N, K) (or (K, N) with ``k_axis=0``, transposed first).
    rule: format and seed.
    k_axis: contraction axis of ``w``.
    hessian: optional (K, K) input second moment: GPTQ rounding.
    gptq: options of that rounding.

  Returns:
    QuantizedTensor of shape (N, K), bytes equal to ``quantize(w, ...)``.

  Raises:
    ValueError: K not a multiple of 32, NaN/Inf, or values beyond the format's
      range (``itq3s_jax.quantize``'s checks).
  """
  if k_axis == 0:
    w = w.T
  blocks.check_k(w.shape[-1])
  n = w.shape[0]
  rows = min(n, max(1, CHUNK_WEIGHTS // max(1, w.shape[-1])))
  data, qt = None, None
  for lo in range(0, n, rows):
    chunk = np.zeros((rows, w.shape[-1]), w.dtype)
    chunk[:min(rows, n - lo)] = w[lo:lo + rows]
    qt = itq3s_jax.quantize(jnp.asarray(chunk), rule.format, seed=rule.seed, hessian=hessian,
                            gptq=gptq if hessian is not None else None)
    codes = np.asarray(qt.data)
    if data is None:
      data = np.empty((n, codes.shape[-1]), np.uint8)
    data[lo:lo + rows] = codes[:min(rows, n - lo)]
    del chunk, codes
  if qt is None:  # no rows: the codes of zero rows
    qt = itq3s_jax.quantize(jnp.zeros((1, w.shape[-1]), jnp.float32), rule.format,
                            seed=rule.seed)
    data = np.zeros((0, qt.data.shape[-1]), np.uint8)
  return qt.replace(data=jnp.asarray(data))


def _stored_codes(w: np.ndarray, c: stats_lib.Codes | None, rule,
                  gptq) -> qtensor.QuantizedTensor | None:
  """The stored codes of the (N, K) float weight ``w``; None unless GPTQ here would give them."""
  if c is None or (c.format, c.seed) != (rule.format, rule.seed):
    return None
  try:
    wanted = gptq.resolve(rule.format).to_json()
  except ValueError:
    return None
  if (c.gptq != wanted or c.data.shape[-1] != qtensor.row_nbytes(rule.format, w.shape[-1])):
    return None
  rows = c.rows_for(w)
  if rows is None:
    return None
  return itq3s_jax.QuantizedTensor(data=jnp.asarray(c.data[rows]), format=rule.format,
                                   k=w.shape[-1], seed=rule.seed, rounding=wanted["rounding"])


def _release_freed_memory() -> None:
  """Hands memory freed by the last tensor back to the OS (glibc only).

  Tensor-sized buffers freed by NumPy, XLA and orbax's writer threads stay in
  glibc's per-thread arenas; without a trim the RSS of a long conversion
  creeps up by several tensors' worth (measured: benchmarks/convert_rss.py).
  """
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _load_libc():
  try:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


_LIBC = _load_libc()


def convert(src: str, dst: str, *, rule: itq3s_jax.QuantRule | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = False,
            calibration: Mapping[str, Any] | None = None,
            gptq: itq3s_jax.GptqConfig | None = None,
            on_tensor: Callable[[int], None] | None = None,
            allow_type41: bool = False,
            tuned: Mapping[str, np.ndarray] | None = None,
            tuned_for: Mapping[str, Any] | None = None,
            codes: Mapping[str, stats_lib.Codes] | None = None) -> Summary:
  """Converts the float checkpoint ``src`` into a quantized checkpoint ``dst``.

  Args:
    src: safetensors file/shard directory, GGUF file or orbax params checkpoint.
    dst: ``*.gguf`` for a GGUF file, anything else for an orbax checkpoint dir.
    rule: which tensors to quantize and how (:class:`itq3s_jax.QuantRule`; None:
      the default rule with ``min_size=4096``, the command line's default).
    resume: continue a conversion of the same source/options that was cut off.
    overwrite: replace an existing ``dst``.
    progress: show a tqdm progress bar on stderr.
    calibration: optional input statistics {key: Sigma (K, K)}
      (``itq3s_jax.calibration.load``): each quantized tensor with statistics
      (:func:`hessian_key`) is GPTQ-rounded, the others round to nearest.
    gptq: options of that rounding (:class:`itq3s_jax.GptqConfig`).
    on_tensor: called with the count of tensors finished in this run, after
      each (tests use it to interrupt a conversion).
    allow_type41: a GGUF destination may hold ``itq3_s`` tensors as GGML type
      41 (which no CPU llama.cpp runs; ``gguf_io``); refused otherwise.
    tuned: optional {LLaMA model state path (``layers.0.input_norm.weight``):
      (n,)} parameters fitted to these codes (``itq3s calibrate --tune``,
      ``calibration.load_tuned``): each kept tensor that is one of them
      (``llama_names.to_model``; ``gemma_names.state_path`` for a Gemma 3 GGUF,
      whose norms are written as 1 + w) is written with the tuned values, in its
      own dtype; every tuned path must name a kept tensor of the same shape.
    tuned_for: the codes ``tuned`` was fitted to (``{"format", "seed",
      "gptq"}``, plus ``"gguf": True`` when fitted to a GGUF's per-tensor
      fallback); required with ``tuned``, and they must be the codes this
      conversion writes.
    codes: optional {statistics key: ``calibration.Codes``} that ``itq3s
      calibrate`` computed from these statistics (``calibration.load_codes``):
      a tensor whose format, seed and GPTQ options match, and every one of
      whose float rows has its digest there, is written with those codes
      instead of running GPTQ again (the same bytes, found by row digest, so
      row order does not matter). Anything else is coded here.

  A GGUF destination is a file llama.cpp loads (``gguf_writer``): rows that the
  format's blocks do not divide fall back per tensor as llama.cpp's do (IQ3_S
  -> IQ4_NL), kept tensors keep their source type, a Hugging Face LLaMA
  source gets llama.cpp's names, RoPE row order and tokenizer metadata.

  Returns:
    A :class:`Summary`.

  Raises:
    CheckpointError: bad input (nothing is written to ``dst``).
  """
  rule = rule or itq3s_jax.QuantRule(min_size=DEFAULT_MIN_SIZE)
  gptq = gptq or itq3s_jax.GptqConfig()
  src, dst = os.fspath(src), os.fspath(dst)
  _check_dst(src, dst)
  if os.path.lexists(dst) and not overwrite:
    raise errors.CheckpointError(f"{dst} already exists; pass --overwrite to replace it.")
  if _is_gguf(dst):
    gguf_writer.check_format(rule.format, allow_type41)
  start = time.perf_counter()
  source = sources.open_source(src)
  if not source.tensors:
    raise errors.CheckpointError(f"{src}: the checkpoint holds no tensors; nothing to convert.")
  plan = [(i, t, rule.decide(t.name, t.shape, t.dtype, t.k_axis))
          for i, t in enumerate(source.tensors)]
  if len({t.name for t in source.tensors}) != len(source.tensors):
    raise errors.CheckpointError(f"{src}: two tensors have the same name.")
  rules = {}  # tensors coded in another format than rule.format (GGUF fallback)
  if _is_gguf(dst):
    plan, rules = gguf_writer.plan_formats(plan, rule)
  if calibration is not None:
    plan = _match_calibration(plan, calibration)
  if tuned:
    _check_tuned_codes(tuned_for, rule, gptq, rules, _is_gguf(dst))
    plan, tuned_of = _match_tuned(plan, tuned, _is_gemma(source))
  else:
    tuned_of = {}
  expected = {info.name: _entry(info, decision, rules.get(info.name, rule),
                                writers.item_name(i),
                                _rounding(info, decision, rules.get(info.name, rule),
                                          calibration, gptq))
              for i, info, decision in plan}
  for name in tuned_of:
    expected[name]["tuned"] = True  # written from the tuned values, not the source
  src_hash = sources.sha256(source.files, source.path)
  job = {"source_sha256": src_hash, "source_kind": source.kind,
         "rule": rule.to_json(), "dst_kind": "gguf" if _is_gguf(dst) else "orbax"}
  if calibration is not None:  # a resume must not mix codes of other statistics
    job["calibration_sha256"] = _stats_sha256(calibration)
    job["gptq"] = gptq.to_json()
  if tuned:
    job["tuned_sha256"] = _stats_sha256(tuned)
  stage = writers.staging_path(dst)
  journal_entries = staging.prepare(stage, job, resume)
  writer = _writer(dst, stage, source, rule, allow_type41)
  try:
    done = staging.reusable(stage, journal_entries, expected, writer)
  except errors.CheckpointError:
    writer.close()
    raise
  entries, converted, reused = [], 0, 0
  total = sum(math.prod(t.shape) for _, t, _ in plan)
  bar = tqdm.tqdm(total=total, unit="w", unit_scale=True, disable=not progress,
                  file=sys.stderr, desc="convert")
  try:
    with open(os.path.join(stage, staging.JOURNAL), "a", encoding="utf-8") as journal, \
        _interrupt_between_tensors() as interrupted:
      for i, info, decision in plan:
        if info.name in done:
          entries.append(done[info.name])
          bar.update(math.prod(info.shape))
          continue
        entry, stored = _convert_one(
            source, info, decision, rules.get(info.name, rule), writer, expected[info.name],
            calibration, gptq, tuned_of.get(info.name), codes)
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
        entries.append(entry)
        _release_freed_memory()
        converted += math.prod(info.shape)
        reused += stored
        bar.update(math.prod(info.shape))
        if on_tensor is not None:
          on_tensor(len(entries) - len(done))
        interrupted()
    bar.close()
    meta = {"format_version": writers.FORMAT_VERSION, "created_by": "itq3s convert",
            "source": {"path": os.path.abspath(src), "kind": source.kind,
                       "sha256": src_hash},
            "rule": rule.to_json(), "source_metadata": source.metadata,
            "tensors": entries}
    result = writer.finish(meta)
  except errors.CheckpointError:
    writer.close()
    shutil.rmtree(stage, ignore_errors=True)  # the source is bad: nothing worth resuming
    raise
  except BaseException:  # Ctrl-C, a crash in a callback: keep the stage, close orbax
    writer.close()
    raise
  finally:
    bar.close()
  for name in (staging.JOB, staging.JOURNAL):
    if os.path.exists(os.path.join(stage, name)):
      os.remove(os.path.join(stage, name))
  writers.move_into_place(result, dst, overwrite)
  if result != stage:
    shutil.rmtree(stage, ignore_errors=True)
  return Summary(dst, tuple(entries), time.perf_counter() - start, converted, reused)


def _match_calibration(plan, calibration: Mapping[str, Any]):
  """The plan with each quantized tensor lacking statistics marked in its reason.

  Raises:
    CheckpointError: the statistics match none of the tensors to quantize
      (they belong to another model, or use names this converter cannot map).
  """
  quantized = [t.name for _, t, d in plan if d.quantize]
  missing = {n for n in quantized if hessian_key(n, calibration) is None}
  if quantized and len(missing) == len(quantized):
    raise errors.CheckpointError(
        f"the calibration statistics match none of the {len(quantized)} tensors to quantize "
        f"(tensors like {quantized[0]!r}, statistics like {next(iter(calibration), None)!r}); "
        "collect them from this checkpoint with `itq3s calibrate`.")
  return [(i, t, d if t.name not in missing else dataclasses.replace(
      d, reason=f"{d.reason}; no calibration statistics: nearest")) for i, t, d in plan]


@contextlib.contextmanager
def _interrupt_between_tensors():
  """Defers Ctrl-C (SIGINT) to the end of the tensor being written; yields the check.

  Orbax writes an item with threads of its own; an interrupt in the middle left them
  scheduling work on a shut-down executor at exit (a traceback after our message). The
  check raises KeyboardInterrupt once the tensor is journaled, so a resume finds every
  finished tensor and nothing half-written. Outside the main thread signals cannot be
  caught and the check does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  hits = []
  previous = signal.signal(signal.SIGINT, lambda *_: hits.append(True))

  def check():
    if hits:
      raise KeyboardInterrupt

  try:
    yield check
  finally:
    signal.signal(signal.SIGINT, previous)


def _stats_sha256(stats: Mapping[str, Any]) -> str:
  h = hashlib.sha256()
  for key in sorted(stats):
    h.update(key.encode() + b"\0" + np.ascontiguousarray(stats[key], np.float32).tobytes())
  return h.hexdigest()


def _check_dst(src: str, dst: str) -> None:
  """Refuses destinations whose replacement would destroy the source or the working dir."""
  if not dst.strip():
    raise errors.CheckpointError("DST is empty; name the checkpoint directory (or .gguf "
                                 "file) to create.")
  real, real_src = os.path.realpath(dst), os.path.realpath(src)
  inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)
  if inside(real_src, real):
    raise errors.CheckpointError(f"{dst} is the source or holds it; choose another "
                                 "destination.")
  if inside(os.path.realpath(os.getcwd()), real):
    raise errors.CheckpointError(f"{dst} is the working directory or holds it; choose "
                                 "another destination.")
  if os.path.isdir(real_src) and inside(real, real_src):
    raise errors.CheckpointError(f"{dst} lies inside the source directory {src}; choose a "
                                 "destination outside it.")


def _check_tuned_codes(tuned_for, rule, gptq, fallback: dict, gguf: bool) -> None:
  """CheckpointError unless the tuned norms were fitted to the codes this conversion writes."""
  if tuned_for is None:
    raise errors.CheckpointError("tuned parameters need tuned_for: the codes they fit.")
  try:
    wanted = {"format": rule.format, "seed": rule.seed,
              "gptq": gptq.resolve(rule.format).to_json()}
  except ValueError as exc:
    raise errors.CheckpointError(str(exc)) from None
  have = {k: tuned_for.get(k) for k in wanted}
  if have != wanted:
    raise errors.CheckpointError(
        f"the calibration file holds norms tuned to {have['format']} seed {have['seed']} codes "
        f"(GPTQ {have['gptq']}), not to the {rule.format} seed {rule.seed} codes (GPTQ "
        f"{wanted['gptq']}) asked for: convert with the options it was calibrated with, or "
        "calibrate again for these (--format/--seed, or --tune 0).")
  if fallback and not tuned_for.get("gguf"):
    name, r = next(iter(fallback.items()))
    raise errors.CheckpointError(
        f"this GGUF codes {len(fallback)} tensors in another format than {rule.format} "
        f"(llama.cpp's fallback: {name!r} becomes {r.format}), so norms tuned to {rule.format} "
        "codes do not fit it; calibrate with --for-gguf (or --tune 0) for this file.")
  if tuned_for.get("gguf") and not gguf:
    raise errors.CheckpointError(
        "the calibration file's norms were tuned to a GGUF's fallback codes (itq3s calibrate "
        "--for-gguf); convert to a .gguf, or calibrate again without --for-gguf.")


def _is_gemma(source) -> bool:
  """A Gemma 3 GGUF source (its norms are named and stored the Gemma way)."""
  if source.gguf_metadata is None:
    return False
  arch = source.gguf_metadata().get("general.architecture")
  return (arch[0] if isinstance(arch, tuple) else arch) == gemma_names.ARCH


def _tuned_path(name: str, tuned: Mapping[str, Any], gemma: bool) -> tuple[str, float] | None:
  """(the tuned parameter a checkpoint tensor holds, the offset it is stored with), else None.

  LLaMA-family tensors store the model's values; a Gemma GGUF stores a norm
  weight w as w + 1 (``gemma_names``).
  """
  if gemma:
    found = gemma_names.state_path(name)
    if found is None or found[1] != "norm":
      return None
    path, offset = found[0], gemma_names.NORM_OFFSET
  else:
    found = llama_names.to_model(name)
    if found is None:
      return None
    path, offset = found[0], 0.0
  return (path, offset) if path in tuned else None


def _match_tuned(plan, tuned: Mapping[str, Any], gemma: bool = False):
  """(the plan with tuned kept tensors marked in their reason, {tensor name: values to write}).

  Raises:
    CheckpointError: a tuned parameter names no kept tensor of the source (the
      file belongs to another model, or a rule now quantizes it), or has
      another shape than that tensor.
  """
  found = {t.name: hit for _, t, d in plan if not d.quantize
           for hit in [_tuned_path(t.name, tuned, gemma)] if hit is not None}
  missing = sorted(set(tuned) - {p for p, _ in found.values()})
  if missing:
    raise errors.CheckpointError(
        f"the calibration file's tuned parameters {missing[:3]} match no kept tensor of the "
        "source; calibrate this checkpoint again (or with --tune 0).")
  for _, t, _ in plan:
    if t.name in found and tuple(tuned[found[t.name][0]].shape) != tuple(t.shape):
      raise errors.CheckpointError(
          f"tensor {t.name!r} is {list(t.shape)} but its tuned values are "
          f"{list(tuned[found[t.name][0]].shape)}; they belong to another model.")
  plan = [(i, t, d if t.name not in found else dataclasses.replace(
      d, reason=f"{d.reason}; tuned by itq3s calibrate")) for i, t, d in plan]
  return plan, {name: np.asarray(tuned[p], np.float32) + np.float32(off)
                for name, (p, off) in found.items()}


def _rounding(info, decision, rule, calibration, gptq) -> str | None:
  """How a quantized tensor will be rounded: GPTQ's mode where it has statistics."""
  if not decision.quantize:
    return None
  if calibration is None or hessian_key(info.name, calibration) is None:
    return "nearest"
  try:
    return gptq.resolve(rule.format).rounding
  except ValueError as exc:
    raise errors.CheckpointError(f"tensor {info.name!r}: {exc}") from None


def _entry(info, decision, rule, item: str, rounding: str) -> dict:
  """The metadata entry of one tensor, all but what the writer adds (``staging.WRITTEN``).

  A function of the plan alone, so a resumed run can check its journal against it.
  """
  entry = {"name": info.name, "item": item, "dtype": np.dtype(info.dtype).name,
           "reason": decision.reason}
  if not decision.quantize:
    entry.update(kind="array", shape=list(info.shape),
                 nbytes=math.prod(info.shape) * np.dtype(info.dtype).itemsize)
    return entry
  shape = list(info.shape[::-1] if info.k_axis == 0 else info.shape)
  nbytes = math.prod(shape[:-1]) * qtensor.row_nbytes(rule.format, shape[-1])
  entry.update(kind="quantized", format=rule.format, seed=rule.seed, rounding=rounding,
               shape=shape, transposed=info.k_axis == 0, nbytes=nbytes,
               bits_per_weight=8.0 * nbytes / math.prod(shape) if math.prod(shape) else 0.0)
  return entry


def _convert_one(source, info, decision, rule, writer, entry, calibration, gptq,
                 tuned_value=None, codes=None) -> tuple[dict, bool]:
  """(the tensor's entry, whether its codes came from ``codes``): read, code, write one tensor."""
  x = source.read(info.name)
  if tuple(x.shape) != tuple(info.shape) or x.dtype != info.dtype:
    raise errors.CheckpointError(
        f"{source.path}: tensor {info.name!r} reads as {x.dtype.name} {list(x.shape)} but "
        f"its header says {np.dtype(info.dtype).name} {list(info.shape)}.")
  entry = dict(entry)
  if not decision.quantize:
    if tuned_value is not None:  # norm gains fitted to these codes (shape checked in the plan)
      x = np.asarray(tuned_value).astype(x.dtype)
    entry.update(writer.put(entry["item"], x, quantized=False))
    return entry, False
  shape_nk = tuple(entry["shape"])
  key = None if calibration is None else hessian_key(info.name, calibration)
  hessian = None
  if key is not None:
    hessian = np.asarray(calibration[key], np.float32)
    if hessian.shape != (shape_nk[-1],) * 2:
      raise errors.CheckpointError(
          f"tensor {info.name!r} has K={shape_nk[-1]} but its calibration statistics "
          f"{key!r} are {hessian.shape}; they belong to another model.")
  stored = None if hessian is None or not codes else _stored_codes(
      x.T if info.k_axis == 0 else x, codes.get(key), rule, gptq)
  try:
    qt = stored if stored is not None else quantize_tensor(x, rule, info.k_axis, hessian, gptq)
  except (ValueError, TypeError) as exc:
    raise errors.CheckpointError(f"tensor {info.name!r}: {exc}") from None
  del x
  if (qt.format, qt.seed, qt.rounding, list(qt.shape), qt.nbytes) != (
      entry["format"], entry["seed"], entry["rounding"], entry["shape"], entry["nbytes"]):
    raise AssertionError(f"{info.name}: planned entry {entry} does not describe {qt}")
  entry.update(writer.put(entry["item"], np.asarray(qt.data), quantized=True))
  return entry, stored is not None
