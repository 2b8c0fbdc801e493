"""Shared test set-up: one thread per test process (CI machines have 2 cores) and quiet warnings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
