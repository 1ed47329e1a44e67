"""The golden float64 reference, straight from the contract (section 2)."""
from __future__ import annotations

import numpy as np

from .arrays import is_torch_tensor, to_float64, to_numpy
from .metadata import SparseMetadata, valid_topk_mask
from .spec import SparseAttentionSpec


def logical_kv_cache_float64(spec: SparseAttentionSpec, kv_cache) -> np.ndarray:
    """The cache as float64 in the logical (num_blocks, 2, block_size, kv_heads, head) shape.

    A PyTorch tensor is taken as the logical view (as vLLM allocates it); any other array
    (NumPy, JAX) as the physical array in `spec.kv_cache_layout`.
    """
    cache = to_float64(kv_cache)
    if is_torch_tensor(kv_cache):
        spec.check_logical_kv_cache_shape(cache.shape)
        return cache
    spec.check_physical_kv_cache_shape(cache.shape)
    order = spec.kv_cache_stride_order()
    return np.transpose(cache, np.argsort(order))


def _slot_scale(spec: SparseAttentionSpec, name: str, scale, num_blocks: int) -> np.ndarray:
    """[num_kv_heads, num_slots] float64 from None, a scalar or a per-(head, slot) array."""
    slots = (spec.num_kv_heads, num_blocks * spec.block_size)
    if scale is None:
        return np.ones(slots)
    arr = to_float64(scale)
    if spec.check_scale_shape(name, arr.shape, num_blocks):
        return np.full(slots, float(arr.reshape(())))
    return arr


def reference_attention(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                        metadata: SparseMetadata, k_scale=None, v_scale=None,
                        *, token_chunk: int = 64) -> np.ndarray:
    """Block-sparse GQA attention in float64.

    Args:
      query: [num_tokens, num_heads, head_size] (any flavour).
      kv_cache: logical PyTorch view, or the physical NumPy/JAX array (see
        `logical_kv_cache_float64`).
      topk_indices: [num_kv_heads, >= num_tokens, topk] int, logical blocks per row.
      metadata: any flavour (its token positions and request map are read).
      k_scale / v_scale: None, a scalar or [num_kv_heads, num_blocks * block_size]; applied to
        FP8 caches only.
    Returns: [num_tokens, num_heads, head_size] float64. Repeated valid entries count once;
      rows with no valid entry give zeros; a row that attends a key gives NaN when its query
      row holds a NaN or Inf, or when a K or V slot it attends holds a NaN (contract, 5).
    """
    q = to_float64(query)
    num_tokens = spec.check_query_shape(q.shape)
    kv = logical_kv_cache_float64(spec, kv_cache)
    num_blocks, _, bs, num_kv, dim = kv.shape
    if spec.is_fp8:
        ks = _slot_scale(spec, "k_scale", k_scale, num_blocks).reshape(num_kv, num_blocks, bs)
        vs = _slot_scale(spec, "v_scale", v_scale, num_blocks).reshape(num_kv, num_blocks, bs)
    else:
        ks = vs = np.ones((num_kv, num_blocks, bs))
    topk = to_numpy(topk_indices).astype(np.int64)
    spec.check_topk_shape(topk.shape, num_tokens)
    topk = topk[:, :num_tokens]
    positions = to_numpy(metadata.token_positions).astype(np.int64)[:num_tokens]
    token_req = to_numpy(metadata.token_to_req).astype(np.int64)[:num_tokens]
    block_table = to_numpy(metadata.block_table).astype(np.int64)
    if positions.shape[0] < num_tokens:
        raise ValueError(f"metadata describes {positions.shape[0]} tokens but query has "
                         f"{num_tokens}")

    valid = valid_topk_mask(topk, positions, bs)
    # Set semantics: a repeated valid entry counts once (keep its first occurrence).
    k = topk.shape[-1]
    same = (topk[..., :, None] == topk[..., None, :]) & np.tril(np.ones((k, k), bool), -1)
    valid &= ~(same & valid[..., None, :]).any(-1)
    blk = np.clip(topk, 0, block_table.shape[1] - 1)
    pages = np.where(valid, block_table[token_req[None, :, None], blk], 0)
    # Never follow a page outside the cache (the kernels mask those too).
    valid &= (pages >= 0) & (pages < num_blocks)
    pages = np.where(valid, pages, 0)

    group = spec.num_queries_per_kv
    out = np.zeros((num_tokens, spec.num_heads, dim))
    offs = np.arange(bs)
    for g in range(num_kv):
        # Contiguous dequantized K and V of this KV head: [num_blocks, block_size, head_size].
        k_head = kv[:, 0, :, g, :] * ks[g][..., None]
        v_head = kv[:, 1, :, g, :] * vs[g][..., None]
        for t0 in range(0, num_tokens, token_chunk):
            t1 = min(t0 + token_chunk, num_tokens)
            pg = pages[g, t0:t1]                                          # [C, K]
            key_pos = topk[g, t0:t1, :, None] * bs + offs                 # [C, K, bs]
            mask = valid[g, t0:t1, :, None] & (key_pos <= positions[t0:t1, None, None])
            keys = k_head[pg]                                             # [C, K, bs, D]
            vals = v_head[pg]
            c = t1 - t0
            keys = keys.reshape(c, -1, dim)
            vals = vals.reshape(c, -1, dim)
            mask = mask.reshape(c, 1, -1)
            qg = q[t0:t1, g * group:(g + 1) * group]                       # [C, group, D]
            # A key no row attends contributes nothing, whatever its bits (NaN included).
            vals = np.where(mask.reshape(c, -1, 1), vals, 0.0)
            scores = np.where(mask, spec.scale * (qg @ keys.transpose(0, 2, 1)), -np.inf)
            peak = scores.max(-1, keepdims=True)
            peak = np.where(np.isfinite(peak), peak, 0.0)
            weights = np.where(mask, np.exp(scores - peak), 0.0)
            denom = weights.sum(-1, keepdims=True)
            attended = mask.any(-1, keepdims=True)                        # [C, 1, 1]
            rows = (weights @ vals) / np.where(attended, denom, 1.0)
            # Garbage in (section 5): a non-finite query row that attends a key gives NaN
            # (a NaN in an attended K or V slot already does); no key attended: zeros.
            bad_q = ~np.isfinite(qg).all(-1, keepdims=True)               # [C, group, 1]
            rows = np.where(bad_q, np.nan, rows)
            out[t0:t1, g * group:(g + 1) * group] = np.where(attended, rows, 0.0)
    return out
