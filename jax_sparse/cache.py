"""Writing new K/V into the paged cache: one scatter that XLA performs in place when the
cache is donated (the default here), with FP8 quantization on the way in. Plain XLA, so it is
the write path of every implementation and platform (GPU, TPU, CPU): no kernel needed."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from interop import FP8_MAX, SparseAttentionSpec

from .validation import check_scale, check_write_inputs


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


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("kv_cache",))
def write_kv(kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec, k_scale=None,
             v_scale=None):
    """Store each token's K and V at its slot; returns the new cache.

    Args:
      kv_cache: the physical cache (spec.physical_kv_cache_shape), the spec's storage dtype for
        the key dtype. Donated: XLA writes into its buffer and the argument is consumed (use
        the returned array). Under an outer `jax.jit`, donate it there to keep it in place.
      key / value: [num_tokens, num_kv_heads, head_size] bfloat16 / float16.
      slot_mapping: [num_tokens] int, page * block_size + offset; negative: not written.
      k_scale / v_scale: FP8 caches only: None, a scalar or [num_kv_heads, num_blocks *
        block_size] float32 read at the slot; the cache stores x / scale saturated to FP8_MAX.
    Returns: the updated cache (the same buffer as `kv_cache` when donated).
    """
    num_blocks = check_write_inputs(spec, kv_cache, key, value, slot_mapping)
    bs = spec.block_size
    slots = slot_mapping.astype(jnp.int32)
    safe_slots = jnp.clip(slots, 0, num_blocks * bs - 1)
    quantized = [
        _quantize(x, check_scale(name, scale, spec, num_blocks), slots, safe_slots,
                  kv_cache.dtype)
        for name, x, scale in (("k_scale", key, k_scale), ("v_scale", value, v_scale))]
    # A negative slot goes to page num_blocks, out of range: mode="drop" skips the write.
    pages = jnp.where(slots >= 0, slots // bs, num_blocks)
    offsets = jnp.where(slots >= 0, slots % bs, 0)
    new = jnp.stack(quantized, axis=1)  # [T, 2, num_kv_heads, D]
    if spec.kv_cache_layout == "NHD":
        return kv_cache.at[pages, :, offsets].set(new, mode="drop")
    return kv_cache.at[pages, :, :, offsets].set(new, mode="drop")
