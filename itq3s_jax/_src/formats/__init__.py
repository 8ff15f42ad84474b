"""Importing this package registers every built-in format (one module each)."""

from itq3s_jax._src.formats import itq3_t  # noqa: F401
from itq3s_jax._src.formats import uniform3  # noqa: F401
from itq3s_jax._src.formats import iq3s  # noqa: F401
from itq3s_jax._src.formats import iq4nl  # noqa: F401
