"""Shared fixtures. Tests use the eager mask path unless a test asks for the compiled one:
compiling takes seconds per pattern, which a fast suite cannot afford everywhere.

Tests that need a CUDA GPU carry ``@pytest.mark.cuda``: skipped without one, and
``pytest -m cuda`` (what ``make gpu-check`` runs) selects exactly them. A test that skips
itself for want of CUDA without the marker is a collection error, so none is left out."""

import os

os.environ.setdefault("NMSPARSE_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_built():
    """The CPU kernel libraries this machine runs, built before the first test. A first build
    logs a one-line notice on stderr, which a test reading a command's stderr line by line
    would otherwise see or not, depending on which test happened to build them first."""
    from nmsparse.kernels import cpu
    from nmsparse.kernels.cpu import mask_pass

    for name in cpu.ISAS:
        cpu.isa_reason(name)  # builds the library of each instruction set the CPU has
    if mask_pass.reason() is None:
        mask_pass._library()


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    has_cuda = torch.cuda.is_available()
    unmarked = []
    for item in items:
        marked = item.get_closest_marker("cuda") is not None
        if marked and not has_cuda:
            item.add_marker(no_cuda)
        reasons = [str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")]
        if not marked and any(r.startswith("needs") and "CUDA" in r for r in reasons):
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError("tests that need CUDA lack @pytest.mark.cuda (so `pytest -m "
                                f"cuda` would miss them): {', '.join(unmarked[:5])}")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny training loops on a shared machine run ~10x
    faster than with every core contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
