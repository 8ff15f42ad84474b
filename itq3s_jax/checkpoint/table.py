"""Plain-text tables for the convert/inspect summaries (no third-party dependency)."""

from __future__ import annotations

from typing import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Left-aligned columns separated by two spaces; numbers right-aligned."""
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

  def line(values):
    return "  ".join(v.rjust(w) if num else v.ljust(w)
                     for v, w, num in zip(values, widths, numeric)).rstrip()

  return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(x: object) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"
