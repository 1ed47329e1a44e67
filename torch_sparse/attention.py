"""Block-sparse GQA attention over a paged KV cache: the Triton kernels and their launcher.

One kernel body serves prefill and decode. A program handles one (token, KV head, split):
it loads the token's whole GQA group of queries (padded to a `tl.dot` tile of >= 16 rows),
walks its share of the token's top-k row and attends each valid selected block with an online
softmax in fp32 (base 2). With one split it writes the final output; with several (split-K
decode) each program writes a partial output and its log-sum-exp, and the last split of a
(token, KV head) to finish combines them (`_merge_splits`, in the same launch: an arrival
counter per (token, KV head) says which split is last). The split count depends only on
shapes, so a CUDA graph can capture a decode.

Safety: a top-k entry is followed only when it is a block the token may see, inside the
block-table row, and its page lies inside the cache; every other entry is masked (its loads
are predicated off), whatever value it holds. A repeated entry counts once, at its first
occurrence in the row. That rule has two homes, one per language: in Triton
(`triton_common.visible_blocks`, `triton_common.entry_page`, and `_first_occurrences` here)
and in PyTorch ops in `selection.py` (the device-side plans and the eager path).

Garbage in (contract 5): a row's "attended a key" is tracked apart from the softmax sum, so a
non-finite query row that attends a key comes out NaN (and zeros when it attends none), and
a split's NaN log-sum-exp makes the merged row NaN (`triton_common.finish_rows`). Every row
of a program attends the same keys, which are the only ones loaded, so no other key's V
reaches an output.

The online-softmax step over one block (`triton_common.attend_block`) and the FP8 query
scaling are shared with the prefill paths (`union.py`, `k2q.py`). A token mask lets the
dispatcher (`dispatch.py`) leave rows to those paths; without one the compiled kernel is what
it was before the mask existed.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from interop.tiling import group_rows

from .triton_common import (INTERPRETED, LOG2_E, attend_block, check_knob, dot_dtype,
                            entry_page, finish_rows, fp16_rows, repeated_entries, scale_args,
                            visible_blocks)

# Split-K sizing: aim for this many programs, never more splits than this (each split then
# still attends whole blocks) nor than the top-k width.
TARGET_PROGRAMS = 256
MAX_SPLITS = 16
# Launch defaults (H100 sweep, benchmarks/sweep.py); `TokenKernelConfig.get_default()`.
NUM_WARPS = 4
NUM_STAGES = 2
# Split-K arrival counters, one int32 per (token, KV head), per (device, stream); see
# `_arrival_counters`.
_COUNTERS: dict = {}


@triton.jit
def _first_occurrences(row_ptr, stride_kk, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Bitmask (int64; TOPK <= 64) over a top-k row: bit k set when entry k differs from every
    entry before it. A repeated block is attended once, at its first occurrence (contract 5);
    validity depends on the value only, so an earlier equal entry is valid exactly when this
    one is. One vector load of the row and a [TOPK_PAD, TOPK_PAD] compare, once per program
    (two small reductions; nothing is added to the loop over blocks)."""
    offs = tl.arange(0, TOPK_PAD)
    row = tl.load(row_ptr + offs * stride_kk, mask=offs < TOPK, other=-1)
    first = ~repeated_entries(row, offs)
    return tl.sum(tl.where(first, tl.full([TOPK_PAD], 1, tl.int64) << offs, 0), 0)


@triton.jit
def _repeats_earlier(entry, row_ptr, j, stride_kk, TOPK: tl.constexpr):
    """Whether entry j of a top-k row (value `entry`) equals one of entries [0, j): the rule of
    `_first_occurrences` for rows wider than its 64-bit mask, with scalar loads of the row."""
    repeated = j < 0  # False, as a tensor
    for k in tl.static_range(TOPK - 1):
        earlier = k < j
        prior = tl.load(row_ptr + k * stride_kk, mask=earlier, other=0)
        repeated = repeated | (earlier & (prior == entry))
    return repeated


@triton.jit
def _merge_splits(part_ptr, lse_ptr, out_ptr, t, kv_head,
                  stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    """out = sum_s 2^(lse_s - lse) * part_s for the GQA group of one (token, KV head), in one
    pass (a running max rescales the sum, so the partials load with their lse); every split
    empty (all lse -inf): zeros. A split whose lse is NaN (a non-finite query, or NaN met in
    the cache) makes the row NaN: its weight is NaN whatever the running max does with it.
    Partials are read from L2 (.cg): other SMs wrote them."""
    head = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_mask = tl.arange(0, GROUP_PAD) < GROUP
    offs_d = tl.arange(0, HEAD_SIZE)
    lse_row = lse_ptr + t * stride_lt + head
    part_rows = part_ptr + t * stride_pt + head[:, None] * stride_ph + offs_d[None, :]
    peak = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_SIZE], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(lse_row + s * stride_ls, mask=head_mask, other=float("-inf"),
                      cache_modifier=".cg")
        part = tl.load(part_rows + s * stride_ps, mask=head_mask[:, None], other=0.0,
                       cache_modifier=".cg")
        new_peak = tl.maximum(peak, lse)
        safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # no inf - inf
        alpha = tl.exp2(peak - safe)
        weight = tl.exp2(lse - safe)
        total = total * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * part
        peak = new_peak
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _sparse_attn_kernel(
        q_ptr, cache_ptr, topk_ptr, block_table_ptr, token_to_req_ptr, positions_ptr,
        token_mask_ptr, out_ptr, lse_ptr, k_scale_ptr, v_scale_ptr, final_ptr, counter_ptr,
        num_reqs, num_blocks, max_blocks, qk_scale,
        stride_qt, stride_qh,
        stride_blk, stride_kv, stride_tok, stride_head,
        stride_kg, stride_kt, stride_kk,
        stride_bt,
        stride_os, stride_ot, stride_oh,
        stride_ls, stride_lt, stride_fot, stride_foh,
        ks_head, ks_slot, vs_head, vs_slot,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr, CHUNK: tl.constexpr, DECODE_QUERY_LEN: tl.constexpr,
        HAS_TOKEN_MASK: tl.constexpr,
        HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr, FP16_COMPUTE: tl.constexpr,
        DOT_DTYPE: tl.constexpr):
    """Grid (num_tokens, num_kv_heads, NUM_SPLITS).

    DECODE_QUERY_LEN > 0: token t is query j = t % L of request t // L, at position
    seq_lens[r] - L + j (token_to_req_ptr holds seq_lens). 0: token_to_req / positions say it.
    HAS_TOKEN_MASK: a token whose mask entry is 0 is skipped (nothing read or written).
    NUM_SPLITS == 1 writes the output; otherwise out_ptr / lse_ptr are fp32 partials and the
    last split of a (token, KV head) to finish merges them into final_ptr: an int32 counter
    per (token, KV head) at counter_ptr, zero on entry, counts the arrivals and is left zero
    again. (One launch: a separate merge kernel costs about 2 us more per decode on an H100.)
    """
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_TOKEN_MASK:
        chosen = tl.load(token_mask_ptr + t) != 0
    else:
        chosen = tl.full([], 1, tl.int1)  # a constant: the branch below folds away
    if chosen:
        if DECODE_QUERY_LEN > 0:
            req = t // DECODE_QUERY_LEN
            pos = tl.load(token_to_req_ptr + req) - DECODE_QUERY_LEN + t % DECODE_QUERY_LEN
        else:
            req = tl.load(token_to_req_ptr + t)
            pos = tl.load(positions_ptr + t)
        req, limit = visible_blocks(req, pos, num_reqs, max_blocks, BLOCK_SIZE)

        offs_h = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_SIZE)
        offs_n = tl.arange(0, BLOCK_SIZE)
        head = kv_head * GROUP + offs_h
        head_mask = offs_h < GROUP
        t64 = t.to(tl.int64)
        q = tl.load(q_ptr + t64 * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=head_mask[:, None], other=0.0)
        row_scale = tl.full([GROUP_PAD], qk_scale, tl.float32)
        if FP16_COMPUTE:
            q, row_scale = fp16_rows(q, row_scale)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_SIZE], tl.float32)
        seen = tl.zeros([GROUP_PAD], tl.int32)  # the rows attend one key set: one flag
        row = topk_ptr + kv_head.to(tl.int64) * stride_kg + t64 * stride_kt
        head_base = cache_ptr + kv_head.to(tl.int64) * stride_head
        if TOPK <= 64:
            first = _first_occurrences(row, stride_kk, TOPK, TOPK_PAD)
        for i in range(CHUNK):
            j = split * CHUNK + i
            entry = tl.load(row + j * stride_kk, mask=j < TOPK, other=-1)
            # A repeated entry counts once: its later copies are dropped.
            if TOPK <= 64:  # (j past the row reads -1 anyway; the shift stays below 64)
                entry = tl.where(((first >> tl.minimum(j, 63)) & 1) != 0, entry, -1)
            else:
                entry = tl.where(_repeats_earlier(entry, row, j, stride_kk, TOPK), -1, entry)
            valid, block, page = entry_page(entry, limit, req, block_table_ptr, stride_bt,
                                             num_blocks)
            # Keys up to `pos` of a valid block (one comparison: the interpreter turns a
            # scalar & vector of bools into ints). A valid block holds key `pos` or older.
            key_mask = offs_n <= tl.where(valid, pos - block * BLOCK_SIZE, -1)
            seen = tl.maximum(seen, valid.to(tl.int32))
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q, head_base + page.to(tl.int64) * stride_blk,
                k_scale_ptr + kv_head * ks_head, v_scale_ptr + kv_head * vs_head, page,
                key_mask, key_mask[None, :], offs_n, offs_d, stride_tok, stride_kv, ks_slot,
                vs_slot, row_scale, BLOCK_SIZE, HAS_K_SCALE, HAS_V_SCALE, DOT_DTYPE)

        # No valid entry: the output is zeros and the partial's log-sum-exp is -inf; a
        # non-finite query row that attends a key: NaN (and a NaN log-sum-exp).
        attended = seen > 0
        out, l_i = finish_rows(acc, l_i, attended)
        tl.store(out_ptr + split * stride_os + t64 * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
        if NUM_SPLITS > 1:
            lse = tl.where(attended, m_i + tl.log2(l_i), float("-inf"))
            tl.store(lse_ptr + split * stride_ls + t64 * stride_lt + head, lse, mask=head_mask)
            # Every thread's partial stores happen before the release (a CTA barrier, then
            # one gpu-scope acq_rel atomic); the last arrival acquires them all.
            tl.debug_barrier()
            counter = counter_ptr + t64 * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                _merge_splits(out_ptr, lse_ptr, final_ptr, t64, kv_head, stride_os, stride_ot,
                              stride_oh, stride_ls, stride_lt, stride_fot, stride_foh, GROUP,
                              GROUP_PAD, HEAD_SIZE, NUM_SPLITS)
                tl.atomic_xchg(counter, 0)


@dataclasses.dataclass(frozen=True)
class TokenKernelConfig:
    """The token kernel's launch knobs (prefill rows and the split-K decode), in the spirit of
    JAX's `BlockSizes`.

    num_splits: programs per (token, KV head), each taking a chunk of the top-k row (None:
      from the shapes, `num_splits_for`, so a CUDA graph keeps one count per batch size).
    num_warps / num_stages: Triton's launch options.
    """

    num_splits: int | None = None
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES

    def __post_init__(self):
        check_knob(self, "num_splits", optional=True)
        check_knob(self, "num_warps")
        check_knob(self, "num_stages")

    @classmethod
    def get_default(cls) -> "TokenKernelConfig":
        """The tuned defaults: splits from the shapes, NUM_WARPS warps, NUM_STAGES stages."""
        return cls(num_splits=None, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def num_splits_for(num_tokens: int, num_kv_heads: int, topk: int) -> int:
    """Split-K count from shapes only (a power of two): more splits when few programs run."""
    target = max(1, min(topk, MAX_SPLITS, TARGET_PROGRAMS // max(1, num_tokens * num_kv_heads)))
    return 1 << (target.bit_length() - 1)


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 split-K arrival counters (at least `count`) for the current stream of
    `device`. The kernel leaves them zero, so they are allocated once and reused by every
    later launch on that stream, CUDA-graph captures included (a buffer first allocated
    during a capture is zeroed by that graph too). Launches on different streams never share
    counters; two CUDA graphs captured on one stream must not be replayed concurrently."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def launch_sparse_attention(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                            block_table: torch.Tensor, output: torch.Tensor, sm_scale: float, *,
                            token_to_req: torch.Tensor | None = None,
                            token_positions: torch.Tensor | None = None,
                            seq_lens: torch.Tensor | None = None, decode_query_len: int = 0,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None,
                            token_mask: torch.Tensor | None = None,
                            config: TokenKernelConfig | None = None,
                            num_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> None:
    """Run the kernels on inputs the front end has validated; writes `output` in place.

    query / output: [num_tokens, num_heads, head_size]; kv_cache: the logical view
    (num_blocks, 2, block_size, num_kv_heads, head_size), any strides with a unit head stride;
    topk: [num_kv_heads, >= num_tokens, topk]; block_table: [num_reqs, max_blocks].
    Token map: either token_to_req / token_positions ([num_tokens]) or, for a uniform decode,
    seq_lens ([num_reqs]) with decode_query_len >= 1. k_scale / v_scale: None, a 0-d or
    [num_kv_heads, num_blocks * block_size] float32 tensor (FP8 caches only). token_mask:
    optional bool [num_tokens]: only its True rows are attended and written (the dispatcher
    leaves the others to other paths). config: the launch knobs (None:
    `TokenKernelConfig.get_default()`); num_splits / num_warps / num_stages: override one of
    its fields (the benchmarks sweep them).
    """
    config = dataclasses.replace(
        config or TokenKernelConfig.get_default(),
        **{name: value for name, value in (("num_splits", num_splits), ("num_warps", num_warps),
                                           ("num_stages", num_stages)) if value is not None})
    num_tokens, num_heads, head_size = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    group_pad = group_rows(group)  # tl.dot needs M >= 16
    width = topk.shape[-1]
    splits = config.num_splits or num_splits_for(num_tokens, num_kv_heads, width)
    if decode_query_len:
        token_to_req = token_positions = seq_lens
        num_reqs = seq_lens.shape[0]
    else:
        num_reqs = block_table.shape[0]
    if splits == 1:
        part, lse = output, output
        part_strides = (0,) + output.stride()[:2]
        lse_strides = (0, 0)
    else:
        part = torch.empty((splits, num_tokens, num_heads, head_size), dtype=torch.float32,
                           device=query.device)
        lse = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32,
                          device=query.device)
        part_strides = part.stride()[:3]
        lse_strides = lse.stride()[:2]
    fp8 = kv_cache.element_size() == 1
    ks, ks_head, ks_slot = scale_args(k_scale, output)
    vs, vs_head, vs_slot = scale_args(v_scale, output)
    counters = output
    if splits > 1:
        counters = _arrival_counters(query.device, num_tokens * num_kv_heads)
    _sparse_attn_kernel[(num_tokens, num_kv_heads, splits)](
        query, kv_cache, topk, block_table, token_to_req, token_positions,
        output if token_mask is None else token_mask, part, lse, ks, vs, output, counters,
        num_reqs, num_blocks, block_table.shape[1], sm_scale * LOG2_E,
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        topk.stride(0), topk.stride(1), topk.stride(2),
        block_table.stride(0),
        *part_strides, *lse_strides, output.stride(0), output.stride(1),
        ks_head, ks_slot, vs_head, vs_slot,
        GROUP=group, GROUP_PAD=group_pad, HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size, TOPK=width, TOPK_PAD=triton.next_power_of_2(width),
        NUM_SPLITS=splits, CHUNK=triton.cdiv(width, splits),
        DECODE_QUERY_LEN=decode_query_len, HAS_TOKEN_MASK=token_mask is not None,
        HAS_K_SCALE=k_scale is not None,
        HAS_V_SCALE=v_scale is not None,
        FP16_COMPUTE=fp8,
        DOT_DTYPE=dot_dtype(query.dtype, fp8),
        num_warps=config.num_warps, num_stages=config.num_stages)
