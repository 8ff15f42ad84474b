"""The staging directory of a conversion: ``job.json``, the ``done.jsonl`` journal, resume.

A conversion writes into ``.<DST name>.itq3s-partial`` (``writers.staging_path``)
with ``job.json`` (what is being converted: source hash and options) and
``done.jsonl`` (one entry per finished tensor, fsynced). ``--resume`` trusts
none of it blindly: the job must equal this run's job; every journal line
must be a well-typed entry (``entries.check_entry``) of a tensor of this job
with exactly the fields this run would record; and every staged tensor whose
bytes no longer match the entry's sha256 is converted again.
"""

from __future__ import annotations

import json
import os
import shutil

from itq3s_jax._src import safe_files
from itq3s_jax._src import safe_json
from itq3s_jax.checkpoint import entries
from itq3s_jax.checkpoint import errors

JOB, JOURNAL = "job.json", "done.jsonl"
_MAX_JOB = 1 << 20
_MAX_JOURNAL = entries.MAX_META_BYTES
# Fields a writer adds after writing (verified against the staged bytes, not predicted).
WRITTEN = ("sha256", "parts")


def _start_over(stage: str, why) -> errors.CheckpointError:
  return errors.CheckpointError(f"{stage}: {why}; rerun without --resume to start over.")


def prepare(stage: str, job: dict, resume: bool) -> list[dict]:
  """Creates ``stage`` (or, with ``resume``, checks its job); returns the journal's entries.

  Raises:
    CheckpointError: ``resume`` and the staging directory is of another job or
      its files are unreadable or malformed.
  """
  job_path = os.path.join(stage, JOB)
  if os.path.isdir(stage) and resume:
    try:
      old = safe_json.loads(safe_files.read_bounded(job_path, _MAX_JOB, "job file"),
                            what=job_path, max_bytes=_MAX_JOB)
    except ValueError:  # Unreadable or Malformed
      old = None
    if old != job:
      raise errors.CheckpointError(
          f"{stage} was made from another source or with other options; rerun without "
          "--resume to start over.")
    return _read_journal(stage)
  if os.path.lexists(stage):
    if os.path.isdir(stage) and not os.path.islink(stage):
      shutil.rmtree(stage)
    else:
      os.remove(stage)
  os.makedirs(stage)
  with open(job_path, "w", encoding="utf-8") as f:
    json.dump(job, f)
  return []


def _read_journal(stage: str) -> list[dict]:
  path = os.path.join(stage, JOURNAL)
  if not os.path.lexists(path):
    return []
  try:
    raw = safe_files.read_bounded(path, _MAX_JOURNAL, "journal")
  except safe_files.Unreadable as exc:
    raise _start_over(stage, exc) from None
  lines = raw.split(b"\n")
  done = []
  for i, line in enumerate(lines[:-1]):  # lines[-1]: empty, or the line being written at death
    try:
      done.append(safe_json.as_dict(
          safe_json.loads(line, what=f"{path} line {i + 1}", max_bytes=1 << 20),
          f"{path} line {i + 1}"))
    except safe_json.Malformed as exc:
      raise _start_over(stage, f"damaged journal ({exc})") from None
  return done


def reusable(stage: str, done: list[dict], expected: dict[str, dict], writer) -> dict[str, dict]:
  """The journal entries to reuse, {name: entry}, after checking them against the job.

  Args:
    stage: the staging directory (for messages).
    done: the journal's entries (:func:`prepare`).
    expected: {name: the entry this run would record for that tensor, without the
      ``WRITTEN`` fields}.
    writer: the destination writer; ``writer.verify(entry)`` re-hashes staged data.

  Returns:
    The entries whose staged data still matches their sha256; the others (and
    tensors never finished) are converted again. The journal is rewritten to
    hold exactly the returned entries.

  Raises:
    CheckpointError: a journal entry that is malformed, of a tensor this job
      does not have, listed twice, or whose fields differ from what this job
      records (another format, seed, rounding, shape ...).
  """
  out: dict[str, dict] = {}
  for i, entry in enumerate(done):
    what = f"{os.path.join(stage, JOURNAL)} line {i + 1}"
    try:
      entries.check_entry(entry, what)
    except safe_json.Malformed as exc:
      raise _start_over(stage, f"damaged journal ({exc})") from None
    want = expected.get(entry["name"])
    if want is None or entry["name"] in out:
      raise _start_over(stage, f"the journal lists {entry['name']!r} "
                        f"{'twice' if want else 'which this job lacks'}")
    if {k: v for k, v in entry.items() if k not in WRITTEN} != want:
      raise _start_over(stage, f"the journal entry of {entry['name']!r} does not match "
                        "this job")
    out[entry["name"]] = entry
  out = {name: e for name, e in out.items() if writer.verify(e)}
  with open(os.path.join(stage, JOURNAL), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(e) + "\n" for e in out.values())
    f.flush()
    os.fsync(f.fileno())
  return out
