"""Benchmarks and studies of nmsparse, run from the repository root (not installed):
``python -m benchmarks.kernels``, ``python -m benchmarks.gpu_check``, ``python -m
benchmarks.study``, ``python benchmarks/overhead.py``.

A regular package, not a namespace one, so that a ``benchmarks`` package installed elsewhere
(some distributions ship one) cannot shadow this folder.
"""
