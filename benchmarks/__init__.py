"""ActNorm's benchmarks; ``benchmarks/run.py`` is the entry point.

A package so that tests can import its parts (``from benchmarks.graph_memory import ...``);
importing it imports no framework.
"""
