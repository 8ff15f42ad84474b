"""Locating data files shipped inside PyPI packages (MiniLM, SmolLM2) without importing them.

The packages' ``__init__`` modules pull in heavy optional dependencies (torch,
llama-cpp-python), so only their install location is looked up.
"""

from __future__ import annotations

import importlib.util
import os


def package_file(module: str, *parts: str) -> str | None:
  """Path of ``parts`` inside the installed package ``module``, or None if either is absent."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  return path if os.path.exists(path) else None
