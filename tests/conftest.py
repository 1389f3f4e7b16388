import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test (or a tool's main() it calls) must not leave autograd disabled for later tests."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.is_grad_enabled()
    yield
    now = torch.is_grad_enabled()
    torch.set_grad_enabled(before)
    assert now == before, "this test left torch grad mode changed"
