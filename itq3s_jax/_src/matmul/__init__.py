"""``x @ dequantize(qt).T``: the XLA implementation (``xla.py``) and the dispatch (``api.py``).

The dispatch lives in its own module so the Pallas kernels can import the XLA
reference without importing the dispatch that registers them.
"""
