"""``itq3s convert SRC DST``: quantize a float checkpoint (streaming, atomic, resumable)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile

import itq3s_jax
from itq3s_jax import cli
from itq3s_jax import checkpoint
from itq3s_jax.checkpoint import converter
from itq3s_jax.checkpoint import table
from itq3s_jax.checkpoint import writers
from itq3s_jax._src import safe_files
from itq3s_jax._src import stats as stats_lib

NAME = "convert"
HELP = ("Convert a safetensors/GGUF/orbax float checkpoint into an itq3s orbax "
        "checkpoint (or a GGUF file llama.cpp runs when DST ends in .gguf).")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", metavar="SRC", help="safetensors file or shard directory, GGUF "
                 "file, or orbax params checkpoint directory")
  p.add_argument("dst", metavar="DST", help="output orbax checkpoint directory, or *.gguf")
  p.add_argument("--format", default="itq3_t", choices=itq3s_jax.formats(),
                 help="format of quantized tensors (default: itq3_t)")
  p.add_argument("--seed", type=int, default=0, help="sign-vector seed (default: 0)")
  p.add_argument("--include", metavar="REGEX", help="quantize only names matching REGEX")
  p.add_argument("--exclude", metavar="REGEX", help="never quantize names matching REGEX")
  p.add_argument("--min-size", type=int, default=converter.DEFAULT_MIN_SIZE,
                 help="smallest 2-D weight (in weights) to quantize (default: %(default)s)")
  p.add_argument("--quantize-embeddings", action="store_true",
                 help="also quantize embeddings and the output head")
  p.add_argument("--calibration", metavar="NPZ",
                 help="input statistics (itq3s calibrate): tensors found there are GPTQ-"
                 "rounded in the coding domain (with the codes calibrate stored, where they "
                 "code these very weights with these options), the others round to nearest")
  cli.add_rounding_argument(p, "with --calibration")
  p.add_argument("--allow-type-41", action="store_true",
                 help="with --format itq3_s and a .gguf DST: write GGML type 41 anyway "
                 "(upstream llama.cpp reads 41 as Q1_0 and refuses the file; the ITQ3_S "
                 "fork runs it on CUDA only)")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted conversion of the same SRC and options")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def run(args: argparse.Namespace) -> int:
  try:
    rule = itq3s_jax.QuantRule(args.format, seed=args.seed, include=args.include,
                               exclude=args.exclude, min_size=args.min_size,
                               quantize_embeddings=args.quantize_embeddings)
    stats, tuned, tuned_for, codes = None, {}, None, {}
    gptq = itq3s_jax.GptqConfig(rounding=args.rounding)
    if args.calibration:
      stats = _load_calibration(args.calibration)
      tuned, tuned_for = stats_lib.load_tuned(args.calibration)
      codes = stats_lib.load_codes(args.calibration)
    elif args.rounding:
      raise cli.CommandError("--rounding needs --calibration.")
    summary = checkpoint.convert(args.src, args.dst, rule=rule, resume=args.resume,
                                 overwrite=args.overwrite, progress=not args.quiet,
                                 calibration=stats, gptq=gptq,
                                 allow_type41=args.allow_type_41, tuned=tuned,
                                 tuned_for=tuned_for, codes=codes)
  except checkpoint.CheckpointError as exc:
    raise cli.CommandError(str(exc)) from None
  except ValueError as exc:  # bad options (regex, seed)
    raise cli.CommandError(str(exc)) from None
  except OSError as exc:
    raise cli.CommandError(f"{exc.filename or args.dst}: {exc.strerror or exc}") from None
  except KeyboardInterrupt:
    print(f"partial conversion kept in {writers.staging_path(args.dst)}; rerun with "
          "--resume to continue.", file=sys.stderr)
    raise
  if not args.quiet:
    print(_summary_table(summary))
  return 0


def _load_calibration(path: str) -> dict:
  """Calibration statistics, or CommandError naming the file (never a zip/npy traceback)."""
  try:
    safe_files.regular_size(path, "calibration file")
    with zipfile.ZipFile(path) as z:  # closed on every error (np.load leaks the file on some)
      bad = z.testzip()
    if bad is not None:
      raise ValueError(f"member {bad!r} is damaged (CRC mismatch)")
    return stats_lib.load(path)
  except safe_files.Unreadable as exc:
    raise cli.CommandError(str(exc)) from None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
    # np.load raises these for a broken zip, a missing or pickled array, a bad header
    raise cli.CommandError(f"{path}: not a readable calibration file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).") from None


def _summary_table(summary: converter.Summary) -> str:
  rows = []
  for e in summary.entries:
    bpw = e.get("bits_per_weight")
    rows.append([e["name"], "x".join(map(str, e["shape"])), e["dtype"],
                 e.get("format", "-"), f"{bpw:.4f}" if bpw else "-", e.get("rounding", "-"),
                 e["reason"]])
  q = [e for e in summary.entries if e["kind"] == "quantized"]
  nq = sum(math.prod(e["shape"]) for e in q)
  # A GGUF destination keeps tensors in their source type (a Q8_0 embedding stays Q8_0),
  # which the entries (float32 as read) do not know: the file's size is the truth there.
  if os.path.isfile(summary.dst):
    size = f"file {table.human_bytes(os.path.getsize(summary.dst))}"
  else:
    size = f"checkpoint {table.human_bytes(sum(e['nbytes'] for e in summary.entries))}"
  footer = (f"\n{len(q)} of {len(summary.entries)} tensors quantized ({nq} weights, "
            f"{8.0 * sum(e['nbytes'] for e in q) / nq if nq else 0:.4f} bpw); "
            f"{size}; {summary.seconds:.1f} s, "
            f"{summary.weights_per_second / 1e6:.2f} M weights/s -> {summary.dst}"
            + (f"\n{summary.codes_reused} tensors written with the calibration file's GPTQ "
               "codes (no second GPTQ run)" if summary.codes_reused else ""))
  return table.render(["tensor", "shape", "dtype", "format", "bpw", "rounding", "rule"],
                      rows) + footer
