"""``python -m proofs``: run every theorem's property checks and print a table.

Each row is one registered check (``harness.CHECKS``), run with hypothesis for
``--examples`` examples (plus its pinned ones through pytest only): status, examples
tried, examples skipped (input outside the format's range / not applicable), and the
worst observed ratio to the bound (<= 1 holds; "tight" rows show the smallest ratio
reached by the tightness witnesses, which must be >= 0.99; "fraction" rows show the
mean fraction of blocks re-quantized to identical bytes). Then the T5 and T9 tables.

  python -m proofs --examples 200            # all theorems
  python -m proofs --only T3 T5 --examples 50
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys
import time

import numpy as np
from hypothesis import HealthCheck, given, settings

from proofs import harness
from proofs import strategies


def _load_modules() -> None:
  here = pathlib.Path(__file__).parent
  names = sorted((p.stem for p in here.glob("t*_test.py")),
                 key=lambda s: int(re.match(r"t(\d+)", s).group(1)))
  for name in names:
    importlib.import_module(f"proofs.{name}")


def run_check(chk: harness.Check, examples: int, derandomize: bool) -> dict:
  stats = {"tried": 0, "skipped": 0, "values": []}

  def body(case):
    stats["tried"] += 1
    r = chk.fn(case)
    if r is None:
      stats["skipped"] += 1
    else:
      stats["values"].append(r)

  test = settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck), print_blob=False)(
                      given(chk.strategy)(body))
  t0 = time.time()
  status, note = "holds", ""
  try:
    test()
  except AssertionError as exc:
    status, note = "FAILS", str(exc).splitlines()[0][:120] if str(exc) else "AssertionError"
  except Exception as exc:  # noqa: BLE001  (the report must go on to the next theorem)
    status, note = "ERROR", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
  vals = stats["values"]
  if not vals:
    worst = None
  elif chk.kind == "tight":
    worst = min(vals)
  elif chk.kind == "fraction":
    worst = float(np.mean(vals))
  else:
    worst = max(vals)
  if chk.kind == "tight" and worst is not None and worst < 0.99 and status == "holds":
    status = "FAILS"
  return dict(status=status, note=note, tried=stats["tried"], skipped=stats["skipped"],
              worst=worst, seconds=time.time() - t0)


def t5_table(draws: int) -> list[str]:
  """Per family: how often itq3_t's bound / error is below uniform3's (256-blocks)."""
  from proofs import t5_vs_uniform_test as t5
  lines = ["", "T5 per family (256-blocks, seed 0, %d blocks each): fraction with" % (
      draws * strategies.ROWS),
           f"{'family':<16} {'M<=theta_lo*m':>13} {'eps_t<eps_u':>11} {'err_t<err_u':>11}"
           f" {'err_t<err_u_rot':>15}"]
  for fam in ("gaussian", "heavy_tail", "outlier_columns", "uniform", "llama_cos", "one_hot",
              "hadamard_rows"):
    cond, eps, err, err_rot = [], [], [], []
    for d in range(draws):
      c = strategies.make(fam, 256, 0, 0, d)
      t, u, ur = (harness.code(f, 0, c.w) for f in ("itq3_t", "uniform3", "uniform3_rot"))
      (wb, zb), = harness.blocks64("itq3_t", 0, c.w)
      cond += list(np.max(np.abs(zb), -1) <= t5.theta_lo(256) * np.max(np.abs(wb), -1))
      eps += list(t.eps[:, 0] < u.eps[:, 0])
      e = [np.linalg.norm(harness.f64(c.w) - x.w_hat, axis=-1) for x in (t, u, ur)]
      err += list(e[0] < e[1])
      err_rot += list(e[0] < e[2])
    lines.append(f"{fam:<16} {np.mean(cond):>13.2f} {np.mean(eps):>11.2f} {np.mean(err):>11.2f}"
                 f" {np.mean(err_rot):>15.2f}")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m proofs", description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=100, help="hypothesis examples per check")
  p.add_argument("--only", nargs="*", default=None, help="theorem ids, e.g. T3 T5")
  p.add_argument("--random", action="store_true", help="randomized (default: derandomized)")
  p.add_argument("--t5-draws", type=int, default=16, help="draws per family in the T5 table")
  args = p.parse_args(argv)
  _load_modules()
  checks = [c for c in harness.CHECKS if not args.only or c.theorem in args.only]
  checks.sort(key=lambda c: int(c.theorem[1:]))  # stable: registration order within a theorem
  print(f"formats: {', '.join(harness.itq3s_jax.formats())}; with a bound: "
        f"{', '.join(harness.bound_formats())}")
  print(f"{'thm':<4} {'check':<34} {'status':<6} {'examples':>8} {'skipped':>7} "
        f"{'worst':>9} {'kind':<8} {'s':>6}")
  failed = 0
  for chk in checks:
    r = run_check(chk, args.examples, not args.random)
    failed += r["status"] != "holds"
    worst = "-" if r["worst"] is None else f"{r['worst']:.4f}"
    print(f"{chk.theorem:<4} {chk.name:<34} {r['status']:<6} {r['tried']:>8} {r['skipped']:>7} "
          f"{worst:>9} {chk.kind:<8} {r['seconds']:>6.1f}", flush=True)
    if r["note"]:
      print(f"     {r['note']}")
  if not args.only or "T5" in args.only:
    print("\n".join(t5_table(args.t5_draws)))
  if not args.only or "T9" in args.only:
    from proofs import t9_iq3s_test as t9
    for fmt, v in t9.worst_relative_error().items():
      print(f"T9 worst constructed ||w - w_hat|| / ||w|| for {fmt}: {v:.3f}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
