"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):
    """Row updates take different kernels on one thread than on several (torch's int64 scatter path, numba's
    parallel loop): tests that step optimizers run under both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
