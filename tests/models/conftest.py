"""Fixtures of the model tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny training loops on a shared machine run ~10x
    faster than with every core contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
