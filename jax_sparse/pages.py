"""Reading cache pages inside a Pallas (Triton backend) kernel: what every kernel family shares.

Addressing. Pallas' Triton lowering computes a ref's element offsets in 32-bit integers unless
the array holds more than 2^32 bytes (jax 0.10-0.11, `_compute_offsets_from_indices`). For 2-
and 4-byte dtypes that is safe, but a 1-byte (FP8) cache of 2^31 to 2^32 bytes has element
offsets past 2^31 in 32 bits: they wrap negative, and the kernel reads before the cache (an
illegal address, or silently wrong output). Such a cache is handed to the kernel as uint16
pairs (a free bitcast of the same buffer), which halves its element count; each loaded row is
split back into its two FP8 halves and interleaved in registers.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

# The largest element offset a 32-bit lowering can address.
_MAX_32BIT_OFFSET = 2**31 - 1


def needs_packing(shape, dtype) -> bool:
    """Whether a cache of this shape and dtype must go to the kernel as uint16 pairs: a 1-byte
    dtype with element offsets past 2^31 (the packed view stays within reach up to 2^32 bytes,
    and above that Pallas itself switches to 64-bit offsets)."""
    size = 1
    for n in shape:
        size *= int(n)
    return jnp.dtype(dtype).itemsize == 1 and size - 1 > _MAX_32BIT_OFFSET


def cache_operand(kv_cache, *, force_packed: bool = False):
    """(operand, packed_dtype): the array to pass the kernel and, when packed, the FP8 dtype
    its uint16 elements hold two of (else None). `force_packed` packs any FP8 cache (tests)."""
    if not (force_packed or needs_packing(kv_cache.shape, kv_cache.dtype)):
        return kv_cache, None
    if jnp.dtype(kv_cache.dtype).itemsize != 1:
        raise ValueError(f"only 1-byte caches are packed, got {jnp.dtype(kv_cache.dtype).name}")
    pairs = kv_cache.reshape(*kv_cache.shape[:-1], kv_cache.shape[-1] // 2, 2)
    return lax.bitcast_convert_type(pairs, jnp.uint16), jnp.dtype(kv_cache.dtype)


def _unpack(words, packed_dtype):
    """uint16 [..., n] -> packed_dtype [..., 2n]: the low byte is the element at the lower
    address (little-endian), so it comes first."""
    low = (words & 0xFF).astype(jnp.uint8)
    high = lax.shift_right_logical(words, jnp.uint16(8)).astype(jnp.uint8)
    pair = jnp.stack([lax.bitcast_convert_type(low, packed_dtype),
                      lax.bitcast_convert_type(high, packed_dtype)], axis=-1)
    return pair.reshape(*words.shape[:-1], 2 * words.shape[-1])


def load_page(cache_ref, page, kv: int, head, layout: str, mask, packed_dtype=None):
    """[block_size, head_size] of K (kv=0) or V (kv=1) of one KV head from one page, in the
    cache's dtype; rows where `mask` [block_size] is False are not read (predicated off) and
    come back as zeros. packed_dtype: see `cache_operand`."""
    kv = jnp.int32(kv)  # a Python int index trips the interpreter's indexer
    if layout == "NHD":
        page_ref = cache_ref.at[page, kv, :, head, :]
    else:
        page_ref = cache_ref.at[page, kv, head, :, :]
    rows = plgpu.load(page_ref, mask=jnp.broadcast_to(mask[:, None], page_ref.shape),
                      other=jnp.zeros((), page_ref.dtype))
    return rows if packed_dtype is None else _unpack(rows, packed_dtype)
