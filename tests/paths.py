"""Which kernel path each test ran, for the one-line summary at the end of a run (conftest.py).

`install()` wraps the front ends' launchers (every module attribute that is the launcher, so
`from ... import` aliases are wrapped too; conftest calls it before the first test module is
imported). Each call records (front end, implementation, path, cache dtype, layout, mode):

- mode "interpreted": the Triton interpreter (TRITON_INTERPRET=1) or Pallas interpret mode;
  "compiled": run natively (a GPU, or XLA on the host); "lowered": lowered for a platform
  this machine does not have (a GPU or TPU lowering checked on the CPU), not run.
- cache dtype: the storage dtype (bf16, f16, e4m3, e5m2); layout: NHD or HND.

JAX launchers are recorded when traced: a call that reuses a compiled function records
nothing, which is fine for a summary of what ran at least once. The compiled-for-sm_90 Triton
checks run in a child process (tests/compiled.py) and are not recorded here.
"""
from __future__ import annotations

import functools
import os
import sys

RUNS: list[tuple] = []

# Short names of the storage dtypes.
_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
FULL_MATRIX = {(d, layout) for d in _DTYPES.values() for layout in ("NHD", "HND")}


def _short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return _DTYPES.get(name, name)


def _wrap_everywhere(package: str, module, name: str, record) -> None:
    """Replace `module.name` and every alias of it in `package`'s loaded modules."""
    original = getattr(module, name, None)
    if original is None or getattr(original, "_records_paths", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        try:
            RUNS.append(record(*args, **kwargs))
        except Exception:  # noqa: BLE001 - recording never fails a test
            pass
        return original(*args, **kwargs)

    wrapper._records_paths = True
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == package or mod_name.startswith(package + ".")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, wrapper)


# --- PyTorch ------------------------------------------------------------------------------------

def _torch_record(impl, path):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    def record(*args, **kwargs):
        cache = args[1] if path != "write_kv" else args[0]  # the logical view
        layout = "HND" if cache.stride(3) > cache.stride(2) else "NHD"
        if impl == "eager" or cache.device.type != "cuda":
            mode = "interpreted" if interpreted and impl != "eager" else "compiled"
        else:
            mode = "compiled"
        return ("torch", impl, path, _short(cache.dtype), layout, mode)
    return record


def _install_torch() -> None:
    try:
        import torch_sparse  # noqa: F401
        from torch_sparse import attention, cache, eager, k2q, union
    except ImportError:
        return
    for module, name, impl, path in [
            (attention, "launch_sparse_attention", "triton", "token"),
            (union, "launch_union", "triton", "union"),
            (k2q, "launch_k2q", "triton", "k2q"),
            (cache, "launch_write_kv", "triton", "write_kv"),
            (eager, "sparse_attention_eager", "eager", "token"),
            (eager, "write_kv_eager", "eager", "write_kv")]:
        _wrap_everywhere("torch_sparse", module, name, _torch_record(impl, path))


# --- JAX ----------------------------------------------------------------------------------------

def _jax_record(impl, path, native):
    """native: the backend this implementation runs on compiled ("gpu", "tpu"; None: any)."""
    def record(spec, *args, interpret=None, **kwargs):
        import jax
        backend = jax.default_backend()
        if native is None:
            mode = "compiled"
        elif interpret is None:
            mode = "compiled" if backend == native else "interpreted"
            if impl == "mosaic":  # no interpreter: lowered unless on a GPU
                mode = "compiled" if backend == "gpu" else "lowered"
        elif interpret is False:
            mode = "compiled" if backend == native else "lowered"
        else:
            mode = "interpreted"
        storage = spec.cache_storage_dtype(str(args[0].dtype))
        return ("jax", impl, path, _short(storage), spec.kv_cache_layout, mode)
    return record


def _install_jax() -> None:
    try:
        import jax_sparse  # noqa: F401
        from jax_sparse import attention, cache, k2q, union, xla
    except ImportError:
        return
    launchers = [(attention, "paged_sparse_attention", "pallas", "token", "gpu"),
                 (union, "paged_sparse_attention_union_capped", "pallas", "union", "gpu"),
                 (k2q, "paged_sparse_attention_k2q", "pallas", "k2q", "gpu"),
                 (xla, "sparse_attention_xla", "xla", "gather", None)]
    try:
        from jax_sparse import tpu
        launchers.append((tpu, "paged_sparse_attention_tpu", "tpu", "token", "tpu"))
    except ImportError:
        pass
    try:
        from jax_sparse import mosaic
        launchers.append((mosaic, "paged_sparse_attention_mosaic", "mosaic", "token", "gpu"))
    except ImportError:
        pass
    for module, name, impl, path, native in launchers:
        _wrap_everywhere("jax_sparse", module, name, _jax_record(impl, path, native))

    def write_record(kv_cache, key, value, slot_mapping, spec, *args, **kwargs):
        return ("jax", "xla", "write_kv", _short(kv_cache.dtype), spec.kv_cache_layout,
                "compiled")
    _wrap_everywhere("jax_sparse", cache, "write_kv", write_record)


def install() -> None:
    _install_torch()
    _install_jax()


# --- the summary --------------------------------------------------------------------------------

def summary(runs) -> str:
    """One line: per mode, front end and implementation, each path with the number of (cache
    dtype, layout) pairs it ran with out of the 8; a path missing some lists them."""
    groups: dict = {}
    for front, impl, path, dtype, layout, mode in runs:
        groups.setdefault((mode, front, impl), {}).setdefault(path, set()).add((dtype, layout))
    order = {"interpreted": 0, "compiled": 1, "lowered": 2}
    parts = []
    for (mode, front, impl) in sorted(groups, key=lambda k: (order.get(k[0], 9), k[1:])):
        paths = []
        for path, seen in sorted(groups[(mode, front, impl)].items()):
            seen &= FULL_MATRIX
            missing = sorted(FULL_MATRIX - seen)
            text = f"{path} {len(seen)}/8"
            if missing and mode == "interpreted":
                text += " (no " + ",".join(f"{d}-{l}" for d, l in missing) + ")"
            paths.append(text)
        parts.append(f"{mode} {front}/{impl}: {', '.join(paths)}")
    return "paths ran (cache dtype x layout of 8): " + ("; ".join(parts) if parts else "none")
