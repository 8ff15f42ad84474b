"""Accuracy benchmark: rel-MSE and bpw per format x test tensor beside the anchors.

Runs the same code as ``itq3s accuracy`` (its public form: ``itq3s_jax.accuracy``)
on the full tensors, adds the anchor columns of benchmarks/anchors.py and checks
the issue-2 targets of itq3_t. Every registered format is measured, so new
formats appear without changes here.

  python benchmarks/accuracy.py                  # full tensors, table + targets
  python benchmarks/accuracy.py --json > a.json  # for the report generator
  python benchmarks/accuracy.py --rows 32 --formats itq3_t   # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402  (benchmarks/anchors.py, next to this file)
from itq3s_jax import accuracy  # noqa: E402


def check_targets(results, summaries) -> list[tuple[str, float, float, bool]]:
  """(target, measured, limit, met) for itq3_t; empty when itq3_t was not measured."""
  ours = [r for r in results if r.format == "itq3_t"]
  summ = [s for s in summaries if s.format == "itq3_t"]
  if not ours or not summ:
    return []
  t = {x.name: x.limit for x in anchors.ITQ3_T_TARGETS}
  rows = []

  def add(name, value):
    rows.append((name, value, t[name], value <= t[name]))

  add("rel-MSE on every test tensor", max(r.rel_mse for r in ours))
  a = [r.rel_mse for r in ours if r.tensor == "a"]
  if a:
    add("rel-MSE on a = N(0,1) (stretch, Q3_K's level)", a[0])
  add("bits per weight", max(r.bpw for r in ours))
  add("llama.cpp cos metric", summ[0].cos_metric)
  ratios = [r.max_ratio for r in ours if r.max_ratio is not None]
  if ratios and all(r.bound_holds is not None for r in ours):
    # The float32 bound is the binding check; report the exact-arithmetic ratio beside it.
    add("max err / certified bound (incl. float32 slack)",
        0.0 if all(r.bound_holds for r in ours) else float("inf"))
  add("bits per weight at K = 576", summ[0].bpw_k576)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  accuracy.add_arguments(parser)
  parser.set_defaults(rows=0)  # full tensors
  parser.add_argument("--all-anchors", action="store_true",
                      help="show every anchor column, not only the default ones")
  args = parser.parse_args(argv)
  cols = ([a for a in anchors.ANCHORS] if args.all_anchors
          else [anchors.by_name(n) for n in anchors.DEFAULT_COLUMNS])
  formats, tensors, missing = accuracy.parse_common(args)
  results, summaries = accuracy.measure(formats, tensors, seed=args.seed)
  targets = check_targets(results, summaries)
  if args.json:
    print(accuracy.to_json(
        results, summaries, rows=args.rows or None, seed=args.seed, skipped=missing,
        anchors=[dataclasses.asdict(a) for a in anchors.ANCHORS],
        itq3_t_targets=[dict(target=n, measured=v, limit=l, met=m)
                        for n, v, l, m in targets]))
    return 0
  rows = "full tensors" if not args.rows else f"{args.rows} rows per tensor"
  print(f"accuracy benchmark ({rows}, seed {args.seed}, no importance weights)\n")
  print(accuracy.render(results, summaries, cols))
  for tid, why in missing.items():
    print(f"skipped {tid}: {why}")
  if targets:
    print("\nitq3_t targets (issue 2):")
    for name, value, limit, met in targets:
      shown = ("holds on every block" if value == 0.0 else "VIOLATED") if "bound" in name \
          else f"{value:.4f}"
      print(f"  {'met ' if met else 'MISS'}  {name}: {shown} (limit {limit})")
    if missing:
      print("  (the nine-tensor target needs the MiniLM tensors; see 'skipped' above)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
