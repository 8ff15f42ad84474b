"""The package's modules import one way: no cycles, even through imports inside functions.

Every ``import``/``from ... import`` statement of ``itq3s_jax`` (at module level
or inside a function) is an edge from its module to the modules it names;
importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so those are
edges too unless they enclose the importer (then they are already running).
A cycle in that graph is a design error even when a function-level import
hides it at run time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import itq3s_jax

ROOT = os.path.dirname(os.path.abspath(itq3s_jax.__file__))
PACKAGE = "itq3s_jax"


def module_files(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: file} of every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(root):
    rel = os.path.relpath(dirpath, os.path.dirname(root))
    for f in files:
      if f.endswith(".py"):
        parts = rel.split(os.sep) + ([] if f == "__init__.py" else [f[:-3]])
        out[".".join(parts)] = os.path.join(dirpath, f)
  assert package in out
  return out


def _targets(name: str, node: ast.AST, modules: set[str]) -> set[str]:
  """Modules of the package that one import statement in module ``name`` runs."""
  pkg = name if name in modules and _is_package(name, modules) else name.rpartition(".")[0]
  found: set[str] = set()
  if isinstance(node, ast.Import):
    found.update(a.name for a in node.names)
  elif isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      anchor = pkg.split(".")
      anchor = anchor[:len(anchor) - node.level + 1]
      base = ".".join(anchor + ([base] if base else []))
    subs = {f"{base}.{a.name}" for a in node.names} & modules
    found.update(subs)
    if len(subs) < len(node.names):  # names defined in base itself, not submodules
      found.add(base)
  out = {m for m in found if m in modules and m != name}
  for mod in found | {base} if isinstance(node, ast.ImportFrom) else found:
    parts = mod.split(".")
    for i in range(1, len(parts)):  # importing a.b.c also runs a and a.b ...
      prefix = ".".join(parts[:i])
      # ... unless they enclose the importer: then they are already being imported.
      if prefix in modules and prefix != name and not name.startswith(prefix + "."):
        out.add(prefix)
  return out


def _is_package(name: str, modules: set[str]) -> bool:
  return any(m.startswith(name + ".") for m in modules)


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
  mods = set(files)
  graph = {}
  for name, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges |= _targets(name, node, mods)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None."""
  color, stack = {}, []

  def visit(u):
    color[u] = 1
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if color.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in color:
        found = visit(v)
        if found:
          return found
    stack.pop()
    color[u] = 2
    return None

  for u in sorted(graph):
    if u not in color:
      found = visit(u)
      if found:
        return found
  return None


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph(module_files()))
  assert cycle is None, " -> ".join(cycle)


def test_the_check_catches_a_cycle_hidden_in_a_function(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from pkg import a\n")
  graph = import_graph(module_files(str(pkg), "pkg"))
  assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
  (pkg / "sub" / "b.py").write_text("def f():\n  return 1\n")
  assert find_cycle(import_graph(module_files(str(pkg), "pkg"))) is None


@pytest.mark.parametrize("module", ["itq3s_jax"])
def test_importing_the_core_does_not_import_flax(module):
  code = f"import sys, {module}; print('flax' in sys.modules, 'orbax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False", "False"]
