"""Side-by-side benchmarks (see README.md here). A package so that every script imports the shared
helpers as ``benchmarks.common``, ``benchmarks.timing``, ``benchmarks.attention_inputs`` and
``benchmarks.baselines`` with no ``sys.path`` edits: run a script from the repository root as
``python -m benchmarks.NAME`` (or ``PYTHONPATH=. python benchmarks/NAME.py``).

Deliberately empty: ``registration_overhead`` must set ``TRITON_INTERPRET`` before torch is imported.
"""
