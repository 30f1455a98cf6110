"""Does a plain ``pip install nmsparse`` (no extras) run the main job?

A fresh virtual environment gets the nmsparse wheel and nothing but the distributions its
*base* requirements pull in (transitively, markers evaluated), then runs ``nmsparse train``
with its defaults (fewer epochs unless ``--full``), ``eval``, ``summary``, ``export`` and
``export --packed``, and checks that every optional piece that is absent (PyYAML, Pillow,
Triton, TensorBoard) gives a one-line error naming an extra that exists.

No download: the base requirements' distributions are taken from the environment running this
script (where they were installed by pip) and exposed to the fresh environment one by one,
as symbolic links in a staging folder named by a ``.pth`` file, instead of being downloaded
again (torch alone is ~200 MB). The fresh environment sees exactly those distributions, so
a requirement missing from ``pyproject.toml`` fails here as it would on a user's machine:
``pip install --no-index`` of the wheel must find every requirement already satisfied, and the
commands run without the development environment on the path.

    python benchmarks/plain_install.py            # writes benchmarks/results/plain_install.md
    python benchmarks/plain_install.py --full     # the default 30 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "plain_install.md"
# Pillow is no optional piece: matplotlib requires it, so imagefolder works after a plain install.
OPTIONAL = ("yaml", "triton", "tensorboard", "hypothesis", "pytest")


def base_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements need, transitively (extras not taken)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in found:
            continue
        dist = metadata.distribution(requirement.name)  # missing: PackageNotFoundError
        found[key] = dist
        todo.extend(Requirement(text) for text in dist.requires or [])
    return found


def stage(dists: dict[str, metadata.Distribution], folder: Path) -> int:
    """Link each distribution's top-level files and folders (code and .dist-info) into
    ``folder``; returns how many entries were linked."""
    folder.mkdir()
    linked = 0
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        tops = {Path(file).parts[0] for file in dist.files or [] if ".." not in Path(file).parts}
        for top in sorted(tops):
            source, target = site / top, folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
                linked += 1
    return linked


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 900):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.perf_counter() - started


def check_plain_install(epochs: int | None = 2, keep: Path | None = None) -> list[dict]:
    """Build the fresh environment, run the checks; returns one row per step. Raises
    ``AssertionError`` naming the first step that failed (with its stderr)."""
    rows: list[dict] = []
    work = Path(keep or tempfile.mkdtemp(prefix="nmsparse-plain-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # the wheel and nothing else: no index, no find-links
    env["NMSPARSE_COMPILE"] = "0"

    def step(name: str, command: list[str], expect: int = 0, cwd: Path = work):
        result, seconds = run(command, cwd, env)
        rows.append({"step": name, "seconds": round(seconds, 1), "exit": result.returncode})
        assert result.returncode == expect, (f"{name}: exit {result.returncode}, expected "
                                             f"{expect}\n{result.stdout[-1500:]}"
                                             f"\n{result.stderr[-3000:]}")
        return result

    # build from a copy: a build writes build/ and *.egg-info next to the sources
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = work / "wheel"
    step("build the wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "--no-index", "-q", "-w", str(wheels),
                             str(source)])
    wheel = next(wheels.glob("nmsparse-*.whl"))
    dists = closure(base_requirements())
    linked = stage(dists, work / "base-deps")
    rows.append({"step": f"stage {len(dists)} distributions ({linked} links): "
                         + ", ".join(sorted(dists)), "seconds": 0.0, "exit": 0})
    venv = work / "venv"
    # without pip: the venv's own pip and setuptools would shadow the staged ones; this
    # environment's pip installs into it with --python instead
    step("python -m venv --without-pip", [sys.executable, "-m", "venv", "--without-pip",
                                          str(venv)])
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    (site / "_nmsparse_base_deps.pth").write_text(str(work / "base-deps") + "\n")
    step("pip install --no-index nmsparse (base only)",
         [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q",
          str(wheel)])
    step("pip check", [sys.executable, "-m", "pip", "--python", str(python), "check"])
    absent = step("optional packages absent", [str(python), "-c", (
        "import importlib.util, json; print(json.dumps([m for m in "
        f"{list(OPTIONAL)!r} if importlib.util.find_spec(m)]))")])
    assert json.loads(absent.stdout) == [], f"not a plain install: {absent.stdout}"

    nmsparse = str(venv / "bin" / "nmsparse")
    train = [nmsparse, "train", "--out", "run"] + ([] if epochs is None else
                                                  ["--epochs", str(epochs)])
    trained = step("nmsparse train (defaults" + ("" if epochs is None else
                                                 f", --epochs {epochs}") + ")", train)
    assert "final test accuracy" in trained.stdout, trained.stdout[-1000:]
    for png in ("curves.png", "sad.png", "density.png"):
        assert (work / "run" / png).is_file(), f"no {png}"
    step("nmsparse eval", [nmsparse, "eval", "run"])
    step("nmsparse summary", [nmsparse, "summary", "run"])
    step("nmsparse export", [nmsparse, "export", "run", "--out", "exported"])
    step("nmsparse export --packed", [nmsparse, "export", "run", "--packed", "--out", "packed"])
    assert (work / "packed" / "model.packed.safetensors").is_file()

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    (work / "recipe.yaml").write_text("epochs: 1\n")
    for name, command in {
        "YAML recipe without PyYAML": [nmsparse, "train", "--recipe", "recipe.yaml"],
        "--tensorboard without it": [nmsparse, "train", "--tensorboard", "--out", "r3"],
    }.items():
        failed = step(name, command, expect=2)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
        named = re.findall(r"nmsparse\[(\w+)\]", lines[0])
        assert named and set(named) <= extras, f"{name}: hint names no existing extra: {lines}"
        rows[-1]["step"] += f" -> one line naming nmsparse[{named[0]}]"
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="train for the default 30 epochs")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--no-write", action="store_true", help="do not write the result file")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = check_plain_install(None if args.full else 2, args.keep)
    total = time.perf_counter() - started
    lines = ["# Plain install check", "",
             f"`python benchmarks/plain_install.py{' --full' if args.full else ''}`: "
             f"every step passed in {total:.0f} s (Python {sys.version.split()[0]}; "
             "timings from a shared machine).", "",
             "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {row['step']} | {row['exit']} | {row['seconds']} |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULT.parent.mkdir(exist_ok=True)
        RESULT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
