"""``nmsparse export``: a trained run as a finalized model file.

* dense (default): ``model.safetensors`` (the original ``state_dict()`` keys, masks baked in,
  loadable into the unmodified architecture) and ``model.json`` (architecture, pattern and
  the per-layer N:M check of the exported weights);
* ``--packed``: one ``model.packed.safetensors`` in the packed N:M format
  (:mod:`nmsparse.export.packed`) whose header carries the same architecture description.

Both describe the architecture so ``nmsparse.models.create_model(model, input_shape=...,
num_classes=..., **model_options)`` rebuilds it. Everything is computed before the first byte
is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._atomic import atomic_open
from ..check import check
from ..export.packed import PackedReport, save_packed
from ..make_sparse import finalize
from .trainer import load_trained

EXPORT_FORMAT = "nmsparse-dense-with-zeros"
EXPORT_VERSION = 1
PACKED_NAME = "model.packed.safetensors"


def _finalized_run(path: str | Path):
    config, data, model, payload = load_trained(path)
    finalize(model)
    description = {
        "model": config.model, "model_options": config.model_options,
        "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "data": config.data, "task": data.task,
        "pattern": "dense" if config.dense else config.pattern, "method": config.method,
        "layout": config.layout, "epochs_trained": payload["epoch"], "config": config.to_dict(),
    }
    return config, model, description


def export_run(path: str | Path, out_dir: Path) -> list[Path]:
    from safetensors.torch import save

    config, model, description = _finalized_run(path)
    layers: list[dict[str, Any]] = []
    if not config.dense:
        report = check(model, config.pattern, include=config.include,
                       exclude=config.exclude or None, layout=config.layout)
        layers = [{"name": row.name, "shape": list(row.shape),
                   "pattern": str(row.pattern) if row.pattern else None, "status": row.status,
                   "groups": row.groups, "violating_groups": row.violating_groups,
                   "note": row.note} for row in report.rows]
    # clones: safetensors refuses tensors that share storage (tied weights)
    state = {key: value.detach().clone().contiguous() for key, value in
             model.state_dict().items()}
    blob = save(state, metadata={"format": EXPORT_FORMAT, "pattern": config.pattern})
    description = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **description,
                   "all_layers_nm": all(layer["status"] != "violation" for layer in layers),
                   "layers": layers}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, info = out_dir / "model.safetensors", out_dir / "model.json"
    with atomic_open(weights, "wb") as file:
        file.write(blob)
    with atomic_open(info, "w", encoding="utf-8") as file:
        json.dump(description, file, indent=2)
    return [weights, info]


def export_run_packed(path: str | Path, out_dir: str | Path) -> tuple[list[Path], PackedReport]:
    """The run at ``path`` finalized and saved packed into ``out_dir``; a dense run has
    nothing to pack (``ValueError``)."""
    config, model, description = _finalized_run(path)
    if config.dense:
        raise ValueError(f"{path} was trained dense: nothing to pack (export it without "
                         "--packed)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / PACKED_NAME
    report = save_packed(model, target, config.pattern, include=config.include,
                         exclude=config.exclude or None, layout=config.layout,
                         metadata=description)
    return [target], report
