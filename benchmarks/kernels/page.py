"""The Markdown page of the kernel benchmark (``docs/kernels.md``): measured, or a placeholder
saying plainly that nothing is measured yet."""

from __future__ import annotations

from collections.abc import Sequence

from nmsparse.tables import format_table

from .results import (
    DECODE_HEADERS,
    DECODE_NUMERIC,
    KERNEL_HEADERS,
    KERNEL_NUMERIC,
    TARGET_HEADERS,
    DecodeResult,
    KernelResult,
    decode_rows,
    kernel_rows,
    shape_text,
    target_rows,
)

COMMAND = "python -m benchmarks.kernels --out docs/kernels.md"
FIXTURE_NOTE = ("FIXTURE page from a dry run of the GPU check: every number on it is made up "
                "and nothing was measured. Never commit it as docs/kernels.md.")

METHOD_MD = """\
## What is compared

For each weight shape `OUTxIN` (the `nn.Linear` weight, bf16) and batch size (rows of the
input):

* **dense (cuBLAS)**: `torch.nn.functional.linear` on the dense weight;
* **2:4 cuSPARSELt (torch)** and **2:4 CUTLASS (torch)**: PyTorch's semi-structured sparse
  tensors (`torch.sparse.SparseSemiStructuredTensorCUSPARSELT` / `...CUTLASS`) through
  `nmsparse.kernels.semi_structured.SemiStructuredLinear`, the layer `accelerate(model)`
  installs (it pads the input rows to a multiple of 8 itself). Each backend is first probed
  with a small matmul checked against the dense result; a backend that cannot run on the GPU
  (PyTorch's CUTLASS 2:4 kernels check for compute capability 8.x) gets a row saying why;
* **N:M Triton (nmsparse)** at 2:4, 4:8, 1:4 and 2:8: `nmsparse.kernels.nm_linear` on weights
  packed by `nmsparse.packing.pack` (kept values + bit-packed in-group positions), with
  `NMSPARSE_KERNELS=triton` so that an unsupported call fails instead of silently timing the
  unpack + `F.linear` fallback.

End to end: greedy decoding with the `gpt_1b` preset of `nmsparse.app.models` (24 layers,
d_model 2048, byte vocabulary; built on the GPU, cast to bf16), batch 1, dense vs the same
model pruned by magnitude (`nmsparse.sparsify(model, "2:4", "fixed")` then
`nmsparse.finalize`) at 2:4 (converted by `accelerate` and, separately, by
`nmsparse.kernels.swap_linear_layers`) and at 2:8 (`swap_linear_layers`). Decoding uses a
static KV cache (`GPT.decoder`, built from the model's own modules: each step feeds one
token, so every Linear sees one row, as in real decoding); the greedy next token is computed
on the GPU, so one step is one CUDA-graph replay with no host synchronisation (the decoder
is checked against the model's full forward on the CPU in `tests/models/test_gpt_decoder.py`). The
weights are random (untrained): the tokens are meaningless, the arithmetic is the same.
**logit err** compares the first step's logits with the same pruned model in dense format.

## Method

* Timing: CUDA events; the median over the timed runs after warm-up runs (which also compile
  the Triton kernels). No `torch.compile` anywhere: every kernel is called eagerly, and with
  `--timing graph` (the default) the calls are captured once in a CUDA graph and the graph is
  replayed, which removes Python and launch overhead for every kernel alike (`--timing eager`
  times the Python calls instead; the `timing` column says which applied, and a failed capture
  falls back to eager and says so).
* Cold weights: each kernel gets `k` copies of its weight and one graph replay (or timed run)
  calls it once per copy in turn, so a copy is read again only after the others, together at
  least twice the L2 cache (50 MB on H100), went through; the time is divided by `k`. The
  input is one tensor per batch size (a layer's input is usually in cache in a model).
* Bytes: weight as stored (dense; compressed values + metadata for the 2:4 tensors; values +
  index bytes for the packed format) + input + output. **GB/s** = bytes / time.
  **limit** = bytes of the dense call / bytes of this call: the speedup a purely memory-bound
  kernel could reach. **of limit** = speedup / limit.
* **rel err**: max |y - y_ref| / max |y_ref| against `F.linear` with the same pruned weight
  (bf16: differences of order 1e-3 are rounding, order 1 would be a broken kernel).
"""

USAGE_MD = """\
## Using the kernels

```python
import nmsparse
from nmsparse.kernels import swap_linear_layers
from nmsparse.kernels.semi_structured import accelerate

nmsparse.finalize(model)                    # masks baked in: pruned weights are exact zeros
model = model.to("cuda", torch.bfloat16).eval()
print(accelerate(model))                    # 2:4 tensor cores, backend="auto" (or
                                            # "cusparselt", "cutlass")
# or, for any N:M with M in {4, 8, 16}: print(swap_linear_layers(model, "2:8"))
```

`accelerate` verifies every weight is 2:4 along the input dim before compressing it (PyTorch
does not check and would compute garbage), pads shapes that miss the kernels' tiles by at most
12.5 % (else leaves the layer dense), probes each backend, compares every converted layer with
its dense product, and with `backend="auto"` times both backends per weight shape. It returns
a per-layer report (converted or skipped with the reason, backend); `plan(model)` gives the
same verdicts without a GPU. Without CUDA, or on a GPU older than compute capability 8.0, it
raises `RuntimeError`.
"""

PLACEHOLDER_MD = f"""\
**GPU figures not yet measured.** No GPU was available in the session that wrote this page,
so it holds no measurement: the tables below only show what will be reported. To produce the
figures, on an NVIDIA H100 or H200 (torch 2.11, Triton 3.6) run

```
{COMMAND}
```

which replaces this page with the measured tables, the machine, the command and the date.
"""


TARGETS_MD = """\
* batch-1 decode (one input row): 2:4 >= 1.6x dense; 1:4 and 2:8 >= 2.8x (the
  memory-bound limits in bf16 are about 1.8x for 2:4, 3.6x for 1:4 and 3.2x for 2:8:
  the packed weight takes 9/16, 9/32 and 5/16 of the dense bytes);
* 8192x8192 at batch 4096 through the 2:4 sparse tensor cores (cuSPARSELt or
  CUTLASS) >= 1.3x dense on H100; the published H100 figure is about 1.2x.
"""


def render_markdown(command: str = COMMAND, machine: dict[str, str] | None = None,
                    results: Sequence[KernelResult] | None = None,
                    decode: Sequence[DecodeResult] | None = None, settings: str = "",
                    fixture: bool = False) -> str:
    """The page: measured (``results`` given) or the placeholder saying nothing is measured;
    ``fixture``: results are a dry run's made-up numbers, and the page says so first."""
    parts = ["# N:M sparse linear kernels: benchmark", ""]
    measured = results is not None
    if measured:
        intro = (f"**{FIXTURE_NOTE}**" if fixture else
                 "These figures are measured by `benchmarks/kernels` on the machine below "
                 "(not estimated).")
        parts += [intro, "",
                  format_table(["machine", ""], [[key, value] for key, value in
                                                 (machine or {}).items()], markdown=True), "",
                  f"Command: `{command}`", ""]
        if settings:
            parts += [f"Settings: {settings}", ""]
    else:
        parts += [PLACEHOLDER_MD]
    parts += [METHOD_MD, "## Targets", "", TARGETS_MD]
    if measured:
        parts += [format_table(TARGET_HEADERS, target_rows(results, decode or []),
                               markdown=True), ""]
        parts += ["## Linear layers", ""]
        for shape in dict.fromkeys(r.shape for r in results):
            subset = [r for r in results if r.shape == shape]
            rows = [row[1:] for row in kernel_rows(subset)]
            parts += [f"### {shape_text(shape)} (out x in)", "",
                      format_table(KERNEL_HEADERS[1:], rows,
                                   right_aligned=[i - 1 for i in KERNEL_NUMERIC],
                                   markdown=True), ""]
        if decode:
            parts += ["## End-to-end decode", "",
                      format_table(DECODE_HEADERS, decode_rows(decode),
                                   right_aligned=DECODE_NUMERIC, markdown=True), ""]
    else:
        parts += [format_table(["target", "threshold", "measured"], [
            ["batch-1 decode, 2:4", ">= 1.6x", "not yet measured"],
            ["batch-1 decode, 1:4", ">= 2.8x", "not yet measured"],
            ["batch-1 decode, 2:8", ">= 2.8x", "not yet measured"],
            ["8192x8192, batch 4096, 2:4 tensor cores (H100)", ">= 1.3x",
             "not yet measured"],
        ], markdown=True), ""]
    parts += [USAGE_MD, "## Reproduce", "", "```", command, "```", "",
              "`--quick` for a shorter run, `--shapes 4096x4096,8192x8192 --batches 1,4096`",
              "to pick cases, `--no-decode` to skip the model, `--no-write` to print only.",
              "The GPU check (`make gpu-check`, see [gpu.md](gpu.md)) runs this benchmark",
              "with the others in one prepared run.", ""]
    return "\n".join(parts)
