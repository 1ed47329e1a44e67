"""Token-tile union prefill: a tile of consecutive tokens walks the union of its selections.

The token kernel (`attention.py`) loads each selected page once per (token, KV head), for the
GQA group's rows only. Neighbouring tokens select mostly the same blocks, so here a program
takes a tile of `tile_tokens(group)` consecutive tokens x one KV head (128 query rows for a
GQA group of 16: Hopper's wgmma needs 64 rows per warpgroup) and walks the union of the
tile's selected blocks once, each row masked to the blocks its token chose and to keys at or
before its position (FlashInfer's `sparse_fwd_union` idea):

1. `plan_union` (jnp ops, static shapes, no host sync): per (KV head, tile), the distinct valid
   (page, logical block) entries sorted, and for each the bitmask of the tile's tokens that
   chose it; plus the union sizes. Validity is the shared rule (`selection.select_rows`), so
   every page the kernel reads lies inside the cache whatever top-k holds.
2. `_union_kernel`, one program per (tile, KV head): online softmax in fp32 (base 2) over the
   union's pages through the shared `attention._attend_block` with a per-row mask, the output
   rows stored directly. Tiles may straddle two requests (or a request's first block): the
   tokens' bits say which rows attend an entry. Padding tokens (position -1) and rows with no
   valid entry get zeros.

`paged_sparse_attention_union` plans and runs over chunks of tokens so the plan stays within
interop.tiling.UNION_PLAN_BYTES whatever the prefill size. On a GPU the kernel lowers
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
from interop.tiling import union_tile_tokens as tile_tokens
from interop.tiling import union_tokens_per_chunk as tokens_per_chunk

from .attention import _whole, block_attender, normalize
from .pages import cache_operand
from .selection import LOG2E, select_rows

NUM_WARPS = 8
NUM_STAGES = 2


class UnionPlan(NamedTuple):
    """The tile unions of a chunk of n tokens: tile i holds its tokens i * T + [0, T) (those
    below n), T = `tile_tokens(group)`; E = T * topk entries per (KV head, tile), the union's
    distinct entries first, ordered by (page, logical block).

      page: [num_kv_heads, num_tiles, E] int32, the entry's page (in [0, num_blocks)); -1 past
        the union.
      block: [num_kv_heads, num_tiles, E] int32, its logical block (keys at positions
        block * block_size + [0, block_size)); 0 past the union.
      token_bits: [num_kv_heads, num_tiles, E] int32, bit j set when the tile's token j chose
        the entry (a valid entry of its top-k row); 0 past the union.
      size: [num_kv_heads, num_tiles] int32, the union's size.
    """

    page: jax.Array
    block: jax.Array
    token_bits: jax.Array
    size: jax.Array


def plan_union(topk_indices, token_to_req, token_positions, block_table, *, num_blocks: int,
               block_size: int, tile_tokens: int, token_mask=None) -> UnionPlan:
    """The union of each tile's valid selections, per KV head (see `UnionPlan`).

    Args:
      topk_indices: [num_kv_heads, n, topk] int32, the chunk's top-k rows.
      token_to_req / token_positions: [n] int32 (position -1: padding, selects nothing).
      block_table: [num_reqs, max_blocks] int32.
      num_blocks / block_size: the cache's pages and their size (static).
      tile_tokens: T, tokens per tile (static, at most 31: the bitmask is int32).
      token_mask: optional bool [n]: only its True tokens are planned.
    Returns: a `UnionPlan`. Entries are distinct per (page, logical block): tokens of two
    requests that share a page for the same block share the entry; a row that repeats a valid
    entry sets its bit once. jnp ops only (static shapes, no host sync): jit-able.
    """
    num_kv_heads, n, topk = topk_indices.shape
    num_reqs, max_blocks = block_table.shape
    num_tiles = -(-n // tile_tokens)
    entries = tile_tokens * topk
    req = jnp.clip(token_to_req, 0, num_reqs - 1)[None, :, None]
    position = token_positions if token_mask is None else jnp.where(token_mask,
                                                                    token_positions, -1)
    valid, block, page = select_rows(
        topk_indices, position[None, :, None], lambda b: block_table[req, b],
        block_size=block_size, max_blocks=max_blocks, num_blocks=num_blocks)
    sentinel = jnp.iinfo(jnp.int32).max  # above every page: invalid entries sort last
    tile_shape = (num_kv_heads, num_tiles, entries)

    def tiled(x, fill):  # [G, n, topk] -> [G, num_tiles, T * topk], (token, column) order
        x = jnp.pad(x, ((0, 0), (0, num_tiles * tile_tokens - n), (0, 0)), constant_values=fill)
        return x.reshape(tile_shape)

    token = lax.broadcasted_iota(jnp.int32, tile_shape, 2) // topk  # the entry's tile token
    # Stable: inside a run of equal keys, entries stay in (token, column) order.
    page, block, token = lax.sort(
        (tiled(jnp.where(valid, page, sentinel), sentinel), tiled(block, 0), token),
        dimension=2, num_keys=2, is_stable=True)
    live = page < sentinel

    def same_as_previous(x):
        return jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]],
                               axis=-1)

    same_key = same_as_previous(page) & same_as_previous(block)
    first = live & ~same_key
    union_index = jnp.cumsum(first, axis=-1, dtype=jnp.int32) - 1
    # A run's tokens are distinct once repeats are dropped: their sum is their bitwise or.
    bits = jnp.where(live & ~(same_key & same_as_previous(token)),
                     lax.shift_left(jnp.int32(1), token), 0)
    heads = jnp.arange(num_kv_heads)[:, None, None]
    tiles = jnp.arange(num_tiles)[None, :, None]
    # Writes of non-entries land past the end and are dropped.
    at = lambda where: (heads, tiles, jnp.where(where, union_index, entries))  # noqa: E731
    token_bits = jnp.zeros(tile_shape, jnp.int32).at[at(live)].add(bits, mode="drop")
    union_page = jnp.full(tile_shape, -1, jnp.int32).at[at(first)].set(page, mode="drop")
    union_block = jnp.zeros(tile_shape, jnp.int32).at[at(first)].set(block, mode="drop")
    return UnionPlan(union_page, union_block, token_bits, first.sum(-1, dtype=jnp.int32))


def _union_kernel(first_ref, mask_ref, positions_ref, size_ref, page_ref, block_ref, bits_ref,
                  q_ref, cache_ref, k_scale_ref, v_scale_ref, _prev_ref, out_ref, *,
                  group: int, group_pad: int, tile_tokens: int, layout: str, block_size: int,
                  score_scale: float, fp16_compute: bool, packed_dtype=None):
    """Grid (num_tiles, num_kv_heads): the rows of tile program_id(0) of a chunk of n tokens.

    first_ref: [1] int32, the chunk's first token; mask_ref / positions_ref: [n] int32, the
    chunk's owned tokens (0: another path's row, left as it is) and their positions;
    size_ref, page_ref, block_ref, bits_ref: the chunk's `UnionPlan` arrays.
    q_ref / out_ref: [num_tokens, num_heads, D] (every token; _prev_ref is the buffer out_ref
    aliases). Row r is the tile's token r // group_pad, query head kv_head * group +
    r % group_pad. The loop runs over the union's size: entries past it are never visited.
    """
    tile, kv_head = pl.program_id(0), pl.program_id(1)
    n = mask_ref.shape[0]
    rows = jnp.arange(tile_tokens * group_pad, dtype=jnp.int32)
    row_token = rows // group_pad
    local = tile * tile_tokens + row_token
    in_chunk = local < n
    local = jnp.minimum(local, n - 1)
    owned = in_chunk & (mask_ref[local] != 0)
    live = owned & (rows % group_pad < group)

    @pl.when(jnp.max(live.astype(jnp.int32)) > 0)  # tiles no row of which is ours exit
    def _tile():
        num_blocks = cache_ref.shape[0]
        position = jnp.where(owned, positions_ref[local], -1)
        # Dead rows point past the arrays (masked off on a GPU; dropped in interpret mode).
        token = (first_ref[0] + tile * tile_tokens + row_token)[:, None]
        head = (kv_head * group + rows % group_pad)[:, None]
        dims = jnp.arange(q_ref.shape[-1], dtype=jnp.int32)[None, :]
        q = plgpu.load(q_ref.at[token, head, dims], mask=live[:, None],
                       other=jnp.zeros((), q_ref.dtype))
        attend, init = block_attender(
            q, kv_head, cache_ref, k_scale_ref, v_scale_ref, layout=layout,
            block_size=block_size, score_scale=score_scale, fp16_compute=fp16_compute,
            packed_dtype=packed_dtype)
        offsets = jnp.arange(block_size, dtype=jnp.int32)

        def body(e, carry):
            carry, attended = carry
            page = page_ref[kv_head, tile, e]
            # The plan validated the page; one outside the cache is read by no row.
            inside = (page >= 0) & (page < num_blocks)
            bits = jnp.where(inside, bits_ref[kv_head, tile, e], 0)
            chosen = (lax.shift_right_logical(bits, row_token) & 1) != 0
            # The last key of the block each row attends (-1: none).
            last = jnp.where(chosen, position - block_ref[kv_head, tile, e] * block_size, -1)
            carry = attend(carry, page=jnp.where(inside, page, 0),
                           load_mask=offsets <= last.max(),
                           mask=offsets[None, :] <= last[:, None])
            return carry, jnp.maximum(attended, jnp.where(last >= 0, 1, 0))

        (acc, m, l), attended = lax.fori_loop(0, size_ref[kv_head, tile], body,
                                              (init, jnp.zeros(rows.shape, jnp.int32)))
        # A row with no valid key (padding included) gets zeros.
        out, _ = normalize(acc, m, l, attended > 0)
        plgpu.store(out_ref.at[token, head, dims], out.astype(out_ref.dtype), mask=live[:, None])


def paged_sparse_attention_union_capped(spec: SparseAttentionSpec, query, kv_cache,
                                        topk_indices, token_to_req, token_positions,
                                        block_table, k_scale=None, v_scale=None, *,
                                        max_union: int | None, token_mask=None, out=None,
                                        interpret: bool | None = None,
                                        force_packed: bool = False):
    """`paged_sparse_attention_union` on the tiles whose union is at most max_union.

    A tile whose largest union over the KV heads exceeds max_union (None: no limit) is left
    to another path: its rows keep `out`'s values and are returned in `left`.
    Returns: (out [num_tokens, num_heads, head_size] in the query dtype, left bool
    [num_tokens], True for the rows of token_mask that were left).
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, topk, group = spec.num_kv_heads, spec.topk_blocks, spec.num_queries_per_kv
    if out is None:
        out = jnp.zeros(query.shape, query.dtype)
    if token_mask is None:
        token_mask = jnp.ones((num_tokens,), bool)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tokens = tile_tokens(group)
    group_pad = pl.next_power_of_2(group)
    n = min(num_tokens, tokens_per_chunk(num_kv_heads, topk, tokens))
    num_tiles = -(-n // tokens)
    num_blocks = kv_cache.shape[0]
    cache, packed_dtype = cache_operand(kv_cache, force_packed=force_packed)
    kernel = functools.partial(
        _union_kernel, group=group, group_pad=group_pad, tile_tokens=tokens,
        layout=spec.kv_cache_layout, block_size=spec.block_size,
        score_scale=spec.scale * LOG2E, fp16_compute=jnp.dtype(kv_cache.dtype).itemsize == 1,
        packed_dtype=packed_dtype)
    plan_shape = (num_kv_heads, num_tiles, tokens * topk)
    inputs = (jax.ShapeDtypeStruct((1,), jnp.int32), *[jax.ShapeDtypeStruct((n,), jnp.int32)] * 2,
              jax.ShapeDtypeStruct(plan_shape[:2], jnp.int32),
              *[jax.ShapeDtypeStruct(plan_shape, jnp.int32)] * 3, query, cache, k_scale, v_scale)
    union_kernel = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=[*[None if x is None else _whole(x.shape) for x in inputs],
                  _whole(query.shape)],
        out_specs=_whole(query.shape),
        out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
        input_output_aliases={len(jax.tree.leaves(inputs)): 0},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name=f"sparse_attention_union_{spec.kv_cache_layout}_rows{tokens * group_pad}",
    )

    def run_chunk(i, carry):
        out, left = carry
        # The last chunk ends at num_tokens (it may overlap the one before: the rows it
        # rewrites get the same values), so every chunk has the static size.
        first = jnp.minimum(i * n, num_tokens - n)
        take = lambda x, axis=0: lax.dynamic_slice_in_dim(x, first, n, axis)  # noqa: E731
        owned, positions = take(token_mask), take(token_positions)
        plan = plan_union(take(topk_indices, 1), take(token_to_req), positions, block_table,
                          num_blocks=num_blocks, block_size=spec.block_size,
                          tile_tokens=tokens, token_mask=owned)
        if max_union is not None:
            small = jnp.repeat(plan.size.max(0) <= max_union, tokens)[:n]
            left = lax.dynamic_update_slice_in_dim(left, owned & ~small, first, 0)
            owned = owned & small
        out = union_kernel(first[None], owned.astype(jnp.int32), positions, plan.size,
                           plan.page, plan.block, plan.token_bits, query, cache, k_scale,
                           v_scale, out)
        return out, left

    return lax.fori_loop(0, -(-num_tokens // n), run_chunk,
                         (out, jnp.zeros((num_tokens,), bool)))


def paged_sparse_attention_union(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                                 token_to_req, token_positions, block_table, k_scale=None,
                                 v_scale=None, *, token_mask=None, out=None,
                                 interpret: bool | None = None, force_packed: bool = False):
    """Union attention of the rows in token_mask; inputs already validated (as
    `attention.paged_sparse_attention` takes them).

    Args:
      query: [num_tokens, num_heads, head_size] bfloat16 / float16.
      kv_cache: the physical cache in spec.kv_cache_layout, the spec's storage dtype.
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding, zeros out).
      block_table: [num_reqs, max_blocks] int32.
      k_scale / v_scale: None, [1] float32 or [num_kv_heads, num_blocks * block_size] float32.
      token_mask: optional bool [num_tokens] (traced): the rows this path computes; None:
        every row.
      out: optional [num_tokens, num_heads, head_size] in the query dtype: the result keeps
        its rows outside token_mask, written in place (None: those rows are zeros).
      interpret: default: interpret everywhere but on a GPU.
      force_packed: hand an FP8 cache to the kernel as uint16 pairs (see
        `pages.cache_operand`).
    Returns: [num_tokens, num_heads, head_size] in the query dtype.
    """
    return paged_sparse_attention_union_capped(
        spec, query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
        k_scale, v_scale, max_union=None, token_mask=token_mask, out=out, interpret=interpret,
        force_packed=force_packed)[0]
