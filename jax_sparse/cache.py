"""The paged cache: allocating it (`allocate_kv_cache`), and writing new K/V into it
(`write_kv`): one scatter that XLA performs in place when the cache is donated (the default
here), with FP8 quantization on the way in. Plain XLA, so it is the write path of every
implementation and platform (GPU, TPU, CPU): no kernel needed.

Slots (contract, section 5): a negative slot is padding and is skipped; a slot past the cache
is never written (the scatter drops it). Where reading the slots is free (a NumPy
slot_mapping, or a JAX array on the CPU, outside `jax.jit`), a slot past the cache is a
ValueError naming the first such token, raised before the cache is donated. The check mode
(`checks=True`, or the environment variable M3_SPARSE_CHECKS=1) checks every call: a concrete
slot_mapping on a GPU is copied to the host first (the call waits for it); under an outer
`jax.jit` the check runs with the computation (`jax.debug.callback`) and its error surfaces as
a `jax.errors.JaxRuntimeError` carrying the ValueError's message when the result is waited
on; a cache donated to that outer jit is consumed by then, so check eagerly first where that
matters.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import interop
from interop import FP8_MAX, QUERY_DTYPES, SparseAttentionSpec

from .validation import (check_jax_flavour, check_scale, check_slots, check_slots_when_run,
                         check_write_inputs, checks_enabled, host_values, is_traced)


def _quantize(x, scale, slots, safe_slots, storage_dtype):
    """x [T, num_kv_heads, D] -> the cache dtype; FP8: x / scale, saturated to +-FP8_MAX."""
    name = jnp.dtype(storage_dtype).name
    if name not in FP8_MAX:
        return x.astype(storage_dtype)
    x = x.astype(jnp.float32)
    if scale is not None:
        if scale.ndim == 2:  # [num_kv_heads, num_slots], read at each token's slot
            scale = jnp.where(slots[:, None] >= 0, scale[:, safe_slots].T, 1.0)[..., None]
        else:
            scale = scale[0]
        x = x / scale
    return jnp.clip(x, -FP8_MAX[name], FP8_MAX[name]).astype(storage_dtype)


def scatter_kv(kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec, k_scale=None,
               v_scale=None, *, check_when_run: bool = False):
    """The traced body of `write_kv` (and of each shard of `sharded_write_kv`): the new cache.

    check_when_run: add the check mode's run-time slot check (`check_slots_when_run`).
    """
    num_blocks = check_write_inputs(spec, kv_cache, key, value, slot_mapping)
    bs = spec.block_size
    slots = slot_mapping[:key.shape[0]].astype(jnp.int32)  # vLLM pads slot_mapping: ignored
    if check_when_run:
        check_slots_when_run(slots, num_blocks * bs)
    safe_slots = jnp.clip(slots, 0, num_blocks * bs - 1)
    quantized = [
        _quantize(x, check_scale(name, scale, spec, num_blocks), slots, safe_slots,
                  kv_cache.dtype)
        for name, x, scale in (("k_scale", key, k_scale), ("v_scale", value, v_scale))]
    # A negative slot goes to page num_blocks, out of range (negative indices would wrap);
    # a slot past the cache lands at a page >= num_blocks: mode="drop" skips both writes.
    pages = jnp.where(slots >= 0, slots // bs, num_blocks)
    offsets = jnp.where(slots >= 0, slots % bs, 0)
    new = jnp.stack(quantized, axis=1)  # [T, 2, num_kv_heads, D]
    if spec.kv_cache_layout == "NHD":
        return kv_cache.at[pages, :, offsets].set(new, mode="drop")
    return kv_cache.at[pages, :, :, offsets].set(new, mode="drop")


_scatter_kv_jit = jax.jit(scatter_kv, static_argnames=("spec", "check_when_run"),
                          donate_argnames=("kv_cache",))


def check_cache_owner(kv_cache) -> None:
    """ValueError for a cache that PyTorch owns (an array `interop.kv_cache_to_jax` or
    `interop.to_jax` made from a tensor): JAX cannot write into that buffer, and a copy would
    leave PyTorch's cache stale without a word (contract, section 5)."""
    if not is_traced(kv_cache) and interop.bridges.imported_from_torch(kv_cache):
        raise ValueError(
            "kv_cache is a PyTorch-owned cache imported with interop.kv_cache_to_jax: JAX "
            "cannot write into it in place (its writes would go to a copy PyTorch never sees). "
            "Write it with torch_sparse.write_kv, or give JAX its own cache with "
            "jnp.array(kv_cache, copy=True) (then PyTorch no longer sees JAX's writes)")


def prepare_write(kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec, k_scale,
                  v_scale, *, checks: bool | None, num_slots) -> bool:
    """Every check `write_kv` makes before its donating call, so a failed call never consumes
    the cache. num_slots(num_blocks) -> the slots one writer may use. Returns whether the
    slots must also be checked when the computation runs (check mode, traced slots)."""
    check_jax_flavour(kv_cache=kv_cache, key=key, value=value, slot_mapping=slot_mapping,
                      k_scale=k_scale, v_scale=v_scale)
    check_cache_owner(kv_cache)
    num_blocks = check_write_inputs(spec, kv_cache, key, value, slot_mapping)
    checks = checks_enabled(checks)
    slots = host_values(slot_mapping, fetch=checks)
    if slots is not None:
        check_slots(slots[:key.shape[0]], num_slots(num_blocks))
        return False
    return checks and is_traced(slot_mapping)


def write_kv(kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec, k_scale=None,
             v_scale=None, *, checks: bool | None = None):
    """Store each token's K and V at its slot; returns the new cache.

    Args:
      kv_cache: the physical cache (spec.physical_kv_cache_shape), the spec's storage dtype for
        the key dtype, owned by JAX (a cache imported from PyTorch is a ValueError: write it
        with torch_sparse.write_kv). Donated: XLA writes into its buffer and the argument is
        consumed (use the returned array); a call that raises consumes nothing. Under an outer
        `jax.jit`, donate it there to keep it in place.
      key / value: [num_tokens, num_kv_heads, head_size] bfloat16 / float16.
      slot_mapping: [>= num_tokens] int, page * block_size + offset; negative: not written;
        >= num_blocks * block_size: never written, and a ValueError naming the first such
        token where the check is free or in the check mode (module docstring). Entries past
        num_tokens are ignored (vLLM pads it).
      k_scale / v_scale: FP8 caches only: None, a scalar or [num_kv_heads, num_blocks *
        block_size] float32 read at the slot; the cache stores x / scale saturated to FP8_MAX.
      checks: the check mode for this call; None: on when M3_SPARSE_CHECKS=1.
    Returns: the updated cache (the same buffer as `kv_cache` when donated).
    Raises: TypeError for a dtype mistake or a PyTorch tensor (naming the interop bridge),
      ValueError for a shape, a slot or an owner mistake.
    """
    check_when_run = prepare_write(kv_cache, key, value, slot_mapping, spec, k_scale, v_scale,
                                   checks=checks,
                                   num_slots=lambda num_blocks: num_blocks * spec.block_size)
    return _scatter_kv_jit(kv_cache, key, value, slot_mapping, spec, k_scale, v_scale,
                           check_when_run=check_when_run)


def allocate_kv_cache(spec: SparseAttentionSpec, num_blocks: int, *, dtype=None, fill=0,
                      device=None):
    """A new cache of num_blocks pages in the spec's physical layout, every element `fill`.

    The initial state: every K and V slot holds `fill`, zeros by default, so a slot read
    before it is written (a block the indexer selects past what write_kv stored) contributes
    a score of 0 and a value of 0: finite, never the garbage of uninitialised memory. The
    cache is owned by JAX: `write_kv` updates it in place when it is donated.

    Args:
      spec: the layer's spec; its kv_cache_dtype and the query dtype give the storage dtype
        (`spec.cache_storage_dtype`).
      num_blocks: pages (>= 1).
      dtype: the query dtype the cache serves, "bfloat16" or "float16" (a name or a dtype);
        it decides the storage only for kv_cache_dtype="auto". None: bfloat16.
      fill: the initial value of every element, a float (converted to the storage dtype; FP8
        caches saturate it to +-FP8_MAX as write_kv does; NaN stays NaN).
      device: None (JAX's default device), a `jax.Device` or a `jax.sharding.Sharding` (for
        example `kv_cache_sharding(mesh, spec)`).
    Returns: [spec.physical_kv_cache_shape(num_blocks)] in the storage dtype.
    Raises: TypeError for a dtype that is not a query dtype, ValueError for num_blocks < 1.
    """
    query_dtype = "bfloat16" if dtype is None else jnp.dtype(dtype).name
    if query_dtype not in QUERY_DTYPES:
        raise TypeError(f"dtype {query_dtype} is not a query dtype; expected one of "
                        f"{', '.join(QUERY_DTYPES)} (the cache's own dtype follows from "
                        f"kv_cache_dtype={spec.kv_cache_dtype!r})")
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    storage = jnp.dtype(spec.cache_storage_dtype(query_dtype))
    fill = float(fill)
    if storage.name in FP8_MAX and not math.isnan(fill):  # saturate like write_kv does
        fill = max(-FP8_MAX[storage.name], min(FP8_MAX[storage.name], fill))
    return jnp.full(spec.physical_kv_cache_shape(num_blocks), fill, storage, device=device)
