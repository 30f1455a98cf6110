"""The GPU check: every CUDA path of nmsparse verified and measured in one run of at most
8 minutes, prepared so that whichever session is lent a GPU runs it first (docs/gpu.md).

    make gpu-check OUT=DIR            # on the GPU machine (its python3 has torch and Triton)
    make gpu-check DRY=1 OUT=DIR      # anywhere: fixture numbers, no GPU call

Parts, in order (:mod:`.plan`): install nmsparse without network, describe the machine, run
``pytest -m cuda``, check the Triton kernels and ``accelerate`` against dense on the GPU,
the kernel benchmark (:mod:`benchmarks.kernels`), GPT decode tokens/s, and the SR-STE
training-step overhead (:mod:`benchmarks.overhead`) with eager and compiled mask refresh.
Each part runs in its own process group under its own time cap (:mod:`.runner`); Python parts
live in :mod:`.parts`. Results: ``report.md``, ``report.json``, ``kernels.md`` and ``log.txt``
in the output folder (:mod:`.report`). Exit status 0 when every part finished, 1 otherwise,
2 for bad arguments.
"""
