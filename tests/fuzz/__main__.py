"""``python -m tests.fuzz [--cases N] [--seed S] [--kills K]``: run the fuzz tier, print the counts.

Exit status 1 if any case ends in a failure outcome (traceback, hang, partial,
wrong, alloc) or a pinned case has another outcome than the one it pins. With
``--kills K`` it runs the kill/resume experiment instead (``kills.py``).
"""

from __future__ import annotations

import argparse
import sys

from . import kills as kills_lib
from . import pinned
from . import runner


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
  p.add_argument("--cases", type=int, default=1500, help="generated cases (default 1500)")
  p.add_argument("--seed", type=int, default=0, help="case generator seed (default 0)")
  p.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
  p.add_argument("--kills", type=int, default=0,
                 help="run the kill/resume experiment with this many kills instead")
  args = p.parse_args(argv)
  if args.kills:
    import tempfile  # pylint: disable=g-import-not-at-top
    report = kills_lib.run(args.kills, tempfile.mkdtemp(prefix="itq3s-kills-"), args.seed,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report)
    return 0 if report.identical else 1
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
