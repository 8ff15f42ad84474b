"""``itq3s accuracy``: rel-MSE, bits per weight and bound checks on the test tensors.

Quantizes the nine test tensors of :mod:`itq3s_jax.testing` with every format
(or ``--formats``) and prints one table: rel-MSE = sum (w - w_hat)^2 / sum w^2
(float64) per tensor x format, then bits per weight, the largest block error
over its certified bound eps_q, whether the float32 bound held on every block,
and llama.cpp's test-quantize-fns metric on its cos data. By default a subset
of rows of each tensor keeps the run under a minute; ``--rows 0`` uses them all
(``benchmarks/accuracy.py`` does, through :func:`measure` and :func:`render`).

Every test tensor has K a multiple of 256, and every format codes 256-blocks
independently of their row, so a tensor is coded as its (R*K/256, 256) block
rows in fixed-size chunks: one compilation per format instead of one per
shape (``tests/formats_test.py`` checks the bytes are the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import itq3s_jax
from itq3s_jax import cli
from itq3s_jax import testing

NAME = "accuracy"
HELP = "quantize the nine test tensors and print rel-MSE / bpw / bound checks per format"
DEFAULT_ROWS = 32
QK = 256
MAX_CHUNK_BLOCKS = 4096  # 1M weights per jitted call


@dataclasses.dataclass(frozen=True)
class Result:
  """One format on one tensor."""
  format: str
  tensor: str
  shape: tuple[int, ...]
  bpw: float
  rel_mse: float
  max_ratio: float | None  # max over blocks of ||w - w_hat|| / eps_q (exact-arithmetic eps_q)
  bound_holds: bool | None  # every block within error_bound(include_rounding=True)


@dataclasses.dataclass(frozen=True)
class FormatSummary:
  """Per-format numbers that do not depend on the test tensors."""
  format: str
  bpw_k576: float  # bits per weight of a row of K = 576 (SmolLM2's width)
  cos_metric: float  # llamacpp_metric on testing.cos_data() (n = 4096)


def row_bpw(format: str, k: int) -> float:
  """Bits per weight of one quantized row of k weights (shape only, nothing computed)."""
  out = jax.eval_shape(lambda w: itq3s_jax.quantize(w, format).data,
                       jax.ShapeDtypeStruct((1, k), jnp.float32))
  return 8.0 * out.shape[-1] / k


@functools.lru_cache(maxsize=None)
def _codec(format: str, seed: int):
  """Jitted (B, 256) float32 blocks -> (w_hat, eps_q, eps_q + float32 slack)."""
  bounded = itq3s_jax.has_bound(format)

  def run(w):
    qt = itq3s_jax.quantize(w, format, seed=seed)
    w_hat = itq3s_jax.dequantize(qt, jnp.float32)
    if not bounded:
      return w_hat, None, None
    eps = itq3s_jax.error_bound(qt, include_rounding=False)[..., 0]
    eps_r = itq3s_jax.error_bound(qt, include_rounding=True)[..., 0]
    return w_hat, eps, eps_r

  return jax.jit(run)


def _as_blocks(w: np.ndarray) -> np.ndarray:
  if w.shape[-1] % QK:
    raise ValueError(f"test tensors need K a multiple of {QK}, got shape {w.shape}.")
  return np.asarray(w, np.float32).reshape(-1, QK)


def _chunk_blocks(sizes: Iterable[int]) -> int:
  most = max(sizes, default=1)
  return min(MAX_CHUNK_BLOCKS, 1 << max(0, math.ceil(math.log2(most))))


def _code_blocks(blocks: np.ndarray, format: str, seed: int, chunk: int):
  """Codes (B, 256) blocks chunk by chunk (zero-padded to whole chunks)."""
  fn = _codec(format, seed)
  outs = []
  for lo in range(0, blocks.shape[0], chunk):
    part = blocks[lo:lo + chunk]
    pad = chunk - part.shape[0]
    padded = np.pad(part, ((0, pad), (0, 0))) if pad else part
    res = jax.block_until_ready(fn(jnp.asarray(padded)))
    outs.append([None if r is None else np.asarray(r)[:part.shape[0]] for r in res])
  return [None if outs[0][i] is None else np.concatenate([o[i] for o in outs])
          for i in range(3)]


def _bound_stats(w: np.ndarray, w_hat: np.ndarray, eps, eps_r):
  if eps is None:
    return None, None
  err = np.sqrt(np.sum((w.astype(np.float64) - w_hat.astype(np.float64)) ** 2, axis=-1))
  eps = eps.astype(np.float64)
  ratio = np.where(eps > 0, err / np.where(eps > 0, eps, 1.0), np.where(err > 0, np.inf, 0.0))
  return float(np.max(ratio, initial=0.0)), bool(np.all(err <= eps_r.astype(np.float64)))


def measure(formats: Sequence[str], tensors: dict[str, np.ndarray], *,
            seed: int = 0, progress: bool = False) -> tuple[list[Result], list[FormatSummary]]:
  """Quantizes every tensor with every format (no importance weights).

  Args:
    formats: registered format names.
    tensors: id -> float32 (R, K) weights, K a multiple of 256.
    seed: sign-vector seed.
    progress: show a tqdm bar over formats x tensors (stderr).

  Returns:
    (one :class:`Result` per format x tensor, one :class:`FormatSummary` per format).
  """
  blocks = {tid: _as_blocks(w) for tid, w in tensors.items()}
  cos = testing.cos_data()
  cos_blocks = _as_blocks(cos[None, :])
  chunk = _chunk_blocks([b.shape[0] for b in blocks.values()] + [cos_blocks.shape[0]])
  results, summaries = [], []
  bar = tqdm.tqdm(total=len(formats) * (len(blocks) + 1), desc="accuracy", unit="tensor",
                  leave=False, disable=not progress)
  for fmt in formats:
    for tid, b in blocks.items():
      bar.set_postfix_str(f"{fmt} {tid}")
      bar.update()
      w_hat, eps, eps_r = _code_blocks(b, fmt, seed, chunk)
      ratio, holds = _bound_stats(b, w_hat, eps, eps_r)
      results.append(Result(fmt, tid, tuple(tensors[tid].shape),
                            row_bpw(fmt, tensors[tid].shape[-1]),
                            testing.rel_mse(b, w_hat), ratio, holds))
    cos_hat = _code_blocks(cos_blocks, fmt, seed, chunk)[0].reshape(cos.shape)
    summaries.append(FormatSummary(fmt, row_bpw(fmt, 576), testing.llamacpp_metric(cos, cos_hat)))
    bar.update()
  bar.close()
  return results, summaries


def _fmt(v, spec: str) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "NO"
  return format(v, spec)


def render(results: Sequence[Result], summaries: Sequence[FormatSummary],
           anchors: Sequence = ()) -> str:
  """The accuracy table: tensors down, our formats then anchor columns across.

  ``anchors`` are objects with ``name``, ``bpw``, ``rel_mse`` (id -> value),
  ``cos_metric`` and ``max_ratio`` (see benchmarks/anchors.py); they are printed
  beside the measured columns, marked ``*``.
  """
  fmts = [s.format for s in summaries]
  tids = list(dict.fromkeys(r.tensor for r in results))
  cell = {(r.format, r.tensor): r for r in results}
  by_fmt = {s.format: s for s in summaries}
  heads = fmts + [f"*{a.name}" for a in anchors]
  width = max([9] + [len(h) for h in heads])
  lines = ["tensor".ljust(15) + " ".join(h.rjust(width) for h in heads)]

  def line(label, ours, theirs):
    lines.append(label.ljust(15) + " ".join(v.rjust(width) for v in ours + theirs))

  for tid in tids:
    line(f"{tid:3}{testing.DESCRIPTIONS.get(tid, '')}"[:14],
         [_fmt(cell[f, tid].rel_mse, ".4f") for f in fmts],
         [_fmt(a.rel_mse.get(tid), ".4f") for a in anchors])
  line("bpw", [_fmt(max(cell[f, t].bpw for t in tids), ".4f") for f in fmts],
       [_fmt(a.bpw, ".4f") for a in anchors])
  line("bpw K=576", [_fmt(by_fmt[f].bpw_k576, ".4f") for f in fmts], ["-"] * len(anchors))
  line("max err/eps", [_fmt(_max_or_none(cell[f, t].max_ratio for t in tids), ".3f")
                       for f in fmts],
       [_fmt(None if a.max_ratio is None else max(a.max_ratio[t] for t in tids
                                                  if t in a.max_ratio), ".3f")
        for a in anchors])
  line("bound holds", [_fmt(_all_or_none(cell[f, t].bound_holds for t in tids), "")
                       for f in fmts], ["-"] * len(anchors))
  line("cos metric", [_fmt(by_fmt[f].cos_metric, ".6f") for f in fmts],
       [_fmt(a.cos_metric, ".6f") for a in anchors])
  lines.append("rel-MSE = sum (w - w_hat)^2 / sum w^2 (float64); max err/eps = max over "
               "256-blocks of ||w - w_hat|| / eps_q; cos metric = llama.cpp "
               "test-quantize-fns sqrt(sum d^2)/n, 3-bit bar 0.0040.")
  if anchors:
    lines.append("* = anchor numbers on the full tensors (benchmarks/anchors.py), llama.cpp "
                 "C library / numpy prototypes; not measured here.")
  return "\n".join(lines)


def _max_or_none(vals):
  vals = [v for v in vals if v is not None]
  return max(vals) if vals else None


def _all_or_none(vals):
  vals = [v for v in vals if v is not None]
  return all(vals) if vals else None


def to_json(results: Sequence[Result], summaries: Sequence[FormatSummary], **extra) -> str:
  """Machine-readable form of :func:`measure`'s output (for report generators)."""
  return json.dumps({
      **extra,
      "results": [dataclasses.asdict(r) for r in results],
      "formats": [dataclasses.asdict(s) for s in summaries],
  }, indent=1, allow_nan=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--formats", nargs="+", metavar="FORMAT",
                      help="formats to measure (default: all registered: "
                      f"{', '.join(itq3s_jax.formats())})")
  parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                      help=f"evenly spaced rows per tensor (default {DEFAULT_ROWS}; 0 = all rows)")
  parser.add_argument("--tensors", nargs="+", metavar="ID", default=None,
                      help=f"test tensors (default: all of {' '.join(testing.TENSOR_IDS)})")
  parser.add_argument("--seed", type=int, default=0, help="sign-vector seed (default 0)")
  parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def parse_common(args: argparse.Namespace):
  """Validates the shared arguments; returns (formats, tensors, missing)."""
  formats = list(args.formats or itq3s_jax.formats())
  unknown = [f for f in formats if f not in itq3s_jax.formats()]
  if unknown:
    raise cli.CommandError(f"unknown format(s) {unknown}; known: {list(itq3s_jax.formats())}")
  if args.rows < 0:
    raise cli.CommandError(f"--rows {args.rows} must be >= 0 (0 = all rows)")
  if args.seed < 0:
    raise cli.CommandError(f"--seed {args.seed} must be >= 0")
  ids = args.tensors or testing.TENSOR_IDS
  bad = [t for t in ids if t not in testing.TENSOR_IDS]
  if bad:
    raise cli.CommandError(f"unknown tensor id(s) {bad}; known: {list(testing.TENSOR_IDS)}")
  missing = {t: why for t, why in testing.missing_tensors().items() if t in ids}
  tensors = testing.test_tensors(ids, rows=args.rows or None)
  return formats, tensors, missing


def missing_note(missing: dict[str, str]) -> str | None:
  """One plain line saying which rows are absent and which package brings them, or None."""
  if not missing:
    return None
  why = sorted(set(missing.values()))
  return (f"NOTE: {len(missing)} of the {len(testing.TENSOR_IDS)} test tensors are not shown "
          f"({', '.join(missing)}): {'; '.join(why)}.")


def run(args: argparse.Namespace, anchors: Sequence = ()) -> int:
  formats, tensors, missing = parse_common(args)
  note = missing_note(missing)
  if note and not args.json:
    print(note, flush=True)
  results, summaries = measure(formats, tensors, seed=args.seed, progress=not args.json)
  if args.json:
    print(to_json(results, summaries, rows=args.rows or None, seed=args.seed,
                  skipped=missing, anchors=[dataclasses.asdict(a) for a in anchors]))
    return 0
  rows = "all rows" if not args.rows else f"{args.rows} evenly spaced rows of each tensor"
  print(f"itq3s accuracy: {len(formats)} formats x {len(tensors)} test tensors ({rows}), "
        f"seed {args.seed}, no importance weights")
  print(render(results, summaries, anchors))
  if note:
    print(note)
  return 0
