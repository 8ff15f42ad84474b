"""Theorems about the itq3s-jax formats, derived in proofs/README.md and property-tested.

``harness`` holds the float64 references, jitted core calls and derived constants;
``strategies`` the adversarial weight generators; ``t<N>_*_test.py`` one module per
theorem; ``python -m proofs`` prints the status table.
"""
