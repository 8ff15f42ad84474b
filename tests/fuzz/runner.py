"""Runs fuzz cases in-process, each under a time limit and a memory watch, and counts outcomes.

Per case: the target's input is rebuilt from the base in a fresh directory and
mutated (``targets.py``); the reader runs in this process. A ``SIGALRM`` timer
turns a case that runs past ``timeout_s`` into a "hang" (a blocking ``open`` of a
FIFO is interrupted too); the kernel's peak-RSS counter is reset before each
case (``/proc/self/clear_refs``) and read after it, and ``RLIMIT_AS`` is lowered
to the current address space plus ``cap_bytes``, so an allocation sized by a
declared field shows up as "alloc" whether or not its pages are touched.
Exceptions of background threads are recorded as tracebacks of the case.

Outcomes: ok, error (clean refusal), orbax_late_print (see ``_ORBAX_LATE``) --
and the failures: traceback, hang, partial, wrong, alloc.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

from . import pinned
from . import targets

FAILURES = ("traceback", "hang", "partial", "wrong", "alloc")
GIB = 1 << 30


class _Timeout(BaseException):
  """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


@dataclasses.dataclass
class Result:
  case: int
  target: str
  family: str
  status: str
  detail: str
  seconds: float
  peak_growth: int  # bytes of resident memory above the case's start


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def run_one(fn, case_dir: str, timeout_s: float, cap_bytes: int) -> tuple[str, str, int]:
  """(status, detail, peak RSS growth) of ``fn(case_dir)`` under the limits."""
  thread_errors = []
  old_hook = threading.excepthook
  threading.excepthook = lambda args: thread_errors.append(
      "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
  old_limit = resource.getrlimit(resource.RLIMIT_AS)
  peak_ok = _reset_peak()
  rss0 = _status_kb("VmRSS")
  resource.setrlimit(resource.RLIMIT_AS, (_status_kb("VmSize") + cap_bytes, old_limit[1]))

  def alarm(signum, frame):
    raise _Timeout

  old_alarm = signal.signal(signal.SIGALRM, alarm)
  signal.setitimer(signal.ITIMER_REAL, timeout_s)
  try:
    status, detail = fn(case_dir)
  except _Timeout:
    status, detail = "hang", f"ran past {timeout_s} s"
  except MemoryError:
    status, detail = "alloc", "MemoryError under the address-space cap"
  except Exception:  # pylint: disable=broad-except (any escape is a traceback outcome)
    status, detail = "traceback", traceback.format_exc()[-1500:]
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_alarm)
    resource.setrlimit(resource.RLIMIT_AS, old_limit)
    threading.excepthook = old_hook
  growth = max(0, _status_kb("VmHWM") - rss0) if peak_ok else 0
  if status not in FAILURES and growth > GIB:
    status, detail = "alloc", f"peak RSS grew by {growth / GIB:.2f} GiB"
  if thread_errors and status not in FAILURES:
    status, detail = "traceback", "background thread: " + thread_errors[0][-1500:]
  return status, detail, growth


class _Stderr:
  """File descriptor 2 redirected to a file for a whole run, so that what C++ code or a
  callback thread prints (after the case that caused it returned, possibly) is seen."""

  def __enter__(self):
    # Exceptions Python reports as unraisable (a callback's, a finalizer's) go here too.
    self._old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: os.write(2, (
        f"Unraisable exception in {u.object!r:.100}:\n" + "".join(traceback.format_exception(
            u.exc_type, u.exc_value, u.exc_traceback))).encode())
    self._file = tempfile.TemporaryFile(mode="a+b")  # O_APPEND: writers never clobber
    sys.stderr.flush()
    self._saved = os.dup(2)
    os.dup2(self._file.fileno(), 2)
    self._pos = 0
    return self

  def new(self) -> str:
    sys.stderr.flush()
    self._file.seek(self._pos)
    text = self._file.read()
    self._pos += len(text)
    return text.decode("utf-8", "replace")

  def log(self, message: str) -> None:
    os.write(self._saved, (message + "\n").encode())

  def __exit__(self, *exc):
    sys.unraisablehook = self._old_hook
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._file.close()


# orbax/tensorstore: when an orbax call fails on a damaged checkpoint while other reads
# are pending, their completion callbacks later hit orbax's closed asyncio loop and
# tensorstore prints this from its callback thread, after the command's one-line error.
# It is third-party output (no exception reaches the library), counted on its own.
_ORBAX_LATE = ("in call_soon_threadsafe", "RuntimeError: Event loop is closed")


def _blame(results: list[Result], printed: str) -> None:
  """A traceback printed since the last look is the latest case's (or a late print of
  the one before: the detail says so)."""
  if "Traceback" in printed and results and results[-1].status not in FAILURES:
    errors = set(re.findall(r"^(\w+(?:Error|Exception|Warning)\b.*)$", printed, re.M))
    late = all(m in printed for m in _ORBAX_LATE) and errors == {_ORBAX_LATE[1]}
    results[-1].status = "orbax_late_print" if late else "traceback"
    results[-1].detail = ("printed on stderr during or just after this case: "
                          + printed[printed.index("Traceback"):][-1500:])


def cases(n: int, seed: int = 0):
  """The first ``n`` generated cases: (index, target, family), targets in turn."""
  for i in range(n):
    target = targets.TARGETS[i % len(targets.TARGETS)]
    rng = random.Random(seed * 1_000_003 + i)
    yield i, target, rng.choice(target.families), rng


def run(n: int, seed: int = 0, *, timeout_s: float = 30.0, cap_bytes: int = 2 * GIB,
        workdir: str | None = None, with_pinned: bool = True, log=None) -> list[Result]:
  """Builds the bases, runs the pinned cases then ``n`` generated ones; returns results."""
  own = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix="itq3s-fuzz-")
  try:
    base = targets.build(os.path.join(workdir, "base"))
    results = []
    jobs = []
    if with_pinned:
      jobs += [(-1 - j, "pinned", fn.__name__, lambda d, fn=fn: fn(d, base))
               for j, (fn, _) in enumerate(pinned.PINNED)]
    for i, target, family, rng in cases(n, seed):
      jobs.append((i, target.name, family,
                   lambda d, t=target, f=family, r=rng: t.run(r, f, d, base)))
    with _Stderr() as stderr:
      for i, name, family, fn in jobs:
        case_dir = os.path.join(workdir, f"case{i}")
        os.makedirs(case_dir)
        t0 = time.perf_counter()
        status, detail, growth = run_one(fn, case_dir, timeout_s, cap_bytes)
        results.append(Result(i, name, family, status, detail, time.perf_counter() - t0, growth))
        shutil.rmtree(case_dir, ignore_errors=True)
        _blame(results, stderr.new())
        if log is not None and results[-1].status in FAILURES:
          stderr.log(f"case {i} {name}/{family}: {results[-1].status}: {results[-1].detail}")
      time.sleep(0.5)  # callbacks that print late
      _blame(results, stderr.new())
    return results
  finally:
    if own:
      shutil.rmtree(workdir, ignore_errors=True)


def summary(results: list[Result]) -> str:
  """A table of outcome counts by target and by family, and the totals."""
  statuses = ("ok", "error", "orbax_late_print") + FAILURES
  lines = []
  for key in ("target", "family"):
    groups = collections.defaultdict(collections.Counter)
    for r in results:
      groups[getattr(r, key)][r.status] += 1
    width = max(len(k) for k in groups)
    lines.append(f"{key:<{width}}  " + "  ".join(f"{s:>9}" for s in statuses) + "      all")
    # (orbax_late_print is wider than its numbers; the columns stay in order)
    for k in sorted(groups):
      c = groups[k]
      lines.append(f"{k:<{width}}  " + "  ".join(f"{c[s]:>{max(9, len(s))}}" for s in statuses)
                   + f"  {sum(c.values()):>7}")
    lines.append("")
  total = collections.Counter(r.status for r in results)
  lines.append("total: " + ", ".join(f"{s} {total[s]}" for s in statuses)
               + f"; {len(results)} cases, {sum(r.seconds for r in results):.1f} s, largest "
               f"peak RSS growth {max((r.peak_growth for r in results), default=0) / 2**20:.0f} MiB")
  return "\n".join(lines)
