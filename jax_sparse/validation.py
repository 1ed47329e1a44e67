"""Trace-time checks of the public entry points: static facts only (shapes, dtypes, the spec),
each failure a ValueError naming the field, its value and what was expected."""
from __future__ import annotations

import jax.numpy as jnp

from interop import QUERY_DTYPES, SparseAttentionSpec


def _dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def _check_int(name: str, x, ndim: int) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(jnp.shape(x))}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must hold integers, got dtype {jnp.result_type(x)}")


def check_cache(spec: SparseAttentionSpec, kv_cache, data_dtype: str, data_name: str) -> int:
    """The physical cache against the spec and the query/key dtype; returns num_blocks."""
    if data_dtype not in QUERY_DTYPES:
        raise ValueError(f"{data_name} dtype {data_dtype} is not supported; expected one of "
                         f"{', '.join(QUERY_DTYPES)}")
    num_blocks = spec.check_physical_kv_cache_shape(kv_cache.shape)
    expected = spec.cache_storage_dtype(data_dtype)
    if _dtype_name(kv_cache) != expected:
        raise ValueError(f"kv_cache dtype {_dtype_name(kv_cache)} does not match the spec: "
                         f"expected {expected} (kv_cache_dtype={spec.kv_cache_dtype!r}, "
                         f"{data_name} dtype {data_dtype})")
    return num_blocks


def check_scale(name: str, scale, spec: SparseAttentionSpec, num_blocks: int):
    """None, [1] float32 (one scale) or [num_kv_heads, num_slots] float32; None unless FP8."""
    if scale is None or not spec.is_fp8:
        return None
    scale = jnp.asarray(scale, jnp.float32)
    if spec.check_scale_shape(name, scale.shape, num_blocks):
        return scale.reshape(1)
    return scale


def check_attention_inputs(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                           token_to_req, token_positions, block_table) -> int:
    """Everything `sparse_attention` reads; returns num_blocks."""
    num_tokens = spec.check_query_shape(query.shape)
    num_blocks = check_cache(spec, kv_cache, _dtype_name(query), "query")
    _check_int("topk_indices", topk_indices, 3)
    spec.check_topk_shape(topk_indices.shape, num_tokens)
    for name, x in (("token_to_req", token_to_req), ("token_positions", token_positions)):
        _check_int(name, x, 1)
        if x.shape[0] < num_tokens:
            raise ValueError(f"metadata.{name} has {x.shape[0]} entries but query has "
                             f"{num_tokens} tokens: expected >= {num_tokens}")
    _check_int("block_table", block_table, 2)
    if 0 in block_table.shape:
        raise ValueError(f"block_table shape {block_table.shape} is empty: expected "
                         "[num_reqs >= 1, max_blocks >= 1]")
    return num_blocks


def check_write_inputs(spec: SparseAttentionSpec, kv_cache, key, value, slot_mapping) -> int:
    """Everything `write_kv` reads; returns num_blocks."""
    num_blocks = check_cache(spec, kv_cache, _dtype_name(key), "key")
    expected = (spec.num_kv_heads, spec.head_size)
    for name, x in (("key", key), ("value", value)):
        if x.ndim != 3 or x.shape[1:] != expected:
            raise ValueError(f"{name} shape {x.shape} does not match the spec: expected "
                             f"[num_tokens, {expected[0]}, {expected[1]}]")
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value ({value.shape}, {value.dtype}) must match key "
                         f"({key.shape}, {key.dtype})")
    _check_int("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries: expected "
                         f"{key.shape[0]} (one per token of key)")
    return num_blocks
