"""The reproducible accuracy study of nmsparse against the SR-STE paper's claims.

Run from the repository root: ``python -m benchmarks.study --preset quick`` (see
``python -m benchmarks.study --help``); results land in ``benchmarks/study/runs/`` and the
report in ``docs/results.md`` with figures ``docs/images/study-*.png``.
"""
