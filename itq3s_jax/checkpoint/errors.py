"""The one exception type of checkpoint conversion: bad input a user can fix."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A malformed, unsupported or unsafe checkpoint; the message names the file or tensor.

  The ``itq3s convert`` / ``itq3s inspect`` commands print it as one line and
  exit non-zero; nothing is written to the destination when it is raised.
  """
