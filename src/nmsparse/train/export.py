"""``nmsparse export``: a trained run as a finalized dense-with-zeros model.

Writes ``model.safetensors`` (the original ``state_dict()`` keys, masks baked in, loadable
into the unmodified architecture) and ``model.json`` (architecture, pattern and the per-layer
N:M check of the exported weights). Everything is computed before the first byte is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._atomic import atomic_open
from ..check import check
from ..sparse_model import finalize
from .trainer import load_trained

EXPORT_FORMAT = "nmsparse-dense-with-zeros"
EXPORT_VERSION = 1


def export_run(path: str | Path, out_dir: Path) -> list[Path]:
    from safetensors.torch import save

    config, data, model, payload = load_trained(path)
    finalize(model)
    layers = []
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
    description = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "model": config.model, "model_options": config.model_options,
        "data": config.data, "task": data.task, "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "pattern": "dense" if config.dense else config.pattern, "method": config.method,
        "layout": config.layout, "epochs_trained": payload["epoch"],
        "all_layers_nm": all(layer["status"] != "violation" for layer in layers),
        "layers": layers, "config": config.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, info = out_dir / "model.safetensors", out_dir / "model.json"
    with atomic_open(weights, "wb") as file:
        file.write(blob)
    with atomic_open(info, "w", encoding="utf-8") as file:
        json.dump(description, file, indent=2)
    return [weights, info]
