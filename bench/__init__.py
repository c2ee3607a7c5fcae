"""Benchmarks for pacsmesh: this machine's own limits and a reference archive (Orthanc).

Run the self-checks with ``python -m bench.limits`` and ``python -m bench.orthanc``.
Generated data goes to a temporary directory or ``bench/out/`` (git-ignored).
"""
