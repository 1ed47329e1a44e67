"""Shared test setup: interpreters on CPU, the `gpu` marker, seeded generators."""
import os
import zlib

import numpy as np
import pytest


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


HAS_CUDA = _has_cuda()

# PyTorch and JAX share the GPU: keep JAX from reserving most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Four host devices for the mesh tests (tests/test_jax_sharding.py), set before JAX starts its
# CPU backend. The default device stays cpu:0, so single-device tests see no difference.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"]))

# The Triton interpreter must be chosen before any kernel module is imported.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh per case, reproducible per run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
