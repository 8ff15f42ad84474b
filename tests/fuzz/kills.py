"""Kill/resume: a conversion killed N times at random moments resumes to the exact bytes.

``python -m tests.fuzz --kills 20`` runs it: one reference conversion of a
safetensors model, then ``itq3s convert --resume`` started again and again and
killed (SIGKILL, every third time SIGINT) after a random delay; after each kill
DST must not exist. A last run finishes the job; every tensor must equal the
reference byte for byte (quantized codes and kept arrays).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np

from itq3s_jax import checkpoint
from itq3s_jax.checkpoint import safetensors_file
from itq3s_jax.checkpoint import writers


@dataclasses.dataclass
class KillReport:
  kills: int
  killed_midway: int  # kills that hit a run with work left (not a no-op)
  seconds: float
  identical: bool
  detail: str


def _model(path: str, n_tensors: int = 24) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tensors = {f"layers.{i}.proj.weight": rng.standard_normal((128, 512)).astype(np.float32)
             for i in range(n_tensors)}
  tensors["norm.weight"] = np.ones(512, np.float32)
  safetensors_file.write(path, {k: (v.shape, v.dtype) for k, v in tensors.items()},
                         tensors.__getitem__)
  return tensors


def _cli(src: str, dst: str, resume: bool) -> subprocess.Popen:
  argv = [sys.executable, "-m", "itq3s_jax.cli", "convert", src, dst, "--min-size", "1",
          "--quiet"] + (["--resume"] if resume else [])
  return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run(kills: int, workdir: str, seed: int = 0, log=print) -> KillReport:
  """Runs the kill/resume experiment in ``workdir`` (created if missing)."""
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(seed)
  src = os.path.join(workdir, "model.safetensors")
  _model(src)
  ref, dst = os.path.join(workdir, "ref"), os.path.join(workdir, "out")
  start = time.perf_counter()
  t0 = time.perf_counter()
  if _cli(src, ref, False).wait() != 0:
    return KillReport(0, 0, 0.0, False, "the reference conversion failed")
  full = time.perf_counter() - t0
  journal = os.path.join(writers.staging_path(dst), "done.jsonl")
  midway = 0
  for i in range(kills):
    proc = _cli(src, dst, resume=i > 0)
    before = _lines(journal)
    sig = signal.SIGINT if i % 3 == 2 else signal.SIGKILL
    if sig == signal.SIGINT:
      # Ctrl-C while converting (the command's handler); during interpreter start-up
      # Python itself reports the interrupted import.
      while proc.poll() is None and _lines(journal) <= before:
        time.sleep(0.02)
      time.sleep(rng.uniform(0.0, 0.2) * full)
    else:
      time.sleep(rng.uniform(0.2, 1.2) * full)
    if proc.poll() is None:
      proc.send_signal(sig)
      midway += 1
    try:
      err = proc.communicate(timeout=120)[1].decode(errors="replace")
    except subprocess.TimeoutExpired:
      proc.kill()
      return KillReport(i + 1, midway, time.perf_counter() - start, False,
                        f"kill {i + 1}: the process did not exit after {sig.name}")
    if "Traceback" in err:
      return KillReport(i + 1, midway, time.perf_counter() - start, False,
                        f"kill {i + 1} ({sig.name}): traceback on stderr:\n{err[-2000:]}")
    if os.path.exists(dst):
      # Finished (DST is renamed into place whole) before the signal, or killed after the
      # rename: DST must then be the complete conversion. Start over from scratch.
      bad = _differing(ref, dst)
      if bad:
        return KillReport(i + 1, midway, time.perf_counter() - start, False,
                          f"kill {i + 1}: DST exists but differs from the reference: {bad}")
      os.rename(dst, dst + f".done{i}")
      continue
    log(f"kill {i + 1}/{kills} ({sig.name}): journal {before} -> {_lines(journal)} tensors")
  if _cli(src, dst, resume=True).wait() != 0:
    return KillReport(kills, midway, time.perf_counter() - start, False, "final resume failed")
  diff = _differing(ref, dst)
  return KillReport(kills, midway, time.perf_counter() - start, not diff,
                    f"tensors differing from the uninterrupted conversion: {diff}")


def _differing(ref: str, dst: str) -> list[str]:
  """Names (at most 5) whose tensors differ between two checkpoints, or that one lacks."""
  want, got = checkpoint.load(ref), checkpoint.load(dst)
  return [k for k in sorted(set(want) | set(got)) if not _same(want.get(k), got.get(k))][:5]


def _same(a, b) -> bool:
  if a is None or b is None:
    return False
  a = np.asarray(getattr(a, "data", a))
  b = np.asarray(getattr(b, "data", b))
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _lines(path: str) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except OSError:
    return 0
