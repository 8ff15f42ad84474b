"""``python -m tests.fuzz [--cases N] [--seed S]``: run the fuzz tier, print the counts.

Exit status 1 if any case ends in a failure outcome (traceback, hang, partial,
wrong, alloc) or a pinned case has another outcome than the one it pins.
"""

from __future__ import annotations

import argparse
import sys

from . import pinned
from . import runner


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
  p.add_argument("--cases", type=int, default=1500, help="generated cases (default 1500)")
  p.add_argument("--seed", type=int, default=0, help="case generator seed (default 0)")
  p.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
  args = p.parse_args(argv)
  results = runner.run(args.cases, args.seed, timeout_s=args.timeout,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  print(runner.summary(results))
  want = {fn.__name__: outcome for fn, outcome in pinned.PINNED}
  bad_pins = [r for r in results if r.target == "pinned" and r.status != want[r.family]]
  for r in bad_pins:
    print(f"pinned {r.family}: {r.status} (want {want[r.family]}): {r.detail}")
  return 1 if bad_pins or any(r.status in runner.FAILURES for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
