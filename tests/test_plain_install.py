"""A plain ``pip install nmsparse`` (base requirements only, in a fresh virtual environment)
runs the main job: see benchmarks/plain_install.py for how it avoids downloads. About 40 s
on 2 CPU cores; deselect with ``-m "not slow"`` while iterating."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plain_install.py"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX virtual-environment layout")
def test_plain_install_runs_the_main_job(tmp_path):
    spec = importlib.util.spec_from_file_location("plain_install", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.check_plain_install(epochs=2, keep=tmp_path / "plain")
    steps = [row["step"] for row in rows]
    assert "nmsparse train (defaults, --epochs 2)" in steps
    assert "nmsparse export --packed" in steps
    assert all(row["exit"] in (0, 2) for row in rows)


def test_every_install_hint_names_an_extra_that_exists():
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = SCRIPT.parents[1]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    named = {}
    for path in [*root.joinpath("src").rglob("*.py"), root / "README.md"]:
        for extra in re.findall(r"nmsparse\[([\w,]+)\]", path.read_text()):
            for name in extra.split(","):
                named.setdefault(name, path.name)
    assert named, "no install hint found"
    unknown = {name: where for name, where in named.items() if name not in extras}
    assert not unknown, f"hints name extras that do not exist: {unknown}"
    assert {"yaml", "tensorboard", "kernels", "images"} <= set(named)
