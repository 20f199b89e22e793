"""Benchmark harness for consentgate (not part of the test suite; timings never gate tests).

Run ``python -m bench.run_store`` and ``python -m bench.run_find`` from the repository root;
see ``bench/README.md``.
"""
