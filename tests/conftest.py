import os

import pytest
import torch

import rankprune  # noqa: F401


def cuda_ready() -> bool:
    return torch.cuda.is_available() and rankprune.ops.cuda_kernels_built()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and a build with the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not cuda_ready():
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a marked parameter (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def seed():
    """A fresh seed each run (the tests use new random inputs every time); printed on failure."""
    s = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    torch.manual_seed(s)
    return s
