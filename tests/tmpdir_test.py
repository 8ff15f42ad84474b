"""The suite's temporary files stay under pytest's directory (conftest.py, TMPDIR)."""

import pathlib
import subprocess
import sys
import tempfile


def test_tempfile_lands_under_pytest_basetemp(tmp_path_factory):
  base = tmp_path_factory.getbasetemp().resolve()
  here = pathlib.Path(tempfile.mkdtemp()).resolve()
  assert base in here.parents
  # A subprocess (a notebook kernel, a command line) inherits the choice.
  out = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp())"],
                       capture_output=True, text=True, check=True).stdout.strip()
  assert base in pathlib.Path(out).resolve().parents
