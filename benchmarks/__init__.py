"""Benchmark suites of cure-lirpa: a package, each suite a module run as ``python -m
benchmarks.<suite>`` or through the registry::

    python -m benchmarks list
    python -m benchmarks run --suite certificates --quick
    python -m benchmarks.certificates --quick     # the same suite, its own command line
    python -m benchmarks docs                      # copy the latest results into the docs

What the suites share (registry, results files, timing, per-cell caches, options, the docs
generator) lives in :mod:`benchmarks.harness`; results go to ``benchmarks/results/``.
"""
