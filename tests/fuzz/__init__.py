"""Fuzz tier: deterministic malformed inputs for every reader (issue 18).

``python -m tests.fuzz --cases 5000`` runs the pinned counterexamples and 5000
generated cases and prints outcome counts by target and family;
``tests/fuzz_test.py`` runs a few hundred in CI. See ``runner.py`` (limits,
outcomes), ``targets.py`` (readers, oracles), ``mutations.py`` (families).
"""
