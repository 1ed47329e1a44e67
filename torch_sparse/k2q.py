"""Key-to-query (K2Q) prefill: one program per selected block, many query rows against it.

The token kernel (`attention.py`) loads each selected block once per (token, KV head): 16 query
rows per 64 KB block. K2Q inverts the selection instead (MiniMax's "MSA" prefill):

1. `plan_k2q` (PyTorch ops on the device, no host sync): every valid (token, column k) entry of
   the top-k rows becomes a pair; pairs are sorted by their segment (KV head, page) and, inside
   a segment, by token. A work item is a run of up to `pairs_per_item` consecutive pairs of one
   segment; the work list has a length bound from shapes only, so the grid is static.
2. `_k2q_block_kernel`, one program per work item: loads the page's K and V once, then for
   each of its query tiles gathers PAIRS tokens x the GQA group as rows (>= 64 rows where the
   group allows, so Hopper can use wgmma), masks each row causally (key position <= the
   row's token position), takes the softmax over this block only (no rescaling) and writes the
   normalised partial output and its log2-sum-exp at [k, token, head]. Rows attend different
   keys of the page, so the page's non-finite V values are zeroed before `p @ v` and a row
   that attends one gets a NaN partial (a key no row attends never shows, contract 5).
3. `_k2q_combine_kernel`, one program per (token, KV head): merges the valid columns k of the
   token's top-k row. Validity is recomputed with the rule the plan used (a repeated entry
   counts once, at its first column), so a partial that no program wrote is never read; a row
   with no valid entry gets zeros, a row with a NaN partial (a non-finite query, or a NaN in a
   slot it attends) NaN.

`launch_k2q` runs the three over chunks of tokens so the partials and the plan stay inside
`interop.tiling.K2Q_WORKSPACE_BYTES` whatever the prefill size.

Entry validity (the token kernel's rule): token t of request r at position p is live when
p >= 0 and 0 <= r < num_reqs (and token_mask[t], when given); entry b is valid when
0 <= b <= p // block_size, b < max_blocks, page = block_table[r, b] lies in [0, num_blocks)
and no earlier entry of the row holds b.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from interop.tiling import k2q_tile_shape, k2q_tokens_per_chunk, max_k2q_items

from .selection import selected_pages
from .triton_common import (LOG2_E, check_knob, dot_dtype, entry_page, fp16_rows,
                            repeated_entries, scale_args, visible_blocks)

# Query tiles one program runs against the block it loaded (its work item holds up to
# TILES_PER_ITEM * pairs-per-tile pairs of one segment).
# H100 sweep (64/4, bf16): 4 tiles of 4 warps, 31.8 ms at 64k random against 33.3 with 2,
# 36.4 with 8 and 45 with 8 warps.
TILES_PER_ITEM = 4
NUM_WARPS = 4
NUM_STAGES = 2
# Partial outputs' dtype; None: the query's. Measured on CPU against the float64 reference
# (bf16, top-8, rho 0.87): bf16 partials 7.2e-3 relative error, float32 5.4e-3 (the token
# kernel's), at twice the partial traffic.
PARTIAL_DTYPE = None


@dataclasses.dataclass(frozen=True)
class K2QConfig:
    """The k2q kernels' knobs, in the spirit of JAX's `BlockSizes`.

    tiles_per_item: query tiles a block program runs against the page it loaded (the plan's
      work items hold tiles_per_item * interop.tiling.k2q_tile_shape(group)[1] pairs).
    num_warps / num_stages: Triton's launch options (the combine kernel takes num_warps).
    partial_dtype: the partial outputs' dtype (None: the query's; torch.float32 halves the
      rounding at twice the partial traffic).
    """

    tiles_per_item: int = TILES_PER_ITEM
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    partial_dtype: torch.dtype | None = PARTIAL_DTYPE

    def __post_init__(self):
        for name in ("tiles_per_item", "num_warps", "num_stages"):
            check_knob(self, name)
        if self.partial_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"K2QConfig.partial_dtype must be None, torch.float32, "
                            f"torch.bfloat16 or torch.float16, got {self.partial_dtype!r}")

    @classmethod
    def get_default(cls) -> "K2QConfig":
        """The tuned defaults (H100): the module's TILES_PER_ITEM, NUM_WARPS, NUM_STAGES and
        PARTIAL_DTYPE, read at call time."""
        return cls(tiles_per_item=TILES_PER_ITEM, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                   partial_dtype=PARTIAL_DTYPE)


class K2QPlan(NamedTuple):
    """The inverted selection of tokens [first_token, end_token): E = num_kv_heads * n * topk.

    Pairs are in CSR order: sorted by segment (KV head, page), then by token, then by column.
    Invalid entries come last, with the key num_kv_heads * num_blocks.
      pair_key: [E] int64, kv_head * num_blocks + page of each pair (runs of equal keys are the
        segments).
      pair_token: [E] int32, the pair's token (absolute row of query / output).
      pair_column: [E] int32, the pair's column k in the token's top-k row.
      pair_limit: [E] int32, position - block * block_size: the last key offset of the block the
        token may see (>= 0 for a valid pair).
      item_start: [max_items] int32, the first pair of each work item (a run of up to
        pairs_per_item pairs of one segment), -1 past the last item. max_items depends on
        shapes only (`max_k2q_items`).
    """

    pair_key: torch.Tensor
    pair_token: torch.Tensor
    pair_column: torch.Tensor
    pair_limit: torch.Tensor
    item_start: torch.Tensor


def plan_k2q(topk: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor,
             token_positions: torch.Tensor, num_blocks: int, *, block_size: int = 128,
             first_token: int = 0, end_token: int | None = None,
             token_mask: torch.Tensor | None = None, pairs_per_item: int = 8) -> K2QPlan:
    """Invert the top-k selection of tokens [first_token, end_token) into work items.

    topk: [num_kv_heads, >= end_token, topk] int32/int64 logical blocks; block_table:
    [num_reqs, max_blocks]; token_to_req / token_positions: [num_tokens] (position -1:
    padding); num_blocks: pages in the cache; end_token: default num_tokens; token_mask:
    optional bool [num_tokens], only its True tokens are planned; pairs_per_item: pairs one
    program takes at most. Device ops only (no host sync): a CUDA graph can hold the call.
    """
    if end_token is None:
        end_token = token_to_req.shape[0]
    num_kv_heads, _, width = topk.shape
    num_reqs, max_blocks = block_table.shape
    n = end_token - first_token
    device = topk.device
    valid, block, page = selected_pages(
        topk[:, first_token:end_token], block_table, token_to_req[first_token:end_token],
        token_positions[first_token:end_token], num_blocks, block_size,
        None if token_mask is None else token_mask[first_token:end_token])
    pos = token_positions[first_token:end_token].long()
    heads = torch.arange(num_kv_heads, device=device)[:, None, None]
    sentinel = num_kv_heads * num_blocks
    key, order = torch.sort(torch.where(valid, heads * num_blocks + page, sentinel).reshape(-1),
                            stable=True)
    # order = (g * n + i) * K + k for token first_token + i of KV head g, column k.
    column = order % width
    token = order // width % n
    pair_limit = (pos[token] - block.reshape(-1)[order] * block_size).int()

    # Item starts: every pairs_per_item-th pair of a segment, numbered in CSR order.
    index = torch.arange(key.shape[0], device=device)
    # The first pair of each pair's segment: keys are sorted, so a binary search finds it
    # (a cummax over millions of pairs runs as one long scan: 11 ms at 64k tokens on an H100).
    segment_first = torch.searchsorted(key, key)
    is_start = (key < sentinel) & ((index - segment_first) % pairs_per_item == 0)
    max_items = max_k2q_items(num_kv_heads, n, width, num_blocks, num_reqs, max_blocks,
                              pairs_per_item)
    slot = torch.where(is_start, torch.cumsum(is_start, 0) - 1, max_items)
    item_start = torch.full((max_items + 1,), -1, dtype=torch.int32, device=device)
    item_start.scatter_(0, slot, index.int())
    return K2QPlan(key, (token + first_token).int(), column.int(), pair_limit,
                   item_start[:max_items])


@triton.jit
def _k2q_block_kernel(
        q_ptr, cache_ptr, key_ptr, token_ptr, slot_ptr, limit_ptr, item_ptr,
        part_ptr, lse_ptr, k_scale_ptr, v_scale_ptr,
        num_pairs, num_blocks, first_token, qk_scale,
        stride_qt, stride_qh,
        stride_blk, stride_kv, stride_tok, stride_head,
        stride_pk, stride_pt, stride_ph, stride_lk, stride_lt,
        ks_head, ks_slot, vs_head, vs_slot,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAIRS: tl.constexpr,
        TILES: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, FP16_COMPUTE: tl.constexpr,
        DOT_DTYPE: tl.constexpr):
    """Grid (max_items,): work item i attends up to TILES tiles of PAIRS pairs to its page.

    Tile rows: pair r // GROUP_PAD, query head kv_head * GROUP + r % GROUP_PAD. Partials:
    part[k, token - first_token, head, :] (normalised) and lse[k, token - first_token, head]
    (log2-sum-exp of the scaled scores).
    """
    start = tl.load(item_ptr + tl.program_id(0))
    if start >= 0:  # surplus programs of the static grid exit
        key = tl.load(key_ptr + start)
        kv_head = key // num_blocks
        page = key - kv_head * num_blocks
        offs_n = tl.arange(0, BLOCK_SIZE)
        offs_d = tl.arange(0, HEAD_SIZE)
        offs_r = tl.arange(0, PAIRS * GROUP_PAD)
        head_in_group = offs_r % GROUP_PAD
        head = kv_head * GROUP + head_in_group
        # The page is valid (the plan checked it): its whole block is loaded once.
        kv_base = cache_ptr + kv_head * stride_head + page * stride_blk
        tile = offs_n[:, None].to(tl.int64) * stride_tok + offs_d[None, :]
        compute_dtype = tl.float16 if FP16_COMPUTE else q_ptr.dtype.element_ty
        k = tl.load(kv_base + tile).to(compute_dtype).to(DOT_DTYPE)
        v = tl.load(kv_base + stride_kv + tile).to(compute_dtype)
        # Rows attend different keys of the page (and none attends keys past the request's
        # end): a skipped key meets `p @ v` with p = 0, and 0 * NaN = NaN. Non-finite V values
        # are zeroed once per item; a row that attends one gets l = NaN below (contract 5).
        v_bad = ~(tl.abs(v.to(tl.float32)) < float("inf"))
        key_bad = tl.max(tl.where(v_bad, 1, 0), 1) > 0
        v = tl.where(v_bad, 0.0, v).to(DOT_DTYPE)
        slot_ids = page * BLOCK_SIZE + offs_n
        if HAS_K_SCALE:
            k_scale = tl.load(k_scale_ptr + kv_head * ks_head + slot_ids * ks_slot)
        if HAS_V_SCALE:
            v_scale = tl.load(v_scale_ptr + kv_head * vs_head + slot_ids * vs_slot)
        for t in tl.static_range(TILES):
            first = start + t * PAIRS
            in_range = first < num_pairs
            if in_range & (tl.load(key_ptr + first, mask=in_range, other=-1) == key):
                pair = first + offs_r // GROUP_PAD
                live = pair < num_pairs
                live = live & (tl.load(key_ptr + pair, mask=live, other=-1) == key)
                row_live = live & (head_in_group < GROUP)
                token = tl.load(token_ptr + pair, mask=live, other=0).to(tl.int64)
                column = tl.load(slot_ptr + pair, mask=live, other=0).to(tl.int64)
                last = tl.load(limit_ptr + pair, mask=live, other=-1)
                q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh
                            + offs_d[None, :], mask=row_live[:, None], other=0.0)
                row_scale = tl.full([PAIRS * GROUP_PAD], qk_scale, tl.float32)
                if FP16_COMPUTE:
                    q, row_scale = fp16_rows(q, row_scale)
                scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k)) * row_scale[:, None]
                if HAS_K_SCALE:
                    scores *= k_scale[None, :]
                key_mask = offs_n[None, :] <= last[:, None]
                scores = tl.where(key_mask, scores, float("-inf"))
                m = tl.max(scores, 1)
                m = tl.where(m == float("-inf"), 0.0, m)  # dead rows: no inf - inf
                p = tl.exp2(scores - m[:, None])
                # A live row attends key 0 at least, so l >= 1 unless non-finite inputs made
                # it NaN or 0 (as `triton_common.finish_rows` says): then the partial and its lse
                # are NaN, and the combine carries the NaN into the row.
                l_sum = tl.sum(p, 1)
                hit = tl.max(tl.where(key_mask & key_bad[None, :], 1, 0), 1) > 0
                l_sum = tl.where(hit | (l_sum == 0.0), float("nan"), l_sum)
                l_sum = tl.where(row_live, l_sum, 1.0)  # dead rows are not stored
                if HAS_V_SCALE:
                    p *= v_scale[None, :]
                acc = tl.dot(p.to(compute_dtype).to(DOT_DTYPE), v)
                row = column * stride_pk + (token - first_token) * stride_pt + head * stride_ph
                tl.store(part_ptr + row[:, None] + offs_d[None, :],
                         (acc / l_sum[:, None]).to(part_ptr.dtype.element_ty),
                         mask=row_live[:, None])
                tl.store(lse_ptr + column * stride_lk + (token - first_token) * stride_lt + head,
                         m + tl.log2(l_sum), mask=row_live)


@triton.jit
def _k2q_combine_kernel(
        part_ptr, lse_ptr, out_ptr, topk_ptr, block_table_ptr, token_to_req_ptr,
        positions_ptr, mask_ptr,
        first_token, num_reqs, num_blocks, max_blocks,
        stride_pk, stride_pt, stride_ph, stride_lk, stride_lt, stride_ot, stride_oh,
        stride_kg, stride_kt, stride_kk, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        HAS_MASK: tl.constexpr):
    """Grid (chunk tokens, num_kv_heads): output rows of token first_token + program_id(0).

    out = sum_k 2^(lse_k - lse) * part_k over the valid columns k of the row (the plan's rule,
    a repeated entry's first column only); zeros when none is valid, NaN when a partial's lse
    is NaN (its weight is NaN). Tokens excluded by the mask are not written.
    """
    i = tl.program_id(0).to(tl.int64)
    t = first_token + i
    kv_head = tl.program_id(1)
    req = tl.load(token_to_req_ptr + t)
    pos = tl.load(positions_ptr + t)
    chosen = True
    if HAS_MASK:
        chosen = tl.load(mask_ptr + t) != 0
        pos = tl.where(chosen, pos, -1)  # a token the mask excludes selects nothing
    req, limit = visible_blocks(req, pos, num_reqs, max_blocks, BLOCK_SIZE)

    # The whole top-k row at once: validity, then each column's log-sum-exp per head.
    offs_k = tl.arange(0, TOPK_PAD)
    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_SIZE)
    head = kv_head * GROUP + offs_h
    block = tl.load(topk_ptr + kv_head.to(tl.int64) * stride_kg + t * stride_kt
                    + offs_k * stride_kk, mask=offs_k < TOPK, other=-1)
    # A repeated entry counts once: only its first column was planned (`selected_pages`).
    repeated = repeated_entries(block, offs_k)
    valid, _, _ = entry_page(tl.where(repeated, -1, block), limit, req, block_table_ptr,
                              stride_bt, num_blocks)
    lse = tl.load(lse_ptr + offs_k[:, None] * stride_lk + i * stride_lt + head[None, :],
                  mask=valid[:, None] & (offs_h < GROUP)[None, :], other=float("-inf"))
    peak = tl.max(lse, 0)
    peak = tl.where(peak == float("-inf"), 0.0, peak)  # no valid column: every weight is 0
    weight = tl.exp2(lse - peak[None, :])              # [TOPK_PAD, GROUP_PAD], 0 if invalid
    total = tl.sum(weight, 0)
    acc = tl.zeros([GROUP_PAD, HEAD_SIZE], tl.float32)
    rows = part_ptr + i * stride_pt + head[:, None] * stride_ph + offs_d[None, :]
    for k in tl.static_range(TOPK):
        w = tl.sum(tl.where(offs_k[:, None] == k, weight, 0.0), 0)
        # Only written partials are read: a weight is positive only for a valid column.
        part = tl.load(rows + k * stride_pk, mask=(w > 0)[:, None], other=0.0)
        acc += w[:, None] * part.to(tl.float32)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=(offs_h < tl.where(chosen, GROUP, 0))[:, None])


def launch_k2q(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
               block_table: torch.Tensor, token_to_req: torch.Tensor,
               token_positions: torch.Tensor, output: torch.Tensor, sm_scale: float, *,
               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
               first_token: int = 0, token_mask: torch.Tensor | None = None,
               config: K2QConfig | None = None) -> None:
    """K2Q attention of tokens [first_token, num_tokens); writes their `output` rows in place.

    query / output: [num_tokens, num_heads, head_size]; kv_cache: the logical view
    (num_blocks, 2, block_size, num_kv_heads, head_size), NHD or HND strides with a unit head
    stride, bf16/fp16/fp8 e4m3/e5m2; topk: [num_kv_heads, >= num_tokens, topk] int32/int64;
    block_table: [num_reqs, max_blocks]; token_to_req / token_positions: [num_tokens]
    (position -1: padding, gets zeros); k_scale / v_scale: None, a 0-d or [num_kv_heads,
    num_blocks * block_size] float32 tensor (FP8 caches only). token_mask: optional bool
    [num_tokens]: only its True rows are attended and written. config: the knobs (None:
    `K2QConfig.get_default()`). Rows before first_token and rows the mask excludes are left
    untouched. Inputs are validated by the caller.
    """
    config = config or K2QConfig.get_default()
    num_tokens, num_heads, head_size = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_tokens <= first_token:
        return
    width = topk.shape[-1]
    group = num_heads // num_kv_heads
    group_pad, pairs = k2q_tile_shape(group)  # PAIRS * GROUP_PAD >= 64 rows: tl.dot's M
    part_dtype = config.partial_dtype or query.dtype
    chunk = min(num_tokens - first_token,
                k2q_tokens_per_chunk(num_kv_heads, num_heads, head_size, width,
                                     torch.finfo(part_dtype).bits // 8))
    part = torch.empty((width, chunk, num_heads, head_size), dtype=part_dtype,
                       device=query.device)
    lse = torch.empty((width, chunk, num_heads), dtype=torch.float32, device=query.device)
    fp8 = kv_cache.element_size() == 1
    ks, ks_head, ks_slot = scale_args(k_scale, output)
    vs, vs_head, vs_slot = scale_args(v_scale, output)
    for start in range(first_token, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        plan = plan_k2q(topk, block_table, token_to_req, token_positions, num_blocks,
                        block_size=block_size, first_token=start, end_token=end,
                        token_mask=token_mask, pairs_per_item=pairs * config.tiles_per_item)
        if plan.item_start.shape[0]:  # 0 when no page can be valid (an empty cache or table)
            _k2q_block_kernel[(plan.item_start.shape[0],)](
                query, kv_cache, plan.pair_key, plan.pair_token, plan.pair_column, plan.pair_limit,
                plan.item_start, part, lse, ks, vs,
                plan.pair_key.shape[0], num_blocks, start, sm_scale * LOG2_E,
                query.stride(0), query.stride(1),
                kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                *part.stride()[:3], *lse.stride()[:2],
                ks_head, ks_slot, vs_head, vs_slot,
                GROUP=group, GROUP_PAD=group_pad, PAIRS=pairs, TILES=config.tiles_per_item,
                HEAD_SIZE=head_size, BLOCK_SIZE=block_size, HAS_K_SCALE=k_scale is not None,
                HAS_V_SCALE=v_scale is not None, FP16_COMPUTE=fp8,
                DOT_DTYPE=dot_dtype(query.dtype, fp8),
                num_warps=config.num_warps, num_stages=config.num_stages)
        _k2q_combine_kernel[(end - start, num_kv_heads)](
            part, lse, output, topk, block_table, token_to_req, token_positions,
            output if token_mask is None else token_mask,
            start, block_table.shape[0], num_blocks, block_table.shape[1],
            *part.stride()[:3], *lse.stride()[:2], output.stride(0), output.stride(1),
            topk.stride(0), topk.stride(1), topk.stride(2), block_table.stride(0),
            GROUP=group, GROUP_PAD=group_pad, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
            TOPK=width, TOPK_PAD=triton.next_power_of_2(width),
            HAS_MASK=token_mask is not None, num_warps=config.num_warps)
