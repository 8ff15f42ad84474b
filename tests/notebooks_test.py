"""Executes every notebook in notebooks/ with nbclient on small settings.

ITQ3S_NOTEBOOK_SMALL=1 shrinks sizes; a cell that raises fails the test. Notebooks
are committed with outputs stripped (checked here too, so they stay reviewable).
"""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{path.name} has outputs committed; strip them")
  monkeypatch.setenv("ITQ3S_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()


