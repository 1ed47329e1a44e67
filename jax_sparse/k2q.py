"""Key-to-query (K2Q) prefill: one program per selected page, many query rows against it.

The token kernel (`attention.py`) loads each selected page once per (token, KV head): a GQA
group of query rows per 64 KB page. K2Q inverts the selection instead (MiniMax's "MSA"
prefill), in three steps per chunk of tokens:

1. `plan_k2q` (jnp ops, static shapes, no host sync): every valid (token, column k) entry of
   the top-k rows becomes a pair; pairs are sorted by segment (KV head, page), then by token.
   A work item is a run of up to `tiles * pairs` consecutive pairs of one segment; the work
   list's length is a bound from shapes only (`max_k2q_items`), so the grid is static.
2. `_k2q_block_kernel`, one program per work item: loads the page's K and V once
   (`pages.load_page`), then for each of its query tiles gathers `pairs` tokens x the padded
   GQA group as rows (64 where the group allows, so Hopper can use wgmma), masks each row
   causally (key position <= the row's token position), takes the softmax over this page only
   (fp32, base 2: no online rescaling) and writes the normalised partial output and its
   log2-sum-exp at [k, token, head].
3. `_combine` (XLA, one fused reduction): weights each token's valid columns k by their
   log2-sum-exps. Validity is the plan's (the shared `selection.select_rows` rule), so a
   partial that no program wrote is never read; a row with no valid entry gets zeros.

`paged_sparse_attention_k2q` runs the three over chunks of tokens so partials stay within
interop.tiling.K2Q_WORKSPACE_BYTES whatever the prefill size. On a GPU the kernel lowers
through Pallas' Triton backend; elsewhere it runs in interpret mode.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from interop import SparseAttentionSpec
from interop.tiling import k2q_tile_shape, k2q_tokens_per_chunk, max_k2q_items

from .attention import (_merge_splits, _scale, _whole, drop_nonfinite, fp16_rows,
                        poison_rows)
from .pages import cache_operand, load_page
from .selection import LOG2E, MASK_VALUE, select_rows

# Query tiles one program runs against the page it loaded.
# H100 sweep (64/4, bf16): 4 tiles, 36.2 ms at 64k random against 38.2 with 2 (8 warps: 54).
TILES_PER_ITEM = 4
NUM_WARPS = 4
NUM_STAGES = 1  # no loop in the kernel to pipeline


class K2QPlan(NamedTuple):
    """The inverted selection of a chunk of n tokens: E = num_kv_heads * n * topk entries.

    Pairs are in CSR order: sorted by segment (KV head, page), then by token, then by column;
    invalid entries come last. Pair arrays hold C = pairs_per_item padding pairs past E so a
    work item may read C pairs from its start without a bound check.
      valid: [num_kv_heads, n, topk] bool, the entries that select a page (the shared rule,
        `selection.select_rows`, and the token mask): the combine's weights.
      pair_key: [E + C] int32, kv_head * num_blocks + page (runs of equal keys are the
        segments); num_kv_heads * num_blocks for invalid entries and padding.
      pair_token: [E + C] int32, the pair's token in the chunk (n for padding).
      pair_column: [E + C] int32, the pair's column k in the token's top-k row.
      pair_limit: [E + C] int32, position - block * block_size: the last key offset of the
        page the token may see (>= 0 for a valid pair; -1 for padding).
      item_start: [max_items] int32, the first pair of each work item (a run of up to C pairs
        of one segment), -1 past the last item; max_items from `max_k2q_items`.
    """

    valid: jax.Array
    pair_key: jax.Array
    pair_token: jax.Array
    pair_column: jax.Array
    pair_limit: jax.Array
    item_start: jax.Array


def plan_k2q(topk_indices, token_to_req, token_positions, block_table, *, num_blocks: int,
             block_size: int, pairs_per_item: int, token_mask=None) -> K2QPlan:
    """Invert the top-k selection of a chunk of n tokens into CSR pairs and work items.

    Args:
      topk_indices: [num_kv_heads, n, topk] int32, the chunk's top-k rows.
      token_to_req / token_positions: [n] int32 (position -1: padding, selects nothing).
      block_table: [num_reqs, max_blocks] int32.
      num_blocks / block_size: the cache's pages and their size (static).
      pairs_per_item: C, the pairs one work item takes at most (static).
      token_mask: optional bool [n]: only its True tokens are planned.
    Returns: a `K2QPlan`. jnp ops only (static shapes, no host sync): jit-able.
    """
    num_kv_heads, n, topk = topk_indices.shape
    num_reqs, max_blocks = block_table.shape
    req = jnp.clip(token_to_req, 0, num_reqs - 1)[None, :, None]
    position = token_positions if token_mask is None else jnp.where(token_mask,
                                                                    token_positions, -1)
    position = position[None, :, None]
    valid, block, page = select_rows(
        topk_indices, position, lambda b: block_table[req, b], block_size=block_size,
        max_blocks=max_blocks, num_blocks=num_blocks)
    sentinel = num_kv_heads * num_blocks
    kv_head = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
    key = jnp.where(valid, kv_head * num_blocks + page, sentinel).reshape(-1)
    limit = jnp.broadcast_to(position - block * block_size, valid.shape).reshape(-1)
    entry = jnp.arange(key.shape[0], dtype=jnp.int32)
    # entry = (g * n + token) * topk + column: a stable sort by key keeps token order.
    key, order = lax.sort((key, entry), num_keys=1, is_stable=True)
    token, column, limit = order // topk % n, order % topk, limit[order]

    # The first pair of each pair's segment: keys are sorted, so a binary search finds it
    # (a cumulative max over millions of pairs is one long scan on a GPU).
    segment_first = jnp.searchsorted(key, key, side="left").astype(jnp.int32)
    is_start = (key < sentinel) & ((entry - segment_first) % pairs_per_item == 0)
    max_items = max_k2q_items(num_kv_heads, n, topk, num_blocks, num_reqs, max_blocks,
                              pairs_per_item)
    slot = jnp.where(is_start, jnp.cumsum(is_start, dtype=jnp.int32) - 1, max_items)
    item_start = jnp.full((max_items,), -1, jnp.int32).at[slot].set(entry, mode="drop")
    pad = lambda x, value: jnp.pad(x, (0, pairs_per_item), constant_values=value)  # noqa: E731
    return K2QPlan(valid, pad(key, sentinel), pad(token, n), pad(column, 0), pad(limit, -1),
                   item_start)


def _k2q_block_kernel(first_token_ref, item_ref, key_ref, token_ref, column_ref, limit_ref,
                      q_ref, cache_ref, k_scale_ref, v_scale_ref, part_ref, lse_ref, *,
                      group: int, group_pad: int, pairs: int, tiles: int, layout: str,
                      block_size: int, score_scale: float, fp16_compute: bool,
                      packed_dtype=None):
    """Grid (max_items,): work item i attends up to `tiles` tiles of `pairs` pairs to its page.

    q_ref: [num_tokens, num_heads, D] (every token; the chunk starts at first_token_ref[0]).
    Tile row r: pair r // group_pad, query head kv_head * group + r % group_pad.
    part_ref: [topk, n + 1, num_heads, D] normalised partials at [column, token, head];
    lse_ref: [topk, n + 1, num_heads] their log2-sum-exps. Token row n takes no live row.
    """
    start = item_ref[pl.program_id(0)]

    @pl.when(start >= 0)  # surplus programs of the static grid exit
    def _item():
        num_blocks = cache_ref.shape[0]
        n = part_ref.shape[1] - 1
        key = key_ref[start]
        kv_head, page = key // num_blocks, key % num_blocks
        in_item = start + jnp.arange(tiles * pairs, dtype=jnp.int32)
        last = jnp.where(key_ref[in_item] == key, limit_ref[in_item], -1).max()
        # The page is valid (the plan checked it); keys no row of the item may see are not
        # read (they may hold anything, NaN included).
        offsets = jnp.arange(block_size, dtype=jnp.int32)
        seen = offsets <= last
        k = load_page(cache_ref, page, 0, kv_head, layout, seen, packed_dtype)
        v = load_page(cache_ref, page, 1, kv_head, layout, seen, packed_dtype)
        # The item's rows attend different keys of the page: a non-finite V row must reach
        # only the rows that attend it (`poison_rows` below), not every row through 0 * NaN.
        v, bad = drop_nonfinite(v.astype(jnp.float16 if fp16_compute else q_ref.dtype))
        slots = pl.ds(page * block_size, block_size)
        rows = jnp.arange(pairs * group_pad, dtype=jnp.int32)
        head_size = q_ref.shape[-1]
        dims = jnp.arange(head_size, dtype=jnp.int32)[None, :]
        first_token = first_token_ref[0]
        for t in range(tiles):
            first = start + t * pairs

            @pl.when(key_ref[first] == key)
            def _tile():
                pair = first + rows // group_pad
                live = (key_ref[pair] == key) & (rows % group_pad < group)
                head = jnp.where(live, kv_head * group + rows % group_pad, 0)
                token = token_ref[pair]
                q = plgpu.load(q_ref.at[jnp.where(live, first_token + token, 0)[:, None],
                                        head[:, None], dims],
                               mask=live[:, None], other=jnp.zeros((), q_ref.dtype))
                row_scale = jnp.full(rows.shape, score_scale, jnp.float32)
                if fp16_compute:
                    q, row_scale = fp16_rows(q, row_scale)  # the token kernel's rule
                scores = plgpu.dot(q, k.astype(q.dtype), trans_b=True)  # [rows, block] f32
                if k_scale_ref is not None:
                    scores = scores * _scale(k_scale_ref, kv_head, slots)
                mask = offsets[None, :] <= limit_ref[pair][:, None]
                scores = jnp.where(mask, scores * row_scale[:, None], MASK_VALUE)
                m = scores.max(axis=-1)
                p = jnp.where(mask, jnp.exp2(scores - m[:, None]), 0.0)
                l = p.sum(axis=-1) + poison_rows(mask, bad)
                if v_scale_ref is not None:
                    p = p * _scale(v_scale_ref, kv_head, slots)
                acc = plgpu.dot(p.astype(q.dtype), v)
                # A live row attends >= 1 key of the page, so it divides by l whatever l holds
                # (NaN for garbage: a NaN or Inf query, a NaN in an attended slot; 0 when every
                # score was -inf), and its lse is NaN then too. Dead rows: no division by 0.
                part = acc / jnp.where(live, l, 1.0)[:, None]
                lse = jnp.where(l > 0, m + jnp.log2(l), jnp.nan)
                # Dead rows go to token row n: masked off on a GPU, and in interpret mode
                # (which stores them back unchanged) they never alias a live row.
                token = jnp.where(live, token, n)
                column = column_ref[pair]
                plgpu.store(part_ref.at[column[:, None], token[:, None], head[:, None], dims],
                            part.astype(part_ref.dtype), mask=live[:, None])
                plgpu.store(lse_ref.at[column, token, head], lse, mask=live)


def _combine(valid, part, lse, group: int):
    """[n, num_heads, D] f32: each token's valid partials weighted by their log2-sum-exps.

    valid: [num_kv_heads, n, topk] (the plan's); part: [topk, n + 1, num_heads, D];
    lse: [topk, n + 1, num_heads]. Unwritten partials (invalid columns) are never used; a row
    with a valid column attended a key, and a NaN partial of it makes it NaN.
    """
    n = valid.shape[1]
    valid = jnp.repeat(valid, group, axis=0).transpose(2, 1, 0)  # [topk, n, num_heads]
    part = jnp.where(valid[..., None], part[:, :n], 0)
    return _merge_splits(part, jnp.where(valid, lse[:, :n], -jnp.inf), valid.any(axis=0))


def tokens_per_chunk(spec: SparseAttentionSpec, partial_bytes: int) -> int:
    """Tokens per chunk for this spec (`interop.tiling.k2q_tokens_per_chunk`)."""
    return k2q_tokens_per_chunk(spec.num_kv_heads, spec.num_heads, spec.head_size,
                                spec.topk_blocks, partial_bytes)


def paged_sparse_attention_k2q(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                               token_to_req, token_positions, block_table, k_scale=None,
                               v_scale=None, *, token_mask=None, out=None,
                               interpret: bool | None = None, force_packed: bool = False):
    """K2Q attention of the rows in token_mask.

    Arguments as `attention.paged_sparse_attention` takes them (already validated: int32 index
    arrays, scales None / [1] / [num_kv_heads, num_blocks * block_size] float32), and:
      token_mask: optional bool [num_tokens] (traced): the rows this path computes; None:
        every row.
      out: optional [num_tokens, num_heads, head_size] in the query dtype: the result keeps
        its rows outside token_mask (None: those rows are zeros).
      interpret: default: interpret everywhere but on a GPU.
      force_packed: hand an FP8 cache to the kernel as uint16 pairs (see
        `pages.cache_operand`).
    Returns: [num_tokens, num_heads, head_size] in the query dtype; rows in token_mask with no
      valid entry (padding tokens included) are zeros.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, topk, group = spec.num_kv_heads, spec.topk_blocks, spec.num_queries_per_kv
    if out is None:
        out = jnp.zeros(query.shape, query.dtype)
    if num_tokens == 0:
        return out
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    group_pad, pairs = k2q_tile_shape(group)
    pairs_per_item = pairs * TILES_PER_ITEM
    chunk = min(num_tokens, tokens_per_chunk(spec, jnp.dtype(query.dtype).itemsize))
    num_blocks = kv_cache.shape[0]
    num_reqs, max_blocks = block_table.shape
    max_items = max_k2q_items(num_kv_heads, chunk, topk, num_blocks, num_reqs, max_blocks,
                              pairs_per_item)
    cache, packed_dtype = cache_operand(kv_cache, force_packed=force_packed)
    kernel = functools.partial(
        _k2q_block_kernel, group=group, group_pad=group_pad, pairs=pairs,
        tiles=TILES_PER_ITEM, layout=spec.kv_cache_layout, block_size=spec.block_size,
        score_scale=spec.scale * LOG2E, fp16_compute=jnp.dtype(kv_cache.dtype).itemsize == 1,
        packed_dtype=packed_dtype)
    pair_shape = (num_kv_heads * chunk * topk + pairs_per_item,)
    specs = [None if x is None else _whole(x.shape) for x in (query, cache, k_scale, v_scale)]
    block_kernel = pl.pallas_call(
        kernel,
        grid=(max_items,),
        in_specs=[_whole((1,)), _whole((max_items,)), *[_whole(pair_shape)] * 4, *specs],
        out_specs=[_whole((topk, chunk + 1, num_heads, head_size)),
                   _whole((topk, chunk + 1, num_heads))],
        out_shape=[jax.ShapeDtypeStruct((topk, chunk + 1, num_heads, head_size), query.dtype),
                   jax.ShapeDtypeStruct((topk, chunk + 1, num_heads), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name=f"k2q_block_{spec.kv_cache_layout}_rows{pairs * group_pad}",
    )

    def run_chunk(i, out):
        # The last chunk ends at num_tokens (it may overlap the one before: same rows, same
        # values), so every chunk has the static size.
        first = jnp.minimum(i * chunk, num_tokens - chunk)
        take = lambda x, axis=0: lax.dynamic_slice_in_dim(x, first, chunk, axis)  # noqa: E731
        plan = plan_k2q(take(topk_indices, 1), take(token_to_req), take(token_positions),
                        block_table, num_blocks=num_blocks, block_size=spec.block_size,
                        pairs_per_item=pairs_per_item,
                        token_mask=None if token_mask is None else take(token_mask))
        part, lse = block_kernel(first[None], plan.item_start, plan.pair_key, plan.pair_token,
                                 plan.pair_column, plan.pair_limit, query, cache, k_scale,
                                 v_scale)
        rows = _combine(plan.valid, part, lse, group).astype(out.dtype)
        if token_mask is not None:
            rows = jnp.where(take(token_mask)[:, None, None], rows, take(out))
        return lax.dynamic_update_slice_in_dim(out, rows, first, 0)

    return lax.fori_loop(0, -(-num_tokens // chunk), run_chunk, out)
