"""``nmsparse export``: a trained run as a finalized model file.

* dense (default): ``model.safetensors`` (the original ``state_dict()`` keys, masks baked in,
  loadable into the unmodified architecture) and ``model.json`` (architecture, pattern and
  the per-layer N:M check of the exported weights);
* ``--packed``: one ``model.packed.safetensors`` in the packed N:M format
  (:mod:`nmsparse.export.packed`) whose header carries the same architecture description.

Both describe the architecture so ``nmsparse.app.models.create_model(model, input_shape=...,
num_classes=..., **model_options)`` rebuilds it. Everything is computed before the first byte
is written. Neither needs the run's data set: the input shape and classes come from the run.
The output folder is claimed like a run folder (:mod:`nmsparse.app.train.run_dir`): new, empty or
an earlier export, never a folder of other files; a failed export leaves no folder behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ... import finalize
from ...atomic import write_files
from ...check import check
from ...export.packed import PackedReport, save_packed
from ...packing import index_width
from ...patterns import parse_pattern
from . import run_dir as run_folders
from .trainer import load_trained

EXPORT_FORMAT = "nmsparse-dense-with-zeros"
EXPORT_VERSION = 1
PACKED_NAME = "model.packed.safetensors"


def _finalized_run(path: str | Path, trusted_models=(), data_dir: str | None = None):
    config, data, model, payload = load_trained(path, trusted_models=trusted_models,
                                                data_dir=data_dir, with_data=False)
    finalize(model)
    description = {
        "model": config.model, "model_options": config.model_options,
        "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "data": config.data, "task": data.task,
        "pattern": "dense" if config.dense else config.pattern, "method": config.method,
        "layout": config.layout, "epochs_trained": payload["epoch"], "config": config.to_dict(),
    }
    return config, model, description


def _write_into(out_dir: str | Path, files: dict[str, Any]) -> list[Path]:
    """Claim ``out_dir`` and write ``{name: bytes or a callable(path)}`` all or nothing."""
    folder = run_folders.claim(out_dir, "export")
    try:
        written = write_files(folder.path, files)
    except BaseException:
        folder.abandon()
        raise
    folder.release()
    return written


def export_run(path: str | Path, out_dir: str | Path, *, trusted_models=(),
               data_dir: str | None = None) -> list[Path]:
    """Export the run at ``path`` dense-with-zeros into ``out_dir``; ``trusted_models``: the
    ``module:factory`` names that may be imported to rebuild it."""
    from safetensors.torch import save

    config, model, description = _finalized_run(path, trusted_models, data_dir)
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
    text = (json.dumps(description, indent=2) + "\n").encode("utf-8")
    return _write_into(out_dir, {"model.safetensors": blob, "model.json": text})


def export_run_packed(path: str | Path, out_dir: str | Path, *, trusted_models=(),
                      data_dir: str | None = None) -> tuple[list[Path], PackedReport]:
    """The run at ``path`` finalized and saved packed into ``out_dir``; a dense run, or a
    group size the format cannot store, is a ``ValueError`` before anything is written."""
    import safetensors  # noqa: F401  (missing: fail before the folder is made)

    config, model, description = _finalized_run(path, trusted_models, data_dir)
    if config.dense:
        raise ValueError(f"{path} was trained dense: nothing to pack (export it without "
                         "--packed)")
    try:
        index_width(parse_pattern(config.pattern).m)
    except ValueError as error:
        raise ValueError(f"{path}: {config.pattern} cannot be exported packed: {error}; "
                         "export it without --packed") from None
    reports = []

    def save(target: Path) -> None:
        reports.append(save_packed(model, target, config.pattern, include=config.include,
                                   exclude=config.exclude or None, layout=config.layout,
                                   metadata=description))

    written = _write_into(out_dir, {PACKED_NAME: save})
    return written, reports[0]
