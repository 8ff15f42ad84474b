"""Refuse what must not be opened for reading: FIFOs, devices, sockets, directories.

Opening a FIFO blocks until a writer appears (forever, for a conversion), and
``/dev/zero`` or ``/dev/urandom`` never end; both look like files to
``os.path.exists``. Every reader stats its inputs through :func:`regular_size`
before opening them.
"""

from __future__ import annotations

import os
import stat


class Unreadable(ValueError):
  """A path that is missing, not a regular file, or too large; the message says which."""


def regular_size(path: str | os.PathLike[str], what: str = "file") -> int:
  """Size in bytes of the regular file ``path`` (symlinks followed).

  Raises:
    Unreadable: ``path`` does not exist, or is a directory, FIFO, device or socket.
  """
  path = os.fspath(path)
  try:
    st = os.stat(path)
  except OSError as exc:
    raise Unreadable(f"{path}: {exc.strerror or 'cannot stat'}.") from None
  if not stat.S_ISREG(st.st_mode):
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise Unreadable(f"{path}: is {kind}, not a regular {what}; refusing to read it.")
  return st.st_size


def read_bounded(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
  """The bytes of a regular file of at most ``max_bytes`` (Unreadable / ValueError)."""
  size = regular_size(path, what)
  if size > max_bytes:
    raise Unreadable(f"{os.fspath(path)}: {size} bytes, more than the {max_bytes} a {what} "
                     "may have.")
  try:
    with open(path, "rb") as f:
      return f.read(max_bytes + 1)[:max_bytes]
  except OSError as exc:
    raise Unreadable(f"{os.fspath(path)}: {exc.strerror or exc}.") from None
