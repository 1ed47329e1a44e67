"""DLPack bridges between NumPy, PyTorch and JAX: arrays, whole metadata, and paged caches.

Ownership and aliasing (zero-copy means both sides see one buffer):
- `kv_cache_to_jax(torch_cache, spec)` gives a JAX array that aliases PyTorch's storage; the
  PyTorch tensor still owns it and must outlive every use from JAX. Writes made by PyTorch
  (for example `torch_sparse.write_kv`) are seen by the JAX array, because JAX never copies it;
  JAX itself never writes into an imported buffer (its arrays are immutable), so the JAX side
  is read-only by construction. The first `np.asarray(jax_array)` caches a host copy; on a GPU
  that copy does not see later writes (read through a JAX operation instead).
- `kv_cache_to_torch(jax_cache, spec)` gives a PyTorch view of JAX's buffer; JAX owns it. To keep
  a JAX-owned cache updated in place while PyTorch reads it, update it with
  `jax_sparse.write_kv` under `jax.jit(..., donate_argnums=...)`: XLA writes into the donated
  buffer, so the PyTorch view stays valid and sees the new contents (check with
  `unsafe_buffer_pointer()` that the output buffer is the input buffer). Without donation
  JAX returns a new buffer and the PyTorch view keeps the old contents.
- Stream order: PyTorch and JAX queue GPU work on streams of their own, and neither can make
  the other's stream wait on an event. So every bridge call first waits (on the host) for the
  source's pending work: PyTorch's current stream is synchronized before a tensor is handed to
  JAX, and a JAX array is made ready before PyTorch takes it. A cache written by one framework
  is therefore complete before the other reads it. Writes made AFTER the hand-over (PyTorch
  writing into a cache JAX already imported) need the same wait before JAX reads:
  `wait_for_writes(torch_cache)`. Bridges run once per cache, not per step, so the wait is
  off the hot path; within one framework nothing waits.
"""
from __future__ import annotations

import dataclasses
import weakref

import numpy as np

from .arrays import is_torch_tensor
from .metadata import ARRAY_FIELDS, COUNT_FIELDS, SparseMetadata
from .spec import SparseAttentionSpec

# dtype name -> same-width unsigned type, for NumPy dtypes torch.from_numpy cannot take.
_BITS = {1: np.uint8, 2: np.uint16}
_ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _is_jax_array(x) -> bool:
    return type(x).__module__.split(".")[0] in ("jax", "jaxlib")


# JAX arrays that alias a PyTorch tensor's storage (made by `to_jax` / `kv_cache_to_jax`), by
# id, each with a weak reference that drops the entry when the array dies. JAX arrays are
# weak-referenceable but unhashable, hence the id keys.
_FROM_TORCH: dict[int, weakref.ref] = {}


def _remember_torch_import(a) -> None:
    key = id(a)
    _FROM_TORCH[key] = weakref.ref(a, lambda _ref, key=key: _FROM_TORCH.pop(key, None))


def imported_from_torch(x) -> bool:
    """True when `x` is a JAX array that aliases a PyTorch tensor's storage (from `to_jax` or
    `kv_cache_to_jax`). Such an array must not be donated to a JAX write: JAX would write into
    a new buffer (or consume PyTorch's), and PyTorch would never see the write."""
    ref = _FROM_TORCH.get(id(x))
    return ref is not None and ref() is x


def wait_for_writes(x) -> None:
    """Block the host until the work queued on `x`'s framework has finished: PyTorch's current
    stream on x's device (CUDA), or the JAX computation producing `x`. Call it before the other
    framework reads a buffer that `x` shares with it."""
    if is_torch_tensor(x):
        if x.is_cuda:
            import torch
            torch.cuda.current_stream(x.device).synchronize()
    elif _is_jax_array(x):
        x.block_until_ready()
    else:
        raise TypeError(f"wait_for_writes takes a PyTorch tensor or a JAX array, got "
                        f"{type(x).__name__}")


def _torch_device(device):
    import torch
    if device is None:
        return None
    return torch.device(device)


def _numpy_to_torch(x: np.ndarray):
    import torch
    if x.dtype.name in _ML_DTYPE_NAMES:
        return torch.from_numpy(np.ascontiguousarray(x).view(_BITS[x.dtype.itemsize])).view(
            getattr(torch, x.dtype.name))
    return torch.from_numpy(x)


def _array_to_torch(x, device, copy: bool):
    import torch
    dev = _torch_device(device)
    if is_torch_tensor(x):
        t = x
    elif isinstance(x, (np.ndarray, np.generic)):
        t = _numpy_to_torch(np.asarray(x))
    elif _is_jax_array(x):
        wait_for_writes(x)
        try:
            t = torch.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as err:
            raise TypeError(f"cannot share a JAX array of dtype {x.dtype} and shape {x.shape} "
                            f"with PyTorch through DLPack: {err}") from err
    else:
        raise TypeError(f"to_torch takes a NumPy array, a PyTorch tensor, a JAX array or a "
                        f"SparseMetadata, got {type(x).__name__}")
    if dev is not None and t.device != dev:
        t = t.to(dev)
    elif copy:
        t = t.clone()
    return t


def _array_to_jax(x, device, copy: bool):
    import jax
    import jax.numpy as jnp
    imported = None
    if _is_jax_array(x):
        a = x
    elif is_torch_tensor(x):
        if not x.is_contiguous():
            if not copy:
                raise ValueError(
                    f"cannot share a non-contiguous tensor (shape {tuple(x.shape)}, strides "
                    f"{x.stride()}) with JAX without a copy: JAX arrays are row-major; pass "
                    "copy=True, or kv_cache_to_jax for a cache")
            x = x.contiguous()
        wait_for_writes(x)
        try:
            a = jax.dlpack.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as err:
            raise TypeError(f"cannot share a PyTorch tensor of dtype {x.dtype} with JAX "
                            f"through DLPack: {err}") from err
        imported = a
    elif isinstance(x, (np.ndarray, np.generic)):
        a = jnp.asarray(x)
    else:
        raise TypeError(f"to_jax takes a NumPy array, a PyTorch tensor, a JAX array or a "
                        f"SparseMetadata, got {type(x).__name__}")
    if device is not None:
        dev = jax.devices(device)[0] if isinstance(device, str) else device
        if dev not in a.devices():
            a = jax.device_put(a, dev)
        elif copy:
            a = jnp.array(a, copy=True)
    elif copy:
        a = jnp.array(a, copy=True)
    if a is imported:
        _remember_torch_import(a)
    return a


def to_torch(x, device=None, *, copy: bool = False):
    """A PyTorch tensor (or a PyTorch-flavour SparseMetadata) from any flavour.

    Zero-copy when the source already lives on `device` (or `device` is None); NumPy arrays
    of ml_dtypes types (bfloat16, float8) are shared through a same-width integer view.
    copy=True always gives a fresh buffer.
    """
    if isinstance(x, SparseMetadata):
        arrays = {f: _array_to_torch(getattr(x, f), device, copy) for f in ARRAY_FIELDS}
        counts = {f: int(getattr(x, f)) for f in COUNT_FIELDS}
        return dataclasses.replace(x, **arrays, **counts)
    return _array_to_torch(x, device, copy)


def to_jax(x, device=None, *, copy: bool = False):
    """A JAX array (or a JAX-flavour SparseMetadata, a pytree) from any flavour.

    Zero-copy for PyTorch tensors (through DLPack) and JAX arrays already on `device`; a
    non-contiguous tensor raises unless copy=True. In the JAX flavour of SparseMetadata the
    counts become int32 scalars (leaves), so new batches of the same padded sizes reuse a jit.
    """
    if isinstance(x, SparseMetadata):
        import jax.numpy as jnp
        register_jax_pytrees()
        arrays = {f: _array_to_jax(getattr(x, f), device, copy) for f in ARRAY_FIELDS}
        counts = {f: _array_to_jax(jnp.int32(int(getattr(x, f))), device, False)
                  for f in COUNT_FIELDS}
        return dataclasses.replace(x, **arrays, **counts)
    return _array_to_jax(x, device, copy)


def kv_cache_to_jax(kv_cache, spec: SparseAttentionSpec, *, copy: bool = False):
    """The physical JAX array of a PyTorch cache given as its logical view (zero-copy).

    The view's storage must be laid out in `spec.kv_cache_layout` (as vLLM allocates it): the
    physical permutation of the view must be contiguous, else nothing can be shared.
    """
    if not is_torch_tensor(kv_cache):
        raise TypeError(f"kv_cache_to_jax takes the PyTorch logical view, got "
                        f"{type(kv_cache).__name__}")
    spec.check_logical_kv_cache_shape(kv_cache.shape)
    physical = kv_cache.permute(*spec.kv_cache_stride_order())
    if not physical.is_contiguous():
        if not copy:
            raise ValueError(
                f"kv_cache strides {kv_cache.stride()} are not the {spec.kv_cache_layout} "
                f"layout (stride order {spec.kv_cache_stride_order()}), so it cannot be shared "
                "without a copy; pass copy=True or allocate it with the spec's stride order")
        physical = physical.contiguous()
    return _array_to_jax(physical, None, False)


def kv_cache_to_torch(kv_cache, spec: SparseAttentionSpec, *, copy: bool = False):
    """The PyTorch logical view of a physical cache (JAX array or NumPy array), zero-copy."""
    if is_torch_tensor(kv_cache):
        raise TypeError("kv_cache_to_torch takes the physical JAX or NumPy array; a PyTorch "
                        "tensor is already the logical view")
    spec.check_physical_kv_cache_shape(kv_cache.shape)
    physical = _array_to_torch(kv_cache, None, copy)
    return physical.permute(*np.argsort(spec.kv_cache_stride_order()).tolist())


def allocate_torch_kv_cache(spec: SparseAttentionSpec, num_blocks: int, query_dtype, device=None):
    """A PyTorch cache of num_blocks pages: the logical view over storage in the spec's physical
    layout (as vLLM allocates it), holding the storage dtype for queries of `query_dtype`.

    Its memory is uninitialised, like `torch.empty`: write every slot a step may attend before
    attending it (`jax_sparse.allocate_kv_cache` instead fills with zeros). Also exported as
    `torch_sparse.allocate_kv_cache`."""
    import torch
    name = str(query_dtype).replace("torch.", "")
    dtype = getattr(torch, spec.cache_storage_dtype(name))
    physical = torch.empty(spec.physical_kv_cache_shape(num_blocks), dtype=dtype, device=device)
    return physical.permute(*np.argsort(spec.kv_cache_stride_order()).tolist())


_REGISTERED = False


def register_jax_pytrees() -> None:
    """Register SparseMetadata as a JAX pytree (arrays and counts are leaves). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    import jax
    fields = ARRAY_FIELDS + COUNT_FIELDS
    jax.tree_util.register_pytree_node(
        SparseMetadata,
        lambda md: (tuple(getattr(md, f) for f in fields), None),
        lambda _, leaves: SparseMetadata(**dict(zip(fields, leaves))),
    )
    _REGISTERED = True
