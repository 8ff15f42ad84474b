"""``itq3s inspect PATH``: per-tensor format, shape, bpw and certified bound of a checkpoint."""

from __future__ import annotations

import argparse

from itq3s_jax import checkpoint
from itq3s_jax import cli
from itq3s_jax.checkpoint import table

NAME = "inspect"
HELP = "Show the tensors, bits per weight and certified error bounds of an itq3s checkpoint."


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("path", metavar="PATH", help="itq3s orbax checkpoint directory")


def run(args: argparse.Namespace) -> int:
  try:
    report = checkpoint.inspect(args.path)
  except checkpoint.CheckpointError as exc:
    raise cli.CommandError(str(exc)) from None
  except OSError as exc:
    raise cli.CommandError(f"{exc.filename or args.path}: {exc.strerror or exc}") from None
  rows = [[r.name, r.kind, r.format, "x".join(map(str, r.shape)), f"{r.bits_per_weight:.4f}",
           table.human_bytes(r.nbytes),
           "-" if r.max_block_bound is None else f"{r.max_block_bound:.3e}",
           "-" if r.rel_frob_bound is None else f"{r.rel_frob_bound:.3e}", r.note]
          for r in report.rows]
  print(table.render(["tensor", "kind", "format", "shape", "bpw", "bytes", "max block bound",
                      "rel. Frobenius bound", "note"], rows))
  q = report.quantized
  qw = sum(r.bits_per_weight * _count(r.shape) for r in q)
  nq = sum(_count(r.shape) for r in q)
  bounded = [r.rel_frob_bound for r in q if r.rel_frob_bound is not None]
  print(f"\n{len(report.rows)} tensors, {report.total_weights} weights, "
        f"{table.human_bytes(report.total_bytes)}; {len(q)} quantized "
        f"({qw / nq if nq else 0:.4f} bpw)"
        + (f", worst relative Frobenius bound {max(bounded):.3e}" if bounded else "")
        + (f", {len(q) - len(bounded)} without a certified bound" if len(bounded) < len(q)
           else ""))
  src = report.source
  if src:
    print(f"source: {src.get('kind')} {src.get('path')} sha256 {src.get('sha256')}")
  return 0


def _count(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n
