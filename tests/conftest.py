"""Shared fixtures. Tests use the eager mask path unless a test asks for the compiled one:
compiling takes seconds per pattern, which a fast suite cannot afford everywhere."""

import os

os.environ.setdefault("NMSPARSE_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
