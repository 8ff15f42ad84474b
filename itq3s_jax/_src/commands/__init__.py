"""Sub-commands of ``itq3s``; every non-underscore module here is one (see itq3s_jax/cli.py)."""
