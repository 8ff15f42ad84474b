"""The tables of ``itq3s eval``, rendered from its ``--json`` output (for report generators).

``itq3s eval --json`` writes ``{"smollm2": ..., "minilm": ...}``; :func:`render_smollm2`
and :func:`render_minilm` turn each part back into the command's text table.
``DEFAULT_FORMATS`` is the command's ``--formats`` default. Importing this
module imports Flax (the command's models).
"""

from itq3s_jax._src.commands.eval import DEFAULT_FORMATS
from itq3s_jax._src.commands.eval import render_minilm
from itq3s_jax._src.commands.eval import render_smollm2

__all__ = ["DEFAULT_FORMATS", "render_minilm", "render_smollm2"]
