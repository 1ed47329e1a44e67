"""Token-tile union prefill: a tile of consecutive tokens walks the union of its selections.

The token kernel (`attention.py`) loads each selected block once per (token, KV head), for the
GQA group's rows only. Neighbouring tokens select mostly the same blocks, so here a program
takes a tile of `tile_tokens(group)` consecutive tokens x one KV head (128 query rows for a
GQA group of 16: Hopper's wgmma needs 64 rows per warpgroup) and walks the union of the tile's
selected blocks once, each row masked to the blocks its token chose and to keys at or before
its position (FlashInfer's `sparse_fwd_union` idea):

1. `plan_union` (one Triton kernel, no host sync): per (KV head, tile), the distinct valid
   selected blocks, their page, and for each the bitmask of the tile's tokens that chose it;
   plus the union sizes. Entry validity is the token kernel's rule, so every page the kernel
   reads lies inside the cache whatever top-k holds.
2. `_union_attn_kernel`, one program per (tile, KV head): online softmax in fp32 (base 2) over
   the union's blocks through the shared `triton_common.attend_block`, output written directly.
   Tiles may straddle two requests (or a request's first block): a block is an entry per
   (page, logical block), and a row's token bits say whether it attends it. Rows of padding
   tokens (position -1) and rows with no valid entry get zeros.

`launch_union` plans and runs over chunks of tokens so the plan stays inside
`interop.tiling.UNION_PLAN_BYTES`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from interop.tiling import union_tile_tokens as tile_tokens
from interop.tiling import union_tokens_per_chunk as tokens_per_chunk

from .triton_common import (INTERPRETED, LOG2_E, attend_block, check_knob, dot_dtype,
                            entry_page, finish_rows, fp8_rows, fp16_rows, scale_args,
                            visible_blocks)

NUM_WARPS = 8
NUM_STAGES = 3  # H100, 64/4, 16k correlated: 4.66 ms against 4.93 with 2 (4 overflows SMEM)


@dataclasses.dataclass(frozen=True)
class UnionConfig:
    """The union kernel's launch knobs, in the spirit of JAX's `BlockSizes`: num_warps /
    num_stages, Triton's launch options (the tile shape follows the GQA group, `tile_tokens`,
    and the plan depends on it, so it is no knob).

    fp8_dot (off by default; `sparse_attention(fp8_dot=True)`; benchmarks/fp8_union.py): the
    FP8 tensor-core path for fp8_e4m3 caches: each query row rounded to e4m3 with a
    power-of-two scale (`triton_common.fp8_rows`), K and V used as stored, p rounded to e4m3,
    FP8 dots for q k^T and p v. A per-slot v_scale is a ValueError (a scalar one scales the
    output); a larger error than the default path, which dequantizes to float16.
    """

    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    fp8_dot: bool = False

    def __post_init__(self):
        check_knob(self, "num_warps")
        check_knob(self, "num_stages")
        if not isinstance(self.fp8_dot, bool):
            raise TypeError(f"UnionConfig.fp8_dot must be a bool, got "
                            f"{type(self.fp8_dot).__name__}")

    @classmethod
    def get_default(cls) -> "UnionConfig":
        """The tuned defaults (H100): NUM_WARPS warps, NUM_STAGES stages."""
        return cls(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


class UnionPlan(NamedTuple):
    """The tile unions of tokens [first_token, end_token), T = tile_tokens per tile.

    Tile i holds tokens first_token + i * T + [0, T) (those before end_token); E = T * topk
    entries per (KV head, tile), the union's distinct entries first, ordered by page:
      page: [num_kv_heads, num_tiles, E] int32, the entry's page; -1 past the union.
      block: [num_kv_heads, num_tiles, E] int32, its logical block (keys at positions
        block * block_size + [0, block_size)); 0 past the union.
      token_bits: [num_kv_heads, num_tiles, E] int32, bit j set when the tile's token j chose
        the entry (a valid entry of its top-k row); 0 past the union.
      size: [num_kv_heads, num_tiles] int32, the union's size.
      tile_size: [num_tiles] int32, the largest union of the tile over the KV heads (the
        dispatcher sends a tile, all KV heads together, to one path by it).
    """

    first_token: int
    end_token: int
    tile_tokens: int
    page: torch.Tensor
    block: torch.Tensor
    token_bits: torch.Tensor
    size: torch.Tensor
    tile_size: torch.Tensor


def plan_union(topk: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor,
               token_positions: torch.Tensor, num_blocks: int, *, tile_tokens: int,
               block_size: int = 128, first_token: int = 0,
               end_token: int | None = None) -> UnionPlan:
    """The union of each tile's valid selections, per KV head (see `UnionPlan`).

    topk: [num_kv_heads, >= end_token, topk] int32/int64 logical blocks; block_table:
    [num_reqs, max_blocks]; token_to_req / token_positions: [num_tokens] (position -1:
    padding, selects nothing); num_blocks: pages in the cache; end_token: default num_tokens.
    Entries are distinct per (page, logical block): tokens of two requests that share a page
    for the same block share the entry. A row that repeats a valid entry sets its bit once.
    Entry validity is the token kernel's (`triton_common.visible_blocks` and `entry_page`;
    `selection.selected_pages` in PyTorch ops).
    One zero fill and one kernel launch (it took about 30 PyTorch ops before; the plan's cost
    counts in every union and "auto" call), no host sync: a CUDA graph can hold the call.
    """
    if end_token is None:
        end_token = token_to_req.shape[0]
    num_kv_heads, _, width = topk.shape
    num_reqs, max_blocks = block_table.shape
    if num_blocks * max_blocks >= _SENTINEL // _TOKEN_SLOTS:
        raise ValueError(f"num_blocks ({num_blocks}) x max_blocks ({max_blocks}) must stay "
                         f"below {_SENTINEL // _TOKEN_SLOTS}")
    num_tiles = triton.cdiv(end_token - first_token, tile_tokens)
    entries = tile_tokens * width
    device = topk.device
    page = torch.empty((num_kv_heads, num_tiles, entries), dtype=torch.int32, device=device)
    block = torch.empty_like(page)
    token_bits = torch.zeros_like(page)  # the kernel ors each entry's token bits into it
    size = torch.empty((num_kv_heads, num_tiles), dtype=torch.int32, device=device)
    tile_size = torch.empty(num_tiles, dtype=torch.int32, device=device)
    if num_tiles:
        _plan_union_kernel[(num_tiles,)](
            topk, block_table, token_to_req, token_positions, page, block, token_bits, size,
            tile_size, first_token, end_token, num_kv_heads, num_reqs, num_blocks, max_blocks,
            topk.stride(0), topk.stride(1), topk.stride(2), block_table.stride(0),
            page.stride(0), page.stride(1), size.stride(0),
            WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width), TILE_TOKENS=tile_tokens,
            BLOCK_SIZE=block_size, TOKEN_SLOTS=_TOKEN_SLOTS, SENTINEL=_SENTINEL, num_warps=4)
    return UnionPlan(first_token, end_token, tile_tokens, page, block, token_bits, size,
                     tile_size)


# Plan keys: (page * max_blocks + block) * _TOKEN_SLOTS + the token's index in its tile (the
# low bits carry the token through the sort); invalid entries get the sentinel, which sorts
# last.
_TOKEN_SLOTS = 32  # > interop.tiling.UNION_MAX_TILE_TOKENS
_SENTINEL = (1 << 62) - 1


@triton.jit
def _run_length(key_a, count_a, key_b, count_b):
    """Scan step over sorted keys: b's run of equal keys continues a's (an associative
    combine because equal keys are contiguous)."""
    return key_b, count_b + tl.where(key_a == key_b, count_a, 0)


@triton.jit
def _plan_union_kernel(
        topk_ptr, block_table_ptr, token_to_req_ptr, positions_ptr,
        page_ptr, block_ptr, bits_ptr, size_ptr, tile_size_ptr,
        first_token, end_token, num_kv_heads, num_reqs, num_blocks, max_blocks,
        stride_kg, stride_kt, stride_kk, stride_bt, stride_eg, stride_et, stride_sg,
        WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, TILE_TOKENS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TOKEN_SLOTS: tl.constexpr, SENTINEL: tl.constexpr):
    """Grid (num_tiles,): the union plan of tile program_id(0), every KV head.

    Per KV head: the tile's TILE_TOKENS x WIDTH entries become keys (page, block, token),
    sorted; a run of equal (page, block) is one union entry, numbered by the runs before it;
    its first key writes page and block, every key ors its token's bit (bits_ptr is zero on
    entry); entries past the union get page -1, block 0.
    """
    tile = tl.program_id(0)
    offs = tl.arange(0, TILE_TOKENS * WIDTH_PAD)
    row = offs // WIDTH_PAD
    col = offs % WIDTH_PAD
    token = first_token + tile.to(tl.int64) * TILE_TOKENS + row
    inside = (token < end_token) & (col < WIDTH)
    req = tl.load(token_to_req_ptr + token, mask=inside, other=-1)
    pos = tl.load(positions_ptr + token, mask=inside, other=-1)
    req, limit = visible_blocks(req, pos, num_reqs, max_blocks, BLOCK_SIZE)
    tail = offs < TILE_TOKENS * WIDTH
    tile_size = 0
    for g in range(num_kv_heads):
        entry = tl.load(topk_ptr + g * stride_kg + token * stride_kt + col * stride_kk,
                        mask=inside, other=-1)
        valid, block, page = entry_page(entry, limit, req, block_table_ptr, stride_bt,
                                        num_blocks)
        key = (page.to(tl.int64) * max_blocks + block) * TOKEN_SLOTS + row
        key = tl.sort(tl.where(valid, key, SENTINEL))
        live = key < SENTINEL
        entry_key = key // TOKEN_SLOTS
        _, run = tl.associative_scan((entry_key, tl.full(key.shape, 1, tl.int32)), 0,
                                     _run_length)
        first = live & (run == 1)
        index = tl.cumsum(first.to(tl.int32), 0) - 1
        size = tl.sum(first.to(tl.int32), 0)
        base = g * stride_eg + tile.to(tl.int64) * stride_et
        tl.store(page_ptr + base + index, (entry_key // max_blocks).to(tl.int32), mask=first)
        tl.store(block_ptr + base + index, (entry_key % max_blocks).to(tl.int32), mask=first)
        tl.atomic_or(bits_ptr + base + index, (1 << (key % TOKEN_SLOTS)).to(tl.int32),
                     mask=live)
        past = tail & (offs >= size)
        tl.store(page_ptr + base + offs, tl.full(offs.shape, -1, tl.int32), mask=past)
        tl.store(block_ptr + base + offs, tl.zeros(offs.shape, tl.int32), mask=past)
        tl.store(size_ptr + g * stride_sg + tile, size)
        tile_size = tl.maximum(tile_size, size)
    tl.store(tile_size_ptr + tile, tile_size)


@triton.jit
def _union_step(acc, m_i, l_i, seen, q, pos, row_token, e, entry, page_ptr, block_ptr, bits_ptr,
                head_base, k_scale_ptr, v_scale_ptr, num_blocks, offs_n, offs_d, stride_blk,
                stride_tok, stride_kv, ks_slot, vs_slot, row_scale,
                BLOCK_SIZE: tl.constexpr, HAS_K_SCALE: tl.constexpr,
                HAS_V_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Attend union entry e of the tile: each row masked to its token's choice and position;
    `seen` [rows] records the rows that attended a key."""
    page = tl.load(page_ptr + entry + e)
    block = tl.load(block_ptr + entry + e)
    # The plan validated the page; a page outside the cache is read by no row.
    inside = (page >= 0) & (page < num_blocks)
    bits = tl.where(inside, tl.load(bits_ptr + entry + e), 0)
    page = tl.where(inside, page, 0)
    chosen = ((bits >> row_token) & 1) != 0
    # The last key each row attends in this block (-1: none; a chosen block holds key `pos`
    # or older, so a chosen row attends at least one key).
    last = tl.where(chosen, pos - block * BLOCK_SIZE, -1)
    acc, m_i, l_i = attend_block(
        acc, m_i, l_i, q, head_base + page.to(tl.int64) * stride_blk, k_scale_ptr,
        v_scale_ptr, page, offs_n <= tl.max(last, 0), offs_n[None, :] <= last[:, None], offs_n,
        offs_d, stride_tok, stride_kv, ks_slot, vs_slot, row_scale, BLOCK_SIZE, HAS_K_SCALE,
        HAS_V_SCALE, DOT_DTYPE)
    return acc, m_i, l_i, seen | chosen


@triton.jit
def _union_attn_kernel(
        q_ptr, cache_ptr, page_ptr, block_ptr, bits_ptr, size_ptr, tile_size_ptr,
        positions_ptr, out_ptr, k_scale_ptr, v_scale_ptr,
        first_token, end_token, num_blocks, max_union, qk_scale,
        stride_qt, stride_qh,
        stride_blk, stride_kv, stride_tok, stride_head,
        stride_ot, stride_oh,
        stride_eg, stride_et, stride_sg,
        ks_head, ks_slot, vs_head, vs_slot,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TILE_TOKENS: tl.constexpr,
        HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, ENTRIES: tl.constexpr,
        HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, FP16_COMPUTE: tl.constexpr,
        FP8_DOT: tl.constexpr, V_SCALE_AT_END: tl.constexpr, DOT_DTYPE: tl.constexpr,
        DYNAMIC_LOOP: tl.constexpr):
    """Grid (num_tiles, num_kv_heads): the output rows of tile program_id(0).

    Row r is token first_token + tile * TILE_TOKENS + r // GROUP_PAD, query head
    kv_head * GROUP + r % GROUP_PAD. A tile whose tile_size exceeds max_union is left
    unwritten (another path takes it). DYNAMIC_LOOP: the loop runs over the union's size
    (compiled); else over ENTRIES, skipping entries past the union (the interpreter).
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tl.load(tile_size_ptr + tile) <= max_union:
        offs_r = tl.arange(0, TILE_TOKENS * GROUP_PAD)
        offs_d = tl.arange(0, HEAD_SIZE)
        offs_n = tl.arange(0, BLOCK_SIZE)
        row_token = offs_r // GROUP_PAD
        head_in_group = offs_r % GROUP_PAD
        token = first_token + tile.to(tl.int64) * TILE_TOKENS + row_token
        in_range = token < end_token
        row_mask = in_range & (head_in_group < GROUP)
        pos = tl.load(positions_ptr + token, mask=in_range, other=-1)
        head = kv_head * GROUP + head_in_group
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        row_scale = tl.full([TILE_TOKENS * GROUP_PAD], qk_scale, tl.float32)
        if FP8_DOT:
            q, row_scale = fp8_rows(q, row_scale)
        elif FP16_COMPUTE:
            q, row_scale = fp16_rows(q, row_scale)

        m_i = tl.full([TILE_TOKENS * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([TILE_TOKENS * GROUP_PAD], tl.float32)
        acc = tl.zeros([TILE_TOKENS * GROUP_PAD, HEAD_SIZE], tl.float32)
        seen = tl.zeros([TILE_TOKENS * GROUP_PAD], tl.int1)
        union = tl.load(size_ptr + kv_head * stride_sg + tile)
        entry = kv_head.to(tl.int64) * stride_eg + tile.to(tl.int64) * stride_et
        head_base = cache_ptr + kv_head.to(tl.int64) * stride_head
        if DYNAMIC_LOOP:
            # Compiled: the loop runs over the union only, so its loads pipeline.
            for e in range(union):
                acc, m_i, l_i, seen = _union_step(
                    acc, m_i, l_i, seen, q, pos, row_token, e, entry, page_ptr, block_ptr, bits_ptr,
                    head_base, k_scale_ptr + kv_head * ks_head, v_scale_ptr + kv_head * vs_head,
                    num_blocks, offs_n, offs_d, stride_blk, stride_tok, stride_kv, ks_slot,
                    vs_slot, row_scale, BLOCK_SIZE, HAS_K_SCALE, HAS_V_SCALE, DOT_DTYPE)
        else:
            # The interpreter takes no loop bound from a tensor: a static bound, skipping
            # entries past the union.
            for e in range(ENTRIES):
                if e < union:
                    acc, m_i, l_i, seen = _union_step(
                        acc, m_i, l_i, seen, q, pos, row_token, e, entry, page_ptr, block_ptr,
                        bits_ptr, head_base, k_scale_ptr + kv_head * ks_head,
                        v_scale_ptr + kv_head * vs_head, num_blocks, offs_n, offs_d,
                        stride_blk, stride_tok, stride_kv, ks_slot, vs_slot, row_scale,
                        BLOCK_SIZE, HAS_K_SCALE, HAS_V_SCALE, DOT_DTYPE)

        # No valid entry (padding rows included): zeros; a non-finite query: NaN.
        if V_SCALE_AT_END:  # FP8_DOT's scalar v_scale (p * v_scale could leave e4m3's range)
            acc *= tl.load(v_scale_ptr)
        out, _ = finish_rows(acc, l_i, seen)
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def launch_union(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                 block_table: torch.Tensor, token_to_req: torch.Tensor,
                 token_positions: torch.Tensor, output: torch.Tensor, sm_scale: float, *,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 first_token: int = 0, plan: UnionPlan | None = None,
                 max_union: int | None = None, config: UnionConfig | None = None) -> None:
    """Union attention of tokens [first_token, num_tokens); writes their `output` rows in place.

    query / output: [num_tokens, num_heads, head_size]; kv_cache: the logical view
    (num_blocks, 2, block_size, num_kv_heads, head_size), NHD or HND strides with a unit head
    stride, bf16/fp16/fp8 e4m3/e5m2; topk: [num_kv_heads, >= num_tokens, topk] int32/int64;
    block_table: [num_reqs, max_blocks]; token_to_req / token_positions: [num_tokens]
    (position -1: padding, gets zeros); k_scale / v_scale: None, a 0-d or [num_kv_heads,
    num_blocks * block_size] float32 tensor (FP8 caches only). plan: `plan_union` of these
    inputs with tile_tokens(group) and this first_token; its tokens [first_token, end_token)
    are attended (None: plans every token from first_token on, in chunks of at most
    interop.tiling.UNION_PLAN_BYTES). max_union: tiles whose `tile_size` exceeds it are left
    unwritten (None: every tile is written). config: the launch knobs (None:
    `UnionConfig.get_default()`). Rows before first_token are left untouched. Inputs are
    validated by the caller.
    """
    config = config or UnionConfig.get_default()
    if config.fp8_dot and kv_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"UnionConfig.fp8_dot takes an fp8_e4m3 cache, got {kv_cache.dtype}")
    if config.fp8_dot and v_scale is not None and v_scale.dim() != 0:
        raise ValueError("UnionConfig.fp8_dot takes a scalar v_scale (or none), got one per "
                         "slot")
    num_tokens, num_heads, head_size = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    width = topk.shape[-1]
    group = num_heads // num_kv_heads
    tokens = tile_tokens(group)
    if plan is None:
        chunk = tokens_per_chunk(num_kv_heads, width, tokens)
        plans = (plan_union(topk, block_table, token_to_req, token_positions, num_blocks,
                            tile_tokens=tokens, block_size=block_size, first_token=start,
                            end_token=min(start + chunk, num_tokens))
                 for start in range(first_token, num_tokens, chunk))
    elif plan.first_token != first_token or plan.tile_tokens != tokens:
        raise ValueError(f"plan covers tokens from {plan.first_token} in tiles of "
                         f"{plan.tile_tokens}; expected {first_token} and {tokens}")
    else:
        plans = (plan,)
    fp8 = kv_cache.element_size() == 1
    ks, ks_head, ks_slot = scale_args(k_scale, output)
    vs, vs_head, vs_slot = scale_args(v_scale, output)
    for part in plans:
        num_tiles = part.tile_size.shape[0]
        if num_tiles == 0:
            continue
        _union_attn_kernel[(num_tiles, num_kv_heads)](
            query, kv_cache, part.page, part.block, part.token_bits, part.size,
            part.tile_size, token_positions, output, ks, vs,
            part.first_token, part.end_token, num_blocks,
            part.page.shape[-1] if max_union is None else max_union, sm_scale * LOG2_E,
            query.stride(0), query.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            output.stride(0), output.stride(1),
            part.page.stride(0), part.page.stride(1), part.size.stride(0),
            ks_head, ks_slot, vs_head, vs_slot,
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), TILE_TOKENS=tokens,
            HEAD_SIZE=head_size, BLOCK_SIZE=block_size, ENTRIES=part.page.shape[-1],
            HAS_K_SCALE=k_scale is not None,
            HAS_V_SCALE=v_scale is not None and not config.fp8_dot,
            FP16_COMPUTE=fp8, FP8_DOT=config.fp8_dot,
            V_SCALE_AT_END=v_scale is not None and config.fp8_dot,
            DOT_DTYPE=tl.float8e4nv if config.fp8_dot and not INTERPRETED
            else dot_dtype(query.dtype, fp8),
            DYNAMIC_LOOP=not INTERPRETED, num_warps=config.num_warps,
            num_stages=config.num_stages)
