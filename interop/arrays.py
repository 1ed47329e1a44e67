"""Framework-neutral array helpers: read any flavour's array as NumPy without importing a framework."""
from __future__ import annotations

import numpy as np


def is_torch_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def to_numpy(x) -> np.ndarray:
    """Host NumPy copy of a NumPy array, PyTorch tensor (any device) or JAX array.

    PyTorch low-precision floats (bf16, fp8) come back as float32, which holds them exactly.
    """
    if is_torch_tensor(x):
        x = x.detach().to("cpu")
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_float64(x) -> np.ndarray:
    return to_numpy(x).astype(np.float64)
