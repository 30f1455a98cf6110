"""Training runs: configuration, the loop, checkpoints, logs and plots (used by the CLI).

``nmsparse.app.train.load_trained(path, trusted_models=[...])`` rebuilds a trained model from a
run folder or checkpoint (see :func:`nmsparse.app.train.trainer.load_trained`); it is loaded on
first use, so importing this package stays cheap.
"""

from __future__ import annotations

__all__ = ["load_trained"]


def __getattr__(name: str):
    if name == "load_trained":
        from .trainer import load_trained

        return load_trained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
